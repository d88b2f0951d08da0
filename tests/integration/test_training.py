"""The training pipeline end to end on tiny phantoms: prepare, stage 1, features, stage 2, evaluate, export, serve.

A tiny backbone (timm's test EfficientNet) at 48 px keeps every step to seconds; the DDP test runs stage 1 under
torchrun with two CPU processes on the gloo backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pe_node.model import (
    Predictor,
    check,
    cpu_has_fast_bf16,
    create_model,
    load_checkpoint,
)
from pe_node.model.checkpoint import file_sha256
from pe_node.pipeline.series import load_series
from training.cli import main
from training.config import Stage1Config
from training.evalphantoms.study import generate as generate_independent
from training.fitting.cache import Cache, training_share
from training.fitting.distributed import Processes
from training.fitting.export import stage1_record
from training.fitting.features import FeatureSet
from training.fitting.loop import Optimization
from training.fitting.stage1 import mine_hard_negatives, validate_encoder
from training.fitting.state import load_state, save_state
from training.rspect import read_rspect

CONFIG = {
    "seed": 0,
    "preprocess": {"size": 48, "crop": "body"},
    "data": {"val_fraction": 0.34, "split_seed": 1},
    "model": {"backbone": "test_efficientnet", "lstm_hidden": 16, "dense_dim": 16, "attention_dim": 8},
    "stage1": {"epochs": 4, "batch_size": 8, "lr": 0.003, "negatives_per_study": None, "sampling": "mixed"},
    "stage2": {"epochs": 4, "batch_size": 2, "lr": 0.003},
    "evaluate": {"cam_examples": 1, "tsne_perplexity": 2},
}


def _run(command: str, *arguments: str) -> None:
    """``pe-train COMMAND ARGUMENTS`` in this process (without progress bars); it must succeed."""
    quiet = [] if command == "export" else ["--quiet"]
    assert main([command, *quiet, *arguments]) == 0


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, phantom_train_dir: Path, phantom_heldout_dir: Path) -> Path:
    """Config, both caches, stage 1 and its features: the shared start of the tests below."""
    root = tmp_path_factory.mktemp("training")
    (root / "train.yaml").write_text(yaml.safe_dump(CONFIG))
    config = str(root / "train.yaml")
    _run("prepare", "--config", config, "--data", str(phantom_train_dir), "--cache", str(root / "cache"))
    _run("prepare", "--config", config, "--data", str(phantom_heldout_dir), "--cache", str(root / "heldout"),
         "--split-all", "test")
    _run("stage1", "--config", config, "--cache", str(root / "cache"), "--out", str(root / "stage1"))
    for cache in ("cache", "heldout"):
        _run("features", "--config", config, "--stage1", str(root / "stage1/best.pt"), "--cache", str(root / cache),
             "--out", str(root / f"features-{cache}"))
    return root


@pytest.fixture(scope="module")
def independent(tmp_path_factory: pytest.TempPathFactory, workspace: Path) -> Path:
    """Six tiny studies of the evaluation-only family (64 px, 10-14 slices; one clot in each place), prepared and
    embedded by the workspace's stage 1."""
    root = tmp_path_factory.mktemp("independent")
    generate_independent(root / "phantoms", 6, 3, 64, (10, 14), progress=False)
    config = str(workspace / "train.yaml")
    _run("prepare", "--config", config, "--data", str(root / "phantoms"), "--cache", str(root / "cache"),
         "--split-all", "test")
    _run("features", "--config", config, "--stage1", str(workspace / "stage1/best.pt"), "--cache", str(root / "cache"),
         "--out", str(root / "features"))
    return root


def _losses(run: Path) -> list[float]:
    return [epoch["train_loss"] for epoch in json.loads((run / "metrics.json").read_text())["history"]]


def test_stage1_loss_goes_down_and_the_run_folder_holds_what_resuming_needs(workspace: Path) -> None:
    losses = _losses(workspace / "stage1")
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert sorted(p.name for p in (workspace / "stage1").iterdir()) == ["best.pt", "config.yaml", "last.pt",
                                                                         "metrics.json"]
    last = load_state(workspace / "stage1/last.pt", "stage1")
    assert last.epoch == 4 and last.optimizer is not None and last.rng is not None
    assert last.extra["precision"] == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert yaml.safe_load((workspace / "stage1/config.yaml").read_text())["model"]["backbone"] == "test_efficientnet"


