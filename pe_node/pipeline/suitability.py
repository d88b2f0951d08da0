"""Is a routed series fit for the model? A series that is not gets a "not analysed" report with the reason.

Checks, in order: an axial reconstruction (slice normal within ``max_tilt_degrees`` of the body axis, which admits
gantry tilt but not coronal or sagittal reformats), enough slices, regular spacing (no missing or duplicated
slices), and contrast in the pulmonary arteries. The contrast check looks at the mediastinum (the centre of the
body outline, between sternum and spine) in the middle third of the series: a CTPA has blood pool well above
``min_contrast_hu`` there, a non-contrast CT has blood at 30-60 HU. A weak bolus (100-150 HU) still passes: the
model reports such exams as indeterminate, as RSPECT labels them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pe_node.config import SeriesConfig
from pe_node.findings import NotAnalysed, NotAnalysedReason
from pe_node.pipeline.series import CTSeries

_BODY_HU = -500
_MAX_SAMPLED_SLICES = 24


@dataclass(frozen=True)
class SuitabilityRules:
    min_slices: int = 30
    max_tilt_degrees: float = 30.0
    spacing_tolerance: float = 0.3
    min_contrast_hu: float = 100.0

    @classmethod
    def of(cls, series: SeriesConfig) -> SuitabilityRules:
        """The rules as ``series`` in config.yaml sets them (``series.min_instances``, ``series.max_tilt_degrees``)."""
        return cls(min_slices=series.min_instances, max_tilt_degrees=series.max_tilt_degrees)


def check_suitability(series: CTSeries, rules: SuitabilityRules) -> NotAnalysed | None:
    """None when the model can read the series, else why not."""
    positions = np.array([s.position for s in series.slices], dtype=np.float64)
    return (axial_check(series.orientation, rules) or slice_count_check(len(series), rules)
            or spacing_check(positions, rules) or _contrast(series, rules))


def tilt_degrees(orientation: Sequence[float]) -> float:
    """The angle between the slice normal of ImageOrientationPatient and the body (head-feet) axis."""
    row, column = np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row, column)
    return float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / max(float(np.linalg.norm(normal)), 1e-9)))))


def axial_check(orientation: Sequence[float], rules: SuitabilityRules) -> NotAnalysed | None:
    tilt = tilt_degrees(orientation)
    if tilt > rules.max_tilt_degrees:
        return NotAnalysed(NotAnalysedReason.NOT_AXIAL,
                           f"not an axial series: slice normal {tilt:.0f} degrees from the body axis "
                           f"(at most {rules.max_tilt_degrees:.0f})")
    return None


def slice_count_check(count: int, rules: SuitabilityRules) -> NotAnalysed | None:
    if count < rules.min_slices:
        return NotAnalysed(NotAnalysedReason.TOO_FEW_SLICES, f"too few slices: {count} < {rules.min_slices}")
    return None


def spacing_check(positions: np.ndarray, rules: SuitabilityRules) -> NotAnalysed | None:
    """Whether slices at ``positions`` (along the normal, in slice order) are regularly spaced."""
    gaps = np.abs(np.diff(positions))
    if gaps.size == 0:
        return None
    median = float(np.median(gaps))
    if median <= 1e-3:
        return NotAnalysed(NotAnalysedReason.INCONSISTENT_SPACING, "slices share the same position")
    worst = int(np.argmax(np.abs(gaps - median)))
    if abs(gaps[worst] - median) > rules.spacing_tolerance * median:
        hint = "missing slices?" if gaps[worst] > median else "duplicated or overlapping slices?"
        return NotAnalysed(
            NotAnalysedReason.INCONSISTENT_SPACING,
            f"inconsistent slice spacing: {gaps[worst]:.2f} mm between slices {worst + 1} and {worst + 2}, "
            f"median {median:.2f} mm ({hint})",
        )
    return None


def _contrast(series: CTSeries, rules: SuitabilityRules) -> NotAnalysed | None:
    level = mediastinal_enhancement(series.hu)
    if level < rules.min_contrast_hu:
        return NotAnalysed(
            NotAnalysedReason.NO_CONTRAST,
            f"no contrast in the pulmonary arteries: mediastinal blood pool at {level:.0f} HU "
            f"(a CTPA needs at least {rules.min_contrast_hu:.0f})",
        )
    return None


def mediastinal_enhancement(hu: np.ndarray) -> float:
    """The 97th percentile of smoothed HU in the mediastinum of the middle third of the slices."""
    count = len(hu)
    middle = np.arange(count // 3, max(count // 3 + 1, 2 * count // 3))
    step = max(1, len(middle) // _MAX_SAMPLED_SLICES)
    samples = []
    for index in middle[::step]:
        region = _mediastinum(hu[index])
        if region is not None and region.size:
            samples.append(region.ravel())
    if not samples:
        return float("-inf")
    values = np.concatenate(samples)
    values = values[(values > -200) & (values < 1000)]  # soft tissue and blood; lung, air and dense bone out
    return float(np.percentile(values, 97)) if values.size else float("-inf")


def _mediastinum(slice_hu: np.ndarray) -> np.ndarray | None:
    body = slice_hu > _BODY_HU
    rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    if rows.size < 8 or cols.size < 8:
        return None
    top, height = rows[0], rows[-1] - rows[0]
    left, width = cols[0], cols[-1] - cols[0]
    rows_in = slice(top + int(0.2 * height), top + int(0.65 * height))
    window = slice_hu[rows_in, left + int(0.3 * width): left + int(0.7 * width)]
    if window.shape[0] < 3 or window.shape[1] < 3:
        return None
    smooth = window.astype(np.float32)
    smooth = (smooth[:-2, :-2] + smooth[1:-1, :-2] + smooth[2:, :-2] + smooth[:-2, 1:-1] + smooth[1:-1, 1:-1]
              + smooth[2:, 1:-1] + smooth[:-2, 2:] + smooth[1:-1, 2:] + smooth[2:, 2:]) / 9.0
    return smooth
