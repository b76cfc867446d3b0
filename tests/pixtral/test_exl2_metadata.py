"""quantization_config as one type: what quantize writes reads back the same, exllamav2's subset
reads and writes back unchanged, and a wrong field is named."""

from __future__ import annotations

import json

import pytest

from pixtral.exl2.metadata import CalibrationInfo, EXL2Metadata, MetadataError

OURS = {
    "quant_method": "exl2",
    "version": "0.3.2",
    "bits": 4.0,
    "head_bits": 6,
    "source_model": "demo",
    "calibration": {
        "rows": 24,
        "length": 256,
        "dataset": "text=(default); images=(default)",
        "images": 12,
        "image_token_weight": 0.1,
    },
    "quantizer": "pixtral-exl2 0.1.0",
    "decoder_bpw": 4.0021,
    "head_bpw": 6.5625,
    "calibration_kl": 0.031,
    "measure_rows": 8,
}
# what exllamav2 0.3.2's convert writes (conversion/compile.py): no quantizer, no measured numbers
EXLLAMAV2 = {
    "quant_method": "exl2",
    "version": "0.3.2",
    "bits": 4.0,
    "head_bits": 6,
    "calibration": {"rows": 115, "length": 2048, "dataset": "(default)"},
}


@pytest.mark.parametrize("data", [OURS, EXLLAMAV2])
def test_round_trip_keeps_every_field_and_its_order(data: dict) -> None:
    meta = EXL2Metadata.from_json(json.loads(json.dumps(data)), "config.json")
    assert json.dumps(meta.to_json()) == json.dumps(data)


def test_fields_are_typed() -> None:
    meta = EXL2Metadata.from_json(OURS, "config.json")
    assert meta.calibration == CalibrationInfo(24, 256, "text=(default); images=(default)", 12, 0.1)
    assert (meta.bits, meta.head_bits, meta.decoder_bpw, meta.quantizer) == (4.0, 6, 4.0021, "pixtral-exl2 0.1.0")
    assert EXL2Metadata.from_json(EXLLAMAV2, "x").quantizer is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"bits": "four"}, "quantization_config.bits"),
        ({"head_bits": 6.5}, "quantization_config.head_bits"),
        ({"calibration": {"rows": "many"}}, "quantization_config.calibration.rows"),
        ({"quant_method": "gptq"}, "quantization_config.quant_method"),
    ],
)
def test_a_wrong_field_is_named_with_its_file(change: dict, field: str) -> None:
    with pytest.raises(MetadataError, match=f"tier/config.json: {field}"):
        EXL2Metadata.from_json({**OURS, **change}, "tier/config.json")
    with pytest.raises(MetadataError, match="bits: missing"):
        EXL2Metadata.from_json({"quant_method": "exl2"}, "tier/config.json")
