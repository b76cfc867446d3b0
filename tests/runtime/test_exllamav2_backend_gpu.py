"""The exllamav2 backend against the reference backend on the same tier (the oracle), on a GPU.

Skipped without CUDA. `bench/gpu_check.sh` runs these with every other gpu test; with
PIXTRAL_GPU_OUT set, the measured agreement is written to $PIXTRAL_GPU_OUT/backend_agreement.json.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixtral.prompt import prepare_image
from pixtral.tokenizer import PixtralTokenizer
from runtime.backends.reference import ReferenceBackend
from runtime.engine import Engine, GenerationParams
from runtime.sampling import SamplingParams
from tests.support.synthetic import SyntheticSpec, write_random_model
from tests.support.uniform import write_uniform_tier

pytestmark = pytest.mark.gpu

SPEC = SyntheticSpec(
    hidden_size=512,
    intermediate_size=1536,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    vision_hidden_size=128,
    vision_intermediate_size=256,
    vision_heads=2,
    tokenizer="spm",
    seed=21,
)
GREEDY = GenerationParams(max_new_tokens=16, sampling=SamplingParams(temperature=0.0), ignore_eos=True)


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpu-backend")
    source = write_random_model(root / "fp16", SPEC)
    write_uniform_tier(source, root / "exl2", bits=6, head_bits=8, group_rows=128)
    return root / "exl2"


@pytest.fixture(scope="module")
def engines(tier: Path):
    from runtime.backends.exllamav2 import ExLlamaV2Backend

    tokenizer = PixtralTokenizer(tier)
    ex = ExLlamaV2Backend(tier, max_seq_len=2048)
    yield Engine(ex, tokenizer), Engine(ReferenceBackend(tier, "cuda", torch.float32), tokenizer)
    ex.close()


def _pictures() -> list:
    rng = np.random.default_rng(0)
    return [
        prepare_image(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))) for h, w in ((64, 96), (80, 48))
    ]


def _prompts(engine: Engine) -> dict:
    text = [{"role": "user", "content": "Tell me about the history of lighthouses in a few sentences."}]
    pictures = _pictures()
    images = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Compare"},
                {"type": "image"},
                {"type": "text", "text": "these two pictures."},
            ],
        }
    ]
    return {"text": engine.chat_prompt(text), "two_images": engine.chat_prompt(images, pictures)}


def test_logits_agree_with_the_reference_backend(engines) -> None:
    ex, ref = engines
    report = {}
    for name, prompt in _prompts(ref).items():
        theirs, ours = ex.backend.logits(prompt), ref.backend.logits(prompt)
        report[name] = {
            "positions": len(prompt),
            "top1_agreement": float((theirs.argmax(-1) == ours.argmax(-1)).float().mean()),
            "max_abs_diff": float((theirs - ours).abs().max()),
            "logit_std": float(ours.std()),
            "cosine": float(torch.nn.functional.cosine_similarity(theirs.flatten(), ours.flatten(), dim=0)),
        }
    out = os.environ.get("PIXTRAL_GPU_OUT")
    if out:
        Path(out, "backend_agreement.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, row in report.items():  # fp16 activations (exllamav2) against fp32 (reference): same weights
        assert row["cosine"] > 0.999 and row["top1_agreement"] >= 0.95, (name, row)


def test_greedy_generation_agrees(engines) -> None:
    ex, ref = engines
    to_the_end = GenerationParams(max_new_tokens=16, sampling=SamplingParams(temperature=0.0))  # the stop token counts
    for prompt in _prompts(ref).values():
        a, b = ex.generate(prompt, to_the_end), ref.generate(prompt, to_the_end)
        agree = sum(x == y for x, y in zip(a.token_ids, b.token_ids))
        # paths may part after a near-tie, not at once
        assert agree >= min(4, len(b.token_ids)), (a.token_ids, b.token_ids)
        if a.token_ids == b.token_ids:
            assert (a.finish_reason, a.usage.completion_tokens) == (b.finish_reason, b.usage.completion_tokens)


def test_a_follow_up_turn_hits_the_prefix_cache(engines) -> None:
    ex, _ = engines
    pictures = _pictures()[:1]
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    first = ex.generate(ex.chat_prompt(turn, pictures), GREEDY)
    follow = turn + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Say more."}]
    second = ex.generate(ex.chat_prompt(follow, pictures), GREEDY)
    assert second.usage.images_encoded == 0 and second.usage.cached_tokens > 0


def test_concurrent_requests_run_as_batched_jobs(engines) -> None:
    ex, _ = engines
    prompts = list(_prompts(ex).values()) * 2
    outputs: list = [None] * len(prompts)

    def run(i: int) -> None:
        outputs[i] = ex.generate(prompts[i], GREEDY)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert all(o is not None and o.usage.completion_tokens == 16 for o in outputs)
    assert outputs[0].token_ids == outputs[2].token_ids  # same prompt, same greedy reply, batched or not


def test_our_tier_loads_in_exllamav2s_own_vision_tower(tier: Path) -> None:
    """The path TabbyAPI's EXL2 branch uses: exllamav2's vision tower on our files, without error."""
    from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer, ExLlamaV2VisionTower

    config = ExLlamaV2Config(str(tier))
    config.max_seq_len = 2048
    vision = ExLlamaV2VisionTower(config)
    vision.load()
    model = ExLlamaV2(config)
    model.load()
    embedding = vision.get_image_embeddings(model, ExLlamaV2Tokenizer(config), Image.new("RGB", (96, 64), "red"))
    assert embedding.embeddings.shape[-1] == SPEC.hidden_size
