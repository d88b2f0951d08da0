"""Located findings: where on the CT the model sees pulmonary embolism, as the result objects draw it.

A finding is a run of neighbouring positive slices (image probability above ``THRESHOLD``), read as one clot:

- Runs separated by at most ``MAX_GAP`` (one) slice at or below the threshold are one finding. An embolus is a
  continuous cast of a vessel over consecutive slices, and one slice that dips under the threshold inside it is far
  likelier a miss of the image head than two clots; the gap slice lies inside the finding's extent.
- At most ``MAX_FINDINGS`` (eight) findings: when the runs are more, the two closest runs (fewest slices between
  them, the earlier pair first on a tie) are joined until eight are left, so every positive slice still lies in a
  finding and each finding gets a class-activation map (the predictor maps the peak slice of each; see
  :func:`peak_slices`).

Each finding has its extent (first and last slice, slice order), its peak slice (highest image probability, the
first on a tie) and that probability, a region on the peak slice and a side:

- Region: from the peak slice's class-activation map, the connected area at or above ``CAM_LEVEL`` of the map's
  maximum that holds the maximum, as the axis-aligned ellipse of its second moments (semi-axes twice the standard
  deviation along rows and columns, at least ``MIN_SEMI_AXIS`` pixels, inside the image). Axis-aligned and never
  wider than tall, because OHIF's elliptical ROI takes the first axis of an ELLIPSE (its major axis, DICOM says) as
  the vertical one and reads any other as oblique: an area wider than tall gets the circle of its half-width.
  Without a map (or with a flat one) the region is a point at the body's centre on that slice, and the side is not
  determined.
- Side: the patient-left/right offset (from ImageOrientationPatient and PixelSpacing, so a flipped image reads
  right) of the map's maximum from the body's midline on that slice (the mean position of the body's pixels, its
  largest connected area above ``BODY_HU``). Within ``CENTRAL_MM`` of the midline is central, where the pulmonary
  trunk and the origins of both pulmonary arteries lie; beyond it left or right. The names are those of the
  RSNA-STR exam labels (central, left, right); nothing finer (a lobe) is claimed.

A negative or indeterminate exam has no finding, but the model still looked hardest somewhere: its most suspicious
slice (:func:`rank_slices`: highest image probability times attention, the first of equals; the first key slice and
the first slice the predictor maps) with a region found as a finding's is, and a label that says no PE was found
(:func:`describe_suspicious`). It is what OHIF shows of such an exam; it is not a finding and has no side.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pe_node.findings import THRESHOLD, ExamResult, Prediction
from pe_node.pipeline.series import CTSeries

MAX_GAP = 1
"""Most slices at or below the threshold between two runs that still make one finding."""
MAX_FINDINGS = 8
"""Most findings per series; closer runs are joined beyond it."""
CAM_LEVEL = 0.5
"""Share of the map's maximum that bounds a finding's region."""
MIN_SEMI_AXIS = 2.0
"""Smallest semi-axis of a region's ellipse (pixels), so that a one-pixel area still draws."""
CENTRAL_MM = 25.0
"""Largest left/right distance (mm) of a central finding from the body's midline."""
BODY_HU = -500
"""HU above which a pixel belongs to the body (air and lung parenchyma lie below)."""


class Side(enum.Enum):
    """Where a finding lies across the patient, named as the RSNA-STR location labels."""

    CENTRAL = "central"
    LEFT = "left"
    RIGHT = "right"


class Shape(enum.Enum):
    """The graphic type of a region (DICOM SCOORD and GSPS names)."""

    ELLIPSE = "ELLIPSE"
    POINT = "POINT"


@dataclass(frozen=True)
class Region:
    """An area on one slice in image pixel coordinates (column, row), (0, 0) the top left corner of the first pixel.

    An ellipse has four points, the ends of its vertical axis (its major axis, or as long as the other) then those of
    its horizontal axis (DICOM ELLIPSE); a point has one.
    """

    shape: Shape
    points: tuple[tuple[float, float], ...]

    @property
    def centre(self) -> tuple[float, float]:
        columns, rows = zip(*self.points, strict=True)
        return float(np.mean(columns)), float(np.mean(rows))


@dataclass(frozen=True)
class Finding:
    """A run of positive slices (slice order, ``first`` to ``last``) read as one embolus; see the module docstring."""

    first: int
    last: int
    peak: int
    probability: float
    side: Side | None
    region: Region

    def __contains__(self, index: int) -> bool:
        return self.first <= index <= self.last


