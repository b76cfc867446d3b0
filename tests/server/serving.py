"""Helpers for the server tests: a real uvicorn server on a free port in a background thread, and a
scripted backend (a test double that replays chosen tokens: the random test models cannot be made
to emit a tool call, everything around the model stays real)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import uvicorn

from pixtral.prompt import Prompt
from runtime.backends.base import Backend, GenerationRequest, PrefillStats, TokenStep, TokenStream
from runtime.server.app import server_app
from runtime.server.auth import Keys
from runtime.server.config import ServerConfig

KEYS = Keys(api_key="a" * 32, admin_key="b" * 32)
API = {"x-api-key": KEYS.api_key}
ADMIN = {"Authorization": f"Bearer {KEYS.admin_key}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Running:
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    app: object

    @property
    def host(self):
        return self.app.state.host  # type: ignore[attr-defined]

    @property
    def metrics(self):
        return self.app.state.metrics  # type: ignore[attr-defined]


@contextlib.contextmanager
def running_server(
    config: ServerConfig, startup_model: str | None, keys: Keys | None = KEYS, prepare=None
) -> Iterator[Running]:
    """Start uvicorn on a free port; `prepare(app)` may swap in a backend before requests arrive."""
    port = free_port()
    app = server_app(config, keys, startup_model=startup_model)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    running = Running(f"http://127.0.0.1:{port}", server, thread, app)
    if prepare is not None:
        prepare(running)
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_healthy(url: str) -> None:
    httpx.get(f"{url}/health", timeout=10)


class ScriptedBackend(Backend):
    """Replays `script` (token ids) as the model's output, whatever the prompt; `fail_after` raises."""

    name = "reference"

    def __init__(self, script: list[int], vocab: int, max_seq_len: int = 4096, fail_after: int | None = None):
        self.script, self.vocab, self.max_seq_len, self.fail_after = script, vocab, max_seq_len, fail_after
        self.has_vision = True
        self.prompts: list[Prompt] = []

    def stream(self, request: GenerationRequest) -> TokenStream:
        self.prompts.append(request.prompt)
        stats = PrefillStats(prompt_tokens=len(request.prompt))

        def steps() -> Iterator[TokenStep]:
            for i, token in enumerate(self.script[: request.max_new_tokens]):
                if self.fail_after is not None and i >= self.fail_after:
                    raise RuntimeError("scripted failure")
                yield TokenStep(token, -0.5 if request.want_logprobs else None)
                if token in request.stop_token_ids:
                    return

        return TokenStream(steps(), stats)

    def logits(self, prompt: Prompt) -> torch.Tensor:
        return torch.zeros(len(prompt), self.vocab)

    def memory(self) -> dict[str, int]:
        return {"weights": 0, "kv_cache": 0, "kv_per_token": 0}


def swap_backend(running: Running, backend: Backend) -> None:
    """Put a scripted backend under the loaded engine."""
    running.host.loaded.engine.backend = backend


def models_folder(root: Path, *models: tuple[str, Path]) -> Path:
    """A model directory holding symlinks named as given."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in models:
        (root / name).symlink_to(source.resolve(), target_is_directory=True)
    return root
