"""The training config and the pe-train command line: YAML, overrides, errors that name the key, parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.cli import _overrides, build_parser, main
from training.config import (
    TrainConfig,
    TrainConfigError,
    load_train_config,
    parse_override,
    save_train_config,
)


def test_defaults_are_the_papers_model_at_256_px_with_a_body_crop() -> None:
    config = load_train_config()
    assert config == TrainConfig()
    assert (config.model.name, config.model.backbone, config.model.pretrained) == ("pe_cnn_lstm", "efficientnet_b0",
                                                                                   False)
    assert config.preprocess.to_preprocess().size == 256 and config.preprocess.crop == "body"
    assert config.stage2.pooling == "attention"


def test_yaml_file_then_overrides_in_that_order(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("seed: 3\nstage1: {epochs: 7, lr: 0.01}\npreprocess: {size: 128}\n")
    config = load_train_config(path, [("stage1.epochs", 2), ("model.pretrained", "/weights/b0.safetensors")])
    assert (config.seed, config.stage1.epochs, config.stage1.lr, config.preprocess.size) == (3, 2, 0.01, 128)
    assert config.model.pretrained == "/weights/b0.safetensors"


def test_saved_config_reads_back_identical(tmp_path: Path) -> None:
    config = load_train_config(None, {"stage2.pooling": "mean", "model.pretrained": True, "stage1.grad_clip": None})
    assert load_train_config(save_train_config(config, tmp_path / "config.yaml")) == config


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"stage1.epochz": 3}, "stage1.epochz: unknown key"),
        ({"stage1.epochs": 0}, "stage1.epochs: Input should be greater than or equal to 1"),
        ({"stage2.pooling": "sum"}, "stage2.pooling"),
        ({"model.backbone": "resnet_nonexistent"}, "model.backbone: 'resnet_nonexistent' is not a timm model"),
        ({"model.pretrained": 3}, "model.pretrained: 3: must be true, false or the path of a weights file"),
        ({"preprocess.size": 8}, "preprocess: preprocess size 8"),
        ({"data.val_fraction": 0.6, "data.test_fraction": 0.5}, "data: val_fraction + test_fraction"),
        ({"device": "tpu"}, "device: 'tpu'"),
        ({"data.train_fraction": 0}, "data.train_fraction: Input should be greater than 0"),
        ({"data.train_fraction": 1.5}, "data.train_fraction: Input should be less than or equal to 1"),
    ],
)
def test_bad_values_are_refused_naming_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(TrainConfigError) as error:
        load_train_config(None, overrides)
    assert key in str(error.value)


def test_bad_yaml_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(TrainConfigError, match="config file not found"):
        load_train_config(tmp_path / "missing.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(TrainConfigError, match="top level must be a mapping"):
        load_train_config(listed)


def test_override_text_is_key_equals_yaml_value() -> None:
    assert parse_override("stage1.negatives_per_study=null") == ("stage1.negatives_per_study", None)
    assert parse_override("model.pretrained=true") == ("model.pretrained", True)
    assert load_train_config(None, [parse_override("stage1.lr=3e-4")]).stage1.lr == 3e-4  # YAML reads a string
    with pytest.raises(TrainConfigError, match="expected KEY=VALUE"):
        parse_override("epochs 3")


def test_every_subcommand_parses_its_arguments() -> None:
    parser = build_parser()
    cases = {
        "phantoms": ["--out", "o", "--studies", "3"],
        "prepare": ["--data", "d", "--cache", "c", "--split-all", "test", "--size", "128"],
        "stage1": ["--cache", "c", "--out", "r", "--resume", "--epochs", "2", "--pretrained", "true"],
        "features": ["--stage1", "r/best.pt", "--cache", "c", "--out", "f"],
        "stage2": ["--features", "f", "--out", "r", "--pooling", "mean", "--lr", "0.001"],
        "evaluate": ["--features", "f", "--stage1", "a", "--stage2", "b", "--baseline", "c", "--out", "o"],
        "export": ["--stage1", "a", "--stage2", "b", "--out", "m.pt", "--fp32"],
    }
    for command, arguments in cases.items():
        args = parser.parse_args([command, *arguments])
        assert args.command == command


def test_named_options_override_the_keys_of_their_stage() -> None:
    parser = build_parser()
    stage1 = parser.parse_args(["stage1", "--cache", "c", "--out", "r", "--epochs", "2", "--lr", "0.01",
                                "--pretrained", "/w.pth", "--set", "seed=4"])
    assert dict(_overrides(stage1)) == {"seed": 4, "stage1.epochs": 2, "stage1.lr": 0.01,
                                        "model.pretrained": "/w.pth"}
    stage2 = parser.parse_args(["stage2", "--features", "f", "--out", "r", "--epochs", "5", "--pooling", "mean"])
    assert dict(_overrides(stage2)) == {"stage2.epochs": 5, "stage2.pooling": "mean"}


def test_command_line_config_errors_exit_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status = main(["stage1", "--cache", str(tmp_path), "--out", str(tmp_path / "run"), "--set", "stage1.epochz=3"])
    assert status == 2
    assert "stage1.epochz: unknown key" in capsys.readouterr().err


def test_a_missing_cache_is_a_one_line_failure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status = main(["stage1", "--quiet", "--cache", str(tmp_path / "nothing"), "--out", str(tmp_path / "run")])
    assert status == 1
    assert "no index.json" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["demo.yaml", "demo-gpu.yaml", "finetune-cpu.yaml"])
def test_the_shipped_training_configs_load(name: str) -> None:
    config = load_train_config(Path(__file__).resolve().parents[2] / "training" / "configs" / name)
    assert config.model.pretrained is False, "the demo runs without network"
    assert config.data.test_fraction == 0.0, "the demo tests on phantoms of another seed"


def test_the_fine_tuning_config_goes_on_from_the_model_and_inputs_of_demo_gpu() -> None:
    configs = Path(__file__).resolve().parents[2] / "training" / "configs"
    fine, gpu = (load_train_config(configs / name) for name in ("finetune-cpu.yaml", "demo-gpu.yaml"))
    assert fine.model == gpu.model and fine.preprocess == gpu.preprocess, "else stage1.init refuses the weights"
    assert fine.stage1.lr < gpu.stage1.lr and fine.stage1.chronic_repeats > 1


def test_the_cpu_demo_recipe_is_the_gpu_one_with_the_time_budget_and_processes_of_two_cores() -> None:
    configs = Path(__file__).resolve().parents[2] / "training" / "configs"
    cpu, gpu = (load_train_config(configs / name).model_dump() for name in ("demo.yaml", "demo-gpu.yaml"))
    assert (cpu["data"]["workers"], cpu["stage1"]["loader_workers"], cpu["stage1"]["max_minutes"]) == (2, 1, 55)
    for config in (cpu, gpu):
        del config["data"]["workers"], config["stage1"]["loader_workers"], config["stage1"]["max_minutes"]
    assert cpu == gpu
