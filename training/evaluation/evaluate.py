"""``pe-train evaluate``: the trained model and the paper's two baselines on one split, scored the same way.

The three models (paper section 4) all read the same stage-1 embeddings of the evaluated studies:

- **full model**: the attention CNN-LSTM (stage 1 + stage 2 with attention MIL pooling);
- **baseline 2**: the CNN-LSTM without attention (stage 2 trained with mean pooling on the same embeddings);
- **baseline 1**: the CNN alone: stage 1's heads on each slice; the study's exam labels are those of the slice with
  the highest image probability, and its PE score is that maximum ("the prediction with maximum confidence").

Every model's probabilities go through ``pe_node.model.make_consistent`` (as served), and the report counts how
many studies broke the RSNA rules before. Scores: per-label AUC (nine exam labels and the image level), the study
PE AUC (the study head's ``pe_score``; baseline 1: the highest image probability), the RSNA weighted log loss next to
the constant-prediction baseline (training prevalences, from the stage-2 checkpoint), and accuracy at 0.5; with
``evaluate.bootstrap`` resamples (default 2000), 95 % intervals of the study PE AUC and the log loss, and the full
model's paired differences from each baseline. Each kind of positive study (acute only, chronic only, acute and
chronic) is also scored on its own against the studies without PE (``by_kind``), and each place of emboli (central,
left, right) by how many of its studies pe-node's report reads present (``by_location``); the sensitivity of the
study PE score at a specificity of 0.90 is reported with its interval.

With ``independent`` (``--independent``) the same models are scored the same way on every study of a second features
folder, made by the same stage 1 from a cache of the evaluation-only phantom family (``training.evalphantoms``), and
the report sets both families side by side: the training family's held-out studies say how well the model learned
its own generator, the independent family how much of that was the generator.

An exported pe-node checkpoint stands in for both ``--stage1`` and ``--stage2`` (its own encoder and sequence model,
on features made with ``--stage1`` that file), so shipped weights are scored as they are.
Figures and the markdown summary are drawn by ``training.evaluation.figures`` and ``training.evaluation.report``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from tqdm import tqdm

from pe_node.findings import (
    EXAM_LABELS,
    IMAGE_LABEL,
    ExamResult,
    Prediction,
    exam_probability,
    exam_result,
    pe_score,
)
from pe_node.model import PEModel, Predictor, PreprocessConfig, check, make_consistent
from pe_node.model.checkpoint import file_sha256
from pe_node.pipeline.series import load_series
from training.config import EvaluateConfig
from training.evaluation.figures import (
    CamExample,
    draw_cam,
    draw_roc_labels,
    draw_roc_models,
    draw_tsne,
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
from training.fitting.features import FeatureSet
from training.fitting.state import TrainState, build_model, load_state, write_json
from training.phantoms.ctimage import MANUFACTURER
from training.rspect import RSPECTError, RSPECTStudy, read_rspect

logger = logging.getLogger(__name__)

FULL, BASELINE_MEAN, BASELINE_CNN = "full", "baseline_mean", "baseline_cnn"
TITLES = {
    FULL: "Full model: attention CNN-LSTM",
    BASELINE_MEAN: "Baseline 2: CNN-LSTM without attention",
    BASELINE_CNN: "Baseline 1: CNN only (study = max over slices)",
}
MIN_STUDIES = 4
"""The fewest studies an evaluation accepts (t-SNE needs a few points, AUCs need both classes)."""


READINGS = {ExamResult.POSITIVE: "present", ExamResult.NEGATIVE: "absent", ExamResult.INDETERMINATE: "undetermined"}
"""How pe-node's report reads an exam (the SR's PE finding), by the name the evaluation gives each reading."""


def evaluate(
    features: FeatureSet,
    stage1: Path,
    stage2: Path,
    baseline: Path | None,
    out: Path,
    config: EvaluateConfig,
    split: str = "test",
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
    independent: FeatureSet | None = None,
) -> dict[str, Any]:
    """Evaluate on ``split`` of the features' cache and, with ``independent``, on every study of a second phantom
    family's features (the evaluation-only family, embedded by the same stage 1); write metrics.json, report.md and
    the figures to ``out``."""
    stage1_state = load_state(stage1, "stage1")
    states = {FULL: load_state(stage2, "stage2")}
    if baseline is not None:
        states[BASELINE_MEAN] = load_state(baseline, "stage2")
    sha = file_sha256(stage1)
    sets = [(features, split)] + ([(independent, "test")] if independent is not None else [])
    for evaluated, _ in sets:
        evaluated.check_stage1(sha, f"stage-1 checkpoint {stage1}")
        for name, state in states.items():
            evaluated.check_stage1(state.inputs["stage1_sha256"], f"{TITLES[name]} ({state.inputs.get('features')})")
    out.mkdir(parents=True, exist_ok=True)
    metrics, predictions, studies = score_set(features, split, stage1_state, states, config, device, seed, progress)
    metrics["family"] = TRAINING_FAMILY
    metrics["checkpoints"] = {"stage1": str(stage1), "stage2": str(stage2),
                              "baseline": str(baseline) if baseline else None,
                              "stage1_sha256": sha, "stage2_sha256": file_sha256(stage2)}
    source = _source(features, needed=config.cam_examples > 0)
    metrics["data"]["phantoms"] = _is_phantom(source, studies)
    figures = [
        draw_roc_labels(out / "roc_labels.png", predictions[FULL], studies, TITLES[FULL]),
        draw_roc_models(out / "roc_models.png", {TITLES[n]: p.pe for n, p in predictions.items()},
                        [s.exam_class == "positive" for s in studies]),
        draw_tsne(out / "tsne.png", predictions[FULL].study_features, [s.exam_class for s in studies],
                  config.tsne_perplexity, seed),
    ]
    if source is not None:
        figures += draw_cams(out, source, studies, build_model(stage1_state, states[FULL]),
                             features.cache.preprocess, predictions[FULL], config.cam_examples, device)
    if independent is not None:
        other, other_predictions, other_studies = score_set(independent, "test", stage1_state, states, config, device,
                                                            seed, progress)
        other["family"] = INDEPENDENT_FAMILY
        other["data"]["phantoms"] = _is_phantom(_source(independent, needed=False), other_studies)
        figures.append(draw_roc_models(out / "roc_models_independent.png",
                                       {TITLES[n]: p.pe for n, p in other_predictions.items()},
                                       [s.exam_class == "positive" for s in other_studies]))
        metrics[INDEPENDENT_FAMILY] = other
    metrics["figures"] = [path.name for path in figures]
    write_json(out / "metrics.json", metrics)
    write_report(out / "report.md", metrics)
    logger.info("evaluation of %d studies%s written to %s", len(studies),
                f" and {metrics[INDEPENDENT_FAMILY]['studies']} of the independent family" if independent else "", out)
    return metrics


TRAINING_FAMILY, INDEPENDENT_FAMILY = "training", "independent"
"""The names of the two phantom families in metrics.json: the held-out studies of the family the model trained on,
and the evaluation-only family of another construction (``training.evalphantoms``)."""


def score_set(features: FeatureSet, split: str, stage1: TrainState, states: dict[str, TrainState],
              config: EvaluateConfig, device: torch.device | str, seed: int,
              progress: bool) -> tuple[dict[str, Any], dict[str, Predictions], list[CachedStudy]]:
    """Every model on ``split`` of one features folder: the metrics (models, constant baseline, bootstrap), each
    model's predictions and the studies."""
    studies = features.split(split)
    if len(studies) < MIN_STUDIES:
        raise ValueError(f"evaluate: split {split!r} of {features.cache.root} has {len(studies)} studies; "
                         f"at least {MIN_STUDIES} are needed")
    predictions = {name: predict_sequence(features, studies, stage1, state, device, progress)
                   for name, state in states.items()}
    predictions[BASELINE_CNN] = predict_cnn(features, studies, stage1)
    metrics: dict[str, Any] = {
        "split": split,
        "studies": len(studies),
        "data": {**features.cache.describe()},
        "constant_baseline": _constant(states[FULL].extra.get("label_prior"), studies),
        "models": {name: {"title": TITLES[name], **score(p, studies)} for name, p in predictions.items()},
    }
    if config.bootstrap:
        metrics["bootstrap"] = bootstrap(predictions, studies, config.bootstrap, seed)
    return metrics, predictions, studies


