"""A training run's checkpoints: ``last.pt`` to resume from, ``best.pt`` for the epoch of lowest validation loss.

Each is ``torch.save`` of a plain dict (tensors, numbers, strings, lists, dicts), read with ``weights_only=True``:

    format: "pe-train-state"    stage: "stage1" | "stage2"
    model: {name, config}       the pe_node model name and its full ModelConfig (both stages are described)
    preprocess                  the PreprocessConfig the inputs were made with
    weights                     the state dict of the trained stage (the encoder or the sequence model)
    epoch, best_epoch, best_val_loss, history
    optimizer, scaler, rng      what ``--resume`` needs to go on exactly where it stopped (the learning-rate
                                schedule is a function of the epoch)
    config                      the resolved training config
    inputs                      where the data came from (cache, features, the stage-1 checkpoint and its SHA-256)
    extra                       stage-specific values (stage 2: the training labels' prevalence)

Beside them the run folder holds ``config.yaml`` (the resolved config) and ``metrics.json`` (per-epoch losses).

Where a stage-1 checkpoint is asked for, a pe-node checkpoint (``pe-train export``'s output, such as the shipped
``models/pe-demo.pt``) serves too: its encoder, preprocessing and the provenance of its stage 1. So stage 2 can be
trained again, on other studies, behind a stage 1 that was exported long ago. Where a stage-2 checkpoint is asked
for, the same file gives its sequence model, so that ``pe-train evaluate`` scores an exported model as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pe_node import storage
from pe_node.model import PEModel, create_model, load_checkpoint
from pe_node.model.checkpoint import CHECKPOINT_FORMAT, CheckpointError, file_sha256, save_atomically

STATE_FORMAT = "pe-train-state"


class StateError(ValueError):
    """A training checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class TrainState:
    """Everything a training checkpoint holds (see the module docstring)."""

    stage: str
    model_name: str
    model_config: dict[str, Any]
    preprocess: dict[str, Any]
    weights: dict[str, torch.Tensor]
    epoch: int = 0
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    history: list[dict[str, Any]] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **self.__dict__}


def save_state(path: Path, state: TrainState) -> Path:
    """Write ``state`` to ``path`` atomically (a crash never leaves half a last.pt)."""
    return save_atomically(state.to_dict(), path)


def load_state(path: Path, stage: str | None = None) -> TrainState:
    """Read a training checkpoint; ``stage`` (stage1 / stage2) refuses the other stage's file by name."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"training checkpoint {path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the file boundary: torch raises many kinds here
        raise StateError(f"training checkpoint {path}: cannot be read ({str(error).splitlines()[0][:200]})") from None
    if isinstance(data, dict) and data.get("format") == CHECKPOINT_FORMAT:
        return _stage2_of_checkpoint(path) if stage == "stage2" else _stage1_of_checkpoint(path)
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        marker = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise StateError(
            f"training checkpoint {path}: format {marker!r}, expected {STATE_FORMAT!r} "
            "(best.pt or last.pt of pe-train stage1 / stage2)"
        )
    data.pop("format")
    state = TrainState(**data)
    if stage is not None and state.stage != stage:
        raise StateError(f"training checkpoint {path}: is a {state.stage} checkpoint, {stage} is needed here")
    return state


def _stage1_of_checkpoint(path: Path) -> TrainState:
    """The stage 1 of a pe-node checkpoint as a training state: float32 encoder weights, the preprocessing, and
    what its provenance says about how that stage 1 was trained (kept whole under ``extra["stage1_provenance"]``)."""
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as error:
        raise StateError(str(error)) from None
    provenance = loaded.meta.provenance
    stage1 = provenance.get("stage1") if isinstance(provenance.get("stage1"), dict) else {}
    history = [record for record in (stage1.get("best"), stage1.get("last_epoch")) if isinstance(record, dict)]
    best_val_loss = stage1.get("best_val_loss")
    return TrainState(
        stage="stage1",
        model_name=loaded.meta.model_name,
        model_config=loaded.meta.model_config.to_dict(),
        preprocess=loaded.preprocess.to_dict(),
        weights={name: tensor.float().clone() for name, tensor in loaded.model.encoder.state_dict().items()},
        epoch=int(stage1.get("epochs") or 0),
        best_epoch=int(stage1.get("best_epoch") or 0),
        best_val_loss=float(best_val_loss) if best_val_loss is not None else float("inf"),
        history=list({record["epoch"]: record for record in history if "epoch" in record}.values()),
        config=stage1.get("config") or {},
        inputs={"checkpoint": str(path.resolve()), "checkpoint_sha256": loaded.meta.sha256,
                "command": stage1.get("command") or [], "world_size": stage1.get("world_size", 1)},
        extra={"data": provenance.get("data") or {}, "backbone_weights": provenance.get("backbone_weights") or {},
               # The stage's own commit only: the checkpoint's top-level one is where it was exported, not trained.
               "stage1_provenance": stage1, "code": stage1.get("code")},
    )


def _stage2_of_checkpoint(path: Path) -> TrainState:
    """The stage 2 of a pe-node checkpoint as a training state, to evaluate an exported model: the sequence model's
    float32 weights, behind the checkpoint's own stage 1 (its embeddings are those of ``pe-train features --stage1``
    with the same file), and the training prevalences its provenance records (none in a file exported before they
    were recorded)."""
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as error:
        raise StateError(str(error)) from None
    stage2 = loaded.meta.provenance.get("stage2")
    stage2 = stage2 if isinstance(stage2, dict) else {}
    return TrainState(
        stage="stage2",
        model_name=loaded.meta.model_name,
        model_config=loaded.meta.model_config.to_dict(),
        preprocess=loaded.preprocess.to_dict(),
        weights={name: tensor.float().clone() for name, tensor in loaded.model.sequence.state_dict().items()},
        config=stage2.get("config") or {},
        inputs={"checkpoint": str(path.resolve()), "stage1_sha256": file_sha256(path), "features": str(path)},
        extra={"label_prior": stage2.get("label_prior"), "pooling": loaded.meta.model_config.to_dict().get("pooling")},
    )


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON, durably (``pe_node.storage.atomic_write``)."""
    return storage.atomic_write(path, (json.dumps(data, indent=2, allow_nan=True) + "\n").encode())


def build_model(stage1: TrainState, stage2: TrainState | None = None) -> PEModel:
    """The PE model of a trained stage 1 (and stage 2, if given) in eval mode; without stage 2 the sequence model
    keeps its random weights (feature extraction and the CNN-only baseline use only the encoder)."""
    if stage1.stage != "stage1" or (stage2 is not None and stage2.stage != "stage2"):
        raise StateError("build_model needs a stage1 checkpoint and optionally a stage2 checkpoint, in that order")
    name, config = stage1.model_name, stage1.model_config
    if stage2 is not None:
        if stage2.model_config["backbone"] != config["backbone"]:
            raise StateError(
                f"stage 2 was trained on {stage2.model_config['backbone']} embeddings, stage 1 is {config['backbone']}"
            )
        name, config = stage2.model_name, stage2.model_config
    model = create_model(name, **config)
    model.encoder.load_state_dict(stage1.weights)
    if stage2 is not None:
        model.sequence.load_state_dict(stage2.weights)
    return model.eval()
