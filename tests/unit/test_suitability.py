"""Suitability: axial, enough slices, regular spacing, contrast in the pulmonary arteries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from pe_node.findings import NotAnalysedReason
from pe_node.pipeline.series import CTSeries, SliceRef
from pe_node.pipeline.suitability import (
    SuitabilityRules,
    check_suitability,
    mediastinal_enhancement,
)
from tests.dicom_factory import phantom_volume

RULES = SuitabilityRules(min_slices=30)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def series(hu: np.ndarray, *, positions: list[float] | None = None, orientation=AXIAL) -> CTSeries:
    positions = positions if positions is not None else [1.25 * k for k in range(len(hu))]
    slices = [SliceRef(f"1.2.{k}", "1.2.840.10008.5.1.4.1.1.2", Path(f"{k}.dcm"), p, k + 1)
              for k, p in enumerate(positions)]
    return CTSeries("1.1", "1.2", slices, hu, (0.7, 0.7), 1.25, orientation, pydicom.Dataset())


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return phantom_volume(n_slices=40, size=64, seed=1)


def test_a_contrast_ctpa_passes(volume: np.ndarray) -> None:
    assert check_suitability(series(volume), RULES) is None


def test_coronal_reformat_is_not_analysed(volume: np.ndarray) -> None:
    refusal = check_suitability(series(volume, orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0)), RULES)
    assert refusal is not None and refusal.reason is NotAnalysedReason.NOT_AXIAL
    assert "90 degrees from the body axis" in refusal.detail


def test_gantry_tilt_is_still_axial(volume: np.ndarray) -> None:
    tilt = np.radians(15)
    tilted = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(np.sin(tilt)))
    assert check_suitability(series(volume, orientation=tilted), RULES) is None


def test_too_few_slices(volume: np.ndarray) -> None:
    refusal = check_suitability(series(volume[:12]), RULES)
    assert refusal is not None and refusal.reason is NotAnalysedReason.TOO_FEW_SLICES
    assert refusal.detail == "too few slices: 12 < 30"


def test_missing_slices_break_the_spacing(volume: np.ndarray) -> None:
    positions = [1.25 * k for k in range(len(volume))]
    positions[20:] = [p + 2.5 for p in positions[20:]]  # two slices missing between 20 and 21
    refusal = check_suitability(series(volume, positions=positions), RULES)
    assert refusal is not None and refusal.reason is NotAnalysedReason.INCONSISTENT_SPACING
    assert "3.75 mm between slices 20 and 21, median 1.25 mm (missing slices?)" in refusal.detail


def test_duplicated_positions_break_the_spacing(volume: np.ndarray) -> None:
    positions = [1.25 * k for k in range(len(volume))]
    positions[10] = positions[9]
    refusal = check_suitability(series(volume, positions=positions), RULES)
    assert refusal is not None and refusal.reason is NotAnalysedReason.INCONSISTENT_SPACING


def test_non_contrast_ct_is_not_analysed(volume: np.ndarray) -> None:
    plain = volume.copy()
    plain[(plain > 150) & (plain < 500)] = 45  # blood without contrast
    assert mediastinal_enhancement(plain) < 100 < mediastinal_enhancement(volume)
    refusal = check_suitability(series(plain), RULES)
    assert refusal is not None and refusal.reason is NotAnalysedReason.NO_CONTRAST
    assert "no contrast in the pulmonary arteries" in refusal.detail


def test_weak_bolus_still_passes_for_the_model_to_call_indeterminate(volume: np.ndarray) -> None:
    weak = volume.copy()
    weak[(weak > 150) & (weak < 500)] = 130
    assert check_suitability(series(weak), RULES) is None