def _constant(prior: dict[str, Any] | None, studies: list[CachedStudy]) -> dict[str, Any]:
    """The constant-prediction baseline from the training prevalences (none for an exported model whose file does
    not record them)."""
    if prior is None:
        return {"rsna_log_loss": None, "exam_prior": None, "image_prior": None}
    exam_y = np.stack([s.exam for s in studies])
    image_y = [s.image.astype(np.float64) for s in studies]
    exam, image = constant_predictions(np.array(prior["exam"]), prior["image"], [s.slices for s in studies])
    return {"rsna_log_loss": rsna_log_loss(exam, exam_y, image, image_y), "exam_prior": prior["exam"],
            "image_prior": prior["image"]}


def predict_sequence(features: FeatureSet, studies: list[CachedStudy], stage1: TrainState, stage2: TrainState,
                     device: torch.device | str, progress: bool) -> Predictions:
    """Stage 2 on every study's embeddings, one study at a time."""
    sequence = build_model(stage1, stage2).sequence.to(device)
    exam_raw, image_raw, study_features, attention = [], [], [], []
    with torch.inference_mode():
        for study in tqdm(studies, desc="stage 2", unit="study", disable=not progress):
            embeddings = torch.from_numpy(np.array(features.embeddings(study), dtype=np.float32)).to(device)
            output = sequence(embeddings[None])
            exam_raw.append(torch.sigmoid(output.exam[0]).cpu().double().numpy())
            image_raw.append(torch.sigmoid(output.image[0]).cpu().double().numpy())
            study_features.append(output.study[0].cpu().numpy())
            attention.append(output.attention[0].cpu().numpy())
    predictions = _consistent(np.stack(exam_raw), image_raw)
    predictions.study_features = np.stack(study_features)
    predictions.attention = attention
    predictions.pe = pe_score(predictions.exam)
    return predictions


