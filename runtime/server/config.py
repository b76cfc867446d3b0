"""The server's settings: TabbyAPI's `config.yml` sections and option names, plus ours, one frozen object.

`network` / `model` carry TabbyAPI's main names (host, port, disable_auth, model_dir, model_name,
max_seq_len, cache_mode, gpu_split_auto, gpu_split, backend, vision); `limits` and `images` hold what
TabbyAPI leaves open (../shared/spec/tabbyapi.md §7): request and image size caps, and remote or
local images only when allowed. Command-line flags override the file (`with_overrides`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixtral.errors import OptionError, UserError, check_range

SAMPLE_CONFIG = Path(__file__).with_name("config_sample.yml")


class ServerConfigError(UserError):
    """A config.yml that cannot be read or holds unknown or out-of-range options."""


@dataclass(frozen=True)
class NetworkConfig:
    host: str = "127.0.0.1"
    port: int = 5000
    disable_auth: bool = False
    api_tokens_file: str = "api_tokens.yml"  # api/admin keys, generated on first start
    keepalive_seconds: float = 15.0  # SSE comment while a long prefill or the queue holds a stream back


@dataclass(frozen=True)
class ModelConfig:
    model_dir: str = "models"  # the only folder the server reads models from
    model_name: str | None = None  # folder (or path) loaded at start
    backend: str = "auto"  # auto | exllamav2 | reference
    max_seq_len: int | None = None  # default: the model's
    cache_mode: str = "FP16"  # exllamav2: FP16 | Q8 | Q6 | Q4
    gpu_split_auto: bool = True
    gpu_split: list[float] = field(default_factory=list)  # GB per GPU when gpu_split_auto is false
    device: str = "auto"  # reference backend
    dtype: str | None = None  # reference backend
    vision: bool = True  # accept images (a model without a vision tower refuses them either way)
    # a request naming another model: off, the loaded model serves it (TabbyAPI's default); on, an
    # admin key loads the named model first and an api key gets 401 (unless it names a dummy model)
    inline_model_loading: bool = False
    use_dummy_models: bool = (
        False  # list dummy_model_names first in /v1/models; requests naming them use the loaded model
    )
    dummy_model_names: list[str] = field(default_factory=lambda: ["gpt-3.5-turbo"])


@dataclass(frozen=True)
class LimitsConfig:
    max_concurrent_requests: int = 8  # generating at once (the reference backend runs one, the rest queue)
    max_queue: int = 64  # waiting beyond that gets 429
    max_request_bytes: int = 64 * 2**20
    max_messages: int = 1024
    max_new_tokens: int | None = None  # a cap on max_tokens; None: the context
    max_n: int = 8  # choices per request
    stall_seconds: float = 120.0  # /health turns unhealthy when a generation makes no progress this long
    shutdown_grace_seconds: float = 10.0


@dataclass(frozen=True)
class ImagesConfig:
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 50_000_000  # decoded pixels: decompression bombs are refused before decoding
    max_images_per_request: int = 16
    allow_remote: bool = False  # http(s) image URLs (TabbyAPI: disable_fetch_requests false)
    remote_hosts: list[str] = field(default_factory=list)  # allow-list; empty = any host when allow_remote
    fetch_timeout_seconds: float = 10.0
    local_folder: str | None = None  # file:// images only from inside this folder; None = never


@dataclass(frozen=True)
class ServerConfig:
    network: NetworkConfig = NetworkConfig()
    model: ModelConfig = ModelConfig()
    limits: LimitsConfig = LimitsConfig()
    images: ImagesConfig = ImagesConfig()

    def check(self) -> ServerConfig:
        """Ranges of the numeric options (raises OptionError naming the option)."""
        check_range("network.port", self.network.port, 1, 65535)
        check_range("network.keepalive_seconds", self.network.keepalive_seconds, 0.05, 3600, "a number")
        check_range("limits.max_concurrent_requests", self.limits.max_concurrent_requests, 1, 1024)
        check_range("limits.max_queue", self.limits.max_queue, 0, 1 << 20)
        check_range("limits.max_request_bytes", self.limits.max_request_bytes, 1024, 1 << 34)
        check_range("limits.max_messages", self.limits.max_messages, 1, 1 << 20)
        check_range("limits.max_n", self.limits.max_n, 1, 128)
        check_range("images.max_image_bytes", self.images.max_image_bytes, 1024, 1 << 31)
        check_range("images.max_image_pixels", self.images.max_image_pixels, 1024, 1 << 32)
        check_range("images.max_images_per_request", self.images.max_images_per_request, 0, 1024)
        check_range("images.fetch_timeout_seconds", self.images.fetch_timeout_seconds, 0.1, 600, "a number")
        if self.model.max_seq_len is not None:
            check_range("model.max_seq_len", self.model.max_seq_len, 16, 1 << 24)
        return self


_SECTIONS = {f.name: f.type for f in dataclasses.fields(ServerConfig)}


def _section(cls: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ServerConfigError(f"{where}: unknown option(s) {unknown}; known: {sorted(names)}")
    return cls(**values)


def load_server_config(path: str | Path | None) -> ServerConfig:
    """Read a config.yml (TabbyAPI layout); no path: the defaults."""
    if path is None:
        return ServerConfig()
    try:
        import yaml
    except ImportError:
        raise ServerConfigError(f"{path}: reading config.yml needs PyYAML: pip install 'pixtral-exl2[serve]'") from None

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ServerConfigError(f"{path}: cannot read ({err.strerror or err})") from err
    except yaml.YAMLError as err:
        raise ServerConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ServerConfigError(f"{path}: expected sections network/model/limits/images at the top level")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ServerConfigError(f"{path}: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")
    sections = {}
    for name, cls in (
        ("network", NetworkConfig),
        ("model", ModelConfig),
        ("limits", LimitsConfig),
        ("images", ImagesConfig),
    ):
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ServerConfigError(f"{path}: section {name} must be a mapping")
        try:
            sections[name] = _section(cls, values, f"{path} [{name}]")
        except TypeError as err:
            raise ServerConfigError(f"{path} [{name}]: {err}") from err
    try:
        return ServerConfig(**sections).check()
    except OptionError as err:
        raise ServerConfigError(f"{path}: {err}") from err


def with_overrides(config: ServerConfig, **flags: Any) -> ServerConfig:
    """Flags that were given (not None) replace the file's values: `network__port=8000` style keys."""
    sections = {name: getattr(config, name) for name in _SECTIONS}
    for key, value in flags.items():
        if value is None:
            continue
        section, _, option = key.partition("__")
        sections[section] = dataclasses.replace(sections[section], **{option: value})
    return ServerConfig(**sections).check()
