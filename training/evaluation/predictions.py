"""What one model said of the evaluated studies: the record ``evaluate`` scores and ``figures`` draws."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Predictions:
    """One model's outputs on the evaluated studies, raw and label-consistent, in study order; ``reading`` and
    ``reported`` are what pe-node's report would say of each study (the reading and the PE probability it gives)."""

    exam_raw: np.ndarray
    image_raw: list[np.ndarray]
    exam: np.ndarray
    image: list[np.ndarray]
    pe: np.ndarray
    violations: int
    reading: list[str]
    reported: np.ndarray
    study_features: np.ndarray | None = None
    attention: list[np.ndarray] | None = None
