"""What pe-node finds: the labels it predicts, the prediction it hands from the model on, and how that is read.

The nine exam labels and the image label are those of the RSNA-STR Pulmonary Embolism CT (RSPECT) data set; their
order here is the order of every probability vector in the model, the loss and the checkpoints.

The reading rules live here and nowhere else (DESIGN.md "Label consistency"): a label is predicted when its
probability is above ``THRESHOLD``; an exam is positive when its highest image probability is; a non-positive exam
is "negative" only when ``negative_exam_for_pe`` is above the threshold and ``indeterminate`` is not, and every
other non-positive exam is "indeterminate" (the safe reading of label sets that break the consistency rules). A
series that cannot be analysed is a ``NotAnalysed`` with its reason. The SR, the status page, ``pe-node predict``,
the demo and ``pe-train evaluate`` all read an outcome through these functions.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class ExamLabel(str, enum.Enum):
    """The nine study-level labels of RSPECT, in model output order."""

    NEGATIVE = "negative_exam_for_pe"
    INDETERMINATE = "indeterminate"
    CHRONIC = "chronic_pe"
    ACUTE_AND_CHRONIC = "acute_and_chronic_pe"
    CENTRAL = "central_pe"
    LEFT = "leftsided_pe"
    RIGHT = "rightsided_pe"
    RV_LV_GTE_1 = "rv_lv_ratio_gte_1"
    RV_LV_LT_1 = "rv_lv_ratio_lt_1"


EXAM_LABELS: tuple[str, ...] = tuple(label.value for label in ExamLabel)
IMAGE_LABEL = "pe_present_on_image"

# The RSNA weighted log loss weights (DESIGN.md "Model and training"), in EXAM_LABELS order.
EXAM_WEIGHTS: tuple[float, ...] = (
    0.0736196319,  # negative_exam_for_pe
    0.09202453988,  # indeterminate
    0.1042944785,  # chronic_pe
    0.1042944785,  # acute_and_chronic_pe
    0.1877300613,  # central_pe
    0.06257668712,  # leftsided_pe
    0.06257668712,  # rightsided_pe
    0.2346625767,  # rv_lv_ratio_gte_1
    0.0782208589,  # rv_lv_ratio_lt_1
)
IMAGE_WEIGHT = 0.07361963

THRESHOLD = 0.5
"""A label is predicted when its probability is above this (the RSNA-STR rule)."""

_NEGATIVE = EXAM_LABELS.index(ExamLabel.NEGATIVE.value)
_INDETERMINATE = EXAM_LABELS.index(ExamLabel.INDETERMINATE.value)


@dataclass
class Prediction:
    """What the model found in one series, every probability already label-consistent.

    Arrays are in slice order (sorted along the slice normal), index-aligned with ``sop_instance_uids``.
    ``cams`` maps a slice index to a class-activation map in [0, 1] at that slice's own Rows x Columns.
    """

    series_instance_uid: str
    sop_instance_uids: list[str]
    exam: dict[str, float]
    image: np.ndarray
    attention: np.ndarray
    cams: dict[int, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def pe_present(self) -> bool:
        """The RSNA rule: an exam is positive when its highest image probability is above ``THRESHOLD``."""
        return bool(len(self.image) and float(np.max(self.image)) > THRESHOLD)

    def to_json(self) -> dict[str, Any]:
        """The ``pe-node predict --json`` shape of DESIGN.md."""
        return {
            "series_instance_uid": self.series_instance_uid,
            "exam": {label: float(self.exam[label]) for label in EXAM_LABELS},
            "images": [
                {"sop_instance_uid": uid, "pe_present_on_image": float(p)}
                for uid, p in zip(self.sop_instance_uids, self.image)
            ],
            "attention": [float(a) for a in self.attention],
            "timings": {phase: float(s) for phase, s in self.timings.items()},
        }


class NotAnalysedReason(enum.Enum):
    """Why a series (or a study) could not be analysed (the SR codes each reason)."""

    TOO_FEW_SLICES = "too_few_slices"
    NOT_AXIAL = "not_axial"
    NO_CONTRAST = "no_contrast"
    INCONSISTENT_SPACING = "inconsistent_spacing"
    UNREADABLE = "unreadable"
    IMAGE_TOO_LARGE = "image_too_large"
    NOT_CT_IMAGES = "not_ct_images"
    TOO_THICK = "too_thick"
    NO_USABLE_SERIES = "no_usable_series"


MAX_DETAIL = 1024


@dataclass(frozen=True)
class NotAnalysed:
    """A series (or study) that is unsuitable for the model; ``detail`` says why in words."""

    reason: NotAnalysedReason
    detail: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, NotAnalysedReason):
            raise TypeError(f"NotAnalysed.reason must be a NotAnalysedReason, got {self.reason!r}")
        if not self.detail.strip():
            raise ValueError("NotAnalysed.detail must say why the series was not analysed")
        if len(self.detail) > MAX_DETAIL:
            raise ValueError(f"NotAnalysed.detail is {len(self.detail)} characters long, at most {MAX_DETAIL}")


class ExamResult(enum.Enum):
    """The exam-level answer of one analysis."""

    POSITIVE = "positive"
    NEGATIVE = "negative"
    INDETERMINATE = "indeterminate"
    NOT_ANALYSED = "not_analysed"


class ClinicalCourse(enum.Enum):
    """The clinical course of the emboli of a positive exam."""

    ACUTE = "acute"
    CHRONIC = "chronic"
    ACUTE_ON_CHRONIC = "acute_on_chronic"


COURSE_LABELS: dict[ClinicalCourse, ExamLabel] = {
    ClinicalCourse.CHRONIC: ExamLabel.CHRONIC,
    ClinicalCourse.ACUTE_ON_CHRONIC: ExamLabel.ACUTE_AND_CHRONIC,
}


def exam_result(outcome: Prediction | NotAnalysed) -> ExamResult:
    if isinstance(outcome, NotAnalysed):
        return ExamResult.NOT_ANALYSED
    if outcome.pe_present:
        return ExamResult.POSITIVE
    negative = outcome.exam[ExamLabel.NEGATIVE.value] > THRESHOLD
    indeterminate = outcome.exam[ExamLabel.INDETERMINATE.value] > THRESHOLD
    return ExamResult.NEGATIVE if negative and not indeterminate else ExamResult.INDETERMINATE


def pe_score(exam_probabilities: np.ndarray) -> np.ndarray:
    """The exam head's probability that an exam shows PE: neither negative nor indeterminate,
    (1 - p(negative_exam_for_pe)) (1 - p(indeterminate)). Works on [9] (in ``EXAM_LABELS`` order) or [N, 9]."""
    exam = np.asarray(exam_probabilities, dtype=np.float64)
    return (1.0 - exam[..., _NEGATIVE]) * (1.0 - exam[..., _INDETERMINATE])


def exam_probability(prediction: Prediction) -> float:
    """The probability of PE in the exam, on the side of ``THRESHOLD`` that the RSNA-STR rule puts the exam.

    A positive exam's is its highest image probability (the rule itself). A non-positive exam's is ``pe_score``,
    capped at its highest image probability (so at most the threshold). The highest image probability alone says
    little there: when the exam head calls an exam negative although some slices scored above the threshold, label
    consistency moves those slices to exactly the threshold, and the exam would report it whether the exam head was
    sure or not.
    """
    image = np.asarray(prediction.image, dtype=np.float64)
    if not image.size:
        return 0.0
    highest = float(image.max())
    if highest > THRESHOLD:
        return highest
    study = pe_score(np.array([prediction.exam[label] for label in EXAM_LABELS]))
    return min(highest, float(study))


def clinical_course(exam: Mapping[str, float]) -> ClinicalCourse:
    """Chronic or acute-on-chronic when that label is above the threshold (the likelier if both are), else acute."""
    candidates = [
        (exam[label.value], course) for course, label in COURSE_LABELS.items() if exam[label.value] > THRESHOLD
    ]
    return max(candidates, key=lambda pair: pair[0])[1] if candidates else ClinicalCourse.ACUTE


def positive_slices(prediction: Prediction) -> list[int]:
    """Indices (slice order) of the slices whose image probability is above the threshold."""
    return [int(i) for i in np.flatnonzero(np.asarray(prediction.image) > THRESHOLD)]
