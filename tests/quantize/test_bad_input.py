"""Bad input to `pixtral-exl2 quantize` fails before any long work, clearly, and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli import app

runner = CliRunner()
FAST = ["--bpw", "4.0", "--rows", "4", "--measure-rows", "2", "--length", "96", "--text-only"]


def _copy(model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / "model"))


def _edit_tensor(model_dir: Path, name: str, edit) -> None:
    for shard in model_dir.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name] = edit(tensors[name])
            save_file(tensors, str(shard))
            return
    raise AssertionError(name)


def _quantize(model_dir: Path, out: Path, *extra: str):
    return runner.invoke(app, ["quantize", str(model_dir), str(out), *FAST, *extra])


def test_not_a_pixtral_directory(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    result = _quantize(tmp_path / "model", tmp_path / "out")
    assert result.exit_code == 2 and "LlavaForConditionalGeneration" in result.output
    assert not (tmp_path / "out").exists()


def test_mixed_bf16_and_fp32(tiny_model: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model, tmp_path)
    _edit_tensor(model, "language_model.model.layers.0.mlp.up_proj.weight", lambda t: t.float())
    result = _quantize(model, tmp_path / "out")
    assert result.exit_code == 2 and "mixed float dtypes" in result.output and "F32" in result.output
    assert not (tmp_path / "out").exists()


def test_nan_weights(tiny_model: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model, tmp_path)

    def poison(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[3, 5] = float("nan")
        return t

    _edit_tensor(model, "language_model.model.layers.1.self_attn.v_proj.weight", poison)
    result = _quantize(model, tmp_path / "out")
    assert result.exit_code == 2 and "layers.1.self_attn.v_proj.weight contains NaN" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text,message",
    [("   \n", "calib.txt: no calibration text"), ("Only a few words of text here.", "calibration text ran out")],
)
def test_empty_or_too_short_calibration_text(tiny_model: Path, tmp_path: Path, text: str, message: str) -> None:
    source = tmp_path / "calib.txt"
    source.write_text(text)
    result = _quantize(tiny_model, tmp_path / "out", "--calibration-text", str(source))
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def test_existing_output_directory(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    result = _quantize(tiny_model, tmp_path / "out")
    assert result.exit_code == 2 and "already exists" in result.output
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "flags,message",
    [(["--bpw", "1.5"], "outside what EXL2 reaches"), (["--bpw", "9"], "outside what EXL2 reaches"),
     (["--head-bits", "7"], "--head-bits: expected one of"), (["--bpw", "four"], "expected numbers"),
     (["--recipe", "nope"], "recipe 'nope' not found")],
)  # fmt: skip
def test_impossible_settings(tiny_model: Path, tmp_path: Path, flags: list[str], message: str) -> None:
    result = runner.invoke(app, ["quantize", str(tiny_model), str(tmp_path / "out"), *flags])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def test_measurement_of_another_model(tiny_model: Path, tiny_spm_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"format": "pixtral-exl2-measurement", "version": 1, "linears": {}}))
    result = _quantize(tiny_model, tmp_path / "out", "--measurement", str(path))
    assert result.exit_code == 2 and "no measurement for language_model.model.layers.0" in result.output
    assert not (tmp_path / "out").exists()
