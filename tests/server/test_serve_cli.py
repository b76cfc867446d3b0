"""`pixtral-exl2 serve` before it serves: the sample config, config errors, keys, bad model paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from runtime.server.auth import load_or_create_keys
from runtime.server.config import ServerConfig, ServerConfigError, load_server_config, with_overrides

runner = CliRunner()


def test_the_sample_config_is_the_defaults(tmp_path: Path) -> None:
    out = tmp_path / "config.yml"
    result = runner.invoke(app, ["serve", "--write-config", str(out)])
    assert result.exit_code == 0, result.output
    assert load_server_config(out) == ServerConfig()  # the shipped sample documents exactly the defaults
    again = runner.invoke(app, ["serve", "--write-config", str(out)])
    # serve has no --force
    assert again.exit_code == 2 and "already exists" in again.output and "--force" not in again.output


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("network:\n  prot: 5000\n", "prot"),
        ("modle:\n  x: 1\n", "modle"),
        ("network:\n  port: 70000\n", "network.port"),
        ("network: [1, 2]\n", "mapping"),
        ("{unbalanced", "not valid YAML"),
    ],
)
def test_config_errors_name_the_option(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "config.yml"
    path.write_text(text)
    with pytest.raises(ServerConfigError, match=needle):
        load_server_config(path)
    result = runner.invoke(app, ["serve", "--config", str(path)])
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text("network:\n  port: 6000\n  host: 0.0.0.0\nmodel:\n  backend: exllamav2\n")
    config = with_overrides(
        load_server_config(path), network__port=7000, model__backend="reference", network__host=None
    )
    assert (config.network.port, config.network.host, config.model.backend) == (7000, "0.0.0.0", "reference")


def test_keys_are_generated_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.yml"
    keys, created = load_or_create_keys(path)
    assert created and len(keys.api_key) == 32 and keys.api_key != keys.admin_key
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_or_create_keys(path) == (keys, False)
    assert (
        keys.permission([keys.admin_key]) == "admin"
        and keys.permission(["x", keys.api_key]) == "api"
        and keys.permission(["x"]) is None
    )


def test_serving_a_path_that_is_not_a_model(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", str(tmp_path / "missing"), "--disable-auth"])
    assert result.exit_code == 2 and "not a model directory" in result.output


def test_a_bad_address_or_a_busy_port_fails_before_any_model_loads(tiny_model: Path) -> None:
    import socket

    result = runner.invoke(app, ["serve", str(tiny_model), "--disable-auth", "--host", "999.1.1.1"])
    assert result.exit_code == 2 and "999.1.1.1" in result.output and "serving" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["serve", str(tiny_model), "--disable-auth", "--port", str(port)])
    assert (
        result.exit_code == 2
        and f"cannot listen on 127.0.0.1:{port}" in result.output
        and "serving" not in result.output
    )