def predict_cnn(features: FeatureSet, studies: list[CachedStudy], stage1: TrainState) -> Predictions:
    """Baseline 1: stage 1's heads on each slice embedding; exam labels from the slice of highest image
    probability, and the study PE score is that probability."""
    encoder = build_model(stage1).encoder
    exam_raw, image_raw = [], []
    with torch.inference_mode():
        for study in studies:
            embeddings = torch.from_numpy(np.array(features.embeddings(study), dtype=np.float32))
            image_logits, exam_logits = encoder.forward_head(embeddings)
            image = torch.sigmoid(image_logits).double().numpy()
            exam_raw.append(torch.sigmoid(exam_logits[int(np.argmax(image))]).double().numpy())
            image_raw.append(image)
    predictions = _consistent(np.stack(exam_raw), image_raw)
    predictions.pe = np.array([float(image.max()) for image in predictions.image])
    return predictions


def _consistent(exam_raw: np.ndarray, image_raw: list[np.ndarray]) -> Predictions:
    violations = 0
    exam, image, reading, reported = [], [], [], []
    for p, images in zip(exam_raw, image_raw, strict=True):
        violations += bool(check(p, images))
        fixed = make_consistent(p, images)
        exam.append(fixed.exam)
        image.append(fixed.image)
        served = Prediction(series_instance_uid="", sop_instance_uids=[], exam=dict(zip(EXAM_LABELS, fixed.exam)),
                            image=fixed.image, attention=np.zeros(len(fixed.image)))
        reading.append(READINGS[exam_result(served)])
        reported.append(exam_probability(served))
    return Predictions(exam_raw=exam_raw, image_raw=image_raw, exam=np.stack(exam), image=image,
                       pe=np.zeros(len(exam)), violations=violations, reading=reading, reported=np.array(reported))