def test_features_are_the_served_encoders_embeddings_of_every_cached_study(workspace: Path) -> None:
    index = json.loads((workspace / "features-heldout/index.json").read_text())
    assert index["embedding_dim"] == 256
    studies = sorted(p.name for p in (workspace / "features-heldout").glob("*.npy"))
    assert len(studies) == 5


def test_pipeline_trains_evaluates_and_exports_a_checkpoint_pe_node_serves(workspace: Path,
                                                                          phantom_heldout_dir: Path) -> None:
    config, root = str(workspace / "train.yaml"), workspace
    _run("stage2", "--config", config, "--features", str(root / "features-cache"), "--out", str(root / "attention"))
    _run("stage2", "--config", config, "--features", str(root / "features-cache"), "--out", str(root / "mean"),
         "--pooling", "mean", "--epochs", "2")
    losses = _losses(root / "attention")
    assert losses[-1] < losses[0]
    assert load_state(root / "mean/best.pt", "stage2").model_config["pooling"] == "mean"

    _run("evaluate", "--config", config, "--features", str(root / "features-heldout"), "--stage1",
         str(root / "stage1/best.pt"), "--stage2", str(root / "attention/best.pt"), "--baseline",
         str(root / "mean/best.pt"), "--out", str(root / "report"))
    files = {p.name for p in (root / "report").iterdir()}
    assert {"report.md", "metrics.json", "roc_labels.png", "roc_models.png", "tsne.png", "cam_01.png"} <= files
    metrics = json.loads((root / "report/metrics.json").read_text())
    assert set(metrics["models"]) == {"full", "baseline_mean", "baseline_cnn"}
    assert metrics["data"]["phantoms"] is True and metrics["studies"] == 5
    assert all(m["consistency"]["studies_breaking_rules_after"] == 0 for m in metrics["models"].values())
    report = (root / "report/report.md").read_text()
    assert "What phantoms cannot tell about real data" in report and "Constant prediction" in report
    assert set(metrics["bootstrap"]["full_against"]) == {"baseline_mean", "baseline_cnn"}
    assert "## The full model against the baselines" in report and "## What pe-node would report" in report
    readings = metrics["models"]["full"]["node_reading"]["readings"]
    assert sum(sum(kind.values()) for kind in readings.values()) == 5
    kinds = metrics["models"]["full"]["by_kind"]
    assert sum(kind["studies"] for kind in kinds.values()) == readings["positive"]["present"] + \
        readings["positive"]["absent"] + readings["positive"]["undetermined"]
    assert "## By kind of positive study" in report

    _run("export", "--stage1", str(root / "stage1/best.pt"), "--stage2", str(root / "attention/best.pt"), "--out",
         str(root / "pe-test.pt"), "--evaluation", str(root / "report/metrics.json"))
    loaded = load_checkpoint(root / "pe-test.pt")
    assert loaded.meta.weights_dtype == "float16" and loaded.preprocess.size == 48
    provenance = loaded.meta.provenance
    assert provenance["stage1"]["command"][:2] == ["pe-train", "stage1"]
    assert provenance["stage1"]["code"] == provenance["stage2"]["code"] == provenance["code"], "each stage's commit"
    assert provenance["stage1"]["precision"] == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert provenance["evaluation"]["models"]["full"]["title"].startswith("Full model")
    assert provenance["evaluation"]["bootstrap"] == metrics["bootstrap"]
    study = next(s for s in read_rspect(phantom_heldout_dir).values() if s.pe_present)
    series = load_series(study.images[0].path.parent)
    prediction = Predictor.from_checkpoint(root / "pe-test.pt", device="cpu").predict(series, cam_slices=1)
    assert len(prediction.image) == len(series) and check(prediction.exam, prediction.image) == []


