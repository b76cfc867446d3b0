"""What `pixtral-exl2 inspect` reports about an EXL2 checkpoint, as plain data (the CLI renders it)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from runtime.exl2_checkpoint import EXL2Checkpoint
from runtime.exl2_format import FormatError

FP16_GROUPS = (
    ("vision tower", "vision_tower."),
    ("projector", "multi_modal_projector."),
    ("embeddings", "language_model.model.embed_tokens."),
    ("norms", ""),  # everything else that is not quantized
)


def inspect_checkpoint(model_dir: str | Path) -> dict[str, Any]:
    """Per-layer bits and sizes, the decoder's bpw, head bits, fp16 parts, and files."""
    model_dir = Path(model_dir)
    with EXL2Checkpoint(model_dir) as ckpt:
        if not ckpt.layers:
            raise FormatError(f"{model_dir}: not an EXL2 checkpoint (no *.q_weight tensors); `pixtral-exl2 info` describes fp16 models")
        summaries = [ckpt.summary(prefix) for prefix in ckpt.layers]
        head_bpw = ckpt.head_bpw(summaries)
        kept: dict[str, dict[str, Any]] = {}
        for name in ckpt.fp_tensors:
            label = next(label for label, prefix in FP16_GROUPS if name.startswith(prefix))
            entry = kept.setdefault(label, {"tensors": 0, "params": 0, "dtypes": set()})
            entry["tensors"] += 1
            entry["params"] += math.prod(ckpt.weights.shape(name))
            entry["dtypes"].add(ckpt.weights.dtype(name))
        report = {
            "model_dir": str(model_dir),
            "quantization_config": ckpt.config.quantization.to_json() if ckpt.config.quantization else None,
            "layers": [
                {
                    "name": s.name,
                    "in_features": s.in_features,
                    "out_features": s.out_features,
                    "groups": s.plan.describe(),
                    "bits_histogram": _bits_histogram(s),
                    "bpw": round(s.bpw, 4),
                    "bytes": s.file_bytes,
                }
                for s in summaries
            ],
            "decoder_bpw": round(ckpt.decoder_bpw(summaries), 4),
            "head_bpw": round(head_bpw, 4) if head_bpw is not None else None,
            "kept_unquantized": {k: {**v, "dtypes": sorted(v["dtypes"])} for k, v in kept.items()},
            "files": [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(model_dir.iterdir()) if p.is_file()],
        }
    return report


def _bits_histogram(summary: Any) -> dict[str, float]:
    """Fraction of input rows at each width, e.g. {"8": 0.05, "4": 0.95}."""
    rows: dict[int, int] = {}
    for bits, count in summary.plan.groups:
        rows[bits] = rows.get(bits, 0) + count
    return {str(b): round(r / summary.in_features, 4) for b, r in sorted(rows.items(), reverse=True)}