def node_reading(predictions: Predictions, studies: list[CachedStudy]) -> dict[str, Any]:
    """What pe-node's reports would say of these studies: how each kind of study (negative, positive,
    indeterminate) is read (present, absent, undetermined), the sensitivity (positive studies read present), the
    specificity (negative studies read absent), and the AUC of the PE probability the report gives."""
    truth = [s.exam_class for s in studies]
    readings = {kind: {name: 0 for name in READINGS.values()} for kind in ("negative", "positive", "indeterminate")}
    for kind, reading in zip(truth, predictions.reading, strict=True):
        readings[kind][reading] += 1
    positives, negatives = sum(readings["positive"].values()), sum(readings["negative"].values())
    return {
        "readings": readings,
        "sensitivity": readings["positive"]["present"] / positives if positives else None,
        "specificity": readings["negative"]["absent"] / negatives if negatives else None,
        "reported_pe_auc": auc([kind == "positive" for kind in truth], predictions.reported),
    }


POSITIVE_KINDS = ("acute", "chronic", "acute_and_chronic")
"""The kinds of positive study by their RSPECT labels: ``chronic_pe``, ``acute_and_chronic_pe`` or neither (acute)."""


def positive_kind(study: CachedStudy) -> str | None:
    """The kind of a positive study (``POSITIVE_KINDS``); ``None`` for a study without PE."""
    if study.exam_class != "positive":
        return None
    if study.labels["chronic_pe"]:
        return "chronic"
    return "acute_and_chronic" if study.labels["acute_and_chronic_pe"] else "acute"


def by_kind(predictions: Predictions, studies: list[CachedStudy]) -> dict[str, Any]:
    """Where a model finds PE and where it misses: for each kind of positive study, how many there are, the study
    PE AUC of those studies against every study without PE, how many pe-node's report reads present, and the image
    AUC of their PE slices against every slice of the studies without PE. The study PE AUC of the whole set is the
    kinds' AUCs weighted by their shares of the positives, so the table shows which kind costs how much of it."""
    kinds = [positive_kind(s) for s in studies]
    others = np.array([kind is None for kind in kinds])
    other_slices = np.concatenate([p for p, k in zip(predictions.image, kinds, strict=True) if k is None] or [[]])
    result: dict[str, Any] = {}
    for name in POSITIVE_KINDS:
        members = np.array([kind == name for kind in kinds])
        if not members.any():
            continue
        pe_slices = np.concatenate([p[s.image.astype(bool)] for p, s, k in
                                    zip(predictions.image, studies, kinds, strict=True) if k == name])
        result[name] = {
            "studies": int(members.sum()),
            "study_pe_auc": auc(members[members | others], predictions.pe[members | others]),
            "read_present": sum(r == "present" for r, m in zip(predictions.reading, members, strict=True) if m),
            "image_auc": auc(np.r_[np.ones(len(pe_slices)), np.zeros(len(other_slices))],
                             np.r_[pe_slices, other_slices]),
        }
    return result


LOCATIONS = {"central": "central_pe", "left": "leftsided_pe", "right": "rightsided_pe"}
"""Where a positive study's emboli lie, by the RSPECT label that says so."""
SPECIFICITY = 0.9
"""The specificity at which ``score`` reports the sensitivity of the study PE score."""


def by_location(predictions: Predictions, studies: list[CachedStudy]) -> dict[str, Any]:
    """Detection by where the emboli lie: for each location (central, left, right) the positive studies with that
    label and how many of them pe-node's report reads present (a slice above 0.5, the RSNA rule). A study with
    emboli in two places counts in both."""
    result: dict[str, Any] = {}
    for name, label in LOCATIONS.items():
        members = [i for i, s in enumerate(studies) if s.exam_class == "positive" and s.labels[label]]
        detected = sum(predictions.reading[i] == "present" for i in members)
        result[name] = {"studies": len(members), "detected": detected,
                        "rate": detected / len(members) if members else None}
    return result


