"""The model the server holds: loading and unloading by name (confined to the model directory), the
generation slots, the generations in flight, and the health they add up to."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pixtral.errors import UserError
from pixtral.tokenizer import PixtralTokenizer
from runtime.backends import BackendConfig, load_backend
from runtime.engine import Engine
from runtime.server.config import ServerConfig
from runtime.server.generation import Generation
from runtime.server.schemas import Health, ModelLoadRequest

log = logging.getLogger("pixtral_exl2.server")


class ModelNotFound(UserError):
    """A model name that is not a model folder directly inside the model directory."""


class NoModelLoaded(UserError):
    """A request that needs a model while none is loaded."""


class InlineLoadRefused(UserError):
    """A request with an api key that names a model other than the loaded one (inline loading on)."""


class QueueFull(UserError):
    """More requests waiting than limits.max_queue."""


@dataclass
class Loaded:
    name: str
    path: Path
    engine: Engine
    backend_config: BackendConfig
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def slots(self) -> int:
        """Generations that run at once: 0 (no limit) where the backend batches jobs (exllamav2 with
        paged attention), else one (the reference backend, unpaged exllamav2)."""
        return 0 if self.engine.batches else 1


class ModelHost:
    """The loaded model and everything that runs on it."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.root = Path(config.model.model_dir).resolve()
        self.loaded: Loaded | None = None
        self.generations: set[Generation] = set()
        self.failures: list[str] = []  # generator errors since the last success (health)
        self.waiting = 0
        self.closing = False
        self._load_lock = asyncio.Lock()
        self._slots: asyncio.Semaphore | None = None

    # --- names ----------------------------------------------------------------------------------

    def path_of(self, name: str) -> Path:
        """The folder of model `name`: an entry of the model directory (a symlink placed there by the
        server's owner is followed); a name can never reach a path outside it."""
        if not name or name.startswith(".") or any(c in name for c in "/\\\0:") or name != name.strip():
            raise ModelNotFound(
                f"model name {name!r}: expected the name of a folder directly inside the model directory"
            )
        path = self.root / name
        if path.parent != self.root or not (path / "config.json").is_file():
            raise ModelNotFound(f"model {name!r} not found in the model directory")
        return path

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / "config.json").is_file()
        )

    def require(self) -> Loaded:
        """The loaded model (a request's `model` field is resolved by `for_request`)."""
        if self.loaded is None:
            raise NoModelLoaded("no model is loaded; load one with POST /v1/model/load")
        return self.loaded

    async def for_request(self, name: str | None, admin: bool) -> Loaded:
        """The model a completion request runs on, as TabbyAPI's load_inline_model decides
        (endpoints/OAI/utils/common_.py): the loaded model unless `inline_model_loading` is on and
        an admin key names another folder of model_dir, which is then loaded first. An api key
        naming another model gets InlineLoadRefused (401), a dummy model name excepted."""
        m = self.config.model
        if not name or (self.loaded is not None and name == self.loaded.name):
            return self.require()
        if not m.inline_model_loading:
            if admin:
                log.warning(
                    "request names model %r but inline_model_loading is off: %r serves it",
                    name,
                    self.loaded.name if self.loaded else None,
                )
            return self.require()
        dummy = m.use_dummy_models and name in m.dummy_model_names
        if not admin and not dummy:
            raise InlineLoadRefused(f"model {name!r}: switching models needs an admin key")
        if dummy or name not in self.names():
            return self.require()  # TabbyAPI skips the load for a dummy or a missing folder
        return await self.load(name)

    def listed_names(self, admin: bool) -> list[str]:
        """/v1/models: the loaded model first (clients take the first entry), then the others of
        model_dir for an admin key, after the dummy models when they are on."""
        loaded = [self.loaded.name] if self.loaded else []
        others = [n for n in self.names() if n not in loaded] if admin else []
        dummies = list(self.config.model.dummy_model_names) if self.config.model.use_dummy_models else []
        return dummies + loaded + others

    # --- load / unload --------------------------------------------------------------------------

    def backend_config(self, request: ModelLoadRequest | None) -> BackendConfig:
        m = self.config.model
        r = request or ModelLoadRequest(model_name="-")
        split_auto = m.gpu_split_auto if r.gpu_split_auto is None else r.gpu_split_auto
        split = r.gpu_split if r.gpu_split is not None else m.gpu_split
        return BackendConfig(
            backend=r.backend or m.backend,
            device=m.device,
            dtype=m.dtype,
            max_seq_len=r.max_seq_len or m.max_seq_len,
            cache_mode=(r.cache_mode or m.cache_mode).upper(),
            gpu_split=None if split_auto or not split else tuple(split),
            max_batch_size=self.config.limits.max_concurrent_requests,
        )

    async def load(
        self, name: str, request: ModelLoadRequest | None = None, progress: Callable[[int, int], None] | None = None
    ) -> Loaded:
        path = self.path_of(name)
        config = self.backend_config(request)
        async with self._load_lock:
            await self._unload()
            backend = await asyncio.to_thread(load_backend, path, config, progress)
            tokenizer = await asyncio.to_thread(PixtralTokenizer, path)
            refused = (
                None if self.config.model.vision else "vision is disabled on this server (model.vision); send text only"
            )
            self.loaded = Loaded(name, path, Engine(backend, tokenizer, refused), config)
            slots = self.loaded.slots or self.config.limits.max_concurrent_requests
            self._slots = asyncio.Semaphore(slots)
            self.failures.clear()
            return self.loaded

    async def unload(self) -> None:
        async with self._load_lock:
            await self._unload()

    async def _unload(self) -> None:
        loaded, self.loaded = self.loaded, None
        for generation in list(self.generations):
            generation.cancel("the model was unloaded while this request was generating")
        if loaded is not None:
            deadline = time.monotonic() + self.config.limits.shutdown_grace_seconds
            while self.generations and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(loaded.engine.close)

    async def drain(self, grace: float) -> None:
        """Shutting down: refuse new generations, let running ones finish for up to `grace` seconds,
        then cancel the rest (their clients get an error event and `[DONE]`, not a cut connection)."""
        self.closing = True
        deadline = time.monotonic() + grace
        while self.generations and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for generation in list(self.generations):
            generation.cancel("the server is shutting down")
        while self.generations and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.05)

    # --- slots ----------------------------------------------------------------------------------

    async def acquire_slot(self) -> asyncio.Semaphore:
        """Wait for a generation slot (FIFO); refuse when the queue is full."""
        slots = self._slots
        if self.closing:
            raise NoModelLoaded("the server is shutting down")
        if slots is None:
            raise NoModelLoaded("no model is loaded; load one with POST /v1/model/load")
        if slots.locked() and self.waiting >= self.config.limits.max_queue:
            raise QueueFull(f"{self.waiting} requests are already waiting (limits.max_queue); try again later")
        self.waiting += 1
        try:
            await slots.acquire()
        finally:
            self.waiting -= 1
        return slots

    # --- health ---------------------------------------------------------------------------------

    def health(self) -> Health:
        issues = list(self.failures[-3:])
        now = time.monotonic()
        stalled = [g for g in self.generations if now - g.last_progress > self.config.limits.stall_seconds]
        if stalled:
            issues.append(
                f"{len(stalled)} generation(s) made no progress for over {self.config.limits.stall_seconds:g} s"
            )
        if self.loaded is not None and not self.loaded.engine.healthy():
            issues.append("the generator thread has stopped")
        return Health(status="unhealthy" if issues else "healthy", issues=issues, model_loaded=self.loaded is not None)
