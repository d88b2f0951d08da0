"""``pe-train export``: the trained stages as one pe-node checkpoint, the file ``pe-node`` serves.

The stage-1 encoder and the stage-2 sequence model go into one ``PEModel`` and are written by
``pe_node.model.save_checkpoint`` (float16 weights by default: half the size, and loading casts back to float32),
with the preprocessing the cache was made with and a provenance record: the data each stage saw, seeds, the
commands of each stage, the validation numbers, the evaluation's numbers if given, and the git commit of the code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
from pathlib import Path
from typing import Any

from pe_node.model import PreprocessConfig, load_checkpoint, save_checkpoint
from pe_node.model.checkpoint import file_sha256
from training.fitting.state import StateError, TrainState, build_model, load_state

logger = logging.getLogger(__name__)


def export(
    stage1: Path,
    stage2: Path,
    out: Path,
    evaluation: Path | None = None,
    description: str | None = None,
    half: bool = True,
) -> Path:
    """Write the pe-node checkpoint of ``stage1`` + ``stage2`` (best.pt files) to ``out``; returns its path.

    ``evaluation`` is an evaluation's metrics.json, whose headline numbers go into the provenance.
    """
    first, second = load_state(stage1, "stage1"), load_state(stage2, "stage2")
    sha = file_sha256(stage1)
    if second.inputs.get("stage1_sha256") != sha:
        raise StateError(
            f"stage 2 {stage2} was trained on the embeddings of stage 1 {second.inputs.get('stage1')} "
            f"(SHA-256 {str(second.inputs.get('stage1_sha256'))[:12]}), not of {stage1} ({sha[:12]})"
        )
    model = build_model(first, second)
    provenance = {
        "description": description or "pe-train export",
        "data": first.extra.get("data", {}),
        "seed": first.config.get("seed"),
        "backbone_weights": first.extra.get("backbone_weights", {}),
        "stage1": stage1_record(first, stage1),
        "stage2": _stage(second, stage2),
        "evaluation": _evaluation(evaluation) if evaluation is not None else None,
        "code": source_code(),
    }
    path = save_checkpoint(out, model, PreprocessConfig.from_dict(first.preprocess), provenance=provenance, half=half)
    load_checkpoint(path)  # what pe-node will do: fail here, not in the node
    logger.info("exported %s (%.1f MB, %s weights)", path, path.stat().st_size / 1e6, "fp16" if half else "fp32")
    return path


def stage1_record(state: TrainState, path: Path) -> dict[str, Any]:
    """Stage 1's record; for a stage 1 read from a pe-node checkpoint, what that checkpoint says about how it was
    trained (run, commands, numbers, code), and which file it came from; for a fine-tuned one, also the record of
    the stage 1 it started from (``init``)."""
    earlier = state.extra.get("stage1_provenance")
    if earlier is None:
        return _stage(state, path)
    return {**earlier, "code": state.extra.get("code"),
            "from_checkpoint": {"path": str(path), "sha256": state.inputs.get("checkpoint_sha256")}}


def _stage(state: TrainState, path: Path) -> dict[str, Any]:
    return {
        "checkpoint": str(path),
        "best_epoch": state.best_epoch,
        # None where nothing was validated (an average made without --cache): JSON has no infinity.
        "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
        "epochs": state.epoch,
        "last_epoch": state.history[-1] if state.history else None,
        "best": next((h for h in state.history if h["epoch"] == state.best_epoch), None),
        "command": state.inputs.get("command", []),
        "world_size": state.inputs.get("world_size", 1),
        "config": state.config,
        **({"data": state.extra["data"]} if state.stage == "stage2" and "data" in state.extra else {}),
        **({"label_prior": state.extra["label_prior"]} if "label_prior" in state.extra else {}),
        **({"init": state.extra["init"]} if "init" in state.extra else {}),
        **({key: state.extra[key] for key in ("average", "validation") if key in state.extra}),
        **({"code": state.extra["code"]} if "code" in state.extra else {}),
        **({"precision": state.extra["precision"]} if "precision" in state.extra else {}),
    }


def _evaluation(path: Path) -> dict[str, Any]:
    """The headline numbers of an evaluation's metrics.json: of the training family's held-out set and, if it was
    evaluated, of the independent family (``independent``)."""
    metrics = json.loads(Path(path).read_text())
    return {"report": str(path), **_headline(metrics),
            **({"independent": _headline(metrics["independent"])} if "independent" in metrics else {})}


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "family": metrics.get("family"),
        "split": metrics["split"],
        "studies": metrics["studies"],
        "phantoms": metrics["data"].get("phantoms"),
        "constant_baseline_rsna_log_loss": metrics["constant_baseline"]["rsna_log_loss"],
        "models": {
            name: {key: result[key] for key in ("title", "study_pe_auc", "rsna_log_loss", "study_pe_accuracy",
                                                "mean_label_accuracy", "auc", "node_reading", "by_location",
                                                "sensitivity_at_specificity", "by_kind") if key in result}
            for name, result in metrics["models"].items()
        },
        **({"bootstrap": metrics["bootstrap"]} if "bootstrap" in metrics else {}),
    }


SOURCE_COMMIT_VARIABLE = "PE_NODE_SOURCE_COMMIT"
"""Names the commit of a copy of the source tree (a container build, a tree copied to a GPU machine); when set it
wins over what git says there."""


def source_code(root: Path | None = None) -> dict[str, Any]:
    """The commit of the code that exported (and whether the working tree had changes), if git knows it; when
    ``PE_NODE_SOURCE_COMMIT`` is set, the commit it names instead, marked as such: a copy of the tree (a container
    build, a tree copied to a GPU machine) may carry no ``.git``, or a stale one that names an older commit."""
    named = os.environ.get(SOURCE_COMMIT_VARIABLE, "").strip()
    if named:
        return {"git_commit": named, "from": f"{SOURCE_COMMIT_VARIABLE} (a copy of the tree)"}
    root = root or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None}
    return {"git_commit": commit, "uncommitted_changes": bool(dirty)}