def score(predictions: Predictions, studies: list[CachedStudy]) -> dict[str, Any]:
    """The numbers of one model: AUCs, losses, accuracies and the consistency check."""
    exam_y = np.stack([s.exam for s in studies])
    image_y = [s.image.astype(np.float64) for s in studies]
    all_images_y, all_images_p = np.concatenate(image_y), np.concatenate(predictions.image)
    positive = np.array([s.exam_class == "positive" for s in studies])
    aucs = {label: auc(exam_y[:, j], predictions.exam[:, j]) for j, label in enumerate(EXAM_LABELS)}
    aucs[IMAGE_LABEL] = auc(all_images_y, all_images_p)
    accuracies = {label: accuracy(exam_y[:, j], predictions.exam[:, j]) for j, label in enumerate(EXAM_LABELS)}
    accuracies[IMAGE_LABEL] = accuracy(all_images_y, all_images_p)
    remaining = sum(bool(check(e, i)) for e, i in zip(predictions.exam, predictions.image, strict=True))
    return {
        "study_pe_auc": auc(positive, predictions.pe),
        "sensitivity_at_specificity": {"specificity": SPECIFICITY,
                                       "sensitivity": sensitivity_at_specificity(positive, predictions.pe,
                                                                                 SPECIFICITY)},
        "study_pe_accuracy": accuracy(positive, predictions.pe),
        "rsna_log_loss": rsna_log_loss(predictions.exam, exam_y, predictions.image, image_y),
        "rsna_log_loss_raw": rsna_log_loss(predictions.exam_raw, exam_y, predictions.image_raw, image_y),
        "auc": aucs,
        "accuracy": accuracies,
        "mean_label_accuracy": float(np.mean([accuracies[label] for label in EXAM_LABELS])),
        "node_reading": node_reading(predictions, studies),
        "by_kind": by_kind(predictions, studies),
        "by_location": by_location(predictions, studies),
        "consistency": {"studies_breaking_rules_before": predictions.violations,
                        "studies_breaking_rules_after": remaining, "studies": len(studies)},
    }


LEVEL = 0.95
"""The confidence level of the bootstrap intervals."""


