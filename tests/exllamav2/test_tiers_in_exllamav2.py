"""exllamav2 0.3.2 itself loads every tier the quantizer writes and computes what the reference
backend computes; its attention is causal on the path our backend configures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pixtral.exl2.checkpoint import EXL2Checkpoint
from pixtral.prompt import Prompt, chat_prompt
from pixtral.tokenizer import PixtralTokenizer
from runtime.backends.exllamav2 import attention_path
from runtime.backends.reference import ReferenceBackend

QUESTION = [{"role": "user", "content": "What colour is the circle? Tell me about the shapes in the picture."}]


def _prompt(tier: Path) -> Prompt:
    return chat_prompt(PixtralTokenizer(tier), QUESTION)


def _load(ex: Any, tier: Path, configure: bool = True) -> Any:
    config = ex.ExLlamaV2Config(str(tier))
    config.max_seq_len = 256
    if configure:
        attention_path(config)
    model = ex.ExLlamaV2(config)
    model.load()
    return model


def _logits(ex: Any, model: Any, ids: torch.Tensor) -> torch.Tensor:
    cache = ex.ExLlamaV2Cache(model, max_seq_len=256)
    return model.forward(ids[None], cache).float()[0]


@pytest.mark.parametrize("name", ["2.5bpw", "4.0bpw", "6.0bpw", "4.0bpw-head8"])
def test_exllamav2_loads_the_tier_and_dequantizes_it_like_our_reader(exllamav2: Any, demo_tiers, name: str) -> None:
    _, tiers = demo_tiers
    model = _load(exllamav2, tiers[name])
    with EXL2Checkpoint(tiers[name]) as ckpt:
        widths = set()
        for prefix in ckpt.layers:
            theirs = model.modules_dict[prefix].get_weight_tensor_dq().cpu()  # [K, N]
            ours = ckpt.dequantized(prefix).T
            groups = ckpt.tensors(prefix)["q_groups"].tolist()
            widths |= set(groups[::2])
            if prefix.endswith("down_proj"):  # loaded with unmap=True: rows stay in storage order
                ours = ours[torch.argsort(ckpt.tensors(prefix)["q_invperm"].long())]
            if prefix.endswith(("gate_proj", "up_proj")):  # columns gathered by down_proj's permutation
                down = prefix.rsplit(".", 1)[0] + ".down_proj"
                ours = ours[:, torch.argsort(ckpt.tensors(down)["q_invperm"].long())]
            assert torch.equal(theirs, ours[:, : theirs.shape[1]]), prefix
    assert len(widths) >= 2, widths  # mixed-width groups were exercised
    model.unload()


@pytest.mark.parametrize("name", ["2.5bpw", "4.0bpw", "4.0bpw-head8"])
def test_exllamav2_logits_equal_the_reference_backend(exllamav2: Any, demo_tiers, name: str) -> None:
    _, tiers = demo_tiers
    prompt = _prompt(tiers[name])
    model = _load(exllamav2, tiers[name])
    theirs = _logits(exllamav2, model, torch.tensor(prompt.token_ids))
    ours = ReferenceBackend(tiers[name], "cpu").logits(prompt)
    log_p, log_q = torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    assert kl < 1e-4, kl  # fp16 activations (exllamav2) against fp32 (reference), same weights
    assert float((theirs.argmax(-1) == ours.argmax(-1)).float().mean()) >= 0.95
    model.unload()


def test_prefill_is_causal_on_the_path_the_backend_configures(exllamav2: Any, demo_tiers) -> None:
    """Logits at early positions must not change when later tokens are appended. exllamav2's SDPA
    branch breaks that (no mask for plain causal prompts); the path attention_path picks keeps it."""
    _, tiers = demo_tiers
    ids = torch.tensor(_prompt(tiers["4.0bpw"]).token_ids)
    short = 8

    def drift(model: Any) -> float:
        return float((_logits(exllamav2, model, ids)[:short] - _logits(exllamav2, model, ids[:short])).abs().max())

    ours = _load(exllamav2, tiers["4.0bpw"])
    assert drift(ours) < 1e-2
    ours.unload()
    sdpa = _load(exllamav2, tiers["4.0bpw"], configure=False)  # exllamav2's default without flash-attn
    assert drift(sdpa) > 0.5  # the defect this path avoids (so this test can fail)
    sdpa.unload()