def test_evaluate_reports_the_independent_family_beside_the_held_out_set(workspace: Path, independent: Path,
                                                                          tmp_path: Path) -> None:
    config, root = str(workspace / "train.yaml"), workspace
    _run("stage2", "--config", config, "--features", str(root / "features-cache"), "--out", str(tmp_path / "attention"),
         "--epochs", "2")
    _run("evaluate", "--config", config, "--features", str(root / "features-heldout"), "--stage1",
         str(root / "stage1/best.pt"), "--stage2", str(tmp_path / "attention/best.pt"), "--independent",
         str(independent / "features"), "--out", str(tmp_path / "report"), "--set", "evaluate.cam_examples=0")
    metrics = json.loads((tmp_path / "report/metrics.json").read_text())
    other = metrics["independent"]
    assert metrics["family"] == "training" and metrics["studies"] == 5
    assert other["family"] == "independent" and other["studies"] == 6 and other["data"]["phantoms"] is True
    assert set(other["models"]) == {"full", "baseline_cnn"}
    for result in (*metrics["models"].values(), *other["models"].values()):
        located = result["by_location"]
        assert set(located) == {"central", "left", "right"}
        assert all(0 <= place["detected"] <= place["studies"] for place in located.values())
        assert result["sensitivity_at_specificity"]["specificity"] == 0.9
    assert {place: found["studies"] for place, found in other["models"]["full"]["by_location"].items()} == {
        "central": 1, "left": 1, "right": 1}
    assert "sensitivity_at_specificity" in other["bootstrap"]["models"]["full"]
    assert "roc_models_independent.png" in metrics["figures"]
    report = (tmp_path / "report/report.md").read_text()
    assert "## Both phantom families side by side" in report and "# The independent, evaluation-only family" in report
    assert report.count("## Detection by location") == 2
    _run("export", "--stage1", str(root / "stage1/best.pt"), "--stage2", str(tmp_path / "attention/best.pt"), "--out",
         str(tmp_path / "both.pt"), "--evaluation", str(tmp_path / "report/metrics.json"))
    kept = load_checkpoint(tmp_path / "both.pt").meta.provenance["evaluation"]
    assert kept["family"] == "training" and kept["independent"]["family"] == "independent"
    assert kept["independent"]["models"]["full"]["by_location"] == other["models"]["full"]["by_location"]
    assert kept["independent"]["bootstrap"] == other["bootstrap"]


