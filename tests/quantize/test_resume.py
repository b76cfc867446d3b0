"""A job killed (SIGKILL-like `os._exit`) mid-measurement and mid-quantization, then resumed, writes
byte-identical output to an uninterrupted run; finished tiers are never rewritten."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from calibration.rows import CalibrationSpec
from cli import app
from pixtral.text import DECODER_LINEARS
from quantize.job import QuantizeConfig, load_state
from quantize.pipeline import run_quantize
from tests.support.synthetic import SyntheticSpec, write_random_model

SPEC = SyntheticSpec(hidden_size=64, intermediate_size=128, num_layers=3, tokenizer="spm", seed=11)
TIERS = (3.0, 4.0, 6.0)
CALIBRATION = CalibrationSpec(rows=6, measure_rows=3, length=128, image_fraction=0.34)
REPO = Path(__file__).parents[2]


def _config(source: Path, out: Path, resume: bool = False) -> QuantizeConfig:
    return QuantizeConfig(source, out, TIERS, calibration=CALIBRATION, resume=resume)


def _run_and_die(source: Path, out: Path, stage: str, at: int, resume: bool) -> int:
    """Run the job in a child process that kills itself (no cleanup) at the `at`-th `stage` event."""
    code = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from calibration.rows import CalibrationSpec
        from quantize.job import QuantizeConfig
        from quantize.pipeline import run_quantize
        calibration = CalibrationSpec(**{CALIBRATION.__dict__!r})
        config = QuantizeConfig(Path({str(source)!r}), Path({str(out)!r}), {TIERS!r}, calibration=calibration,
                                resume={resume!r})
        def die(event):
            if event.stage == {stage!r} and event.done == {at}:
                os._exit(9)
        run_quantize(config, die)
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode


def _tree(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and ".work" not in p.parts)


@pytest.mark.slow
def test_kill_and_resume_is_byte_identical(tmp_path: Path) -> None:
    source = write_random_model(tmp_path / "model", SPEC)
    reference = tmp_path / "reference"
    run_quantize(_config(source, reference))

    out = tmp_path / "resumed"
    linears_per_layer = len(DECODER_LINEARS)  # measure reports each linear's anchors as they finish
    assert _run_and_die(source, out, "measure", linears_per_layer + 2, resume=False) == 9  # inside layer 2
    state = load_state(out / ".work")
    assert state is not None and state.stage.value == "measure" and state.blocks_done == 2  # layer 1's two blocks
    assert _run_and_die(source, out, "quantize", 4, resume=True) == 9  # layer 1's MLP block, after its first tier
    state = load_state(out / ".work")
    assert state.stage.value == "quantize" and state.blocks_done == 1
    assert not any((out / t).exists() for t in ("3.0bpw", "4.0bpw", "6.0bpw"))
    run_quantize(_config(source, out, resume=True))

    assert _tree(out) == _tree(reference)
    mismatch = [str(p) for p in _tree(reference) if not filecmp.cmp(reference / p, out / p, shallow=False)]
    assert mismatch == []


def test_finished_tiers_are_kept_and_existing_output_refused(tmp_path: Path) -> None:
    source = write_random_model(tmp_path / "model", SyntheticSpec(tokenizer="spm", seed=12))
    out = tmp_path / "out"
    small = CalibrationSpec(rows=4, measure_rows=2, length=96, image_fraction=0.0)
    config = QuantizeConfig(source, out, (4.0,), calibration=small)
    run_quantize(config)
    shard = next((out / "4.0bpw").glob("output-*.safetensors"))
    before = shard.stat().st_mtime_ns

    runner = CliRunner()
    args = [
        "quantize",
        str(source),
        str(out),
        "--bpw",
        "4.0",
        "--rows",
        "4",
        "--measure-rows",
        "2",
        "--length",
        "96",
        "--text-only",
    ]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "already exists" in refused.output
    resumed = runner.invoke(app, args + ["--resume"])  # nothing left to do for a finished tier
    assert resumed.exit_code == 0, resumed.output
    assert shard.stat().st_mtime_ns == before
    forced = runner.invoke(app, args + ["--force"])
    assert forced.exit_code == 0, forced.output
    assert next((out / "4.0bpw").glob("output-*.safetensors")).stat().st_mtime_ns != before


def test_resume_after_a_stop_before_the_first_save_point_starts_again(tmp_path: Path) -> None:
    """A job stopped after creating its work folder but before saving its job file (the stop message
    says --resume): --resume runs the job from the start; a folder without .work is still refused."""
    source = write_random_model(tmp_path / "model", SyntheticSpec(tokenizer="spm", seed=12))
    args = ["--bpw", "4.0", "--rows", "4", "--measure-rows", "2", "--length", "96", "--text-only", "--resume"]
    stray = tmp_path / "stray"
    stray.mkdir()
    refused = CliRunner().invoke(app, ["quantize", str(source), str(stray), *args])
    assert refused.exit_code == 2 and "no unfinished quantize job" in refused.output, refused.output
    out = tmp_path / "out"
    (out / ".work").mkdir(parents=True)  # as the job leaves it when stopped before its first save point
    resumed = CliRunner().invoke(app, ["quantize", str(source), str(out), *args])
    assert resumed.exit_code == 0, resumed.output
    assert (out / "4.0bpw" / "config.json").is_file() and not (out / ".work").exists()
