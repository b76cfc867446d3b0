"""The quantize job's configuration and its persisted state, for resuming after a kill.

Stages run in order; inside MEASURE and QUANTIZE the state advances per layer. Every write is atomic
(temp file + rename), and the row states a checkpoint refers to are written before the job file
that names them, so a kill at any instant leaves a consistent last checkpoint. A resumed job must
have the same frozen settings (model, tiers, calibration, ...) or it is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from calibration.rows import CalibrationSpec
from runtime.outputs import atomic_write_json

from .checkpoint import DEFAULT_SHARD_MB
from .gptq import DAMP

WORK_DIR = ".work"
JOB_FILE = "job.json"
MEASUREMENT_FILE = "measurement.json"  # in OUT_DIR: every job leaves the measurement its tiers came from


class Stage(str, Enum):
    CALIBRATE = "calibrate"
    EMBED = "embed"
    MEASURE = "measure"
    QUANTIZE = "quantize"
    COMPILE = "compile"
    DONE = "done"


STAGES = list(Stage)


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything `pixtral-exl2 quantize` needs; built by the CLI (or a recipe), passed explicitly."""

    model_dir: Path
    out_dir: Path
    tiers: tuple[float, ...] = (4.0,)
    head_bits: int = 6
    calibration: CalibrationSpec = CalibrationSpec()
    measurement: Path | None = None  # reuse a measurement.json (ours or exllamav2's) and skip MEASURE
    device: str = "auto"
    damp: float = DAMP
    shard_mb: int = DEFAULT_SHARD_MB
    checkpoint_seconds: float = 180.0  # how often row states are saved inside MEASURE/QUANTIZE
    resume: bool = False
    force: bool = False
    keep_work: bool = False
    check_weights: bool = True

    def frozen(self) -> dict[str, Any]:
        """The settings a resumed job must share with the interrupted one."""
        return {
            "model_dir": str(Path(self.model_dir).resolve()),
            "tiers": sorted(self.tiers),
            "head_bits": self.head_bits,
            "calibration": dataclasses.asdict(self.calibration),
            "measurement": str(self.measurement) if self.measurement else None,
            "damp": self.damp,
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.frozen(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def work_dir(self) -> Path:
        return Path(self.out_dir) / WORK_DIR


def tier_name(bpw: float) -> str:
    """4.0 -> '4.0bpw', 2.5 -> '2.5bpw', 4.125 -> '4.125bpw'."""
    text = f"{bpw:.3f}".rstrip("0")
    return (text + "0" if text.endswith(".") else text) + "bpw"


@dataclass
class JobState:
    fingerprint: str
    frozen: dict[str, Any]
    stage: Stage = Stage.CALIBRATE
    layer: int = 0  # layers finished in the current stage (as of the saved row states)
    states_file: str | None = None  # row states at `layer`, inside the work dir
    images: int = 0  # pictures in the calibration rows
    plans: dict[str, dict[str, list[list[int]]]] = field(default_factory=dict)  # tier -> linear -> groups
    tier_bits: dict[str, dict[str, float]] = field(default_factory=dict)  # tier -> {bits, numel, bpw}
    tier_errors: dict[str, float] = field(default_factory=dict)  # tier -> calibration KL vs fp16
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    compiled: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["stage"] = self.stage.value
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> JobState:
        return JobState(**{**data, "stage": Stage(data["stage"])})


def save_state(work_dir: Path, state: JobState) -> None:
    atomic_write_json(work_dir / JOB_FILE, state.to_json())


def load_state(work_dir: Path) -> JobState | None:
    path = work_dir / JOB_FILE
    if not path.is_file():
        return None
    return JobState.from_json(json.loads(path.read_text(encoding="utf-8")))


def describe_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The settings that differ, compared as the job file stores them (tuples read back as lists)."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} then, {current.get(k)!r} now" for k in keys)
