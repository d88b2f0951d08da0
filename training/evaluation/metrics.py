"""The evaluation numbers: AUC, the RSNA competition's weighted log loss, accuracy at 0.5, and the study PE score.

``rsna_log_loss`` is the RSNA-STR PE challenge metric over a whole set of studies: every exam label j of study i
weighs w_j, every image k of study i weighs w q_i (q_i the study's share of positive images), and the loss is the
weighted sum of binary log losses divided by the sum of the weights over the whole set. For a single study it equals
L_i of the paper and of ``pe_node.model.rsna_loss``; over several studies it weighs studies by their weights, as
the competition did, rather than averaging L_i.

The bootstrap helpers put confidence intervals on those numbers: a test set of tens of studies decides an AUC to
within several hundredths, and two models a study apart are not told apart by it. ``stratified_resamples`` draws
the studies (positives from positives, the rest from the rest), the same draws serve every model, so that their
differences are paired.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from pe_node.findings import EXAM_LABELS, EXAM_WEIGHTS, IMAGE_WEIGHT

EPS = 1e-15
"""Probabilities are clipped to [EPS, 1 - EPS] before the logarithm, as scikit-learn's log_loss did."""


def auc(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the ROC curve; ``None`` when the labels hold only one class (the AUC is undefined)."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"auc: {labels.size} labels but {scores.size} scores")
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def accuracy(labels: Sequence[float] | np.ndarray, probabilities: Sequence[float] | np.ndarray,
             threshold: float = 0.5) -> float:
    """Share of predictions on the right side of ``threshold`` (a probability > threshold predicts 1)."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    predicted = np.asarray(probabilities, dtype=np.float64).reshape(-1) > threshold
    if labels.shape != predicted.shape or labels.size == 0:
        raise ValueError(f"accuracy: {labels.size} labels and {predicted.size} predictions (need equal, > 0)")
    return float(np.mean(predicted == (labels > 0.5)))


def _log_loss_terms(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(probabilities.astype(np.float64), EPS, 1.0 - EPS)
    return -(labels * np.log(p) + (1.0 - labels) * np.log(1.0 - p))


def rsna_log_loss_terms(
    exam_probabilities: np.ndarray,
    exam_labels: np.ndarray,
    image_probabilities: Sequence[np.ndarray],
    image_labels: Sequence[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Each study's share of the RSNA weighted log loss: its weighted sum of log losses and its sum of weights
    ([N] each). The loss of any set of these studies (a bootstrap resample too) is the one sum over the other."""
    exam_p = np.asarray(exam_probabilities, dtype=np.float64)
    exam_y = np.asarray(exam_labels, dtype=np.float64)
    if exam_p.ndim != 2 or exam_p.shape[1] != len(EXAM_LABELS) or exam_p.shape != exam_y.shape:
        raise ValueError(f"rsna_log_loss: exam probabilities {exam_p.shape} and labels {exam_y.shape} must be [N, 9]")
    if len(image_probabilities) != len(exam_p) or len(image_labels) != len(exam_p):
        raise ValueError(f"rsna_log_loss: {len(exam_p)} studies but {len(image_probabilities)} image probability "
                         f"arrays and {len(image_labels)} image label arrays")
    weights = np.asarray(EXAM_WEIGHTS)
    losses = (_log_loss_terms(exam_y, exam_p) * weights).sum(axis=1)
    totals = np.full(len(exam_p), float(weights.sum()))
    for i, (p, y) in enumerate(zip(image_probabilities, image_labels, strict=True)):
        p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if p.shape != y.shape or p.size == 0:
            raise ValueError(f"rsna_log_loss: a study has {p.size} image probabilities and {y.size} labels")
        share = float(y.mean())
        losses[i] += IMAGE_WEIGHT * share * float(_log_loss_terms(y, p).sum())
        totals[i] += IMAGE_WEIGHT * share * len(y)
    return losses, totals


def rsna_log_loss(
    exam_probabilities: np.ndarray,
    exam_labels: np.ndarray,
    image_probabilities: Sequence[np.ndarray],
    image_labels: Sequence[np.ndarray],
) -> float:
    """The RSNA-STR PE challenge's weighted log loss of a set of studies: exam [N, 9], images one array per study."""
    losses, weights = rsna_log_loss_terms(exam_probabilities, exam_labels, image_probabilities, image_labels)
    return float(losses.sum() / weights.sum())


def constant_predictions(
    exam_prior: np.ndarray, image_prior: float, slices: Sequence[int]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The constant-prediction baseline: every study gets the training prevalence of each exam label and every
    image the training share of positive images. Returns exam [N, 9] and one image array per study."""
    prior = np.asarray(exam_prior, dtype=np.float64)
    if prior.shape != (len(EXAM_LABELS),):
        raise ValueError(f"constant_predictions: exam prior of shape {prior.shape}, expected (9,)")
    exam = np.tile(prior, (len(slices), 1))
    return exam, [np.full(n, float(image_prior)) for n in slices]


def stratified_resamples(labels: Sequence[float] | np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """``resamples`` bootstrap resamples of a set of studies, [resamples, N] indices: the positive studies drawn
    with replacement from the positives and the others from the others, so that every resample keeps the set's
    class counts (and its AUC stays defined)."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1) > 0.5
    if resamples < 1:
        raise ValueError(f"stratified_resamples: resamples must be at least 1, got {resamples}")
    rng = np.random.default_rng(seed)
    columns = []
    for group in (np.flatnonzero(labels), np.flatnonzero(~labels)):
        if group.size:
            columns.append(group[rng.integers(0, group.size, size=(resamples, group.size))])
    return np.concatenate(columns, axis=1)


def resampled_auc(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray,
                  resamples: np.ndarray) -> np.ndarray:
    """The AUC of each resample ([B, N] indices into ``labels`` and ``scores``), from the rank sum of the positives
    (ties count half, as in ``auc``); NaN where a resample holds one class only."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1) > 0.5
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"resampled_auc: {labels.size} labels but {scores.size} scores")
    y, s = labels[resamples], scores[resamples]
    positives = y.sum(axis=1).astype(np.float64)
    negatives = y.shape[1] - positives
    ranks = rankdata(s, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * y).sum(axis=1) - positives * (positives + 1) / 2) / (positives * negatives)


def interval(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    """The percentile interval holding ``level`` of ``values`` (NaNs left out); ``None`` if none are finite."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = (1.0 - level) / 2 * 100
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def sensitivity_at_specificity(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray,
                               specificity: float = 0.9) -> float | None:
    """The highest sensitivity at a threshold that keeps at least ``specificity`` of the negatives below it: the
    positives scoring above the ceil(specificity x negatives)-th lowest negative score; ``None`` without both
    classes."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1) > 0.5
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"sensitivity_at_specificity: {labels.size} labels but {scores.size} scores")
    if labels.all() or not labels.any():
        return None
    return float(resampled_sensitivity_at_specificity(labels, scores, np.arange(labels.size)[None], specificity)[0])


def resampled_sensitivity_at_specificity(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray,
                                         resamples: np.ndarray, specificity: float = 0.9) -> np.ndarray:
    """``sensitivity_at_specificity`` of each resample ([B, N] indices that keep the class counts, as
    ``stratified_resamples`` draws them)."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1) > 0.5
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    y, s = labels[resamples], scores[resamples]
    positives = int(y[0].sum())
    negatives = y.shape[1] - positives
    if positives == 0 or negatives == 0:
        return np.full(len(resamples), np.nan)
    ordered = np.sort(np.where(y, np.inf, s), axis=1)[:, :negatives]
    threshold = ordered[:, int(np.ceil(specificity * negatives - 1e-9)) - 1]
    return ((s > threshold[:, None]) & y).sum(axis=1) / positives
