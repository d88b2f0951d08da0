"""Located findings: how positive slices group into findings, where each lies (side, region) and how it is named;
and the most suspicious slice of an exam without findings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from pe_node.findings import EXAM_LABELS, ExamResult, Prediction
from pe_node.located import (
    CENTRAL_MM,
    MAX_FINDINGS,
    Shape,
    Side,
    describe,
    describe_suspicious,
    finding_extents,
    locate_findings,
    locate_most_suspicious,
    patient_points,
    peak_slices,
    rank_slices,
    slice_span,
)
from pe_node.pipeline.series import CTSeries, SliceRef

SIZE, SPACING = 128, 0.75  # a 96 mm field of view: the body spans columns 8-120
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def series(slices: int = 20, orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
           numbers: list[int | None] | None = None, frames: bool = False) -> CTSeries:
    """An axial series whose body (40 HU) is centred on the image; instance numbers 1..n unless given."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    body = ((cols - SIZE / 2) / (SIZE * 0.44)) ** 2 + ((rows - SIZE / 2) / (SIZE * 0.35)) ** 2 < 1
    hu = np.repeat(np.where(body, 40, -1000).astype(np.int16)[None], slices, axis=0)
    numbers = numbers if numbers is not None else list(range(1, slices + 1))
    refs = [SliceRef("1.2.3.9" if frames else f"1.2.3.{k}", CT_IMAGE, Path(f"{k}.dcm"), 2.5 * k, numbers[k],
                     k + 1 if frames else None) for k in range(slices)]
    header = pydicom.Dataset()
    header.ImagePositionPatient = [-48.0, -48.0, -100.0]
    return CTSeries("1.2.3", "1.2.3.4", refs, hu, (SPACING, SPACING), 2.5, orientation, header)  # type: ignore[arg-type]


def blob(row: float, col: float, sigma: float = 4.0) -> np.ndarray:
    rows, cols = np.mgrid[:SIZE, :SIZE]
    return np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * sigma**2)).astype(np.float32)


def prediction(image: list[float], cams: dict[int, np.ndarray] | None = None,
               attention: list[float] | None = None) -> Prediction:
    n = len(image)
    weights = np.asarray(attention, dtype=np.float32) if attention is not None else np.full(n, 1.0 / n)
    return Prediction("1.2.3.4", [f"1.2.3.{k}" for k in range(n)], dict.fromkeys(EXAM_LABELS, 0.1),
                      np.asarray(image, dtype=np.float32), weights, cams or {})


def test_contiguous_positive_slices_are_one_finding_and_a_one_slice_gap_does_not_split_it() -> None:
    image = [0.1, 0.7, 0.9, 0.4, 0.8, 0.2, 0.1, 0.6, 0.6, 0.1]
    assert finding_extents(np.array(image)) == [(1, 4), (7, 8)]
    assert peak_slices(np.array(image)) == [2, 7], "the highest slice, the first of equals"


def test_a_two_slice_gap_separates_findings() -> None:
    assert finding_extents(np.array([0.9, 0.2, 0.3, 0.9])) == [(0, 0), (3, 3)]


def test_no_slice_above_the_threshold_means_no_finding() -> None:
    assert finding_extents(np.array([0.5, 0.2, 0.5])) == [] and peak_slices(np.array([])) == []


def test_surplus_runs_are_joined_closest_first_so_every_positive_slice_stays_in_a_finding() -> None:
    image = np.full(60, 0.1)
    starts = [0, 4, 8, 12, 16, 20, 24, 28, 40, 50]  # ten runs; the last two lie further apart
    image[starts] = 0.9
    extents = finding_extents(image)
    assert len(extents) == MAX_FINDINGS
    assert extents[:2] == [(0, 8), (12, 12)], "the closest pairs joined, the earlier first on a tie"
    assert extents[-2:] == [(40, 40), (50, 50)]
    assert all(any(first <= s <= last for first, last in extents) for s in starts)


@pytest.mark.parametrize(
    ("column", "orientation", "side"),
    [
        (SIZE / 2 + 2, (1, 0, 0, 0, 1, 0), Side.CENTRAL),
        (SIZE / 2 + 45, (1, 0, 0, 0, 1, 0), Side.LEFT),  # image right is the patient's left
        (SIZE / 2 - 45, (1, 0, 0, 0, 1, 0), Side.RIGHT),
        (SIZE / 2 + 45, (-1, 0, 0, 0, 1, 0), Side.RIGHT),  # a flipped image: image right is the patient's right
    ],
)
def test_side_follows_the_attention_peak_across_the_patient(column: float, orientation: tuple[float, ...],
                                                            side: Side) -> None:
    assert 45 * SPACING > CENTRAL_MM > 2 * SPACING
    ct = series(orientation=orientation)
    (finding,) = locate_findings(prediction([0.1] * 5 + [0.8, 0.95, 0.8] + [0.1] * 12, {6: blob(60, column)}), ct)
    assert (finding.first, finding.last, finding.peak, finding.probability) == (5, 7, 6, pytest.approx(0.95))
    assert finding.side is side


def test_region_is_the_ellipse_around_the_peak_of_the_attention_map() -> None:
    cam = np.maximum(blob(40, 90, sigma=6), 0.8 * blob(100, 20, sigma=3))  # a second, weaker spot elsewhere
    (finding,) = locate_findings(prediction([0.1, 0.9, 0.1], {1: cam}), series(3))
    region = finding.region
    assert region.shape is Shape.ELLIPSE and len(region.points) == 4
    assert region.centre == pytest.approx((90.5, 40.5), abs=0.2)
    (_, top), (_, bottom) = region.points[:2]
    assert 6 < (bottom - top) / 2 < 12, "semi-axis about twice the spread of the half-maximum area"


