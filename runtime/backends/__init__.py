"""Choosing and loading a backend: `auto` is exllamav2 where CUDA and exllamav2 are importable,
else the reference backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pixtral.errors import OptionError
from runtime.backends.base import Backend
from runtime.backends.exllamav2 import exllamav2_available

BACKENDS = ("auto", "reference", "exllamav2")


@dataclass(frozen=True)
class BackendConfig:
    """How to load a model for generation (the CLI's and the server's flags, one object)."""

    backend: str = "auto"
    device: str = "auto"  # reference backend only
    dtype: str | None = None  # reference backend: float32 | bfloat16 | float16; default fp32 on CPU, fp16 on CUDA
    max_seq_len: int | None = None  # default: the model's context
    cache_mode: str = "FP16"  # exllamav2: FP16 | Q8 | Q6 | Q4
    gpu_split: tuple[float, ...] | None = None  # exllamav2: GB per GPU; None = autosplit
    max_batch_size: int | None = None  # exllamav2: concurrent jobs


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise OptionError(f"--backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        return "exllamav2" if exllamav2_available() else "reference"
    if name == "exllamav2" and not exllamav2_available():
        raise OptionError("--backend exllamav2: needs a CUDA GPU and exllamav2 installed; use --backend reference")
    return name


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_backend(
    model_dir: str | Path, config: BackendConfig = BackendConfig(), progress: Callable[[int, int], None] | None = None
) -> Backend:
    """Load `model_dir` (an EXL2 tier or an fp16 source) on the chosen backend."""
    name = resolve_backend(config.backend)
    if config.max_seq_len is not None and config.max_seq_len < 16:
        raise OptionError(f"--context: expected at least 16 tokens, got {config.max_seq_len}")
    if name == "exllamav2":
        from runtime.backends.exllamav2 import ExLlamaV2Backend

        split = list(config.gpu_split) if config.gpu_split else None
        return ExLlamaV2Backend(
            model_dir, config.max_seq_len, config.cache_mode, split, config.max_batch_size, progress
        )
    from runtime.backends.reference import ReferenceBackend

    if config.dtype is not None and config.dtype not in DTYPES:
        raise OptionError(f"--dtype: expected one of {', '.join(DTYPES)}, got {config.dtype!r}")
    return ReferenceBackend(model_dir, config.device, DTYPES.get(config.dtype or ""), config.max_seq_len, progress)
