"""The quantize job end to end on a small model: bpw on target, quality ordered by bpw, GPTQ ahead of
round-to-nearest, vision parts untouched, measurements reusable (ours and exllamav2's)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from calibration.render import bar_chart, table
from calibration.rows import CalibrationSpec
from pixtral.exl2.checkpoint import EXL2Checkpoint
from pixtral.image import encode_image
from pixtral.model import load_model
from pixtral.tokenizer import PixtralTokenizer
from pixtral.weights import Checkpoint
from quantize.gptq import rtn_quantize
from quantize.job import QuantizeConfig
from quantize.pipeline import run_quantize
from tests.support.synthetic import SyntheticSpec, write_random_model

QUANT_SPEC = SyntheticSpec(
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    vision_hidden_size=64,
    vision_intermediate_size=128,
    vision_heads=2,
    tokenizer="spm",
    seed=3,
)
TIERS = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
CALIBRATION = CalibrationSpec(rows=8, measure_rows=4, length=192, image_fraction=0.25)
BPW_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("src") / "model", QUANT_SPEC)


@pytest.fixture(scope="module")
def job(source: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("job") / "out"
    config = QuantizeConfig(source, out, TIERS, calibration=CALIBRATION, keep_work=True)
    return out, run_quantize(config)


def _prompts(tokenizer: PixtralTokenizer) -> list[tuple[list[int], list[np.ndarray]]]:
    """Held-out prompts: text questions, and questions about pictures not used in calibration."""
    texts = [
        "What is the capital of Norway?",
        "Write a haiku about rain.",
        "Explain recursion to a child.",
        "List three prime numbers.",
        "Translate 'good morning' into French.",
        "Why is the sky blue?",
        "def fib(n):",
        "Summarize the plot of Hamlet in one sentence.",
    ]
    prompts = [(tokenizer.encode_chat([{"role": "user", "content": t}]), []) for t in texts]
    rng = random.Random(1234)
    pictures = [bar_chart(rng), table(rng), bar_chart(rng)]
    pictures.append(
        type(pictures[0])(
            Image.fromarray(np.random.default_rng(5).integers(0, 255, (60, 90, 3), dtype=np.uint8)),
            "What is this?",
            "",
            "noise",
        )
    )
    for picture in pictures:
        tokens, pixels = encode_image(
            picture.image.resize((picture.image.width // 3, picture.image.height // 3)), tokenizer.image_ids
        )
        rows, cols = pixels.shape[1] // 16, pixels.shape[2] // 16
        ids = tokenizer.encode_chat(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": picture.question}]}],
            [(rows, cols)],
        )
        prompts.append((ids, [pixels]))
    return prompts


@torch.no_grad()
def _last_token_kl(reference: torch.nn.Module, model: torch.nn.Module, prompts) -> float:
    """Mean over prompts of KL(fp16 ‖ quantized) of the next-token distribution after the prompt."""
    total = 0.0
    for ids, pixels in prompts:
        images = [torch.from_numpy(p) for p in pixels]
        p_log = F.log_softmax(reference(torch.tensor([ids]), images)[0, -1], -1)
        q_log = F.log_softmax(model(torch.tensor([ids]), images)[0, -1], -1)
        total += float((p_log.exp() * (p_log - q_log)).sum())
    return total / len(prompts)


def test_every_tier_lands_on_its_target_bpw(job) -> None:
    out, results = job
    assert [r.target_bpw for r in results] == list(TIERS)
    for result in results:
        with EXL2Checkpoint(result.path) as ckpt:
            from_files = ckpt.decoder_bpw()  # the files alone, spec §3.2 accounting
        assert abs(from_files - result.target_bpw) <= BPW_TOLERANCE, result.name
        assert from_files == pytest.approx(result.bpw, abs=1e-9)
    assert (out / "measurement.json").is_file()


def test_vision_tower_and_projector_are_bit_identical(job, source: Path) -> None:
    _, results = job
    with Checkpoint(source) as src:
        names = [n for n in src.names() if n.startswith(("vision_tower.", "multi_modal_projector."))]
        assert len(names) > 10
        for result in results:
            with Checkpoint(result.path) as dst:
                for name in names:
                    assert src.dtype(name) == dst.dtype(name)
                    assert torch.equal(src.get(name).view(torch.int16), dst.get(name).view(torch.int16)), (
                        result.name,
                        name,
                    )


def test_heldout_error_falls_monotonically_with_bpw(job, source: Path) -> None:
    _, results = job
    tokenizer = PixtralTokenizer(source)
    prompts = _prompts(tokenizer)
    reference = load_model(source)
    text_kl = [_last_token_kl(reference, load_model(r.path), prompts[:8]) for r in results]
    image_kl = [_last_token_kl(reference, load_model(r.path), prompts[8:]) for r in results]
    for kls in (text_kl, image_kl):
        assert all(a > b for a, b in zip(kls, kls[1:])), kls
        assert kls[0] > 20 * kls[-1]
    # the job's own calibration KL tells the same story
    calibration = [r.calibration_kl for r in results]
    assert all(a > b for a, b in zip(calibration, calibration[1:])), calibration


def test_gptq_beats_round_to_nearest_at_the_same_bits(job, source: Path) -> None:
    _, results = job
    tokenizer = PixtralTokenizer(source)
    prompts = _prompts(tokenizer)
    reference = load_model(source)
    for result in results[:4]:  # 2.5 … 4.0 bpw, where rounding error matters
        gptq = load_model(result.path)
        rtn = load_model(source)
        with EXL2Checkpoint(result.path) as ckpt, Checkpoint(source) as src:
            for prefix in ckpt.layers:  # identical layouts, no error feedback, no act-order
                weight = rtn_quantize(src.get(prefix + ".weight").float(), ckpt.summary(prefix).plan).weight
                rtn.get_submodule(prefix).weight.data = weight
        kl_gptq, kl_rtn = _last_token_kl(reference, gptq, prompts), _last_token_kl(reference, rtn, prompts)
        assert kl_gptq < 0.75 * kl_rtn, (result.name, kl_gptq, kl_rtn)


def test_measurement_is_reused_without_measuring(job, source: Path, tmp_path: Path) -> None:
    out, results = job
    config = QuantizeConfig(
        source,
        tmp_path / "again",
        (4.0,),
        calibration=CALIBRATION,
        measurement=out / "measurement.json",
        keep_work=True,
    )
    (again,) = run_quantize(config)
    state = json.loads((tmp_path / "again" / ".work" / "job.json").read_text())
    assert state["timings"]["measure"] < 0.5  # skipped
    assert abs(again.bpw - 4.0) <= BPW_TOLERANCE
    same = next(r for r in results if r.target_bpw == 4.0)
    with EXL2Checkpoint(again.path) as a, EXL2Checkpoint(same.path) as b:
        assert [a.summary(p).plan for p in a.layers] == [b.summary(p).plan for p in b.layers]


def _exllamav2_measurement(source: Path) -> dict:
    """A measurement.json in exllamav2's own layout (per-block rows of QParams with an accuracy)."""

    def qp(bits: list[int], prop: list[float], gs: int) -> dict:
        return {"group_size": {str(b): gs for b in bits}, "bits": bits, "bits_prop": prop, "scale_bits": 4}

    rows = [
        (qp([3, 2], [0.1, 0.9], 32), 0.90),
        (qp([4, 3], [0.1, 0.9], 64), 0.95),
        (qp([4], [1.0], 128), 0.97),
        (qp([6, 5], [0.1, 0.9], 128), 0.99),
        (qp([8], [1.0], 128), 0.999),
    ]
    measurement = {}
    for layer in range(QUANT_SPEC.num_layers):
        prefix = f"language_model.model.layers.{layer}"
        measurement[f"{prefix}.self_attn"] = [
            {"accuracy": acc, "total_bits": 0, **{p: q for p in ("q_proj", "k_proj", "v_proj", "o_proj")}}
            for q, acc in rows
        ]
        measurement[f"{prefix}.mlp"] = [
            {"accuracy": acc, "total_bits": 0, **{p: q for p in ("gate_proj", "up_proj", "down_proj")}}
            for q, acc in rows
        ]
    measurement["language_model.model.norm.norm"] = None
    measurement["language_model.lm_head.linear"] = None
    return {"measurement": measurement, "last_module_idx": 2 * QUANT_SPEC.num_layers + 1}


def test_exllamav2_measurement_is_accepted(source: Path, tmp_path: Path) -> None:
    path = tmp_path / "exl2-measurement.json"
    path.write_text(json.dumps(_exllamav2_measurement(source)))
    config = QuantizeConfig(source, tmp_path / "out", (4.0,), calibration=CALIBRATION, measurement=path)
    (result,) = run_quantize(config)
    assert 3.9 <= result.bpw <= 4.0  # whole-block rows are coarse: close to the target, never above it
    with EXL2Checkpoint(result.path) as ckpt:
        widths = {
            bits for prefix in ckpt.layers if ".layers." in prefix for bits, _ in ckpt.summary(prefix).plan.groups
        }
    assert widths <= {2, 3, 4, 5, 6, 8} and len(widths) > 1
