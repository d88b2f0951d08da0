"""The evaluation metrics against hand-computed values and against pe-node's training loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pe_node.findings import EXAM_LABELS, EXAM_WEIGHTS, IMAGE_LABEL, IMAGE_WEIGHT, pe_score
from pe_node.model import rsna_loss
from training.evaluation.evaluate import (
    BASELINE_CNN,
    BASELINE_MEAN,
    FULL,
    TITLES,
    _consistent,
    bootstrap,
    by_kind,
    node_reading,
)
from training.evaluation.metrics import (
    accuracy,
    auc,
    constant_predictions,
    interval,
    resampled_auc,
    resampled_sensitivity_at_specificity,
    rsna_log_loss,
    rsna_log_loss_terms,
    sensitivity_at_specificity,
    stratified_resamples,
)
from training.evaluation.predictions import Predictions
from training.evaluation.report import write_report
from training.fitting.cache import CachedStudy


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


def _random_set(rng: np.random.Generator, studies: int) -> tuple[np.ndarray, np.ndarray, list, list]:
    exam_p, exam_y = rng.uniform(0.01, 0.99, (studies, 9)), rng.integers(0, 2, (studies, 9)).astype(np.float64)
    lengths = rng.integers(3, 9, studies)
    images_p = [rng.uniform(0.01, 0.99, n) for n in lengths]
    images_y = [(rng.uniform(size=n) < 0.3).astype(np.float64) for n in lengths]
    return exam_p, exam_y, images_p, images_y


def test_rsna_log_loss_of_any_subset_is_the_sum_of_its_studies_terms() -> None:
    exam_p, exam_y, images_p, images_y = _random_set(np.random.default_rng(1), 7)
    losses, weights = rsna_log_loss_terms(exam_p, exam_y, images_p, images_y)
    assert losses.shape == weights.shape == (7,)
    assert losses.sum() / weights.sum() == pytest.approx(rsna_log_loss(exam_p, exam_y, images_p, images_y))
    pick = [0, 3, 3, 6]  # a resample: study 3 twice
    expected = rsna_log_loss(exam_p[pick], exam_y[pick], [images_p[i] for i in pick], [images_y[i] for i in pick])
    assert losses[pick].sum() / weights[pick].sum() == pytest.approx(expected, rel=1e-12)


def test_stratified_resamples_keep_the_class_counts_and_are_deterministic_for_a_seed() -> None:
    labels = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0, 0])
    draws = stratified_resamples(labels, 500, seed=3)
    assert draws.shape == (500, 10)
    assert np.all(labels[draws].sum(axis=1) == 3)  # three positives in every resample
    assert set(np.unique(draws[:, :3])) == {0, 3, 7} and set(np.unique(draws[:, 3:])) == {1, 2, 4, 5, 6, 8, 9}
    assert np.array_equal(draws, stratified_resamples(labels, 500, seed=3))
    assert not np.array_equal(draws, stratified_resamples(labels, 500, seed=4))
    assert len({tuple(row) for row in draws}) > 400  # they do resample
    with pytest.raises(ValueError, match="at least 1"):
        stratified_resamples(labels, 0, seed=0)


def test_resampled_auc_is_the_auc_of_each_resample_ties_included() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 30)
    scores = np.round(rng.uniform(size=30), 1)  # many ties
    draws = np.vstack([stratified_resamples(labels, 50, seed=1), np.arange(30)[None]])
    got = resampled_auc(labels, scores, draws)
    assert got == pytest.approx([auc(labels[d], scores[d]) for d in draws], abs=1e-12)
    assert got[-1] == pytest.approx(auc(labels, scores))
    assert np.isnan(resampled_auc([1, 0, 0], [0.5, 0.2, 0.1], np.array([[1, 2, 2]])))[0]  # one class: undefined


def test_interval_is_the_central_share_of_the_values() -> None:
    values = np.arange(1001, dtype=np.float64) / 1000
    assert interval(values) == pytest.approx([0.025, 0.975])
    assert interval(np.array([np.nan, 0.2, 0.4]), level=1.0) == pytest.approx([0.2, 0.4])
    assert interval(np.array([np.nan])) is None


def _study(number: int, positive: bool) -> CachedStudy:
    image = np.zeros(6, dtype=np.uint8)
    image[2:4] = positive
    labels = {label: 0 for label in EXAM_LABELS}
    labels["negative_exam_for_pe"] = int(not positive)
    return CachedStudy(study_instance_uid=f"1.2.{number}", series_instance_uid=f"1.3.{number}", split="test",
                       labels=labels, image=image, sop_instance_uids=tuple(f"1.4.{number}.{k}" for k in range(6)),
                       crop=None)


def _predictions(pe: np.ndarray, studies: list[CachedStudy]) -> Predictions:
    exam = np.full((len(pe), 9), 0.1)
    exam[:, EXAM_LABELS.index("negative_exam_for_pe")] = 1 - pe
    image = [np.full(s.slices, p) for s, p in zip(studies, pe, strict=True)]
    return Predictions(exam_raw=exam, image_raw=image, exam=exam, image=image, pe=pe_score(exam), violations=0,
                       reading=["present" if p > 0.5 else "absent" for p in pe], reported=pe)


def test_bootstrap_tells_a_better_model_from_a_baseline_and_an_equal_one_from_itself(tmp_path) -> None:
    rng = np.random.default_rng(0)
    truth = rng.uniform(size=60) < 0.35
    studies = [_study(i, bool(t)) for i, t in enumerate(truth)]
    separating = np.where(truth, rng.uniform(0.6, 0.95, 60), rng.uniform(0.05, 0.5, 60))
    guessing = rng.uniform(0.05, 0.95, 60)
    predictions = {FULL: _predictions(separating, studies), BASELINE_MEAN: _predictions(separating, studies),
                   BASELINE_CNN: _predictions(guessing, studies)}
    result = bootstrap(predictions, studies, resamples=400, seed=0)
    assert result["resamples"] == 400 and result["level"] == 0.95
    assert result["models"][FULL]["study_pe_auc"] == pytest.approx([1.0, 1.0])  # it separates every resample
    low, high = result["models"][BASELINE_CNN]["study_pe_auc"]
    assert low < auc(truth, guessing) < high and high - low > 0.1
    ahead = result["full_against"][BASELINE_CNN]
    assert ahead["study_pe_auc_difference"] == pytest.approx(1 - auc(truth, guessing))
    assert ahead["study_pe_auc_difference_ci"][0] > 0 and ahead["share_full_ahead"] == 1.0
    assert ahead["rsna_log_loss_difference_ci"][1] < 0  # and its loss is lower in every resample's interval
    same = result["full_against"][BASELINE_MEAN]
    assert same["study_pe_auc_difference"] == 0 and same["study_pe_auc_difference_ci"] == [0.0, 0.0]
    assert same["share_full_ahead"] == 0.5  # ties count half
    assert bootstrap(predictions, studies, resamples=400, seed=0) == result

    assert result["models"][FULL]["sensitivity"] == [1.0, 1.0] and result["models"][FULL]["specificity"] == [1.0, 1.0]
    low, high = result["models"][BASELINE_CNN]["sensitivity"]
    assert 0 < low < high < 1

    metrics = {
        "split": "test", "studies": 60, "figures": [], "bootstrap": result,
        "data": {"source": "phantoms", "phantoms": False, "splits": {"test": {"negative": int((~truth).sum())}}},
        "constant_baseline": {"rsna_log_loss": 0.37},
        "models": {name: {"title": TITLES[name], "study_pe_auc": auc(truth, p.pe), "rsna_log_loss": 0.2,
                          "study_pe_accuracy": 0.8, "mean_label_accuracy": 0.8,
                          "accuracy": {label: 0.8 for label in (*EXAM_LABELS, IMAGE_LABEL)},
                          "auc": {label: None for label in (*EXAM_LABELS, IMAGE_LABEL)},
                          "consistency": {"studies_breaking_rules_before": 0, "studies_breaking_rules_after": 0,
                                          "studies": 60},
                          "node_reading": node_reading(p, studies)}
                   for name, p in predictions.items()},
    }
    report = write_report(tmp_path / "report.md", metrics).read_text()
    assert "## The full model against the baselines" in report
    row = next(line for line in report.splitlines() if line.startswith(f"| {TITLES[BASELINE_CNN]} | +"))
    assert f"| {ahead['study_pe_auc_difference']:+.3f} |" in row and "| 100% |" in row
    assert "400 bootstrap resamples" in report
    reading = metrics["models"][BASELINE_CNN]["node_reading"]
    row = next(line for line in report.splitlines()
               if line.startswith(f"| {TITLES[BASELINE_CNN]} | {reading['sensitivity']:.3f} |"))
    low, high = result["models"][BASELINE_CNN]["sensitivity"]
    assert f"| {low:.3f} to {high:.3f} |" in row
    assert f"| {reading['readings']['negative']['present']} of {int((~truth).sum())} |" in row


def _exam(**labels: float) -> np.ndarray:
    exam = np.full(9, 0.05)
    for label, p in labels.items():
        exam[EXAM_LABELS.index(label)] = p
    return exam


def test_node_reading_is_what_pe_nodes_report_would_say_of_each_study() -> None:
    studies = [_study(0, True), _study(1, True), _study(2, False), _study(3, False), _study(4, False)]
    studies.append(CachedStudy(study_instance_uid="1.2.5", series_instance_uid="1.3.5", split="test",
                               labels={**{label: 0 for label in EXAM_LABELS}, "indeterminate": 1},
                               image=np.zeros(6, dtype=np.uint8), sop_instance_uids=tuple("abcdef"), crop=None))
    low = np.full(6, 0.1)
    clot = np.array([0.1, 0.2, 0.9, 0.8, 0.1, 0.1])
    exam = np.stack([
        _exam(central_pe=0.7, rightsided_pe=0.8, rv_lv_ratio_lt_1=0.9),  # positive, found: present
        _exam(negative_exam_for_pe=0.9),                                 # positive, missed: absent
        _exam(negative_exam_for_pe=0.9),                                 # negative: absent
        _exam(negative_exam_for_pe=0.3, indeterminate=0.6),              # negative, unsure: undetermined
        _exam(central_pe=0.7, rightsided_pe=0.8, rv_lv_ratio_lt_1=0.9),  # negative, false alarm: present
        _exam(indeterminate=0.8),                                        # indeterminate: undetermined
    ])
    predictions = _consistent(exam, [clot, low, low, low, clot, low])
    assert predictions.reading == ["present", "absent", "absent", "undetermined", "present", "undetermined"]
    assert predictions.reported[0] == pytest.approx(0.9) and predictions.reported[2] < 0.5
    reading = node_reading(predictions, studies)
    assert reading["readings"] == {
        "negative": {"present": 1, "absent": 1, "undetermined": 1},
        "positive": {"present": 1, "absent": 1, "undetermined": 0},
        "indeterminate": {"present": 0, "absent": 0, "undetermined": 1},
    }
    assert reading["sensitivity"] == pytest.approx(0.5) and reading["specificity"] == pytest.approx(1 / 3)
    positive = [s.exam_class == "positive" for s in studies]
    assert reading["reported_pe_auc"] == pytest.approx(auc(positive, predictions.reported))


def _positive(number: int, kind: str) -> CachedStudy:
    study = _study(number, True)
    study.labels["chronic_pe"] = int(kind == "chronic")
    study.labels["acute_and_chronic_pe"] = int(kind == "acute_and_chronic")
    return study


def test_by_kind_scores_each_kind_of_positive_study_against_the_studies_without_pe(tmp_path) -> None:
    rng = np.random.default_rng(1)
    kinds = ["acute"] * 12 + ["chronic"] * 5 + ["acute_and_chronic"] * 3
    studies = [_positive(i, kind) for i, kind in enumerate(kinds)] + [_study(100 + i, False) for i in range(30)]
    # acute and mixed studies score above every study without PE, chronic ones among them
    pe = np.r_[rng.uniform(0.8, 0.95, 12), rng.uniform(0.05, 0.6, 5), rng.uniform(0.8, 0.95, 3),
               rng.uniform(0.05, 0.6, 30)]
    predictions = _predictions(pe, studies)
    result = by_kind(predictions, studies)
    assert list(result) == ["acute", "chronic", "acute_and_chronic"]
    assert [result[kind]["studies"] for kind in result] == [12, 5, 3]
    assert result["acute"]["study_pe_auc"] == 1.0 and result["acute_and_chronic"]["study_pe_auc"] == 1.0
    chronic = np.r_[np.ones(5), np.zeros(30)]
    assert result["chronic"]["study_pe_auc"] == pytest.approx(auc(chronic, np.r_[pe[12:17], pe[20:]]))
    assert result["chronic"]["study_pe_auc"] < 0.9
    positive = [s.exam_class == "positive" for s in studies]
    weighted = sum(r["studies"] * r["study_pe_auc"] for r in result.values()) / 20
    assert weighted == pytest.approx(auc(positive, predictions.pe))  # the kinds add up to the whole
    assert result["acute"]["read_present"] == 12
    assert result["chronic"]["read_present"] == int((pe[12:17] > 0.5).sum())
    # the image AUC of a kind: its PE slices (two per study here) against every slice of the studies without PE
    slices = np.r_[np.repeat(pe[12:17], 2), np.repeat(pe[20:], 6)]
    assert result["chronic"]["image_auc"] == pytest.approx(auc(np.r_[np.ones(10), np.zeros(180)], slices))
    assert by_kind(_predictions(pe[20:], studies[20:]), studies[20:]) == {}  # no positive study, no kind

    metrics = {
        "split": "test", "studies": 50, "figures": [],
        "data": {"source": "phantoms", "phantoms": False, "splits": {"test": {}}},
        "constant_baseline": {"rsna_log_loss": 0.37},
        "models": {FULL: {"title": TITLES[FULL], "study_pe_auc": auc(positive, predictions.pe), "rsna_log_loss": 0.2,
                          "study_pe_accuracy": 0.8, "mean_label_accuracy": 0.8,
                          "accuracy": {label: 0.8 for label in (*EXAM_LABELS, IMAGE_LABEL)},
                          "auc": {label: None for label in (*EXAM_LABELS, IMAGE_LABEL)},
                          "consistency": {"studies_breaking_rules_before": 0, "studies_breaking_rules_after": 0,
                                          "studies": 50},
                          "node_reading": node_reading(predictions, studies), "by_kind": result}},
    }
    report = write_report(tmp_path / "report.md", metrics).read_text()
    assert "## By kind of positive study" in report
    assert f"| chronic PE only (5) | {result['chronic']['study_pe_auc']:.3f} |" in report
    assert f"| chronic PE only (5) | {result['chronic']['read_present']} of 5 |" in report
    assert f"| acute PE only (12) | {result['acute']['image_auc']:.3f} |" in report


def test_sensitivity_at_specificity_takes_the_threshold_that_keeps_nine_negatives_in_ten_below_it() -> None:
    negatives = np.arange(10) / 10.0  # 0.0 .. 0.9: the ninth lowest, 0.8, is the threshold
    positives = np.array([0.85, 0.95, 0.5, 0.81])
    labels = np.r_[np.zeros(10), np.ones(4)]
    scores = np.r_[negatives, positives]
    assert sensitivity_at_specificity(labels, scores, 0.9) == pytest.approx(0.75)
    assert sensitivity_at_specificity(labels, scores, 0.5) == pytest.approx(1.0)  # 0.4: the 0.5 one is above too
    assert sensitivity_at_specificity(np.ones(3), [0.1, 0.2, 0.3]) is None
    draws = stratified_resamples(labels, 50, 0)
    resampled = resampled_sensitivity_at_specificity(labels, scores, draws, 0.9)
    assert resampled.shape == (50,) and np.all((resampled >= 0) & (resampled <= 1))
    assert resampled_sensitivity_at_specificity(labels, scores, np.arange(14)[None], 0.9)[0] == pytest.approx(0.75)
