"""The demo weights in models/: within the size limit, loadable by pe-node, and described truthfully by their card."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pe_node.config import load_config
from pe_node.demo import SIZE, SLICES, make_phantom
from pe_node.findings import EXAM_LABELS, Prediction, exam_probability
from pe_node.model import Predictor, check, load_checkpoint
from pe_node.model.predictor import cam_indices
from pe_node.pipeline.series import load_series
from training.config import TrainConfig, load_train_config
from training.phantoms.generator import ExamClass, exam_class, plan_study, write_study

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "models" / "pe-demo.pt"
CARD = REPO / "models" / "README.md"


def test_demo_weights_are_fp16_under_30_mb_and_are_the_default_checkpoint() -> None:
    assert CHECKPOINT.stat().st_size <= 30 * 1024 * 1024
    loaded = load_checkpoint(CHECKPOINT)
    assert loaded.meta.weights_dtype == "float16"
    assert "not for clinical use" in loaded.meta.provenance["description"]
    assert load_config(REPO / "config.yaml").model.checkpoint == CHECKPOINT


def test_the_model_card_gives_the_checkpoints_own_evaluation_numbers() -> None:
    evaluation = load_checkpoint(CHECKPOINT).meta.provenance["evaluation"]
    card = CARD.read_text(encoding="utf-8")
    assert evaluation["phantoms"] is True
    intervals = evaluation["bootstrap"]["models"]
    for name, result in evaluation["models"].items():
        row = next(line for line in card.splitlines() if line.startswith(f"| {result['title']} |"))
        assert f"| {result['study_pe_auc']:.3f} |" in row, row
        assert f"| {result['rsna_log_loss']:.4f} |" in row, row
        low, high = intervals[name]["study_pe_auc"]
        assert f"| {low:.3f}-{high:.3f} |" in row, row
    reading, bounds = evaluation["models"]["full"]["node_reading"], intervals["full"]
    row = next(line for line in card.splitlines() if line.startswith("| Full model | "))
    assert (f"| {reading['sensitivity']:.3f} | {bounds['sensitivity'][0]:.3f}-{bounds['sensitivity'][1]:.3f} "
            f"| {reading['specificity']:.3f} | {bounds['specificity'][0]:.3f}-{bounds['specificity'][1]:.3f} |") in row
    for name, lead in evaluation["bootstrap"]["full_against"].items():
        low, high = lead["study_pe_auc_difference_ci"]
        assert f"| {lead['study_pe_auc_difference']:+.3f} | {low:+.3f} to {high:+.3f} |" in card, name
    assert f"{evaluation['constant_baseline_rsna_log_loss']:.4f}" in card
    assert "not for clinical use" in card.lower()
    assert "training/demo.sh" in card


def _stage1_chains(provenance: dict) -> list[list[dict]]:
    """For each stage 1 that the shipped one averages (``pe-train average``; or the shipped stage 1 itself), its
    record, then the record of each stage 1 it was fine-tuned from (``init``), back to the first."""
    stage1 = provenance["stage1"]
    chains = []
    for record in [item["stage1"] for item in stage1["average"]] if stage1.get("average") else [stage1]:
        chain = [record]
        while chain[-1].get("init"):
            chain.append(chain[-1]["init"]["stage1"])
        chains.append(chain)
    return chains


def test_the_training_configs_are_those_each_stage_of_the_weights_was_trained_with() -> None:
    # Stage 1 is the mean of five CPU fine-tunings' checkpoints (the third's best.pt, the fourth's and the fifth's
    # best.pt and last.pt), all of one lineage: the GPU stage 1 (demo-gpu.yaml) fine-tuned with finetune-cpu.yaml
    # five times in a row, the first three without hard negatives, the third with 45 minutes, the first two with 35,
    # the first selecting on validation study AUC, as the file then said; stage 2 trained behind the mean with
    # finetune-cpu.yaml.
    provenance = load_checkpoint(CHECKPOINT).meta.provenance
    configs = REPO / "training" / "configs"
    fine = load_train_config(configs / "finetune-cpu.yaml").model_dump(mode="json")
    gpu = load_train_config(configs / "demo-gpu.yaml").model_dump(mode="json")
    third = {**fine, "stage1": {**fine["stage1"], "max_minutes": 45.0, "hard_negatives": 0,
                                "hard_negatives_stride": 1}}
    second = {**fine, "stage1": {**third["stage1"], "max_minutes": 35.0}}
    first = {**fine, "stage1": {**second["stage1"], "select": "val_study_auc"}}
    lineage = [gpu, first, second, third, fine, fine]  # from the GPU run to the fifth fine-tuning
    defaults = TrainConfig().model_dump(mode="json")
    chains = _stage1_chains(provenance)
    assert [len(chain) for chain in chains] == [4, 5, 5, 6, 6], "the third, fourth (2) and fifth (2) fine-tunings"
    assert provenance["stage1"]["average"][1]["sha256"] != provenance["stage1"]["average"][2]["sha256"]
    recorded = []
    for chain in chains:
        for fine_tuned in chain[:-1]:
            # The config keeps the path as given, the init record the file it resolved to.
            assert fine_tuned["init"]["path"].endswith(fine_tuned["config"]["stage1"]["init"])
        recorded += [(record["config"], config, ("stage1", "model", "preprocess"))
                     for record, config in zip(reversed(chain), lineage, strict=False)]
    recorded.append((provenance["stage2"]["config"], fine, ("stage2", "model")))
    for config_recorded, config, sections in recorded:
        for section in sections:
            # A key added to the config since a stage was trained is at its default in that stage's file.
            newer = {key: value for key, value in defaults[section].items() if key not in config_recorded[section]}
            assert {**config_recorded[section], **newer, "init": None} == {**config[section], "init": None}, section


def test_the_card_says_where_each_fine_tunings_starting_weights_are_and_their_hashes_are_the_recorded_ones() -> None:
    chains = _stage1_chains(load_checkpoint(CHECKPOINT).meta.provenance)
    longest = max(chains, key=len)
    recorded = [fine_tuned["init"]["sha256"] for fine_tuned in longest[:-1]]
    for chain in chains:
        inits = [fine_tuned["init"]["sha256"] for fine_tuned in chain[:-1]]
        assert inits == recorded[len(recorded) - len(inits):], "one lineage"
    card = CARD.read_text(encoding="utf-8")
    starting_file = r"`git show ([0-9a-f]{7,40}):models/pe-demo\.pt > (pe-demo-[a-z]+\.pt)`.*?SHA-256\s+([0-9a-f]{64})"
    named = re.findall(starting_file, card, re.DOTALL)
    assert [sha for _, _, sha in named] == recorded, "the card names each starting file, the latest first"
    for _, name, _ in named:
        assert f"INIT={name}" in card
    demo = (REPO / "training" / "demo.sh").read_text(encoding="utf-8")
    assert f"git show {named[0][0]}:models/pe-demo.pt > pe-demo-before.pt" in demo
    git = shutil.which("git")
    if git is None:
        pytest.skip("no git here to read the starting files from history")
    clean = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    for commit, name, sha in named:
        history = subprocess.run([git, "-C", str(REPO), "show", f"{commit}:models/pe-demo.pt"], capture_output=True,
                                 env=clean)
        if history.returncode != 0:
            pytest.skip(f"this copy of the repository does not hold commit {commit} (a shallow clone or an archive)")
        assert hashlib.sha256(history.stdout).hexdigest() == sha, name


def test_the_card_names_the_averaged_checkpoints_by_their_hashes() -> None:
    average = load_checkpoint(CHECKPOINT).meta.provenance["stage1"]["average"]
    card = CARD.read_text(encoding="utf-8")
    section = card[card.index("The averaged checkpoints"):]
    for item in average:
        assert item["sha256"] in section, item["path"]


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


def test_demo_weights_tell_the_make_demo_phantom_from_a_phantom_without_emboli(
    tmp_path: Path, predictor: Predictor, demo_phantom: tuple[list[Path], str, Prediction]
) -> None:
    index = next(i for i in range(40) if exam_class(2026, i) is ExamClass.NEGATIVE)
    write_study(plan_study(2026, index, slices=SLICES, size=SIZE), tmp_path / "negative")
    found = demo_phantom[2]
    clean = predictor.predict(load_series(sorted((tmp_path / "negative").rglob("*.dcm"))))
    assert exam_probability(found) > 0.9 and found.exam["negative_exam_for_pe"] < 0.5
    assert exam_probability(clean) < 0.5 < clean.exam["negative_exam_for_pe"]