@dataclass(frozen=True)
class SuspiciousSlice:
    """The slice of a negative or indeterminate exam that the model found most suspicious, its image probability (at
    most ``THRESHOLD``) and a region on it; see the module docstring."""

    index: int
    probability: float
    region: Region


def rank_slices(image: np.ndarray, attention: np.ndarray, candidates: np.ndarray | None = None) -> list[int]:
    """Slices (of ``candidates``, ascending; default all) best first by image probability times attention, the
    earlier of equals first: the slices that both the image head and the study attention point at."""
    score = np.asarray(image, dtype=np.float64) * np.asarray(attention, dtype=np.float64)
    indices = np.arange(len(score)) if candidates is None else np.asarray(candidates, dtype=np.int64)
    order = np.argsort(-score[indices], kind="stable")
    return [int(indices[i]) for i in order]


def finding_extents(image: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) slice of each finding in slice order: runs above the threshold, short gaps and surplus joined."""
    positive = np.flatnonzero(np.asarray(image, dtype=np.float64) > THRESHOLD)
    if not positive.size:
        return []
    breaks = np.flatnonzero(np.diff(positive) > MAX_GAP + 1)
    extents = [(int(positive[a]), int(positive[b])) for a, b in
               zip(np.r_[0, breaks + 1], np.r_[breaks, len(positive) - 1], strict=True)]
    while len(extents) > MAX_FINDINGS:
        gaps = [extents[i + 1][0] - extents[i][1] for i in range(len(extents) - 1)]
        i = int(np.argmin(gaps))
        extents[i : i + 2] = [(extents[i][0], extents[i + 1][1])]
    return extents


def peak_slices(image: np.ndarray) -> list[int]:
    """The peak slice of each finding: the slices whose class-activation maps give the findings their regions."""
    values = np.asarray(image, dtype=np.float64)
    return [_peak(values, first, last) for first, last in finding_extents(values)]


def locate_findings(prediction: Prediction, series: CTSeries) -> list[Finding]:
    """The findings of ``prediction`` on ``series`` in slice order; none unless some slice is above the threshold."""
    image = np.asarray(prediction.image, dtype=np.float64)
    findings = []
    for first, last in finding_extents(image):
        peak = _peak(image, first, last)
        region, side = _region_and_side(series, peak, prediction.cams.get(peak))
        findings.append(Finding(first, last, peak, float(image[peak]), side, region))
    return findings


def locate_most_suspicious(prediction: Prediction, series: CTSeries) -> SuspiciousSlice | None:
    """The most suspicious slice of a non-positive ``prediction`` on ``series``; None for a positive exam (its
    findings say where) or an empty series."""
    if prediction.pe_present or not len(prediction.image):
        return None
    index = rank_slices(prediction.image, prediction.attention)[0]
    region, _ = _region_and_side(series, index, prediction.cams.get(index))
    return SuspiciousSlice(index, float(prediction.image[index]), region)


def patient_points(series: CTSeries, index: int, region: Region) -> np.ndarray | None:
    """The points of ``region`` on slice ``index`` in patient coordinates (mm), [points, 3]; None without the
    position of the first slice in the header (an Enhanced CT keeps it per frame).

    Slice ``index`` lies ``position`` mm along the slice normal from the first slice, in plane with it.
    """
    origin = series.header.get("ImagePositionPatient")
    if origin is None or len(origin) != 3:
        return None
    row_direction = np.asarray(series.orientation[:3], dtype=np.float64)
    column_direction = np.asarray(series.orientation[3:], dtype=np.float64)
    normal = np.cross(row_direction, column_direction)
    row_spacing, column_spacing = series.pixel_spacing
    along = series.slices[index].position - series.slices[0].position
    start = np.asarray([float(v) for v in origin]) + along * normal
    pixels = np.asarray(region.points, dtype=np.float64) - 0.5  # from corner to centre-of-pixel coordinates
    return start + np.outer(pixels[:, 0] * column_spacing, row_direction) + np.outer(
        pixels[:, 1] * row_spacing, column_direction
    )


def describe(finding: Finding, series: CTSeries) -> str:
    """A reader's label of a finding: "PE, right, images 48-61, p 0.96"."""
    side = finding.side.value if finding.side is not None else "side not determined"
    return f"PE, {side}, {slice_span(series, finding.first, finding.last)}, p {finding.probability:.2f}"


