"""`pixtral-exl2 chat` scripted through stdin, as a user pipes a file of commands and messages."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def _chat(model: Path, script: list[str], *flags: str):
    args = [
        "chat",
        str(model),
        "--backend",
        "reference",
        "--device",
        "cpu",
        "--temperature",
        "0",
        "--max-tokens",
        "6",
        *flags,
    ]
    return runner.invoke(app, args, input="\n".join(script) + "\n")


def test_a_scripted_conversation_with_images_save_and_load(tiny_model: Path, tmp_path: Path) -> None:
    picture = tmp_path / "red.png"
    Image.new("RGB", (48, 32), "red").save(picture)
    saved = tmp_path / "chat.json"
    script = [
        "/system Answer briefly.",
        f"/image {picture}",
        "What colour is this?",
        "And its shape?",
        f"/save {saved}",
        "/reset",
        f"/load {saved}",
        "One more question.",
        "/exit",
        "never sent",
    ]
    result = _chat(tiny_model, script)
    assert result.exit_code == 0, result.output
    assert result.output.count("model>") == 3 and "Traceback" not in result.output
    assert "attached" in result.output and "3×2 patches" in result.output
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"][0] == {"type": "image_url", "image_url": {"url": picture.resolve().as_uri()}}
    last_stats = [line for line in result.output.splitlines() if "prompt tokens" in line][-1]
    assert "(0 cached)" not in last_stats  # after /load the earlier turns come from the cache


def test_errors_keep_the_chat_running(tiny_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    script = [
        f"/image {tmp_path / 'missing.png'}",
        f"/image {broken}",
        "/frobnicate",
        f"/load {tmp_path / 'nothing.json'}",
        "word " * 60,
        "Still there?",
    ]
    result = _chat(tiny_model, script, "--context", "48")
    assert result.exit_code == 0, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 5, result.output
    assert "missing.png" in errors[0] and "not a readable image" in errors[1] and "unknown command" in errors[2]
    assert "the context holds 48" in errors[4]
    assert result.output.count("model>") == 1  # the over-long message got no reply; the last one did


def test_chat_on_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    result = runner.invoke(app, ["chat", str(tmp_path), "--backend", "reference"], input="hi\n")
    assert result.exit_code == 2 and "not found" in result.output and "Traceback" not in result.output