@pytest.mark.parametrize(("tall", "wide"), [(12, 3), (3, 12)])
def test_ellipse_is_never_wider_than_tall_and_gives_its_vertical_major_axis_first(tall: float, wide: float) -> None:
    """OHIF's elliptical ROI reads the first axis as the vertical one; a wide area gets the circle of its width."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    cam = np.exp(-((rows - 64) ** 2 / (2 * tall**2) + (cols - 64) ** 2 / (2 * wide**2))).astype(np.float32)
    (finding,) = locate_findings(prediction([0.9], {0: cam}), series(1))
    (c0, r0), (c1, r1), (c2, r2), (c3, r3) = finding.region.points
    assert c0 == c1 and r2 == r3, "first axis vertical, second horizontal"
    height, width = r1 - r0, c3 - c2
    if tall > wide:
        assert height > 2 * width > 0
    else:
        assert height == pytest.approx(width) and width > 4 * 2 * 3, "a circle as wide as the area"


def test_without_a_map_the_region_is_a_point_at_the_body_and_the_side_is_not_determined() -> None:
    ct = series(3)
    (finding,) = locate_findings(prediction([0.1, 0.9, 0.1]), ct)
    assert finding.region.shape is Shape.POINT and finding.side is None
    assert finding.region.points == ((pytest.approx(SIZE / 2, abs=1), pytest.approx(SIZE / 2, abs=1)),)
    assert describe(finding, ct) == "PE, side not determined, image 2, p 0.90"


def test_patient_points_put_the_region_on_its_slice_in_millimetres() -> None:
    ct = series(3)
    (finding,) = locate_findings(prediction([0.1, 0.9, 0.1], {1: blob(40, 90)}), ct)
    points = patient_points(ct, 1, finding.region)
    assert points is not None and points.shape == (4, 3)
    centre = points.mean(axis=0)
    assert centre == pytest.approx([-48 + 90 * SPACING, -48 + 40 * SPACING, -100 + 2.5], abs=0.2)
    del ct.header.ImagePositionPatient
    assert patient_points(ct, 1, finding.region) is None


@pytest.mark.parametrize(
    ("numbers", "frames", "span"),
    [
        (list(range(1, 21)), False, "images 5-8"),
        (list(range(20, 0, -1)), False, "images 13-16"),  # numbered from the other end
        ([7] * 20, False, "slices 5-8 of 20"),  # numbers that do not run along the slices
        ([None] * 20, False, "slices 5-8 of 20"),
        ([1] * 20, True, "frames 5-8"),
    ],
)
def test_extent_is_named_by_the_numbers_a_viewer_shows(numbers: list[int | None], frames: bool, span: str) -> None:
    assert slice_span(series(numbers=numbers, frames=frames), 4, 7) == span


def test_label_names_side_extent_and_peak_probability() -> None:
    ct = series()
    image = [0.1] * 20
    image[4:8] = [0.6, 0.96, 0.7, 0.55]
    (finding,) = locate_findings(prediction(image, {5: blob(60, SIZE / 2 - 45)}), ct)
    assert describe(finding, ct) == "PE, right, images 5-8, p 0.96"


def test_slices_rank_by_probability_times_attention_the_earlier_of_equals_first() -> None:
    image, attention = np.array([0.2, 0.4, 0.1, 0.4]), np.array([0.4, 0.1, 0.3, 0.1])
    assert rank_slices(image, attention) == [0, 1, 3, 2]
    assert rank_slices(image, attention, candidates=np.array([1, 2, 3])) == [1, 3, 2]


def test_most_suspicious_slice_of_a_negative_exam_is_its_top_ranked_slice_with_the_region_of_its_map() -> None:
    ct = series(5)
    image, attention = [0.1, 0.3, 0.45, 0.2, 0.1], [0.1, 0.4, 0.2, 0.2, 0.1]  # 0.12 on slice 1, 0.09 on slice 2
    spot = locate_most_suspicious(prediction(image, {1: blob(40, 90)}, attention), ct)
    assert spot is not None and (spot.index, spot.probability) == (1, pytest.approx(0.3))
    assert spot.region.shape is Shape.ELLIPSE and spot.region.centre == pytest.approx((90.5, 40.5), abs=0.2)
    unmapped = locate_most_suspicious(prediction(image, {}, attention), ct)
    assert unmapped is not None and unmapped.region.shape is Shape.POINT, "without a map, a point at the body"
    assert locate_most_suspicious(prediction([0.1, 0.9, 0.1, 0.1, 0.1]), ct) is None, "a positive exam has findings"


@pytest.mark.parametrize(("result", "probability", "label"), [
    (ExamResult.NEGATIVE, 0.12, "No PE: most suspicious slice, image 2, p 0.12 (below 0.5)"),
    (ExamResult.NEGATIVE, 0.5, "No PE: most suspicious slice, image 2, p 0.50 (not above 0.5)"),
    (ExamResult.INDETERMINATE, 0.3,
     "Indeterminate exam, no PE located: most suspicious slice, image 2, p 0.30 (below 0.5)"),
])
def test_most_suspicious_slice_is_labelled_so_that_nobody_takes_it_for_a_finding(result: ExamResult,
                                                                                probability: float,
                                                                                label: str) -> None:
    ct = series(3)
    spot = locate_most_suspicious(prediction([0.01, probability, 0.01]), ct)
    assert spot is not None and describe_suspicious(spot, ct, result) == label
    with pytest.raises(ValueError, match="positive"):
        describe_suspicious(spot, ct, ExamResult.POSITIVE)
