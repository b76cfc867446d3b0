"""Reading EXL2 checkpoints (ours or exllamav2's): lazily, every layer validated.

A checkpoint is the source model directory with each quantized linear's `weight` replaced by the
EXL2 tensors of format.py; every other tensor (vision tower, projector, embeddings, norms) is
kept in its source dtype (../shared/spec/exl2-format.md §1.5, §4.7). The writer is
pixtral/exl2/writer.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pixtral.config import load_config
from pixtral.exl2.format import FormatError, GroupPlan, bits_per_weight, dequantize, parse_q_groups, storage_bits
from pixtral.text import DECODER_LINEARS, LAYER_PREFIX
from pixtral.weights import Checkpoint, tensor_nbytes

EXL2_SUFFIXES = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
EXL2_DTYPES = {
    "q_weight": "I32",
    "q_scale": "I32",
    "q_scale_max": "F16",
    "q_groups": "I16",
    "q_invperm": "I32",
    "bias": "F16",
}


def validate_layer(prefix: str, tensors: dict[str, torch.Tensor], where: str = "") -> GroupPlan:
    """Check one EXL2 layer's tensors (presence, dtype, shapes, q_groups, permutation); return its plan."""
    label = f"{where}: " if where else ""
    for suffix in EXL2_SUFFIXES:
        if suffix not in tensors:
            raise FormatError(f"{label}{prefix}.{suffix} is missing (required by exllamav2)")
    torch_dtypes = {"I32": torch.int32, "I16": torch.int16, "F16": torch.float16}
    for suffix, tensor in tensors.items():
        expected = torch_dtypes[EXL2_DTYPES[suffix]]
        if tensor.dtype != expected:
            raise FormatError(f"{label}{prefix}.{suffix} has dtype {tensor.dtype}, expected {expected}")
    q_weight, q_scale = tensors["q_weight"], tensors["q_scale"]
    columns = q_weight.shape[1]
    if q_scale.shape[1] * 8 != columns:
        raise FormatError(f"{label}{prefix}.q_scale has {q_scale.shape[1]} words per group, expected {columns // 8}")
    plan = parse_q_groups(tensors["q_groups"], q_weight.shape[0], f"{label}{prefix}.q_groups")
    groups = len(plan.groups)
    if q_scale.shape[0] != groups or tensors["q_scale_max"].shape != (groups,):
        raise FormatError(f"{label}{prefix}.q_scale/q_scale_max have {q_scale.shape[0]} groups, q_groups has {groups}")
    q_invperm = tensors["q_invperm"]
    if q_invperm.shape != (plan.rows,) or not torch.equal(torch.sort(q_invperm.long()).values, torch.arange(plan.rows)):
        raise FormatError(f"{label}{prefix}.q_invperm is not a permutation of the {plan.rows} input rows")
    if "bias" in tensors and tensors["bias"].shape != (columns,):
        raise FormatError(f"{label}{prefix}.bias has shape {list(tensors['bias'].shape)}, expected [{columns}]")
    return plan


@dataclass(frozen=True)
class LayerSummary:
    """What one quantized linear costs and how its bits are spread."""

    name: str
    in_features: int
    out_features: int  # padded N'
    plan: GroupPlan
    bpw: float
    bits: int
    file_bytes: int


class EXL2Checkpoint:
    """Read any EXL2 checkpoint (ours or exllamav2's) lazily and validated."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.config = load_config(self.model_dir)
        self.weights = Checkpoint(self.model_dir)
        names = self.weights.names()
        self.layers = sorted((n[: -len(".q_weight")] for n in names if n.endswith(".q_weight")), key=layer_order)
        quantized = set(self.layers)
        self.fp_tensors = [n for n in sorted(names, key=natural_key) if n.rpartition(".")[0] not in quantized]

    def close(self) -> None:
        self.weights.close()

    def __enter__(self) -> EXL2Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has_layer(self, prefix: str) -> bool:
        return f"{prefix}.q_weight" in self.weights

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The validated EXL2 tensors of one layer, keyed by suffix."""
        return self._layer(prefix)[0]

    def _layer(self, prefix: str) -> tuple[dict[str, torch.Tensor], GroupPlan]:
        out = {}
        for suffix in (*EXL2_SUFFIXES, "bias"):
            name = f"{prefix}.{suffix}"
            if name in self.weights:
                stored = self.weights.dtype(name)
                if stored != EXL2_DTYPES[suffix]:
                    raise FormatError(
                        f"{self.weights.shard_of(name)}: {name} is {stored}, expected {EXL2_DTYPES[suffix]}"
                    )
                out[suffix] = self.weights.get(name)
        return out, validate_layer(prefix, out, str(self.model_dir))

    def dequantized(self, prefix: str) -> torch.Tensor:
        """fp16 weight [N', K] of a layer, exactly as exllamav2 reconstructs it."""
        t = self.tensors(prefix)
        return dequantize(t["q_weight"], t["q_scale"], t["q_scale_max"], t["q_groups"], t["q_invperm"])

    def summary(self, prefix: str) -> LayerSummary:
        t, plan = self._layer(prefix)
        columns, bias = t["q_weight"].shape[1], "bias" in t
        return LayerSummary(
            name=prefix,
            in_features=plan.rows,
            out_features=columns,
            plan=plan,
            bpw=bits_per_weight(plan, columns, bias),
            bits=storage_bits(plan, columns, bias),
            file_bytes=sum(tensor_nbytes(v) for v in t.values()),
        )

    def head_bpw(self, summaries: Iterable[LayerSummary] | None = None) -> float | None:
        """The output head's bpw measured from its tensors (None: the head is not quantized)."""
        head = [s for s in (summaries or map(self.summary, self.layers)) if s.name.endswith("lm_head")]
        return head[0].bpw if head else None

    def decoder_bpw(self, summaries: Iterable[LayerSummary] | None = None) -> float:
        """Average bpw over the decoder's layer linears (head excluded), as exllamav2's `-b` counts."""
        rows = [s for s in (summaries or map(self.summary, self.layers)) if ".layers." in s.name]
        weights = sum(s.in_features * s.out_features for s in rows)
        return sum(s.bits for s in rows) / weights if weights else 0.0


def layer_order(prefix: str) -> tuple[Any, ...]:
    """Decoder layers in index order, linears in forward order (q, k, v, o, gate, up, down), head last."""
    if prefix.startswith(LAYER_PREFIX):
        index, _, linear = prefix[len(LAYER_PREFIX) :].partition(".")
        order = [spec.name for spec in DECODER_LINEARS]
        return (0, int(index), order.index(linear) if linear in order else len(order), linear)
    return (1, 0, 0, prefix)


def natural_key(name: str) -> list[Any]:
    """Sort `layers.10` after `layers.9`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