def test_evaluate_scores_an_exported_model_as_it_is(workspace: Path, independent: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config, root = str(workspace / "train.yaml"), workspace
    _run("stage2", "--config", config, "--features", str(root / "features-cache"), "--out", str(tmp_path / "stage2"),
         "--epochs", "1")
    _run("export", "--stage1", str(root / "stage1/best.pt"), "--stage2", str(tmp_path / "stage2/best.pt"), "--out",
         str(tmp_path / "model.pt"))
    _run("features", "--config", config, "--stage1", str(tmp_path / "model.pt"), "--cache",
         str(independent / "cache"), "--out", str(tmp_path / "features"))
    _run("evaluate", "--config", config, "--features", str(tmp_path / "features"), "--stage1",
         str(tmp_path / "model.pt"), "--stage2", str(tmp_path / "model.pt"), "--out", str(tmp_path / "report"), "--set",
         "evaluate.cam_examples=0")
    metrics = json.loads((tmp_path / "report/metrics.json").read_text())
    assert metrics["studies"] == 6 and metrics["constant_baseline"]["rsna_log_loss"] is not None  # prevalences kept
    scored = metrics["checkpoints"]  # what a model card's evaluation record is bound to
    assert scored["stage1_sha256"] == scored["stage2_sha256"] == file_sha256(tmp_path / "model.pt")
    refused = ["evaluate", "--quiet", "--config", config, "--features", str(independent / "features"), "--stage1",
               str(tmp_path / "model.pt"), "--stage2", str(tmp_path / "model.pt"), "--out", str(tmp_path / "refused")]
    assert main(refused) == 1  # the embeddings of another stage 1 (FeaturesError)
    assert "were made by stage-1 checkpoint" in capsys.readouterr().err


def test_export_refuses_a_stage2_trained_on_another_stage1(workspace: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    state = load_state(workspace / "stage1/best.pt")
    torch.save({**state.to_dict(), "epoch": 99}, other)
    _run("stage2", "--config", str(workspace / "train.yaml"), "--features", str(workspace / "features-cache"),
         "--out", str(tmp_path / "s2"), "--epochs", "1")
    assert main(["export", "--stage1", str(other), "--stage2", str(tmp_path / "s2/best.pt"), "--out",
                 str(tmp_path / "x.pt")]) == 1


def test_resumed_stage2_ends_exactly_where_an_uninterrupted_run_ends(workspace: Path, tmp_path: Path) -> None:
    config, features = str(workspace / "train.yaml"), str(workspace / "features-cache")
    _run("stage2", "--config", config, "--features", features, "--out", str(tmp_path / "straight"), "--epochs", "3")
    _run("stage2", "--config", config, "--features", features, "--out", str(tmp_path / "split"), "--epochs", "1")
    _run("stage2", "--config", config, "--features", features, "--out", str(tmp_path / "split"), "--epochs", "3",
         "--resume", "--set", "stage2.epochs=3")
    straight, resumed = load_state(tmp_path / "straight/last.pt"), load_state(tmp_path / "split/last.pt")
    assert resumed.epoch == 3 and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert all(torch.equal(straight.weights[k], resumed.weights[k]) for k in straight.weights)
    assert [h["train_loss"] for h in straight.history] == [h["train_loss"] for h in resumed.history]


def test_both_stages_train_on_the_share_of_the_train_split_that_data_train_fraction_asks_for_and_resume_on_it(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config, share = str(workspace / "train.yaml"), ["--set", "data.train_fraction=0.5"]
    train = Cache.open(workspace / "cache").split("train")
    kept = training_share(train, 0.5, CONFIG["data"]["split_seed"])
    assert 0 < len(kept) < len(train)
    _run("stage1", "--config", config, "--cache", str(workspace / "cache"), "--out", str(tmp_path / "s1"),
         "--epochs", "1", "--set", "stage1.hard_negatives=1", *share)
    stage1 = json.loads((tmp_path / "s1/metrics.json").read_text())
    assert stage1["data"]["train_studies"] == len(kept)
    assert stage1["data"]["splits"]["train"]["studies"] == len(train)
    assert stage1["history"][0]["mined_studies"] == sum(not study.image.any() for study in kept)
    _run("stage2", "--config", config, "--features", str(workspace / "features-cache"), "--out", str(tmp_path / "s2"),
         "--epochs", "1", *share)
    stage2 = json.loads((tmp_path / "s2/metrics.json").read_text())
    batch = CONFIG["stage2"]["batch_size"]
    assert stage2["data"]["train_studies"] == len(kept)
    assert stage2["batches_per_process"] == [-(-len(kept) // batch)], "one pass over the share an epoch"
    whole = json.loads((workspace / "stage1/metrics.json").read_text())
    assert whole["data"]["train_studies"] == len(train)
    assert main(["stage2", "--quiet", "--config", config, "--features", str(workspace / "features-cache"), "--out",
                 str(tmp_path / "s2"), "--epochs", "2", "--resume"]) == 1
    assert "trained on data.train_fraction 0.5 (split_seed 1)" in capsys.readouterr().err
    _run("stage2", "--config", config, "--features", str(workspace / "features-cache"), "--out", str(tmp_path / "s2"),
         "--epochs", "2", "--resume", *share)
    assert json.loads((tmp_path / "s2/metrics.json").read_text())["data"]["train_studies"] == len(kept)


def test_stage1_trains_on_two_processes_under_torchrun_and_only_rank_0_writes(workspace: Path,
                                                                            tmp_path: Path) -> None:
    # With hard negatives, which each process mines for its share of the studies and then gathers.
    run, logs = tmp_path / "ddp", tmp_path / "logs"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir", str(logs),
        "--redirects", "3", "-m", "training.cli", "stage1", "--quiet", "--config", str(workspace / "train.yaml"),
        "--cache", str(workspace / "cache"), "--out", str(run), "--epochs", "1", "--device", "cpu", "--threads", "1",
        "--set", "stage1.hard_negatives=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.json"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["inputs"]["world_size"] == 2
    batches = metrics["batches_per_process"]
    assert len(batches) == 2 and batches[0] == batches[1] > 0
    without = [study for study in Cache.open(workspace / "cache").split("train") if not study.image.any()]
    epoch = load_state(run / "last.pt", "stage1").history[-1]
    assert epoch["mined_studies"] == len(without) > 1, "each process mines its share, both get every study's"
    assert epoch["mined_slices"] == sum(study.slices for study in without)
    stderr = {path.parent.name: path.read_text() for path in logs.rglob("stderr.log")}
    assert set(stderr) == {"0", "1"}
    for rank, text in stderr.items():
        assert f"rank {rank} trained {batches[0]} batches" in text
    assert "wrote" in stderr["0"] and "wrote" not in stderr["1"]


def test_stage2_trains_again_behind_the_stage1_of_an_exported_checkpoint(workspace: Path, tmp_path: Path) -> None:
    config, root = str(workspace / "train.yaml"), workspace
    _run("stage2", "--config", config, "--features", str(root / "features-cache"), "--out", str(tmp_path / "first"),
         "--epochs", "1")
    _run("export", "--stage1", str(root / "stage1/best.pt"), "--stage2", str(tmp_path / "first/best.pt"), "--out",
         str(tmp_path / "shipped.pt"))
    shipped = load_checkpoint(tmp_path / "shipped.pt")
    exported_stage2 = load_state(tmp_path / "shipped.pt", "stage2")  # what evaluate scores an exported model with
    sequence = shipped.model.sequence.state_dict()
    assert all(torch.equal(exported_stage2.weights[name], sequence[name].float()) for name in sequence)
    assert exported_stage2.inputs["stage1_sha256"] == file_sha256(tmp_path / "shipped.pt")
    assert exported_stage2.extra["label_prior"] == load_state(tmp_path / "first/best.pt", "stage2").extra["label_prior"]

    # The exported file is the stage 1 of features, of a new stage 2 and of a new export.
    _run("features", "--config", config, "--stage1", str(tmp_path / "shipped.pt"), "--cache", str(root / "cache"),
         "--out", str(tmp_path / "features"))
    features = FeatureSet.open(tmp_path / "features")
    served = Predictor(shipped.model, shipped.preprocess, device="cpu")
    study = features.split("train")[0]
    assert torch.equal(torch.from_numpy(np.array(features.embeddings(study))),
                       served.embed_inputs(features.cache.inputs(study)).cpu())
    _run("stage2", "--config", config, "--features", str(tmp_path / "features"), "--out", str(tmp_path / "again"),
         "--epochs", "2")
    _run("export", "--stage1", str(tmp_path / "shipped.pt"), "--stage2", str(tmp_path / "again/best.pt"), "--out",
         str(tmp_path / "again.pt"))
    again = load_checkpoint(tmp_path / "again.pt")
    encoder, before = again.model.encoder.state_dict(), shipped.model.encoder.state_dict()
    assert all(torch.equal(encoder[name], before[name]) for name in before)
    stage1 = again.meta.provenance["stage1"]
    assert stage1["command"][:2] == ["pe-train", "stage1"] and stage1["best_epoch"] >= 1
    assert stage1["from_checkpoint"]["sha256"] == shipped.meta.sha256
    assert again.meta.provenance["data"] == shipped.meta.provenance["data"]
    stage2 = again.meta.provenance["stage2"]
    assert stage2["command"][:2] == ["pe-train", "stage2"] and stage2["epochs"] == 2
    assert stage2["data"]["splits"]["train"]["studies"] == len(features.split("train"))


def test_hard_negatives_are_the_slices_of_studies_without_emboli_that_stage1_scores_highest(workspace: Path) -> None:
    trained = load_state(workspace / "stage1/best.pt", "stage1")
    model = create_model(trained.model_name, **trained.model_config)
    model.encoder.load_state_dict(trained.weights)
    cache = Cache.open(workspace / "cache")
    train = cache.split("train")
    stage1 = Stage1Config(hard_negatives=3, hard_negatives_stride=2)
    device = torch.device("cpu")
    processes = Processes(0, 1, 0, device)
    hard, mined = mine_hard_negatives(model.encoder, cache, train, stage1, 1, processes,
                                      Optimization(model.encoder.parameters(), stage1, device))
    without = [position for position, study in enumerate(train) if not study.image.any()]
    assert sorted(hard) == without and len(without) < len(train), "studies with emboli give none"
    assert mined["mined_studies"] == len(without)
    highest = []
    for position in without:
        study = train[position]
        with torch.no_grad():
            probabilities = torch.sigmoid(model.encoder(cache.inputs(study)).image).numpy()
        scored = np.arange(1, study.slices, 2)
        assert set(hard[position].tolist()) <= set(scored.tolist()) and len(hard[position]) == 3
        top = np.sort(probabilities[scored])[::-1][:3]
        assert probabilities[hard[position]] == pytest.approx(top, abs=1e-5), "hardest first"
        highest.append(top[0])
    assert mined["hard_negative_median_max"] == pytest.approx(float(np.median(highest)), abs=1e-5)
    again, _ = mine_hard_negatives(model.encoder, cache, train, stage1, 2, processes,
                                   Optimization(model.encoder.parameters(), stage1, device))
    assert all(set(again[position].tolist()) <= set(range(0, train[position].slices, 2)) for position in without)


def test_stage1_fine_tunes_a_trained_stage1_and_validates_its_weights_first(workspace: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    config, root = str(workspace / "train.yaml"), workspace
    trained = load_state(root / "stage1/best.pt", "stage1")
    _run("stage1", "--config", config, "--cache", str(root / "cache"), "--out", str(tmp_path / "fine"),
         "--init", str(root / "stage1/best.pt"), "--epochs", "1", "--lr", "0.0003",
         "--set", "stage1.chronic_repeats=2", "--set", "stage1.hard_negatives=2",
         "--set", "stage1.hard_negatives_stride=2")
    fine = load_state(tmp_path / "fine/last.pt", "stage1")
    start, after = fine.history
    assert (start["epoch"], start["train_loss"], after["epoch"]) == (0, None, 1)
    without = [study for study in Cache.open(root / "cache").split("train") if not study.image.any()]
    assert after["mined_studies"] == len(without) > 0, "hard negatives mined before the epoch"
    assert after["mined_slices"] == sum(len(range(1, study.slices, 2)) for study in without)
    assert 0.0 < after["hard_negative_median_max"] < 1.0 and "mined_studies" not in start
    best_before = next(h for h in trained.history if h["epoch"] == trained.best_epoch)
    assert start["val_loss"] == pytest.approx(best_before["val_loss"], rel=1e-4), "epoch 0 is the starting weights"
    kept = load_state(tmp_path / "fine/best.pt", "stage1")
    if kept.epoch == 0:
        assert all(torch.equal(kept.weights[name], trained.weights[name]) for name in trained.weights)
    assert not all(torch.equal(fine.weights[name], trained.weights[name]) for name in trained.weights)
    record = stage1_record(fine, tmp_path / "fine/last.pt")["init"]
    assert record["sha256"] == file_sha256(root / "stage1/best.pt")
    assert record["stage1"]["best_epoch"] == trained.best_epoch and record["stage1"]["command"][:2] == [
        "pe-train", "stage1"]
    assert record["data"] == trained.extra["data"] and record["backbone_weights"] == trained.extra["backbone_weights"]
    assert fine.extra["backbone_weights"]["source"].startswith("stage1.init ")

    capsys.readouterr()
    assert main(["stage1", "--quiet", "--config", config, "--cache", str(root / "cache"), "--out",
                 str(tmp_path / "both"), "--init", str(root / "stage1/best.pt"), "--pretrained", "true"]) == 2
    assert "stage1.init" in capsys.readouterr().err
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert main(["stage1", "--quiet", "--config", config, "--cache", str(root / "cache"), "--out",
                 str(tmp_path / "bad"), "--init", str(tmp_path / "notes.pt")]) == 2
    assert f"stage1.init: training checkpoint {tmp_path / 'notes.pt'}" in capsys.readouterr().err


def test_average_writes_the_mean_of_stage1s_validated_side_by_side_that_trains_and_exports(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config, root = str(workspace / "train.yaml"), workspace
    _run("stage1", "--config", config, "--cache", str(root / "cache"), "--out", str(tmp_path / "fine"),
         "--init", str(root / "stage1/best.pt"), "--epochs", "1", "--lr", "0.001")
    ingredients = [root / "stage1/best.pt", root / "stage1/last.pt", tmp_path / "fine/last.pt"]
    states = [load_state(path, "stage1") for path in ingredients]
    capsys.readouterr()
    _run("average", "--config", config, "--out", str(tmp_path / "average"), *map(str, ingredients),
         "--cache", str(root / "heldout"), "--split", "test")
    printed = capsys.readouterr().out.splitlines()
    average = load_state(tmp_path / "average/best.pt", "stage1")

    for name, tensor in average.weights.items():
        if tensor.is_floating_point():
            mean = sum(state.weights[name].double() for state in states) / len(states)
            assert torch.allclose(tensor.double(), mean, atol=1e-6), name
        else:
            assert torch.equal(tensor, states[0].weights[name]), name
    assert not all(torch.equal(average.weights[name], states[0].weights[name]) for name in average.weights)
    assert [record["sha256"] for record in average.extra["average"]] == [file_sha256(p) for p in ingredients]
    assert all(record["stage1"]["command"][:2] == ["pe-train", "stage1"] for record in average.extra["average"])
    assert average.extra["average"][2]["stage1"]["init"]["sha256"] == file_sha256(root / "stage1/best.pt")

    # Each ingredient and the average validated on the held-out cache, printed and kept.
    validation = json.loads((tmp_path / "average/best.validation.json").read_text())
    assert validation == average.extra["validation"] and validation["split"] == "test"
    rows = [line for line in printed if "val loss" in line]
    assert [row.split()[0] for row in rows] == [*(str(p.resolve()) for p in ingredients), "average"]
    for row, result in zip(rows, [*validation["ingredients"], validation["average"]], strict=True):
        assert f"val loss {result['val_loss']:.4f}" in row
    assert average.best_val_loss == validation["average"]["val_loss"]
    model = create_model(average.model_name, **average.model_config)
    model.encoder.load_state_dict(average.weights)
    device = torch.device("cpu")
    again = validate_encoder(model.encoder.to(memory_format=torch.channels_last), Cache.open(root / "heldout"),
                             Cache.open(root / "heldout").split("test"), Processes(0, 1, 0, device),
                             Optimization(model.encoder.parameters(), Stage1Config(), device, cpu_bf16=True),
                             Stage1Config().image_weight)
    assert again["val_loss"] == pytest.approx(validation["average"]["val_loss"], rel=1e-5)

    # The average is a stage 1 like any other: features, stage 2 and an export that records what was averaged; made
    # without --cache it holds the same weights and no validation.
    _run("average", "--config", config, "--out", str(tmp_path / "plain.pt"), *map(str, ingredients))
    plain = load_state(tmp_path / "plain.pt", "stage1")
    assert all(torch.equal(plain.weights[name], average.weights[name]) for name in average.weights)
    assert "validation" not in plain.extra and plain.history == []
    for made, run in (("average/best.pt", tmp_path / "behind-validated"), ("plain.pt", tmp_path / "behind-plain")):
        _run("features", "--config", config, "--stage1", str(tmp_path / made), "--cache", str(root / "cache"),
             "--out", str(run / "features"))
        _run("stage2", "--config", config, "--features", str(run / "features"), "--out", str(run / "s2"),
             "--epochs", "1")
        _run("export", "--stage1", str(tmp_path / made), "--stage2", str(run / "s2/best.pt"), "--out",
             str(run / "averaged.pt"), "--fp32")
        exported = load_checkpoint(run / "averaged.pt")
        encoder = exported.model.encoder.state_dict()
        assert all(torch.equal(encoder[name], average.weights[name]) for name in average.weights)
        record = exported.meta.provenance["stage1"]
        assert [item["sha256"] for item in record["average"]] == [file_sha256(p) for p in ingredients]
        if made == "plain.pt":
            assert record["best_val_loss"] is None and "validation" not in record
        else:
            assert record["validation"]["average"]["val_loss"] == validation["average"]["val_loss"]


def test_average_refuses_a_single_checkpoint_and_stage1s_of_other_preprocessing(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config, best = str(workspace / "train.yaml"), workspace / "stage1/best.pt"
    capsys.readouterr()
    assert main(["average", "--config", config, "--out", str(tmp_path / "one"), str(best)]) == 2
    assert "needs at least two stage-1 checkpoints, got 1" in capsys.readouterr().err
    other = load_state(best, "stage1")
    other.preprocess = {**other.preprocess, "size": 64}
    save_state(tmp_path / "other.pt", other)
    assert main(["average", "--config", config, "--out", str(tmp_path / "two"), str(best),
                 str(tmp_path / "other.pt")]) == 2
    assert "checkpoint 2 has another preprocessing than the first" in capsys.readouterr().err
    assert main(["average", "--config", config, "--out", str(tmp_path / "three"), str(best),
                 str(workspace / "features-cache")]) == 1
    assert not (tmp_path / "one").exists() and not (tmp_path / "two").exists() and not (tmp_path / "three").exists()
