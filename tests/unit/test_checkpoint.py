"""Checkpoints: a round trip keeps the model and its configs; every kind of bad file is a clear CheckpointError."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from pe_node import __version__
from pe_node.findings import EXAM_LABELS, IMAGE_LABEL
from pe_node.model import (
    CheckpointError,
    PreprocessConfig,
    load_checkpoint,
    save_checkpoint,
)
from pe_node.model.checkpoint import file_sha256, save_atomically
from tests.tiny_models import TINY_PREPROCESS, tiny_model


def outputs(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(1, 4, 3, 32, 32, generator=generator)
    with torch.inference_mode():
        out = model(images)
    return torch.cat([out.image.flatten(), out.exam.flatten(), out.attention.flatten()])


def rewrite(source: Path, target: Path, change) -> Path:
    contents = torch.load(source, weights_only=True)
    change(contents)
    torch.save(contents, target)
    return target


def test_round_trip_keeps_weights_configs_labels_and_provenance(tmp_path: Path) -> None:
    model = tiny_model(seed=4, pooling="mean")
    preprocess = PreprocessConfig(size=96, crop="body")
    provenance = {"data": "phantoms v1", "commands": ["pe-train stage1"], "metrics": {"val_loss": 0.21}}
    path = save_checkpoint(tmp_path / "model.pt", model, preprocess, provenance)
    loaded = load_checkpoint(path)
    assert torch.equal(outputs(loaded.model), outputs(model))
    assert loaded.preprocess == preprocess
    assert loaded.model.name == "pe_cnn_lstm" and loaded.model.config == model.config
    assert loaded.meta.labels == (*EXAM_LABELS, IMAGE_LABEL)
    assert loaded.meta.provenance == provenance
    assert loaded.meta.pe_node_version == __version__
    assert loaded.meta.sha256 == file_sha256(path)
    assert not loaded.model.training


def test_a_saved_checkpoint_is_readable_as_any_new_file_and_replaces_the_old_one_whole(tmp_path: Path) -> None:
    # a service user (deploy/systemd: User=pe-node) must be able to read what an ML engineer exported
    previous = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "model.pt", tiny_model(seed=1), TINY_PREPROCESS)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        save_checkpoint(path, tiny_model(seed=2), TINY_PREPROCESS, {"run": 2})
    finally:
        os.umask(previous)
    assert load_checkpoint(path).meta.provenance == {"run": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left beside it
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):  # a save that fails half-way...
        save_atomically({"weights": torch.zeros(1000), "hook": lambda: None}, path)
    # ...leaves the old file as it was, and nothing beside it
    assert load_checkpoint(path).meta.provenance == {"run": 2} and len(list(tmp_path.iterdir())) == 1


def test_half_precision_storage_is_smaller_and_loads_back_as_float32(tmp_path: Path) -> None:
    model = tiny_model()
    full = save_checkpoint(tmp_path / "full.pt", model, TINY_PREPROCESS)
    half = save_checkpoint(tmp_path / "half.pt", model, TINY_PREPROCESS, half=True)
    assert half.stat().st_size < 0.7 * full.stat().st_size
    loaded = load_checkpoint(half)
    assert loaded.meta.weights_dtype == "float16"
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert torch.allclose(outputs(loaded.model), outputs(model), atol=1e-2)


def test_provenance_must_be_plain_json_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="provenance must hold only JSON values"):
        save_checkpoint(tmp_path / "x.pt", tiny_model(), TINY_PREPROCESS, {"when": object()})


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'absent.pt'}: no such file"):
        load_checkpoint(tmp_path / "absent.pt")


def test_truncated_file_is_a_clear_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "truncated.pt"
    broken.write_bytes(tiny_checkpoint.read_bytes()[: tiny_checkpoint.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: cannot be read as a PyTorch file") as raised:
        load_checkpoint(broken)
    error = raised.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_damaged_file_is_a_clear_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = bytearray(tiny_checkpoint.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)
    broken = tmp_path / "damaged.pt"
    broken.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged.pt: ") as raised:
        load_checkpoint(broken)
    assert raised.value.__cause__ is None


def test_text_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("not a model\n")
    with pytest.raises(CheckpointError, match="notes.pt: cannot be read as a PyTorch file"):
        load_checkpoint(path)


class Foreign:
    """A class that ``weights_only`` loading must refuse to instantiate."""


def test_foreign_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"format": "pe-node-checkpoint", "payload": Foreign()}, path)
    with pytest.raises(CheckpointError, match="foreign.pt: not a pe-node checkpoint, it holds objects other than"):
        load_checkpoint(path)


def test_plain_pickle_of_a_whole_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "module.pt"
    with open(path, "wb") as stream:
        pickle.dump(torch.nn.Linear(2, 2), stream)
    with pytest.raises(CheckpointError, match="module.pt"):
        load_checkpoint(path)


def test_other_torch_file_without_the_format_marker_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(tiny_model().state_dict(), path)
    with pytest.raises(CheckpointError, match="weights.pt: format is None, expected 'pe-node-checkpoint'"):
        load_checkpoint(path)


def test_newer_format_version_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = rewrite(tiny_checkpoint, tmp_path / "future.pt", lambda c: c.update(format_version=99))
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_model_are_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def widen(contents: dict) -> None:
        contents["model"]["config"]["dense_dim"] = 32

    path = rewrite(tiny_checkpoint, tmp_path / "mismatch.pt", widen)
    with pytest.raises(CheckpointError, match="stage2 weights do not fit the model; shape mismatch: dense.0.weight"):
        load_checkpoint(path)


def test_missing_weights_are_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = rewrite(tiny_checkpoint, tmp_path / "partial.pt", lambda c: c["stage1"].pop("image_head.weight"))
    with pytest.raises(CheckpointError, match="stage1 weights do not fit the model; missing: image_head.weight"):
        load_checkpoint(path)


def test_other_label_names_are_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def relabel(contents: dict) -> None:
        contents["labels"]["exam"] = list(reversed(contents["labels"]["exam"]))

    path = rewrite(tiny_checkpoint, tmp_path / "labels.pt", relabel)
    with pytest.raises(CheckpointError, match="labels.pt: labels .* differ"):
        load_checkpoint(path)


def test_unknown_model_name_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = rewrite(tiny_checkpoint, tmp_path / "name.pt", lambda c: c["model"].update(name="pe_unet"))
    with pytest.raises(CheckpointError, match="bad model description: unknown model 'pe_unet'"):
        load_checkpoint(path)


def test_bad_preprocessing_config_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = rewrite(tiny_checkpoint, tmp_path / "pre.pt", lambda c: c["preprocess"].update(size=8))
    with pytest.raises(CheckpointError, match="bad preprocessing config: preprocess size 8"):
        load_checkpoint(path)
