"""Label consistency: the rules of the RSNA checker, and the smallest change that makes a prediction obey them.

A label is predicted when its probability is > 0.5. An exam is positive when its highest image probability is
> 0.5 (DESIGN.md "Model and training"):

- positive exam: exactly one of the RV/LV labels > 0.5; at least one of central, right, left > 0.5; not both
  chronic and acute-and-chronic > 0.5; indeterminate and negative <= 0.5;
- negative exam: exactly one of indeterminate and negative > 0.5; the seven PE labels (chronic, acute-and-chronic,
  central, left, right and both RV/LV labels) <= 0.5.

``make_consistent`` builds the nearest consistent-positive and the nearest consistent-negative outputs, moving each
probability that must change just across 0.5 (to 0.5 when it must be negative, to 0.5 + ``MARGIN`` when it must be
positive), and keeps the cheaper of the two. The cost of moving p to q is the label's loss weight times the
Bernoulli KL divergence KL(p || q): the expected rise in the weighted log loss if p were calibrated. An image's
weight is ``IMAGE_WEIGHT`` times the expected share of positive images (the mean image probability, at least 1/n),
as in the loss. Serving, training and evaluation all use this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pe_node.findings import EXAM_LABELS, EXAM_WEIGHTS, IMAGE_WEIGHT, THRESHOLD, ExamLabel

MARGIN = 1e-3
"""How far above 0.5 a probability that must become positive is set (survives float32 rounding)."""

_INDEX = {label: i for i, label in enumerate(ExamLabel)}
NEGATIVE, INDETERMINATE = _INDEX[ExamLabel.NEGATIVE], _INDEX[ExamLabel.INDETERMINATE]
CHRONIC, ACUTE_AND_CHRONIC = _INDEX[ExamLabel.CHRONIC], _INDEX[ExamLabel.ACUTE_AND_CHRONIC]
CENTRAL, LEFT, RIGHT = _INDEX[ExamLabel.CENTRAL], _INDEX[ExamLabel.LEFT], _INDEX[ExamLabel.RIGHT]
RV_LV_GTE_1, RV_LV_LT_1 = _INDEX[ExamLabel.RV_LV_GTE_1], _INDEX[ExamLabel.RV_LV_LT_1]
PE_LABELS = (CHRONIC, ACUTE_AND_CHRONIC, CENTRAL, LEFT, RIGHT, RV_LV_GTE_1, RV_LV_LT_1)

ExamInput = Mapping[str, float] | Sequence[float] | np.ndarray


@dataclass(frozen=True)
class ConsistentOutput:
    """Exam probabilities [9] (``EXAM_LABELS`` order) and image probabilities [n] that pass ``check``."""

    exam: np.ndarray
    image: np.ndarray
    changed: bool


def exam_vector(exam: ExamInput) -> np.ndarray:
    """Exam probabilities as float64 [9] in ``EXAM_LABELS`` order, from a label mapping or a sequence."""
    if isinstance(exam, Mapping):
        missing = [label for label in EXAM_LABELS if label not in exam]
        extra = sorted(set(exam) - set(EXAM_LABELS))
        if missing or extra:
            raise ValueError(f"exam probabilities: missing labels {missing}, unknown labels {extra}")
        values = np.array([float(exam[label]) for label in EXAM_LABELS], dtype=np.float64)
    else:
        values = np.array(exam, dtype=np.float64).reshape(-1)
        if values.shape != (len(EXAM_LABELS),):
            raise ValueError(f"exam probabilities: expected {len(EXAM_LABELS)} values, got {values.size}")
    _check_probabilities(values, EXAM_LABELS)
    return values


def image_vector(image: Iterable[float] | np.ndarray) -> np.ndarray:
    """Image probabilities as float64 [n]."""
    values = np.array(list(image) if not isinstance(image, np.ndarray) else image, dtype=np.float64).reshape(-1)
    _check_probabilities(values, [f"image {k}" for k in range(values.size)])
    return values


def check(exam: ExamInput, image: Iterable[float] | np.ndarray) -> list[str]:
    """The RSNA checker's violations for one study, as readable sentences; an empty list means consistent."""
    p = exam_vector(exam)
    images = image_vector(image)
    positive = bool(images.size) and float(images.max()) > THRESHOLD
    on = p > THRESHOLD
    problems: list[str] = []
    if positive:
        if int(on[RV_LV_GTE_1]) + int(on[RV_LV_LT_1]) != 1:
            problems.append(_sentence("positive exam needs exactly one of", (RV_LV_GTE_1, RV_LV_LT_1), p, "> 0.5"))
        if not on[[CENTRAL, RIGHT, LEFT]].any():
            problems.append(_sentence("positive exam needs at least one of", (CENTRAL, RIGHT, LEFT), p, "> 0.5"))
        if on[CHRONIC] and on[ACUTE_AND_CHRONIC]:
            problems.append(_sentence("positive exam cannot have both", (CHRONIC, ACUTE_AND_CHRONIC), p, "> 0.5"))
        for j in (INDETERMINATE, NEGATIVE):
            if on[j]:
                problems.append(_sentence("positive exam needs", (j,), p, "<= 0.5"))
    else:
        if int(on[NEGATIVE]) + int(on[INDETERMINATE]) != 1:
            problems.append(_sentence("negative exam needs exactly one of", (NEGATIVE, INDETERMINATE), p, "> 0.5"))
        for j in PE_LABELS:
            if on[j]:
                problems.append(_sentence("negative exam needs", (j,), p, "<= 0.5"))
    return problems


