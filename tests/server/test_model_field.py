"""The request `model` field and /v1/models as TabbyAPI (exl2-checkpoint) handles them
(endpoints/OAI/utils/common_.py load_inline_model, endpoints/core/router.py list_models)."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from serving import ADMIN, API, KEYS, models_folder, running_server

from runtime.demo.model import write_demo_model
from runtime.server.config import ModelConfig, ServerConfig

HI = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    root = tmp_path_factory.mktemp("model-field")
    demo = write_demo_model(root / "demo")
    return models_folder(root / "models", ("demo", demo), ("tiny", tiny_model))


def _config(models: Path, **model: object) -> ServerConfig:
    return ServerConfig(model=ModelConfig(model_dir=str(models), backend="reference", device="cpu", **model))


def _chat(url: str, headers: dict, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=HI | {"model": model}, headers=headers, timeout=120)


def test_by_default_the_loaded_model_serves_any_name(models: Path) -> None:
    with running_server(_config(models), "tiny") as server:
        for name in ("gpt-9", "demo", "../demo"):
            for headers in (API, ADMIN):
                reply = _chat(server.url, headers, name)
                assert reply.status_code == 200 and reply.json()["model"] == "tiny", (name, reply.text)
        listed = httpx.get(f"{server.url}/v1/models", headers=ADMIN).json()["data"]
        assert [m["id"] for m in listed] == ["tiny", "demo"]  # the loaded model first, though not first by name
        first = (
            openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS.admin_key, max_retries=0).models.list().data[0].id
        )
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS.api_key, max_retries=0, timeout=120)
        assert client.chat.completions.create(model=first, **HI).choices[0].finish_reason in ("stop", "length")


def test_inline_loading_takes_an_admin_key_and_spares_dummy_models(models: Path) -> None:
    with running_server(_config(models, inline_model_loading=True, use_dummy_models=True), "tiny") as server:
        refused = _chat(server.url, API, "demo")
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert "admin key" in refused.json()["error"]["message"]
        dummy = _chat(server.url, API, "gpt-3.5-turbo")
        assert dummy.status_code == 200 and dummy.json()["model"] == "tiny"
        assert [m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=API).json()["data"]] == [
            "gpt-3.5-turbo",
            "tiny",
        ]
        switched = _chat(server.url, ADMIN, "demo")
        assert switched.status_code == 200 and switched.json()["model"] == "demo"
        assert httpx.get(f"{server.url}/v1/model", headers=API).json()["id"] == "demo"
        missing = _chat(server.url, ADMIN, "no-such-folder")  # TabbyAPI skips the load: the loaded model serves
        assert missing.status_code == 200 and missing.json()["model"] == "demo"
