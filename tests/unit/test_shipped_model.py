"""The demo weights in models/: within the size limit, loadable by pe-node, described truthfully by their card (the
numbers of the evaluation record bound to the file by its hash, and the provenance the file carries), and finding the
clot of the phantom ``make demo`` sends."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from pe_node.config import load_config
from pe_node.demo import SIZE, SLICES, make_phantom
from pe_node.findings import EXAM_LABELS, Prediction, exam_probability
from pe_node.model import Predictor, check, load_checkpoint
from pe_node.model.predictor import cam_indices
from pe_node.pipeline.series import load_series
from training.phantoms.generator import ExamClass, exam_class, plan_study

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "models" / "pe-demo.pt"
CARD = REPO / "models" / "README.md"
RECORD = REPO / "models" / "pe-demo.evaluation.json"
FAMILIES = ("independent", "training")
"""The card's order: the evaluation-only family first."""


def _record() -> dict[str, Any]:
    return json.loads(RECORD.read_text(encoding="utf-8"))


def _family(record: dict[str, Any], family: str) -> dict[str, Any]:
    return record if family == "training" else record[family]


def _interval(bounds: list[float]) -> str:
    return f"{bounds[0]:.3f}-{bounds[1]:.3f}"


def test_demo_weights_are_fp16_under_30_mb_and_are_the_default_checkpoint() -> None:
    assert CHECKPOINT.stat().st_size <= 30 * 1024 * 1024
    loaded = load_checkpoint(CHECKPOINT)
    assert loaded.meta.weights_dtype == "float16"
    assert "not for clinical use" in loaded.meta.provenance["description"]
    assert load_config(REPO / "config.yaml").model.checkpoint == CHECKPOINT


def test_the_evaluation_record_scored_this_very_file_on_both_families() -> None:
    record = _record()
    sha = hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest()
    assert record["checkpoints"]["stage1_sha256"] == record["checkpoints"]["stage2_sha256"] == sha
    for family in FAMILIES:
        numbers = _family(record, family)
        assert numbers["family"] == family and numbers["data"]["phantoms"] is True
        assert set(numbers["models"]) == {"full", "baseline_mean", "baseline_cnn"}, "both of the paper's baselines"


def test_the_card_gives_both_families_numbers_as_the_record_has_them() -> None:
    record, lines = _record(), CARD.read_text(encoding="utf-8").splitlines()
    for family in FAMILIES:
        numbers = _family(record, family)
        intervals = numbers["bootstrap"]["models"]
        positives = numbers["data"]["splits"]["test"]["positive"]
        for name, result in numbers["models"].items():
            row = next(line for line in lines if line.startswith(f"| {result['title']} | {family} |"))
            bounds = intervals[name]
            reading, fixed = result["node_reading"], result["sensitivity_at_specificity"]
            expected = [f"{numbers['studies']} ({positives})",
                        f"{result['study_pe_auc']:.3f}", _interval(bounds["study_pe_auc"]),
                        f"{fixed['sensitivity']:.3f}", _interval(bounds["sensitivity_at_specificity"]),
                        f"{reading['sensitivity']:.3f}", _interval(bounds["sensitivity"]),
                        f"{reading['specificity']:.3f}", _interval(bounds["specificity"]),
                        *(f"{found['detected']} of {found['studies']}" for found in result["by_location"].values())]
            cells = [cell.strip() for cell in row.strip("|").split("|")][2:]
            assert cells == expected, row
        for name, lead in numbers["bootstrap"]["full_against"].items():
            title = numbers["models"][name]["title"].split(":")[0]
            low, high = lead["study_pe_auc_difference_ci"]
            assert (f"| {title} | {family} | {lead['study_pe_auc_difference']:+.3f} | {low:+.3f} to {high:+.3f} "
                    f"| {lead['share_full_ahead']:.0%} |") in lines, (family, name)


def test_the_card_gives_the_evaluation_the_file_carries_and_the_commits_that_made_it() -> None:
    provenance = load_checkpoint(CHECKPOINT).meta.provenance
    evaluation, card = provenance["evaluation"], CARD.read_text(encoding="utf-8")
    full, bounds = evaluation["models"]["full"], evaluation["bootstrap"]["models"]["full"]
    assert f"{full['study_pe_auc']:.3f} ({_interval(bounds['study_pe_auc'])})" in card
    assert f"on {evaluation['studies']} held-out phantoms" in card
    for code in (provenance["stage2"]["code"], provenance["code"]):
        assert f"`{code['git_commit'][:7]}`" in card
    for item in provenance["stage1"]["average"]:
        assert item["sha256"][:12] in card, item["path"]


def test_the_card_is_a_card() -> None:
    card = CARD.read_text(encoding="utf-8")
    assert len(card.splitlines()) <= 150
    assert "not for clinical use" in card.lower()
    assert "## What phantoms cannot tell" in card
    for command in ("pe-train phantoms --family independent", "pe-train evaluate", "training/demo.sh"):
        assert command in card, command


def test_the_card_names_the_preprocessing_the_checkpoint_carries() -> None:
    preprocess = load_checkpoint(CHECKPOINT).preprocess
    card = CARD.read_text(encoding="utf-8")
    assert re.search(rf"\b{preprocess.size} px\b", card)
    assert preprocess.crop.value in card


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    loaded = load_checkpoint(CHECKPOINT)
    return Predictor(loaded.model, loaded.preprocess)


@pytest.fixture(scope="module")
def demo_phantom(tmp_path_factory: pytest.TempPathFactory, predictor: Predictor) -> tuple[list[Path], str, Prediction]:
    """The phantom `make demo` sends (seed 2026), its truth note, and the demo weights' prediction of it."""
    files, truth = make_phantom(tmp_path_factory.mktemp("phantom"), seed=2026)
    return files, truth, predictor.predict(load_series(files), cam_slices=2)


def test_demo_weights_analyse_the_phantom_make_demo_sends(demo_phantom: tuple[list[Path], str, Prediction]) -> None:
    files, truth, prediction = demo_phantom
    assert "slices with clot" in truth, truth
    assert prediction.image.shape == (len(files),)
    assert check(np.array([prediction.exam[label] for label in EXAM_LABELS]), prediction.image) == []
    assert 0.0 <= exam_probability(prediction) <= 1.0
    assert set(prediction.cams) == set(cam_indices(2, prediction.image, prediction.attention))  # key slices, peaks


def test_demo_weights_put_their_highest_slices_of_the_make_demo_phantom_on_its_clot(
        demo_phantom: tuple[list[Path], str, Prediction]) -> None:
    files, _, prediction = demo_phantom
    plan = plan_study(2026, next(i for i in range(40) if exam_class(2026, i) is ExamClass.POSITIVE), slices=SLICES,
                      size=SIZE)
    clot_at = {round(float(z), 2): bool(shown) for z, shown in zip(plan.patient_z, plan.pe_present, strict=True)}
    z_of = {}
    for path in files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        z_of[header.SOPInstanceUID] = round(float(header.ImagePositionPatient[2]), 2)
    on_clot = np.array([clot_at[z_of[uid]] for uid in prediction.sop_instance_uids])
    assert on_clot.sum() > 0
    highest = np.argsort(prediction.image)[::-1][:3]
    assert on_clot[highest].all(), "the three slices scored highest show the clot"
    assert exam_probability(prediction) > 0.9 and prediction.exam["negative_exam_for_pe"] < 0.5
