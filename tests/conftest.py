"""Shared pytest fixtures: a tiny random-weight PE model and checkpoint, and a small synthetic CT series on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pe_node.model import PEModel, save_checkpoint
from tests.dicom_factory import write_ct_series
from tests.peers import missing_peers, on_ci
from tests.tiny_models import TINY_PREPROCESS, tiny_model

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a test whose ``peer`` marks name a tool that is not installed; under CI=true, fail it instead."""
    names = [name for mark in item.iter_markers("peer") for name in mark.args]
    missing = missing_peers(names)
    if not missing:
        return
    message = f"{', '.join(missing)} not installed (make test installs it)"
    if on_ci():
        pytest.fail(f"CI=true and a required peer is missing: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def tiny_pe_model() -> PEModel:
    """A fresh tiny random-weight PE model (see ``tests.tiny_models``), in eval mode."""
    return tiny_model()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint file of ``tiny_model()`` with 64 px preprocessing (read-only: copy it to change it)."""
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    provenance = {"data": "random weights", "purpose": "tests"}
    return save_checkpoint(path, tiny_model(), TINY_PREPROCESS, provenance=provenance)


@pytest.fixture(scope="session")
def ct_series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding one synthetic 40-slice 64x64 CT series (read-only: do not add files to it)."""
    folder = tmp_path_factory.mktemp("ct_series")
    write_ct_series(folder, n_slices=40, size=64, seed=3)
    return folder


@pytest.fixture(scope="session")
def phantom_train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight tiny phantom studies (64 px, 10-14 slices, seed 5) in the RSPECT layout: every class, three of them
    positive (read-only)."""
    from training.phantoms.generator import generate

    out = tmp_path_factory.mktemp("phantoms_train")
    generate(out, 8, 5, slices=(10, 14), size=64, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def phantom_heldout_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five tiny phantom studies made with another seed (6): a held-out set (read-only)."""
    from training.phantoms.generator import generate

    out = tmp_path_factory.mktemp("phantoms_heldout")
    generate(out, 5, 6, slices=(10, 14), size=64, workers=1, progress=False)
    return out
