"""Run exllamav2 0.3.2's own Python on a CPU: the torch stand-in for its extension
(ext_standin.py) in `sys.modules["exllamav2_ext"]`, and the few device calls exllamav2 makes made
into CPU no-ops. Tests only; a process with CUDA runs the real extension (the `gpu` tests)."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import ext_standin
import pytest
import torch

# exllamav2's modules that map a device index to "cuda:N"
DEVICE_MODULES = ("exllamav2.model", "exllamav2.module", "exllamav2.device", "exllamav2.compat")
MEMORY = 24 << 30  # what the fake device reports free and total (autosplit sizes its layers by it)


class _Stream:
    """torch.cuda.Stream on a CPU: every operation is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass


def _cpu_device(idx: int) -> str:
    return "cpu"


class _TorchWithCpuDevices:
    """`torch` as exllamav2's device.py and compat.py see it: `torch.device(0)` (a CUDA index) is the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def device(spec: Any, index: int | None = None) -> torch.device:
        if isinstance(spec, int) or "cuda" in str(spec):
            return torch.device("cpu")
        return torch.device(spec) if index is None else torch.device(spec, index)


def device_patches() -> dict[str, Any]:
    """torch.cuda attribute -> CPU stand-in; one device with MEMORY bytes."""
    props = SimpleNamespace(major=8, minor=0, total_memory=MEMORY, name="stand-in (CPU)", multi_processor_count=1)
    return {
        "Stream": _Stream,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "device": lambda *a, **k: contextlib.nullcontext(),
        "set_device": lambda *a, **k: None,
        "set_stream": lambda *a, **k: None,
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "get_device_properties": lambda *a: props,
        "get_device_capability": lambda *a: (8, 0),
        "mem_get_info": lambda *a: (MEMORY, MEMORY),
        "memory_allocated": lambda *a: 0,
        "max_memory_allocated": lambda *a: 0,
        "reset_peak_memory_stats": lambda *a: None,
        "current_stream": lambda *a: _Stream(),
    }


@contextlib.contextmanager
def exllamav2_on_cpu() -> Iterator[Any]:
    """exllamav2 imported over the stand-in, with the device no-ops in place while it runs."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the gpu tests run exllamav2's real extension")
    mp = pytest.MonkeyPatch()
    try:
        for name, value in device_patches().items():
            mp.setattr(torch.cuda, name, value, raising=False)
        mp.setitem(sys.modules, "exllamav2_ext", ext_standin)
        threads = torch.get_num_threads()
        ex = importlib.import_module("exllamav2")  # exllamav2.model sets torch to one thread at import
        torch.set_num_threads(threads)
        for module in DEVICE_MODULES:
            if hasattr(sys.modules.get(module), "_torch_device"):
                mp.setattr(sys.modules[module], "_torch_device", _cpu_device)
        for module in ("exllamav2.device", "exllamav2.compat"):
            mp.setattr(sys.modules[module], "torch", _TorchWithCpuDevices())
        yield ex
    finally:
        mp.undo()
