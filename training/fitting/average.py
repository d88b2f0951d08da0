"""``pe-train average``: one stage 1 whose weights are the mean of several trained stage 1s' ("weight averaging",
as in stochastic weight averaging and model soups).

The checkpoints must be of one lineage: fine-tunings of one stage 1, or epochs of one run, so that their weights lie
in one basin of the loss. The mean of such weights often generalizes a little better than any one of them; the
mean of stage 1s trained from different random starts is noise, which validation shows at once. So the command can
validate every ingredient and the average on a cache none of them was trained on (``--cache``), and prints the
numbers side by side before anything else is trained behind the average.

Floating-point tensors (weights and batch-norm statistics) are averaged in float32 and stored in
the first checkpoint's dtype; integer tensors (the batch-norm step counters) are taken from the first. The result is
a stage-1 ``best.pt`` that ``features``, ``stage1 --init``, ``evaluate`` and ``export`` take as any other; its
provenance (``average``) holds, for each ingredient, its path, SHA-256 and the record of how it was trained.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pe_node.model import resolve_device
from pe_node.model.checkpoint import file_sha256
from training.config import TrainConfig, TrainConfigError
from training.fitting.cache import Cache
from training.fitting.distributed import Processes
from training.fitting.export import source_code, stage1_record
from training.fitting.loop import Optimization
from training.fitting.stage1 import validate_encoder
from training.fitting.state import (
    TrainState,
    build_model,
    load_state,
    save_state,
    write_json,
)

logger = logging.getLogger(__name__)


def average_weights(states: Sequence[TrainState]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the stage 1s' weights; refuses checkpoints of different models or preprocessing."""
    if len(states) < 2:
        raise TrainConfigError(f"pe-train average needs at least two stage-1 checkpoints, got {len(states)}")
    first = states[0]
    for number, state in enumerate(states[1:], start=2):
        for what, mine, theirs in (("model", first.model_name, state.model_name),
                                   ("model config", first.model_config, state.model_config),
                                   ("preprocessing", first.preprocess, state.preprocess)):
            if mine != theirs:
                raise TrainConfigError(f"checkpoint {number} has another {what} than the first ({theirs} against "
                                       f"{mine}); only stage 1s of one model and preprocessing can be averaged")
        if state.weights.keys() != first.weights.keys():
            raise TrainConfigError(f"checkpoint {number} holds other tensors than the first")
        for name, tensor in state.weights.items():
            if tensor.shape != first.weights[name].shape:
                raise TrainConfigError(f"checkpoint {number}: {name} is {tuple(tensor.shape)}, "
                                       f"{tuple(first.weights[name].shape)} in the first")
    averaged = {}
    for name, tensor in first.weights.items():
        if tensor.is_floating_point():
            averaged[name] = torch.stack([state.weights[name].float() for state in states]).mean(0).to(tensor.dtype)
        else:
            averaged[name] = tensor.clone()
    return averaged


def average_stage1(
    checkpoints: Sequence[Path],
    out: Path,
    config: TrainConfig,
    cache: Cache | None = None,
    split: str = "val",
    command: list[str] | None = None,
    progress: bool = True,
) -> TrainState:
    """Write the average of ``checkpoints`` (stage-1 best.pt / last.pt files or pe-node checkpoints) to ``out``
    (a file, or a folder that gets ``best.pt``); with ``cache``, first validate each ingredient and the average on
    its ``split`` (config ``stage1.image_weight`` and ``val_negatives_per_study``) and keep the numbers in the
    average's history and in ``<name>.validation.json`` beside it (``best.validation.json``)."""
    paths = [Path(path) for path in checkpoints]
    states = [load_state(path, "stage1") for path in paths]
    first = states[0]
    state = TrainState(
        stage="stage1",
        model_name=first.model_name,
        model_config=first.model_config,
        preprocess=first.preprocess,
        weights=average_weights(states),
        inputs={"command": command or [], "world_size": 1},
        extra={
            "average": [{"path": str(path.resolve()), "sha256": file_sha256(path), "stage1": stage1_record(s, path)}
                        for path, s in zip(paths, states, strict=True)],
            "data": {"average_of": [s.extra.get("data", {}) for s in states]},
            "backbone_weights": {"source": f"the mean of {len(states)} stage-1 checkpoints (pe-train average)"},
            "code": source_code(),
        },
    )
    if cache is not None:
        results = validate_average(states + [state], cache, split, config, progress)
        state.history = [{"epoch": 0, **results[-1]}]
        state.best_val_loss = float(results[-1]["val_loss"])
        state.inputs["cache"] = str(cache.root.resolve())
        state.extra["validation"] = {"cache": str(cache.root.resolve()), "split": split,
                                     "ingredients": results[:-1], "average": results[-1]}
    path = average_path(out)
    save_state(path, state)
    if cache is not None:
        write_json(path.with_name(path.stem + ".validation.json"), state.extra["validation"])
    logger.info("averaged %d stage-1 checkpoints into %s", len(states), path)
    return state


def average_path(out: Path) -> Path:
    """Where ``pe-train average --out OUT`` writes: OUT itself where it names a .pt file, else OUT/best.pt."""
    out = Path(out)
    return out if out.suffix == ".pt" else out / "best.pt"


def validate_average(states: Sequence[TrainState], cache: Cache, split: str, config: TrainConfig,
                     progress: bool) -> list[dict[str, Any]]:
    """``validate_encoder`` on the ``split`` studies of ``cache`` for each state, on this process's device."""
    studies = cache.split(split)
    if not studies:
        raise TrainConfigError(f"cache {cache.root} has no {split} studies to validate the average on")
    if states[0].preprocess != cache.preprocess.to_dict():  # average_weights saw that they all share it
        raise TrainConfigError(f"cache {cache.root} holds inputs preprocessed as {cache.preprocess.to_dict()}, "
                               f"the stage 1s were trained on {states[0].preprocess}")
    device = resolve_device(config.device)
    processes = Processes(rank=0, world_size=1, local_rank=0, device=device)
    results = []
    for number, state in enumerate(states, start=1):
        encoder = build_model(state).encoder.to(device, memory_format=torch.channels_last)
        optimization = Optimization(encoder.parameters(), config.stage1, device, cpu_bf16=True)
        result = validate_encoder(encoder, cache, studies, processes, optimization, config.stage1.image_weight,
                                  config.stage1.val_negatives_per_study)
        if progress:
            logger.info("validated %d of %d on %d %s studies: val loss %.4f", number, len(states), len(studies),
                        split, result["val_loss"])
        results.append(result)
    return results


def validation_table(state: TrainState) -> list[str]:
    """The validation of an average and its ingredients, a line each (the ingredients first), for the terminal."""
    validation = state.extra["validation"]
    names = [record["path"] for record in state.extra["average"]] + ["average"]
    width = max(len(name) for name in names)
    return [f"{name:<{width}}  val loss {result['val_loss']:.4f}  image AUC {_number(result['val_image_auc'])}  "
            f"study AUC (slice maximum) {_number(result['val_study_auc'])}"
            for name, result in zip(names, [*validation["ingredients"], validation["average"]], strict=True)]


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