def make_consistent(exam: ExamInput, image: Iterable[float] | np.ndarray) -> ConsistentOutput:
    """The cheaper of the nearest consistent-positive and consistent-negative outputs; consistent input is kept."""
    p = exam_vector(exam)
    images = image_vector(image)
    if not check(p, images):
        return ConsistentOutput(exam=p, image=images, changed=False)
    image_weight = IMAGE_WEIGHT * max(float(images.mean()), 1.0 / images.size) if images.size else 0.0
    candidates = [_nearest_negative(p, images, image_weight)]
    if images.size:
        candidates.append(_nearest_positive(p, images, image_weight))
    cost, exam_out, image_out = min(candidates, key=lambda c: c[0])
    return ConsistentOutput(exam=exam_out, image=image_out, changed=True)


def _nearest_positive(p: np.ndarray, images: np.ndarray, image_weight: float) -> tuple[float, np.ndarray, np.ndarray]:
    exam, image = p.copy(), images.copy()
    cost = 0.0
    if image.max() <= THRESHOLD:
        k = int(np.argmax(image))
        cost += _move(image, k, True, image_weight)
    for j in (NEGATIVE, INDETERMINATE):
        cost += _move(exam, j, False)
    cost += _exactly_one(exam, (RV_LV_GTE_1, RV_LV_LT_1))
    if not (exam[[CENTRAL, RIGHT, LEFT]] > THRESHOLD).any():
        cheapest = min((CENTRAL, RIGHT, LEFT), key=lambda j: _cost(float(exam[j]), THRESHOLD + MARGIN, EXAM_WEIGHTS[j]))
        cost += _move(exam, cheapest, True)
    if exam[CHRONIC] > THRESHOLD and exam[ACUTE_AND_CHRONIC] > THRESHOLD:
        cheapest = min((CHRONIC, ACUTE_AND_CHRONIC), key=lambda j: _cost(float(exam[j]), THRESHOLD, EXAM_WEIGHTS[j]))
        cost += _move(exam, cheapest, False)
    return cost, exam, image


def _nearest_negative(p: np.ndarray, images: np.ndarray, image_weight: float) -> tuple[float, np.ndarray, np.ndarray]:
    exam, image = p.copy(), images.copy()
    cost = sum(_move(image, k, False, image_weight) for k in range(image.size))
    cost += sum(_move(exam, j, False) for j in PE_LABELS)
    cost += _exactly_one(exam, (NEGATIVE, INDETERMINATE))
    return cost, exam, image


def _exactly_one(exam: np.ndarray, pair: tuple[int, int]) -> float:
    """Make exactly one label of ``pair`` positive, the cheaper way round; returns the cost."""
    first, second = pair
    options = []
    for keep, drop in ((first, second), (second, first)):
        trial = exam.copy()
        options.append((_move(trial, keep, True) + _move(trial, drop, False), trial))
    cost, best = min(options, key=lambda option: option[0])
    exam[:] = best
    return cost


def _move(values: np.ndarray, index: int, positive: bool, weight: float | None = None) -> float:
    """Set ``values[index]`` just across 0.5 if it is on the wrong side; returns the cost (0 if unchanged)."""
    current = float(values[index])
    if (current > THRESHOLD) == positive:
        return 0.0
    target = THRESHOLD + MARGIN if positive else THRESHOLD
    values[index] = target
    return _cost(current, target, EXAM_WEIGHTS[index] if weight is None else weight)


def _cost(p: float, q: float, weight: float) -> float:
    """``weight`` times the Bernoulli KL divergence KL(p || q)."""
    if p == q:
        return 0.0
    eps = 1e-12
    p, q = min(max(p, eps), 1 - eps), min(max(q, eps), 1 - eps)
    kl = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    return weight * max(kl, 0.0)


def _check_probabilities(values: np.ndarray, names: Sequence[str]) -> None:
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(f"probability of {names[k]} is {float(values[k])}, not in [0, 1]")


def _sentence(rule: str, indices: Sequence[int], p: np.ndarray, bound: str) -> str:
    labels = ", ".join(f"{EXAM_LABELS[j]} ({p[j]:.3f})" for j in indices)
    return f"{rule} {labels} {bound}"
