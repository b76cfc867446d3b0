"""What `pixtral-exl2 inspect` reports about an EXL2 checkpoint, as typed data (the CLI renders it)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pixtral.exl2.checkpoint import EXL2Checkpoint, LayerSummary
from pixtral.exl2.format import FormatError
from pixtral.exl2.metadata import EXL2Metadata

FP16_GROUPS = (
    ("vision tower", "vision_tower."),
    ("projector", "multi_modal_projector."),
    ("embeddings", "language_model.model.embed_tokens."),
    ("norms", ""),  # everything else that is not quantized
)


@dataclass(frozen=True)
class LayerReport:
    """One quantized linear: its shape (N' is the padded output width), groups and storage."""

    name: str
    in_features: int
    out_features: int
    groups: str  # "bits:count×rows" runs, as GroupPlan.describe() writes them
    bits_histogram: dict[str, float]  # share of input rows at each width, e.g. {"8": 0.05, "4": 0.95}
    bpw: float
    bytes: int


@dataclass
class KeptPart:
    """A part of the model kept unquantized (vision tower, projector, embeddings, norms)."""

    tensors: int = 0
    params: int = 0
    dtypes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FileEntry:
    name: str
    bytes: int


@dataclass(frozen=True)
class InspectReport:
    model_dir: str
    quantization: EXL2Metadata | None
    layers: list[LayerReport]
    decoder_bpw: float
    head_bpw: float | None  # None: an fp16 head
    kept_unquantized: dict[str, KeptPart]
    files: list[FileEntry]

    def to_json(self) -> dict[str, Any]:
        """The `inspect --json` document (config.json's own `quantization_config` spelling)."""
        out = asdict(self)
        del out["quantization"]
        return {
            "model_dir": out.pop("model_dir"),
            "quantization_config": self.quantization.to_json() if self.quantization else None,
            **out,
        }


def inspect_checkpoint(model_dir: str | Path) -> InspectReport:
    """Per-layer bits and sizes, the decoder's bpw, head bits, fp16 parts, and files."""
    model_dir = Path(model_dir)
    with EXL2Checkpoint(model_dir) as ckpt:
        if not ckpt.layers:
            raise FormatError(
                f"{model_dir}: not an EXL2 checkpoint (no *.q_weight tensors); `pixtral-exl2 info` describes fp16 "
                "models"
            )
        summaries = [ckpt.summary(prefix) for prefix in ckpt.layers]
        head_bpw = ckpt.head_bpw(summaries)
        kept: dict[str, KeptPart] = {}
        for name in ckpt.fp_tensors:
            label = next(label for label, prefix in FP16_GROUPS if name.startswith(prefix))
            part = kept.setdefault(label, KeptPart())
            part.tensors += 1
            part.params += math.prod(ckpt.weights.shape(name))
            if ckpt.weights.dtype(name) not in part.dtypes:
                part.dtypes = sorted([*part.dtypes, ckpt.weights.dtype(name)])
        layers = [
            LayerReport(
                s.name,
                s.in_features,
                s.out_features,
                s.plan.describe(),
                _bits_histogram(s),
                round(s.bpw, 4),
                s.file_bytes,
            )
            for s in summaries
        ]
        return InspectReport(
            model_dir=str(model_dir),
            quantization=ckpt.config.quantization,
            layers=layers,
            decoder_bpw=round(ckpt.decoder_bpw(summaries), 4),
            head_bpw=round(head_bpw, 4) if head_bpw is not None else None,
            kept_unquantized=kept,
            files=[FileEntry(p.name, p.stat().st_size) for p in sorted(model_dir.iterdir()) if p.is_file()],
        )


def _bits_histogram(summary: LayerSummary) -> dict[str, float]:
    """Fraction of input rows at each width, e.g. {"8": 0.05, "4": 0.95}."""
    rows: dict[int, int] = {}
    for bits, count in summary.plan.groups:
        rows[bits] = rows.get(bits, 0) + count
    return {str(b): round(r / summary.in_features, 4) for b, r in sorted(rows.items(), reverse=True)}
