"""The checkpoint: one file holding a trained PE model and everything needed to run it the way it was trained.

The file is ``torch.save`` of a plain dict (tensors, strings, numbers, lists, dicts only), read back with
``torch.load(weights_only=True)`` so that opening a checkpoint never runs code from it:

    format: "pe-node-checkpoint"        format_version: 1
    model: {name, config}               the registered model name and its full ModelConfig
    preprocess: PreprocessConfig dict   windows, size, crop, normalisation
    labels: {exam: [9 names], image}    the output order, checked against pe_node.findings on load
    pe_node_version, provenance         who wrote it, from what data, with which commands and metrics (free-form)
    weights_dtype: float32 | float16    fp16 storage halves the file; loading casts back to float32
    stage1, stage2                      state dicts of the encoder and the sequence model

Every way a file can be wrong (missing, truncated, not a PyTorch file, foreign objects inside, another format,
weights that do not fit the model, other labels) raises ``CheckpointError`` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pe_node import __version__, storage
from pe_node.findings import EXAM_LABELS, IMAGE_LABEL
from pe_node.model.cnn_lstm import ModelConfig, PEModel
from pe_node.model.factory import create_model, model_config
from pe_node.model.preprocess import PreprocessConfig

CHECKPOINT_FORMAT = "pe-node-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself, and the file's identity (path and SHA-256)."""

    path: Path
    sha256: str
    model_name: str
    model_config: ModelConfig
    labels: tuple[str, ...]
    pe_node_version: str
    weights_dtype: str
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A model ready for inference (eval mode, float32), its preprocessing and its metadata."""

    model: PEModel
    preprocess: PreprocessConfig
    meta: CheckpointMeta


def save_checkpoint(
    path: str | Path,
    model: PEModel,
    preprocess: PreprocessConfig,
    provenance: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write ``model`` and its preprocessing to ``path`` (atomically); ``half`` stores the weights as float16.

    ``provenance`` must be JSON-like (dicts, lists, strings, numbers, booleans, None).
    """
    provenance = dict(provenance or {})
    try:
        json.dumps(provenance, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint provenance must hold only JSON values: {error}") from None
    contents = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": {"name": model.name, "config": model.config.to_dict()},
        "preprocess": preprocess.to_dict(),
        "labels": {"exam": list(EXAM_LABELS), "image": IMAGE_LABEL},
        "pe_node_version": __version__,
        "provenance": provenance,
        "weights_dtype": "float16" if half else "float32",
        "stage1": _stored(model.encoder, half),
        "stage2": _stored(model.sequence, half),
    }
    return save_atomically(contents, path)


def save_atomically(contents: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` durably (``pe_node.storage.atomic_write``): a crash never leaves half a file.

    The file gets the permissions of any new file under the umask (usually 0644), so a checkpoint exported by one
    user loads in a pe-node service running as another.
    """
    return storage.atomic_write(path, lambda stream: torch.save(contents, stream))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Read a checkpoint written by ``save_checkpoint``; the model comes back in eval mode on ``device``."""
    path = Path(path)
    contents = _read(path)
    model_name, config = _model_spec(path, contents)
    preprocess = _preprocess(path, contents)
    _check_labels(path, contents)
    model = create_model(model_name, **config.to_dict())
    _load_weights(path, model.encoder, contents.get("stage1"), "stage1")
    _load_weights(path, model.sequence, contents.get("stage2"), "stage2")
    provenance = contents.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise CheckpointError(f"checkpoint {path}: provenance is a {type(provenance).__name__}, not a dict")
    meta = CheckpointMeta(
        path=path,
        sha256=file_sha256(path),
        model_name=model_name,
        model_config=config,
        labels=(*EXAM_LABELS, IMAGE_LABEL),
        pe_node_version=str(contents.get("pe_node_version", "unknown")),
        weights_dtype=str(contents.get("weights_dtype", "float32")),
        provenance=provenance,
    )
    return LoadedCheckpoint(model=model.to(device).eval(), preprocess=preprocess, meta=meta)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stored(module: nn.Module, half: bool) -> dict[str, torch.Tensor]:
    return {
        name: (t.detach().half() if half and t.is_floating_point() else t.detach()).cpu().clone()
        for name, t in module.state_dict().items()
    }


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path}: cannot be read as a PyTorch file (torch.save writes a zip archive); "
            "it is truncated or of another kind"
        )
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint {path}: not a pe-node checkpoint, it holds objects other than tensors and plain values "
            f"({_refusal(error)})"
        ) from None
    except Exception as error:  # the file boundary: torch raises RuntimeError, EOFError, OSError, ... here
        raise CheckpointError(
            f"checkpoint {path}: cannot be read as a PyTorch file, it may be truncated or damaged "
            f"({_first_line(error)})"
        ) from None
    if not isinstance(contents, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(contents).__name__}, not a pe-node checkpoint")
    marker = contents.get("format")
    if marker != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path}: format is {marker!r}, expected {CHECKPOINT_FORMAT!r}")
    version = contents.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format_version {version!r} is not supported by pe-node {__version__} "
            f"(reads 1 to {CHECKPOINT_FORMAT_VERSION})"
        )
    return contents


def _model_spec(path: Path, contents: dict[str, Any]) -> tuple[str, ModelConfig]:
    spec = contents.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("config"), dict):
        raise CheckpointError(f"checkpoint {path}: 'model' must be {{name, config}}, got {spec!r:.200}")
    try:
        return spec["name"], model_config(spec["name"], **spec["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: bad model description: {error}") from None


def _preprocess(path: Path, contents: dict[str, Any]) -> PreprocessConfig:
    data = contents.get("preprocess")
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path}: no preprocessing config")
    try:
        return PreprocessConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: bad preprocessing config: {error}") from None


def _check_labels(path: Path, contents: dict[str, Any]) -> None:
    labels = contents.get("labels")
    expected = {"exam": list(EXAM_LABELS), "image": IMAGE_LABEL}
    if labels != expected:
        raise CheckpointError(
            f"checkpoint {path}: labels {labels!r} differ from this version's {expected!r}; "
            "the outputs would be read in the wrong order"
        )


def _load_weights(path: Path, module: nn.Module, state: Any, stage: str) -> None:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path}: no {stage} weights (expected a dict of tensors)")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{name} {tuple(state[name].shape)} vs {tuple(t.shape)}"
        for name, t in own.items()
        if name in state and state[name].shape != t.shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''} ({len(items)})"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
            if items
        ]
        raise CheckpointError(f"checkpoint {path}: {stage} weights do not fit the model; {'; '.join(parts)}")
    module.load_state_dict(
        {name: t.to(own[name].dtype) if t.is_floating_point() else t for name, t in state.items()}, strict=True
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def _refusal(error: pickle.UnpicklingError) -> str:
    """The line of torch's long weights-only refusal that says what was found ("Unsupported global: ...")."""
    for line in str(error).splitlines():
        if "Unsupported" in line:
            return line.strip().removeprefix("WeightsUnpickler error:").split(" was not ")[0].strip()[:200]
    return _first_line(error)