def describe_suspicious(spot: SuspiciousSlice, series: CTSeries, result: ExamResult) -> str:
    """A reader's label of the most suspicious slice of an exam with ``result`` (negative or indeterminate) that
    cannot be taken for a finding: "No PE: most suspicious slice, image 40, p 0.12 (below 0.5)"."""
    if result is ExamResult.POSITIVE:
        raise ValueError("a positive exam has findings, not a most suspicious slice")
    verdict = "No PE" if result is ExamResult.NEGATIVE else "Indeterminate exam, no PE located"
    side = "below" if spot.probability < THRESHOLD else "not above"
    return (f"{verdict}: most suspicious slice, {slice_span(series, spot.index, spot.index)}, "
            f"p {spot.probability:.2f} ({side} {THRESHOLD:g})")


def slice_span(series: CTSeries, first: int, last: int) -> str:
    """Slices ``first``..``last`` (slice order) by the numbers a viewer shows: frame numbers of a multi-frame image,
    else instance numbers when they run along the slices, else positions ("slices 3-9 of 40")."""
    numbers = _display_numbers(series)
    if numbers is None:
        low, high, noun, suffix = first + 1, last + 1, "slice", f" of {len(series)}"
    else:
        low, high = sorted((numbers[first], numbers[last]))
        noun, suffix = ("frame" if series.slices[first].frame is not None else "image"), ""
    return f"{noun} {low}{suffix}" if low == high else f"{noun}s {low}-{high}{suffix}"


def _peak(image: np.ndarray, first: int, last: int) -> int:
    """The slice of ``first``..``last`` with the highest probability, the first of equals."""
    return first + int(np.argmax(image[first : last + 1]))


def _display_numbers(series: CTSeries) -> list[int] | None:
    """Each slice's frame number, else instance number, when all have one and they run along the slices."""
    frames = [ref.frame for ref in series.slices]
    candidates = frames if None not in frames else [ref.instance_number for ref in series.slices]
    numbers = [n for n in candidates if n is not None]
    if len(numbers) != len(series):
        return None
    steps = np.diff(np.asarray(numbers, dtype=np.int64))
    return numbers if (steps > 0).all() or (steps < 0).all() else None


def _region_and_side(series: CTSeries, index: int, cam: np.ndarray | None) -> tuple[Region, Side | None]:
    body = _body(series.hu[index])
    if cam is None or cam.shape != series.hu.shape[1:] or not float(np.max(cam)) > 0:
        rows, cols = np.nonzero(body) if body.any() else np.indices(body.shape).reshape(2, -1)
        return Region(Shape.POINT, ((float(cols.mean()) + 0.5, float(rows.mean()) + 0.5),)), None
    peak = tuple(int(i) for i in np.unravel_index(int(np.argmax(cam)), cam.shape))
    areas, _ = ndimage.label(cam >= CAM_LEVEL * float(cam[peak]))
    rows, cols = np.nonzero(areas == areas[peak])
    return _ellipse(rows, cols, cam.shape), _side(series, body, peak)


def _ellipse(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, ...]) -> Region:
    """The axis-aligned moment ellipse of an area's pixels, its vertical (major) axis first, kept inside an image of
    ``shape``."""
    centre_col, centre_row = float(cols.mean()) + 0.5, float(rows.mean()) + 0.5
    half_width = min(max(MIN_SEMI_AXIS, 2.0 * float(cols.std())), centre_col, shape[1] - centre_col)
    half_height = min(max(MIN_SEMI_AXIS, 2.0 * float(rows.std()), half_width), centre_row, shape[0] - centre_row)
    half_width = min(half_width, half_height)  # never wider than tall (see the module docstring)
    down = ((centre_col, centre_row - half_height), (centre_col, centre_row + half_height))
    across = ((centre_col - half_width, centre_row), (centre_col + half_width, centre_row))
    return Region(Shape.ELLIPSE, (*down, *across))


def _side(series: CTSeries, body: np.ndarray, peak: Sequence[int]) -> Side:
    """The side of pixel ``peak`` (row, column) from the body's midline, in patient millimetres."""
    rows, cols = np.nonzero(body) if body.any() else (np.array([body.shape[0] / 2]), np.array([body.shape[1] / 2]))
    row_spacing, col_spacing = series.pixel_spacing
    row_x, column_x = series.orientation[0], series.orientation[3]  # patient x (+ is the patient's left)
    offset = (peak[1] - cols.mean()) * col_spacing * row_x + (peak[0] - rows.mean()) * row_spacing * column_x
    if abs(offset) <= CENTRAL_MM:
        return Side.CENTRAL
    return Side.LEFT if offset > 0 else Side.RIGHT


def _body(hu: np.ndarray) -> np.ndarray:
    """The largest connected area above ``BODY_HU`` on one slice (the body without the table)."""
    areas, count = ndimage.label(hu > BODY_HU)
    if count == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(areas.ravel())[1:]
    return areas == 1 + int(np.argmax(sizes))
