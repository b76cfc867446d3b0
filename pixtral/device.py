"""Turning a `--device` option into a torch device, checked before any work starts."""

from __future__ import annotations

import re

import torch

from pixtral.errors import OptionError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """`auto` is CUDA when present, else the CPU; a CUDA device that is not there is an OptionError."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
    if match is None:
        raise OptionError(f"{option}: expected {DEVICE_CHOICES}, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise OptionError(
            f"{option} {name}: no CUDA GPU is available (torch {torch.__version__} is {build}); use --device cpu"
        )
    index = int(match[1]) if match[1] else 0
    if index >= torch.cuda.device_count():
        raise OptionError(
            f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
        )
    return torch.device(name)
