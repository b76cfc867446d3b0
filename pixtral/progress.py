"""The one progress event every long-running library function reports (the CLI renders it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    stage: str
    done: int
    total: int
    detail: str = ""


ProgressFn = Callable[[Progress], None]
