"""How a report reads a prediction (RSNA-STR rules), which slices it captures, and its input types' validation."""

from __future__ import annotations

import numpy as np
import pytest

from pe_node.findings import (
    EXAM_LABELS,
    ClinicalCourse,
    ExamLabel,
    ExamResult,
    NotAnalysed,
    NotAnalysedReason,
    Prediction,
    clinical_course,
    exam_probability,
    exam_result,
    positive_slices,
)
from pe_node.reporting import AlgorithmInfo, ReportOptions, codes
from pe_node.reporting.capture import patient_orientation
from pe_node.reporting.report import key_slices


def prediction(image: list[float], attention: list[float] | None = None, **exam: float) -> Prediction:
    labels = {label: 0.0 for label in EXAM_LABELS}
    labels.update({ExamLabel[name.upper()].value: p for name, p in exam.items()})
    n = len(image)
    return Prediction(
        series_instance_uid="1.2.3",
        sop_instance_uids=[f"1.2.3.{i}" for i in range(n)],
        exam=labels,
        image=np.asarray(image, dtype=np.float64),
        attention=np.asarray(attention if attention is not None else [1.0 / n] * n, dtype=np.float64),
    )


def test_exam_is_positive_when_an_image_probability_exceeds_one_half() -> None:
    assert exam_result(prediction([0.1, 0.51, 0.2], negative=0.9)) is ExamResult.POSITIVE


def test_exam_is_negative_only_when_negative_label_wins() -> None:
    assert exam_result(prediction([0.1, 0.5], negative=0.9)) is ExamResult.NEGATIVE
    assert exam_result(prediction([0.1, 0.5], indeterminate=0.8)) is ExamResult.INDETERMINATE


def test_inconsistent_non_positive_labels_read_as_undetermined() -> None:
    assert exam_result(prediction([0.1], negative=0.2, indeterminate=0.3)) is ExamResult.INDETERMINATE
    assert exam_result(prediction([0.1], negative=0.9, indeterminate=0.9)) is ExamResult.INDETERMINATE


def test_not_analysed_is_its_own_result() -> None:
    outcome = NotAnalysed(NotAnalysedReason.NOT_AXIAL, "ImageOrientationPatient is sagittal")
    assert exam_result(outcome) is ExamResult.NOT_ANALYSED
    assert codes.EVALUATIONS[ExamResult.NOT_ANALYSED] is not codes.EVALUATIONS[ExamResult.INDETERMINATE]


def test_a_positive_exams_probability_is_its_highest_image_probability() -> None:
    assert exam_probability(prediction([0.2, 0.93, 0.6], negative=0.4)) == pytest.approx(0.93)


def test_a_non_positive_exams_probability_comes_from_the_exam_head_not_the_folded_half() -> None:
    """Label consistency leaves 0.5 on the slices it moved down; the exam head says how sure the negative is."""
    assert exam_probability(prediction([0.2, 0.5, 0.5], negative=0.95)) == pytest.approx(0.05)
    assert exam_probability(prediction([0.5], indeterminate=0.8)) == pytest.approx(0.2)
    assert exam_probability(prediction([0.1, 0.3], negative=0.6)) == pytest.approx(0.3), "never above the images"
    assert exam_probability(prediction([0.4], negative=0.2, indeterminate=0.3)) == pytest.approx(0.4), \
        "labels that break the rules still report at most 0.5"
    assert exam_probability(prediction([], attention=[])) == 0.0


@pytest.mark.parametrize(
    ("labels", "course"),
    [
        ({}, ClinicalCourse.ACUTE),
        ({"chronic": 0.7}, ClinicalCourse.CHRONIC),
        ({"acute_and_chronic": 0.6}, ClinicalCourse.ACUTE_ON_CHRONIC),
        ({"chronic": 0.6, "acute_and_chronic": 0.8}, ClinicalCourse.ACUTE_ON_CHRONIC),
    ],
)
def test_clinical_course_follows_the_chronicity_labels(labels: dict[str, float], course: ClinicalCourse) -> None:
    assert clinical_course(prediction([0.9], **labels).exam) is course


def test_positive_slices_are_those_above_one_half() -> None:
    assert positive_slices(prediction([0.2, 0.7, 0.5, 0.51])) == [1, 3]


def test_key_slices_of_a_positive_exam_rank_positive_slices_by_attention_times_probability() -> None:
    p = prediction([0.9, 0.2, 0.6, 0.95, 0.8], attention=[0.1, 0.5, 0.3, 0.05, 0.05])
    assert key_slices(p, ExamResult.POSITIVE, ReportOptions(max_images=2)) == [2, 0]
    assert key_slices(p, ExamResult.POSITIVE, ReportOptions(max_images=10)) == [2, 0, 3, 4]


def test_negative_exam_has_key_slices_only_when_configured() -> None:
    p = prediction([0.1, 0.4, 0.3], attention=[0.2, 0.3, 0.5], negative=0.9)
    assert key_slices(p, ExamResult.NEGATIVE, ReportOptions()) == []
    assert key_slices(p, ExamResult.NEGATIVE, ReportOptions(captures_for_negative=True, max_images=2)) == [2, 1]


@pytest.mark.parametrize("max_images", [-1, 65, 2.5, True])
def test_report_options_refuse_a_bad_image_count(max_images: object) -> None:
    with pytest.raises(ValueError, match="max_images"):
        ReportOptions(max_images=max_images)  # type: ignore[arg-type]


def test_not_analysed_needs_a_reason_and_words() -> None:
    with pytest.raises(TypeError, match="NotAnalysedReason"):
        NotAnalysed("too few slices", "12 < 30")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="detail"):
        NotAnalysed(NotAnalysedReason.TOO_FEW_SLICES, "  ")


def test_algorithm_info_refuses_values_dicom_cannot_hold() -> None:
    with pytest.raises(ValueError, match="version"):
        AlgorithmInfo(name="pe-node PE CNN-LSTM", version="")
    with pytest.raises(ValueError, match="name"):
        AlgorithmInfo(name="x" * 65, version="1")


@pytest.mark.parametrize(
    ("orientation", "letters"),
    [
        ((1, 0, 0, 0, 1, 0), ("L", "P")),
        ((-1, 0, 0, 0, -1, 0), ("R", "A")),
        ((0, 1, 0, 0, 0, -1), ("P", "F")),
        ((0.99, 0.1, 0, -0.1, 0.99, 0), ("L", "P")),
    ],
)
def test_patient_orientation_names_the_dominant_axes(
    orientation: tuple[float, ...], letters: tuple[str, str]
) -> None:
    assert patient_orientation(orientation) == letters
