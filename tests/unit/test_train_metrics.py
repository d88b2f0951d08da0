"""The evaluation metrics against hand-computed values and against pe-node's training loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pe_node.findings import EXAM_LABELS, EXAM_WEIGHTS, IMAGE_WEIGHT
from pe_node.model import rsna_loss
from training.metrics import accuracy, auc, constant_predictions, pe_score, rsna_log_loss


def test_auc_counts_the_correctly_ordered_pairs() -> None:
    # pairs (negative, positive): (0.1, 0.35) right, (0.1, 0.8) right, (0.4, 0.35) wrong, (0.4, 0.8) right: 3/4
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([1, 0], [0.2, 0.2]) == pytest.approx(0.5)  # a tie counts half


def test_auc_is_undefined_with_one_class() -> None:
    assert auc([1, 1, 1], [0.2, 0.5, 0.9]) is None


def test_accuracy_counts_predictions_on_the_right_side_of_one_half() -> None:
    assert accuracy([1, 0, 1, 0], [0.9, 0.5, 0.4, 0.1]) == pytest.approx(0.75)  # 0.5 itself predicts negative
    with pytest.raises(ValueError, match="3 labels and 2 predictions"):
        accuracy([1, 0, 1], [0.2, 0.3])


def _bce(y: float, p: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_rsna_log_loss_of_one_study_is_pe_nodes_training_loss() -> None:
    rng = np.random.default_rng(0)
    exam_logits, image_logits = rng.normal(size=(1, 9)), rng.normal(size=(1, 12))
    exam_y = rng.integers(0, 2, size=(1, 9)).astype(np.float64)
    image_y = np.zeros((1, 12))
    image_y[0, 3:6] = 1
    expected = rsna_loss(torch.tensor(exam_logits), torch.tensor(exam_y), torch.tensor(image_logits),
                         torch.tensor(image_y))
    sigmoid = 1 / (1 + np.exp(-np.concatenate([exam_logits, image_logits], axis=1)))
    got = rsna_log_loss(sigmoid[:, :9], exam_y, [sigmoid[0, 9:]], [image_y[0]])
    assert got == pytest.approx(float(expected), rel=1e-9)


def test_rsna_log_loss_weighs_studies_by_their_weights_over_the_whole_set() -> None:
    exam_p = np.full((2, 9), 0.5)
    exam_y = np.zeros((2, 9))
    # study 0: two images, one positive (share 1/2); study 1: one negative image (share 0: its image weighs nothing)
    images_p = [np.array([0.8, 0.4]), np.array([0.3])]
    images_y = [np.array([1.0, 0.0]), np.array([0.0])]
    exam_total = 2 * sum(EXAM_WEIGHTS) * _bce(0, 0.5)
    image_total = IMAGE_WEIGHT * 0.5 * (_bce(1, 0.8) + _bce(0, 0.4))
    expected = (exam_total + image_total) / (2 * sum(EXAM_WEIGHTS) + IMAGE_WEIGHT * 0.5 * 2)
    assert rsna_log_loss(exam_p, exam_y, images_p, images_y) == pytest.approx(expected, rel=1e-12)


def test_rsna_log_loss_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="must be \\[N, 9\\]"):
        rsna_log_loss(np.zeros((2, 8)), np.zeros((2, 8)), [np.zeros(1)] * 2, [np.zeros(1)] * 2)
    with pytest.raises(ValueError, match="2 studies but 1 image probability"):
        rsna_log_loss(np.zeros((2, 9)), np.zeros((2, 9)), [np.zeros(1)], [np.zeros(1)] * 2)


def test_constant_baseline_predicts_the_prevalences_and_loses_to_a_good_model() -> None:
    prior = np.linspace(0.1, 0.9, len(EXAM_LABELS))
    exam, images = constant_predictions(prior, 0.05, [3, 2])
    assert exam.shape == (2, 9) and np.all(exam == prior)
    assert [len(i) for i in images] == [3, 2] and all(np.all(i == 0.05) for i in images)
    exam_y = np.array([[1, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 1, 0]], dtype=np.float64)
    images_y = [np.zeros(3), np.array([1.0, 0.0])]
    good = rsna_log_loss(np.clip(exam_y, 0.05, 0.95), exam_y, [np.clip(y, 0.05, 0.95) for y in images_y], images_y)
    assert good < rsna_log_loss(exam, exam_y, images, images_y)


def test_pe_score_is_high_only_when_neither_negative_nor_indeterminate() -> None:
    exam = np.zeros((3, 9))
    exam[0, EXAM_LABELS.index("negative_exam_for_pe")] = 0.9
    exam[1, EXAM_LABELS.index("indeterminate")] = 0.8
    assert pe_score(exam) == pytest.approx([0.1, 0.2, 1.0])
