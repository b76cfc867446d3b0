"""An EXL2 tier's `quantization_config` (in config.json) as one typed object.

Written by quantize (every field), read by info, inspect, eval, the model cards and quantize's
resume. exllamav2's own convert writes the first four fields and a calibration table without our
extras: everything past `bits` is optional when reading, and a field that is absent stays absent
when written back. A config's numbers are the writer's claims: eval and inspect measure bpw from the
tensors (checkpoint.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from pixtral.errors import UserError


class MetadataError(UserError):
    """A quantization_config whose fields are not what EXL2 tiers carry."""


@dataclass(frozen=True)
class CalibrationInfo:
    """What a tier was calibrated on."""

    rows: int | None = None
    length: int | None = None
    dataset: str | None = None
    images: int | None = None
    image_token_weight: float | None = None


@dataclass(frozen=True)
class EXL2Metadata:
    """config.json's quantization_config, in the order the fields are written."""

    quant_method: str = "exl2"
    version: str | None = None  # the exllamav2 version the tier is written for
    bits: float = 0.0  # the target decoder bpw
    head_bits: int | None = None
    source_model: str | None = None
    calibration: CalibrationInfo = field(default_factory=CalibrationInfo)
    quantizer: str | None = None  # "pixtral-exl2 X.Y.Z"; None for exllamav2's convert
    decoder_bpw: float | None = None
    head_bpw: float | None = None
    calibration_kl: float | None = None  # KL to fp16 on the calibration rows (a sanity check, seen data)
    measure_rows: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, CalibrationInfo):
                value = {c.name: getattr(value, c.name) for c in fields(value) if getattr(value, c.name) is not None}
            if value is not None:
                out[f.name] = value
        return out

    @staticmethod
    def from_json(data: Any, source: str) -> EXL2Metadata:
        """Parse and type-check; a wrong field is named with the file it is in."""
        where = f"{source}: quantization_config"
        if not isinstance(data, dict):
            raise MetadataError(f"{where}: expected an object, got {type(data).__name__}")
        if data.get("quant_method", "exl2") != "exl2":
            raise MetadataError(f"{where}.quant_method: expected 'exl2', got {data.get('quant_method')!r}")
        if "bits" not in data:
            raise MetadataError(f"{where}.bits: missing (the tier's target bits per weight)")
        calibration = data.get("calibration") or {}
        if not isinstance(calibration, dict):
            raise MetadataError(f"{where}.calibration: expected an object")
        kinds = {"rows": int, "length": int, "dataset": str, "images": int, "image_token_weight": float}
        info = CalibrationInfo(
            **{k: _typed(calibration.get(k), kind, f"{where}.calibration.{k}") for k, kind in kinds.items()}
        )
        top = {
            "version": str,
            "bits": float,
            "head_bits": int,
            "source_model": str,
            "quantizer": str,
            "decoder_bpw": float,
            "head_bpw": float,
            "calibration_kl": float,
            "measure_rows": int,
        }
        values = {k: _typed(data.get(k), kind, f"{where}.{k}") for k, kind in top.items()}
        return EXL2Metadata(calibration=info, **values)


def _typed(value: Any, kind: type, where: str) -> Any:
    """`value` as `kind` (ints are accepted as floats; None stays None)."""
    if value is None:
        return None
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise MetadataError(
        f"{where}: expected {'a number' if kind is float else 'an integer' if kind is int else 'text'}, got {value!r}"
    )
