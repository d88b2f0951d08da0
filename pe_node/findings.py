"""The labels pe-node predicts and the finding it hands from the model to the reports.

The nine exam labels and the image label are those of the RSNA-STR Pulmonary Embolism CT (RSPECT) data set; their
order here is the order of every probability vector in the model, the loss and the checkpoints.
"""

from __future__ import annotations

import enum
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
        """The RSNA rule: an exam is positive when its highest image probability is above 0.5."""
        return bool(len(self.image) and float(np.max(self.image)) > 0.5)

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