def bootstrap(predictions: dict[str, Predictions], studies: list[CachedStudy], resamples: int,
              seed: int) -> dict[str, Any]:
    """95 % percentile intervals of each model's study PE AUC, RSNA weighted log loss and node reading (sensitivity,
    specificity, AUC of the reported PE probability) over ``resamples`` stratified resamples of the studies, and the
    paired differences of the full model from each baseline (the same resamples for every model): the difference's
    interval and the share of resamples in which the full model is ahead (ties count half)."""
    positive = np.array([s.exam_class == "positive" for s in studies])
    draws = stratified_resamples(positive, resamples, seed)
    exam_y = np.stack([s.exam for s in studies])
    image_y = [s.image.astype(np.float64) for s in studies]
    negative = np.array([s.exam_class == "negative" for s in studies])
    aucs, losses, point_auc, point_loss, reading = {}, {}, {}, {}, {}
    for name, p in predictions.items():
        present = np.array([r == "present" for r in p.reading])[draws]
        absent = np.array([r == "absent" for r in p.reading])[draws]
        with np.errstate(invalid="ignore", divide="ignore"):
            reading[name] = {
                "sensitivity": interval((present & positive[draws]).sum(axis=1) / positive[draws].sum(axis=1), LEVEL),
                "specificity": interval((absent & negative[draws]).sum(axis=1) / negative[draws].sum(axis=1), LEVEL),
                "reported_pe_auc": interval(resampled_auc(positive, p.reported, draws), LEVEL),
                "sensitivity_at_specificity": interval(
                    resampled_sensitivity_at_specificity(positive, p.pe, draws, SPECIFICITY), LEVEL),
            }
        aucs[name] = resampled_auc(positive, p.pe, draws)
        point_auc[name] = auc(positive, p.pe)
        loss, weight = rsna_log_loss_terms(p.exam, exam_y, p.image, image_y)
        losses[name] = loss[draws].sum(axis=1) / weight[draws].sum(axis=1)
        point_loss[name] = float(loss.sum() / weight.sum())
    result: dict[str, Any] = {
        "resamples": resamples, "level": LEVEL, "seed": seed,
        "models": {name: {"study_pe_auc": interval(aucs[name], LEVEL), "rsna_log_loss": interval(losses[name], LEVEL),
                          **reading[name]}
                   for name in predictions},
        "full_against": {},
    }
    for name in predictions:
        if name == FULL:
            continue
        gain = aucs[FULL] - aucs[name]
        finite = gain[np.isfinite(gain)]
        result["full_against"][name] = {
            "study_pe_auc_difference": _difference(point_auc[FULL], point_auc[name]),
            "study_pe_auc_difference_ci": interval(gain, LEVEL),
            "share_full_ahead": float(np.mean((finite > 0) + 0.5 * (finite == 0))) if finite.size else None,
            "rsna_log_loss_difference": point_loss[FULL] - point_loss[name],
            "rsna_log_loss_difference_ci": interval(losses[FULL] - losses[name], LEVEL),
        }
    return result


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def draw_cams(out: Path, source: dict[str, RSPECTStudy], studies: list[CachedStudy], model: PEModel,
              preprocess: PreprocessConfig, predictions: Predictions, count: int,
              device: torch.device | str) -> list[Path]:
    """CAMs of the full model on the most probable true PE slice of up to ``count`` positive studies, through the
    serving code path (``Predictor.cams`` on the series read from the source DICOM files)."""
    positives = [i for i, s in enumerate(studies) if s.exam_class == "positive"][:count]
    if not positives:
        return []
    predictor = Predictor(model, preprocess, device=device)
    paths = []
    for number, i in enumerate(positives, start=1):
        study = studies[i]
        truth = np.flatnonzero(study.image)
        k = int(truth[np.argmax(predictions.image[i][truth])])
        series = load_series([image.path for image in source[study.study_instance_uid].images])
        if series.sop_instance_uids[k] != study.sop_instance_uids[k]:
            raise ValueError(f"study {study.study_instance_uid}: the source series is not the one cached")
        attention = predictions.attention[i] if predictions.attention is not None else np.zeros(study.slices)
        example = CamExample(
            study=study.study_instance_uid, slice_index=k, slices=study.slices, hu=series.hu[k],
            cam=predictor.cams(series.hu, [k])[k], image_probability=float(predictions.image[i][k]),
            pe_probability=float(predictions.pe[i]), attention_rank=int((attention > attention[k]).sum()) + 1,
        )
        paths.append(draw_cam(out / f"cam_{number:02d}.png", example))
    return paths


def _source(features: FeatureSet, needed: bool) -> dict[str, RSPECTStudy] | None:
    """The RSPECT listing of the cache's source folder (for the CAMs' DICOM files); ``None`` if it is gone and
    not ``needed``."""
    try:
        return read_rspect(features.cache.source, check_files=False)
    except (FileNotFoundError, RSPECTError) as error:
        if needed:
            raise ValueError(f"evaluate: the CAM examples need the source data set {features.cache.source} "
                             f"({error}); set evaluate.cam_examples=0 to go without") from None
        logger.warning("source data set %s cannot be read (%s)", features.cache.source, error)
        return None


def _is_phantom(source: dict[str, RSPECTStudy] | None, studies: list[CachedStudy]) -> bool:
    """Whether the evaluated data are this project's synthetic phantoms (their DICOM Manufacturer says so)."""
    if source is None:
        return False
    first = source[studies[0].study_instance_uid].images[0].path
    return str(pydicom.dcmread(first, stop_before_pixels=True).get("Manufacturer", "")) == MANUFACTURER
