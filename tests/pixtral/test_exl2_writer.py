"""EXL2 checkpoints: written streamed and atomically, read back validated, fp16 parts bit-identical."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import quantize_fixed
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli import app
from pixtral.exl2.checkpoint import EXL2Checkpoint
from pixtral.exl2.format import FormatError
from pixtral.model import load_model
from pixtral.weights import Checkpoint, WeightsError


@pytest.fixture(scope="module")
def exl2_pair(tiny_spm_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    out = tmp_path_factory.mktemp("exl2") / "tiny-4.0bpw"
    results = quantize_fixed(tiny_spm_model, out, shard_mb=1)
    return tiny_spm_model, out, results


def test_layout_and_side_files(exl2_pair) -> None:
    source, out, _ = exl2_pair
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and all(p.name.startswith("output-") and "-of-" in p.name for p in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for name in ["tokenizer.json", "chat_template.json", "preprocessor_config.json", "generation_config.json"]:
        assert (out / name).read_bytes() == (source / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "exl2"
    assert not list(out.parent.glob(".*tmp*"))


def test_unquantized_tensors_are_bit_identical(exl2_pair) -> None:
    source, out, results = exl2_pair
    with Checkpoint(source) as src, Checkpoint(out) as dst:
        copied = [n for n in src.names() if n.rpartition(".")[0] not in results]
        assert any(n.startswith("vision_tower.") for n in copied) and any(
            n.startswith("multi_modal_projector.") for n in copied
        )
        for name in copied:
            assert src.dtype(name) == dst.dtype(name)
            a, b = src.get(name), dst.get(name)
            assert torch.equal(a.view(torch.uint8) if a.dtype != torch.bool else a, b.view(torch.uint8)), name
        assert not [n for n in dst.names() if n.endswith(".weight") and n.rpartition(".")[0] in results]


def test_reader_dequantizes_what_the_quantizer_computed(exl2_pair) -> None:
    _, out, results = exl2_pair
    with EXL2Checkpoint(out) as ckpt:
        assert set(ckpt.layers) == set(results)
        for prefix, result in results.items():
            weight = ckpt.dequantized(prefix)
            assert weight.dtype == torch.float16
            assert torch.equal(weight[: result.weight.shape[0]].float(), result.weight), prefix
            summary = ckpt.summary(prefix)
            assert summary.plan.groups[0][0] == (6 if prefix.endswith("lm_head") else 4)
        # spec §3.2 by hand: codes + (q_scale_max + q_groups) per group + 4-bit scales + q_invperm
        shapes = [(r.weight.shape[1], r.weight.shape[0]) for p, r in results.items() if ".layers." in p]
        bits = sum(K * N * 4 + K // 32 * 48 + K // 32 * N * 4 + K * 32 for K, N in shapes)
        assert ckpt.decoder_bpw() == pytest.approx(bits / sum(K * N for K, N in shapes), rel=1e-12)


def test_exl2_model_runs_on_cpu_close_to_fp16(exl2_pair) -> None:
    source, out, _ = exl2_pair
    ids = torch.tensor([[1, 3, 1500, 2500, 4]])
    ref, quant = load_model(source)(ids), load_model(out)(ids)
    assert torch.isfinite(quant).all()
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), quant.flatten(), dim=0)
    assert cos > 0.98


def _broken_copy(out: Path, tmp_path: Path, edit) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    for shard in broken.glob("output-*.safetensors"):
        tensors = load_file(shard)
        if edit(tensors):
            save_file(tensors, str(shard))
    return broken


LAYER = "language_model.model.layers.1.mlp.down_proj"


@pytest.mark.parametrize(
    "edit,error",
    [
        (lambda t: t.pop(f"{LAYER}.q_invperm", None) is not None, f"{LAYER}.q_invperm is missing"),
        (
            lambda t: (
                f"{LAYER}.q_groups" in t and t.update({f"{LAYER}.q_groups": t[f"{LAYER}.q_groups"].int()}) is None
            ),
            f"{LAYER}.q_groups is I32, expected I16",
        ),
        (
            lambda t: (
                f"{LAYER}.q_groups" in t
                and t.update({f"{LAYER}.q_groups": torch.tensor([4, 0, 4, 5], dtype=torch.int16)}) is None
            ),
            f"{LAYER}.q_groups: group",
        ),
        (
            lambda t: (
                f"{LAYER}.q_scale_max" in t
                and t.update({f"{LAYER}.q_scale_max": t[f"{LAYER}.q_scale_max"].float()}) is None
            ),
            f"{LAYER}.q_scale_max is F32, expected F16",
        ),
    ],
)
def test_corrupt_layers_are_named(exl2_pair, tmp_path: Path, edit, error: str) -> None:
    broken = _broken_copy(exl2_pair[1], tmp_path, edit)
    with pytest.raises(FormatError, match=error.replace(".", r"\.").replace("[", r"\[")):
        with EXL2Checkpoint(broken) as ckpt:
            ckpt.dequantized(LAYER)


def test_truncated_shard_is_named(exl2_pair, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(exl2_pair[1], broken)
    shard = sorted(broken.glob("output-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(WeightsError, match=f"{shard.name}: truncated"):
        EXL2Checkpoint(broken)


def test_failed_write_leaves_nothing(tiny_model: Path, tmp_path: Path) -> None:
    from pixtral.exl2.metadata import EXL2Metadata
    from pixtral.exl2.writer import write_exl2_checkpoint

    def explode(prefix: str) -> dict:
        raise RuntimeError("boom")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        write_exl2_checkpoint(out, tiny_model, ["language_model.lm_head"], explode, EXL2Metadata(bits=4.0))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_inspect_cli(exl2_pair) -> None:
    _, out, results = exl2_pair
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["layers"]) == len(results)
    assert report["kept_unquantized"]["vision tower"]["tensors"] > 0
    assert report["head_bpw"] > 6
    table = runner.invoke(app, ["inspect", str(out)])
    assert table.exit_code == 0 and "decoder bpw" in table.output and "lm_head" in table.output
    bad = runner.invoke(app, ["inspect", str(out / "nope")])
    assert bad.exit_code == 2 and "config.json" in bad.output


def test_reads_exllamav2_style_output_with_stale_index(exl2_pair, tmp_path: Path) -> None:
    """exllamav2 writes output.safetensors (one shard, no index) and `-cf` copies the source's index."""
    out = tmp_path / "exllamav2-style"
    shutil.copytree(exl2_pair[1], out)
    tensors = {}
    for shard in sorted(out.glob("output-*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    save_file(tensors, str(out / "output.safetensors"))
    shutil.copy(exl2_pair[0] / "model.safetensors.index.json", out / "model.safetensors.index.json")  # stale
    with EXL2Checkpoint(out) as ckpt, EXL2Checkpoint(exl2_pair[1]) as ours:
        assert ckpt.layers == ours.layers
        assert torch.equal(ckpt.dequantized(LAYER), ours.dequantized(LAYER))


def test_bias_is_packed_padded_fp16() -> None:
    from pixtral.exl2.checkpoint import validate_layer
    from quantize.candidates import make_plan
    from quantize.gptq import pack_exl2, rtn_quantize

    plan = make_plan(64, 4, 4, 64)
    tensors = pack_exl2(rtn_quantize(torch.randn(40, 64), plan), plan, bias=torch.arange(40.0))
    assert tensors["bias"].dtype == torch.float16 and tensors["bias"].shape == (64,)
    assert torch.equal(tensors["bias"][40:], torch.zeros(24, dtype=torch.float16))
    assert validate_layer("x", tensors) == plan
