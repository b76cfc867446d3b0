"""The quantize job's configuration and its persisted state, for resuming after a kill.

Stages run in order; inside MEASURE and QUANTIZE the state advances block by block (a decoder layer
is two blocks). Every write is atomic (temp file + rename), and the row states a state refers to
are written before the job file that names them, so a kill at any instant leaves a consistent last
checkpoint. A resumed job must have the same frozen settings (model, tiers, calibration, device kind,
...) or it is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from calibration.rows import CalibrationSpec
from pixtral.config import PixtralConfig
from pixtral.device import resolve_device
from pixtral.exl2.format import GroupPlan
from pixtral.exl2.writer import DEFAULT_SHARD_MB
from pixtral.outputs import atomic_write_json
from pixtral.progress import ProgressFn
from quantize.compute import Compute
from quantize.gptq import DAMP
from quantize.streams import Location, RowStore, load_rows

WORK_DIR = ".work"
JOB_FILE = "job.json"
MEASUREMENT_FILE = "measurement.json"  # in OUT_DIR: every job leaves the measurement its tiers came from
JOB_VERSION = 2
ROWS_FILE = "calibration.safetensors"


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
    # GPTQ against fp16's outputs on fp16 inputs, not the tier's own (GPTAQ; bench/quality_ab.py)
    asymmetric: bool = True
    shard_mb: int = DEFAULT_SHARD_MB
    resume: bool = False
    force: bool = False
    keep_work: bool = False
    check_weights: bool = True
    workers: int = 1  # Ray workers (1: this process); not frozen: any count writes the same bytes
    ray_address: str | None = None  # an existing Ray cluster (else a local one when workers > 1)

    def frozen(self) -> dict[str, Any]:
        """The settings a resumed job must share with the interrupted one."""
        return {
            "model_dir": str(Path(self.model_dir).resolve()),
            "tiers": sorted(self.tiers),
            "head_bits": self.head_bits,
            "calibration": dataclasses.asdict(self.calibration),
            "measurement": str(self.measurement) if self.measurement else None,
            "damp": self.damp,
            "device": resolve_device(self.device).type,  # cpu computes in fp32, cuda in fp16: not mixable
            "asymmetric": self.asymmetric,
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.frozen(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def work_dir(self) -> Path:
        return Path(self.out_dir) / WORK_DIR

    @property
    def reference_rows(self) -> int:
        """Rows the fp16 reference stream carries: the measurement rows (the calibration KL), or every
        row when asymmetric GPTQ reads their fp16 inputs."""
        return self.calibration.rows if self.asymmetric else self.calibration.measure_rows


def tier_name(bpw: float) -> str:
    """4.0 -> '4.0bpw', 2.5 -> '2.5bpw', 4.125 -> '4.125bpw'."""
    text = f"{bpw:.3f}".rstrip("0")
    return (text + "0" if text.endswith(".") else text) + "bpw"


@dataclass
class TierState:
    """One tier: its layout per linear (from the allocation) and what its quantization measured."""

    name: str
    target_bpw: float
    bits: int
    numel: int
    plans: dict[str, tuple[tuple[int, int], ...]]  # linear prefix -> groups (bits, rows)
    head_bpw: float | None = None
    calibration_kl: float | None = None
    compiled: bool = False

    @property
    def bpw(self) -> float:
        return self.bits / self.numel

    def plan(self, prefix: str) -> GroupPlan:
        return GroupPlan(self.plans[prefix])

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "plans": {k: [list(g) for g in v] for k, v in self.plans.items()}}

    @staticmethod
    def from_json(data: dict[str, Any]) -> TierState:
        plans = {k: tuple(tuple(g) for g in v) for k, v in data["plans"].items()}
        return TierState(**{**data, "plans": plans})


@dataclass(frozen=True)
class JobState:
    fingerprint: str
    frozen: dict[str, Any]
    stage: Stage = Stage.CALIBRATE
    blocks_done: int = 0  # blocks finished in the current stage (two per decoder layer)
    streams: dict[str, Location] = field(default_factory=dict)  # stream -> the buffer holding its rows
    images: int = 0  # pictures in the calibration rows
    tiers: dict[str, TierState] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JOB_VERSION,
            "fingerprint": self.fingerprint,
            "frozen": self.frozen,
            "stage": self.stage.value,
            "blocks_done": self.blocks_done,
            "streams": {k: str(v) for k, v in self.streams.items()},
            "images": self.images,
            "tiers": {name: tier.to_json() for name, tier in self.tiers.items()},
            "timings": self.timings,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> JobState:
        if data.get("version") != JOB_VERSION:
            raise ValueError("job file from another version")
        tiers = {name: TierState.from_json(tier) for name, tier in data["tiers"].items()}
        return JobState(
            data["fingerprint"],
            data["frozen"],
            Stage(data["stage"]),
            data["blocks_done"],
            {k: Location.parse(v) for k, v in data["streams"].items()},
            data["images"],
            tiers,
            data["timings"],
        )


@dataclass(frozen=True)
class JobContext:
    """What every stage reads and nothing changes: the settings, the model's config, where to compute,
    where the row states live, and whom to tell about progress. Stages take a JobState and return
    the next one."""

    config: QuantizeConfig
    cfg: PixtralConfig
    compute: Compute
    store: RowStore
    progress: ProgressFn

    @property
    def work(self) -> Path:
        return self.config.work_dir

    @property
    def layers(self) -> int:
        return self.cfg.text.num_hidden_layers

    def token_weights(self, count: int) -> list[Tensor] | None:
        """Per calibration row, each token's weight in the Hessians and errors: image_token_weight at
        `[IMG]`, 1 elsewhere (None when all are 1: the plain sums, bit for bit as before the option)."""
        weight = self.config.calibration.image_token_weight
        if weight == 1.0:
            return None
        rows = load_rows(self.work / ROWS_FILE)[:count]
        return [torch.where(row.input_ids == self.cfg.image_token_index, weight, 1.0) for row in rows]


def save_state(work_dir: Path, state: JobState) -> None:
    atomic_write_json(work_dir / JOB_FILE, state.to_json())


def load_state(work_dir: Path) -> JobState | None:
    """The saved state; None when there is none, or it was written by another version (start over)."""
    path = work_dir / JOB_FILE
    if not path.is_file():
        return None
    try:
        return JobState.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError):
        return None


def describe_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The settings that differ, compared as the job file stores them (tuples read back as lists)."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} then, {current.get(k)!r} now" for k in keys)
