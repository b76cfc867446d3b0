"""Running quantized tiers written by our quantizer on the reference backend (CPU, fp32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibration.rows import CalibrationSpec
from pixtral.prompt import prepare_image
from pixtral.tokenizer import PixtralTokenizer
from quantize.job import QuantizeConfig
from quantize.pipeline import run_quantize
from runtime.backends.reference import ReferenceBackend
from runtime.engine import Engine, GenerationParams
from runtime.sampling import SamplingParams

# 8.0 bpw: every weight (head too) on a 256-level grid per 128-row group, scales on a 16-level grid;
# the weight error stays below ~0.4 % of each group's largest weight. Through two layers and the head,
# logits move by a few percent of their spread: the distributions agree (KL ~1e-4) and no clear
# argmax flips. The bounds leave ~5x headroom over what this model shows (KL 1.2e-4, |Δ| 0.10·std).
MAX_MEAN_KL, MAX_KL, MIN_TOP1, MAX_DIFF_OF_STD = 1e-3, 5e-3, 0.95, 0.25


@pytest.fixture(scope="module")
def tiers(tiny_spm_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiers") / "exl2"
    calibration = CalibrationSpec(rows=4, measure_rows=2, length=64, image_fraction=0.5)
    run_quantize(QuantizeConfig(tiny_spm_model, out, (4.0, 8.0), head_bits=8, calibration=calibration))
    return out


def _prompt(engine: Engine):
    picture = prepare_image(Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)))
    text = "The quick brown fox jumps over the lazy dog and then writes a long story about it."
    return engine.chat_prompt(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], [picture]
    )


def _compare(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    log_p, log_q = torch.log_softmax(reference, -1), torch.log_softmax(logits, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1": float((reference.argmax(-1) == logits.argmax(-1)).float().mean()),
        "diff_of_std": float((reference - logits).abs().max() / reference.std()),
    }


def test_the_8bpw_tier_gives_the_fp16_models_logits(tiny_spm_model: Path, tiers: Path) -> None:
    source = ReferenceBackend(tiny_spm_model, "cpu")
    prompt = _prompt(Engine(source, PixtralTokenizer(tiny_spm_model)))
    fp16 = source.logits(prompt)
    eight = _compare(fp16, ReferenceBackend(tiers / "8.0bpw", "cpu").logits(prompt))
    four = _compare(fp16, ReferenceBackend(tiers / "4.0bpw", "cpu").logits(prompt))
    assert eight["mean_kl"] <= MAX_MEAN_KL and eight["max_kl"] <= MAX_KL, eight
    assert eight["top1"] >= MIN_TOP1 and eight["diff_of_std"] <= MAX_DIFF_OF_STD, eight
    assert four["mean_kl"] > 10 * eight["mean_kl"]  # the comparison can tell tiers apart


def test_generation_from_a_quantized_tier(tiers: Path) -> None:
    tier = tiers / "4.0bpw"
    engine = Engine(ReferenceBackend(tier, "cpu"), PixtralTokenizer(tier))
    prompt = _prompt(engine)
    params = GenerationParams(max_new_tokens=12, sampling=SamplingParams(temperature=0.8, seed=3), ignore_eos=True)
    out = engine.generate(prompt, params)
    assert out.usage.completion_tokens == 12 and out.usage.images_encoded == 1 and out.text
    assert "".join(c.text for c in engine.stream(prompt, params)) == out.text
