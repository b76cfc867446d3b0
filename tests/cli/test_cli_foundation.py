"""The console command as a user runs it: demo-model, info, and failures that exit non-zero."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from cli import app
from pixtral.config import load_config
from runtime.demo.model import DEMO_SPEC

runner = CliRunner()


def test_demo_model_then_info(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo-model", str(out)])
    assert result.exit_code == 0, result.output
    cfg = load_config(out)
    assert cfg.text.num_hidden_layers == DEMO_SPEC.num_layers and cfg.text.vocab_size == 32768
    for name in ["tokenizer.json", "chat_template.json", "preprocessor_config.json", "generation_config.json"]:
        assert (out / name).is_file(), name
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert "[IMG_BREAK] 14" in info.output

    again = runner.invoke(app, ["demo-model", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    assert not list(tmp_path.glob(".demo.tmp*"))


def test_info_on_a_non_pixtral_dir_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2
    assert "LlavaForConditionalGeneration" in result.output


def test_console_script_help() -> None:
    result = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "demo-model" in result.stdout
