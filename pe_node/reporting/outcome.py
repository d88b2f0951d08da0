"""What a report says: a model prediction read by the RSNA-STR rules, or why the series was not analysed.

The rules (DESIGN.md "Label consistency"): an exam is positive when its highest image probability is above 0.5.
A positive exam states each location (central, left, right), its clinical course and the RV/LV ratio; a negative
exam is "Absent" only when ``negative_exam_for_pe`` is above 0.5 and ``indeterminate`` is not, every other
non-positive exam is "Undetermined" (the safe reading of label sets that break the consistency rules).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
from pydicom.sr.coding import Code

from pe_node.findings import ExamLabel, Prediction
from pe_node.reporting.codes import PRIVATE_SCHEME, ClinicalCourse, Evaluation, Location

THRESHOLD = 0.5


class NotAnalysedReason(enum.Enum):
    """Why a series that passed routing was not analysed; each value is the coded reason the SR carries.

    Inadequate contrast has a DICOM code (DCM 130580, CID 6315); the others are private concepts.
    """

    TOO_FEW_SLICES = Code("NA-SLICES", PRIVATE_SCHEME, "Too few slices")
    NOT_AXIAL = Code("NA-AXIAL", PRIVATE_SCHEME, "Not an axial series")
    NO_CONTRAST = Code("130580", "DCM", "Inadequate contrast enhancement")
    INCONSISTENT_SPACING = Code("NA-SPACING", PRIVATE_SCHEME, "Inconsistent slice spacing")
    UNREADABLE = Code("NA-UNREADABLE", PRIVATE_SCHEME, "Unreadable series")


@dataclass(frozen=True)
class NotAnalysed:
    """A series that was routed to pe-node but is unsuitable for the model; ``detail`` says why in words."""

    reason: NotAnalysedReason
    detail: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, NotAnalysedReason):
            raise TypeError(f"NotAnalysed.reason must be a NotAnalysedReason, got {self.reason!r}")
        if not self.detail.strip():
            raise ValueError("NotAnalysed.detail must say why the series was not analysed")
        if len(self.detail) > 1024:
            raise ValueError(f"NotAnalysed.detail is {len(self.detail)} characters long, at most 1024 are allowed")


class ExamResult(enum.Enum):
    """The exam-level answer of one report, with the evaluation code the SR gives the exam finding."""

    POSITIVE = Evaluation.PRESENT
    NEGATIVE = Evaluation.ABSENT
    INDETERMINATE = Evaluation.UNDETERMINED
    NOT_ANALYSED = Evaluation.NOT_EVALUATED


def exam_result(outcome: Prediction | NotAnalysed) -> ExamResult:
    if isinstance(outcome, NotAnalysed):
        return ExamResult.NOT_ANALYSED
    if outcome.pe_present:
        return ExamResult.POSITIVE
    negative = outcome.exam[ExamLabel.NEGATIVE.value] > THRESHOLD
    indeterminate = outcome.exam[ExamLabel.INDETERMINATE.value] > THRESHOLD
    return ExamResult.NEGATIVE if negative and not indeterminate else ExamResult.INDETERMINATE


def exam_probability(prediction: Prediction) -> float:
    """The probability of PE in the exam, on the side of 0.5 that the RSNA-STR rule puts the exam.

    A positive exam's is its highest image probability (the rule itself). A non-positive exam's is the exam head's
    probability that the exam is neither negative nor indeterminate, (1 - p(negative)) (1 - p(indeterminate)),
    capped at its highest image probability (so at most 0.5). The highest image probability alone says little
    there: when the exam head calls an exam negative although some slices scored above 0.5, label consistency
    moves those slices to exactly 0.5, and the exam would report 0.5 whether the exam head was sure or not.
    """
    image = np.asarray(prediction.image, dtype=np.float64)
    if not image.size:
        return 0.0
    highest = float(image.max())
    if highest > THRESHOLD:
        return highest
    exam = prediction.exam
    study = (1.0 - exam[ExamLabel.NEGATIVE.value]) * (1.0 - exam[ExamLabel.INDETERMINATE.value])
    return min(highest, float(study))


LOCATION_LABELS: dict[Location, ExamLabel] = {
    Location.CENTRAL: ExamLabel.CENTRAL,
    Location.LEFT: ExamLabel.LEFT,
    Location.RIGHT: ExamLabel.RIGHT,
}

COURSE_LABELS: dict[ClinicalCourse, ExamLabel] = {
    ClinicalCourse.CHRONIC: ExamLabel.CHRONIC,
    ClinicalCourse.ACUTE_ON_CHRONIC: ExamLabel.ACUTE_AND_CHRONIC,
}


def clinical_course(prediction: Prediction) -> ClinicalCourse:
    """Chronic or acute-on-chronic when that label is above 0.5 (the likelier if both are), else acute."""
    candidates = [
        (prediction.exam[label.value], course)
        for course, label in COURSE_LABELS.items()
        if prediction.exam[label.value] > THRESHOLD
    ]
    return max(candidates, key=lambda pair: pair[0])[1] if candidates else ClinicalCourse.ACUTE


def positive_slices(prediction: Prediction) -> list[int]:
    """Indices (slice order) of the slices whose image probability is above 0.5."""
    return [int(i) for i in np.flatnonzero(np.asarray(prediction.image) > THRESHOLD)]
