"""exllamav2 0.3.2 itself (the oracle) loads our EXL2 files. Needs CUDA: skipped elsewhere.

Run on a GPU machine: `python -m pytest -m gpu`. exllamav2 compiles its extension on first import.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import quantize_fixed

from pixtral.exl2.checkpoint import EXL2Checkpoint
from pixtral.model import load_model
from tests.support.synthetic import SyntheticSpec, write_random_model

pytestmark = pytest.mark.gpu

# kernel-friendly sizes (multiples of 128, head_dim 64), still small
GPU_SPEC = SyntheticSpec(
    hidden_size=256,
    intermediate_size=768,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    vision_hidden_size=128,
    vision_intermediate_size=256,
    vision_heads=2,
    tokenizer="spm",
    seed=5,
)


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpu")
    source = write_random_model(root / "fp16", GPU_SPEC)
    quantize_fixed(source, root / "exl2", bits=4, head_bits=6)
    return root / "exl2"


def _exllamav2_model(model_dir: Path):
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    config = ExLlamaV2Config(str(model_dir))
    config.max_seq_len = 256
    config.max_input_len = 256
    config.max_attention_size = 256**2
    model = ExLlamaV2(config)
    model.load()
    return model


def test_exllamav2_dequantizes_every_layer_like_our_reader(gpu_checkpoint: Path) -> None:
    model = _exllamav2_model(gpu_checkpoint)
    with EXL2Checkpoint(gpu_checkpoint) as ckpt:
        for prefix in ckpt.layers:
            theirs = model.modules_dict[prefix].get_weight_tensor_dq().cpu()  # [K, N]
            ours = ckpt.dequantized(prefix).T  # [K, N']
            if prefix.endswith("down_proj"):
                # loaded with unmap=True: rows stay in storage order
                ours = ours[torch.argsort(ckpt.tensors(prefix)["q_invperm"].long())]
            if prefix.endswith(("gate_proj", "up_proj")):
                # columns gathered by down_proj's permutation at load time (spec §2.7)
                down = prefix.rsplit(".", 1)[0] + ".down_proj"
                ours = ours[:, torch.argsort(ckpt.tensors(down)["q_invperm"].long())]
            assert torch.equal(theirs, ours[:, : theirs.shape[1]]), prefix


def test_exllamav2_logits_match_cpu_reference(gpu_checkpoint: Path) -> None:
    model = _exllamav2_model(gpu_checkpoint)
    ids = torch.tensor([[1, 3, 1000, 2000, 3000, 4000, 4]])
    theirs = model.forward(ids.cuda()).float().cpu()
    ours = load_model(gpu_checkpoint, dtype=torch.float32)(ids).detach()
    # fp16 activations on the GPU vs fp32 on the CPU: same weights, close logits, same argmax
    cos = torch.nn.functional.cosine_similarity(theirs.flatten(), ours.flatten(), dim=0)
    assert cos > 0.999
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
