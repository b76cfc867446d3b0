"""The faster quantizer (coarse-to-fine scale search, snapshot reuse, exact residual errors) against
the previous algorithm on the same model, seed and calibration: its tiers are as good or better."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibration.rows import CalibrationSpec
from quantize.job import QuantizeConfig
from quantize.pipeline import run_quantize

CALIBRATION = CalibrationSpec(rows=6, measure_rows=3, length=128, image_fraction=0.34)
NOISE = 1.10  # calibration KL within 10 %: different but equally good scale choices move it by a few percent


@pytest.mark.parametrize("tiers", [(3.0, 4.0)])
def test_new_tiers_are_as_good_as_the_legacy_ones(tiny_spm_model: Path, tmp_path: Path, tiers: tuple[float, ...]) -> None:
    results = {}
    for legacy in (True, False):
        config = QuantizeConfig(tiny_spm_model, tmp_path / f"out-{legacy}", tiers, calibration=CALIBRATION, legacy=legacy)
        results[legacy] = run_quantize(config)
    for old, new in zip(results[True], results[False]):
        assert new.calibration_kl <= NOISE * old.calibration_kl, (new.name, new.calibration_kl, old.calibration_kl)
        assert abs(new.bpw - old.bpw) < 0.02
