"""The epoch loop both stages share (paper section 3.2: Adam, the RSNA loss, the model of lowest validation loss).

``Optimization`` is Adam with a per-epoch learning-rate schedule, gradient clipping and autocast: on CUDA bf16 where the
GPU has it, else fp16 with a gradient scaler; on the CPU bf16 for a stage that asks for it (stage 1's convolutions,
about twice as fast) where the CPU computes bf16 natively (AMX or AVX512-BF16), else float32. The weights, the optimizer
and the loss stay float32 either way. ``fit`` runs the epochs: train, validate, keep ``last.pt`` every epoch and
``best.pt`` when the validation number the stage selects by (``select``: the loss by default, as in the paper, or an
AUC) improves, and write ``config.yaml`` and ``metrics.json`` beside them. With ``max_minutes`` the first two epochs set
the pace: the stage runs as many of its epochs as fit in the budget (``planned_epochs`` in the metrics) and the schedule
spans those. With ``resume`` it restores the weights, optimizer, scaler, epoch (and so the learning-rate schedule, a
function of the epoch), best loss, history and RNG state from ``last.pt`` and goes on from the next epoch: the run ends
exactly where an uninterrupted one would. With ``validate_first`` (a stage that starts from trained weights) the weights
are validated before any training, as epoch 0: ``best.pt`` stays the starting point unless an epoch beats it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pe_node.model import cpu_has_fast_bf16
from training.config import OptimConfig, TrainConfig, save_train_config
from training.fitting.distributed import Processes
from training.fitting.state import (
    StateError,
    TrainState,
    load_state,
    save_state,
    write_json,
)

logger = logging.getLogger(__name__)

TrainEpoch = Callable[[int], tuple[float, dict[str, Any]]]
"""Trains one epoch (1-based); returns its mean training loss over all processes and values for the run's metrics
(such as the batches each process trained); those under ``"epoch"`` go into the epoch's history record instead."""
Validate = Callable[[], dict[str, float | None]]
"""Returns ``val_loss`` and any other validation numbers, the same on every process."""


class Optimization:
    """Adam, the schedule, clipping and mixed precision of one stage."""

    def __init__(self, parameters: Iterable[nn.Parameter], config: OptimConfig, device: torch.device,
                 cpu_bf16: bool = False):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.config = config
        self.epochs = config.epochs
        """The epochs the schedule spans: ``config.epochs``, or fewer where a time budget plans fewer."""
        self.optimizer = torch.optim.Adam(self.parameters, lr=config.lr, weight_decay=config.weight_decay)
        self.device_type = device.type
        self.amp_dtype: torch.dtype | None = None
        if device.type == "cuda" and config.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device.type == "cpu" and config.amp and cpu_bf16 and cpu_has_fast_bf16():
            self.amp_dtype = torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)

    @property
    def precision(self) -> str:
        """The forward pass's precision: ``"bf16"``, ``"fp16"`` or ``"fp32"`` (no autocast)."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward pass where ``precision`` is not fp32; nothing otherwise."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def step(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` and take one optimizer step (with scaling and clipping as configured)."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {float(loss)}; lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def start_epoch(self, epoch: int) -> float:
        """Set and return the learning rate of ``epoch`` (1-based), a function of the epoch and the config alone:
        cosine from ``lr`` towards 0 over ``self.epochs``, a step decay by ``gamma`` every ``step_epochs``, or constant.
        A resumed run therefore needs no scheduler state, and extending ``epochs`` stretches the schedule."""
        config = self.config
        if config.schedule == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / self.epochs))
        elif config.schedule == "step":
            factor = config.gamma ** ((epoch - 1) // config.step_epochs)
        else:
            factor = 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr * factor
        return config.lr * factor

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dicts(self, state: TrainState) -> None:
        if state.optimizer is not None:
            self.optimizer.load_state_dict(state.optimizer)
        if state.scaler:
            self.scaler.load_state_dict(state.scaler)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fit(
    run: Path,
    state: TrainState,
    module: nn.Module,
    optimization: Optimization,
    train_epoch: TrainEpoch,
    validate: Validate,
    config: TrainConfig,
    processes: Processes,
    resume: bool = False,
    validate_first: bool = False,
) -> TrainState:
    """Train ``module`` (the unwrapped stage whose weights are saved) for the configured epochs; returns the state
    after the last epoch. ``state`` describes the run (stage, model, preprocessing, inputs, extra); with
    ``validate_first`` the untrained weights are validated and kept as epoch 0."""
    section = optimization.config
    if resume:
        state = _resume(run, state, module, optimization)
        if section.max_minutes is not None and "planned_epochs" in state.extra:
            optimization.epochs = min(section.epochs, state.extra["planned_epochs"])
    if processes.is_main:
        save_train_config(config, run / "config.yaml")
    if validate_first and not state.history:
        started = time.monotonic()
        validation = validate()
        _check_finite(state.stage, 0, validation.get("val_loss"))
        state.history.append({"epoch": 0, "lr": None, "train_loss": None, **_numbers(validation),
                              "seconds": round(time.monotonic() - started, 1)})
        state.best_val_loss, state.best_epoch = validation["val_loss"], 0
        _keep(state, module, optimization)
        if processes.is_main:
            _save(run, state, True)
            logger.info("%s epoch 0 (the starting weights): %s", state.stage,
                        ", ".join(f"{k} {_short(v)}" for k, v in state.history[-1].items() if k != "epoch"))
        processes.barrier()
    epoch = state.epoch
    while epoch < optimization.epochs:
        epoch += 1
        started = time.monotonic()
        lr = optimization.start_epoch(epoch)
        train_loss, extra = train_epoch(epoch)
        extra = dict(extra)
        of_epoch = extra.pop("epoch", {})
        state.extra.update(extra)
        validation = validate()
        val_loss = _check_finite(state.stage, epoch, validation.get("val_loss"))
        record = {"epoch": epoch, "lr": lr, "train_loss": float(train_loss), **_numbers(validation), **of_epoch,
                  "seconds": round(time.monotonic() - started, 1)}
        best = _best_record(state)
        state.history.append(record)
        improved = best is None or _better(section.select, record.get(section.select), best.get(section.select))
        if improved:
            state.best_val_loss, state.best_epoch = val_loss, epoch
        if section.max_minutes is not None and epoch <= 2:
            _plan(optimization, state, epoch, processes)
        state.epoch = epoch
        _keep(state, module, optimization)
        if processes.is_main:
            _save(run, state, improved)
            logger.info("%s epoch %d/%d: %s%s", state.stage, epoch, optimization.epochs,
                        ", ".join(f"{k} {_short(v)}" for k, v in record.items() if k != "epoch"),
                        " (best)" if improved else "")
        processes.barrier()
    return state


def _check_finite(stage: str, epoch: int, val_loss: float | None) -> float:
    if val_loss is None or not math.isfinite(val_loss):
        raise FloatingPointError(f"{stage} epoch {epoch}: validation loss is {val_loss}")
    return val_loss


def _numbers(validation: dict[str, float | None]) -> dict[str, float | None]:
    return {key: None if value is None else float(value) for key, value in validation.items()}


def _keep(state: TrainState, module: nn.Module, optimization: Optimization) -> None:
    """Put the module's weights, the optimizer's and scaler's state and the RNG state into ``state``."""
    state.weights = {name: t.detach().cpu().clone() for name, t in module.state_dict().items()}
    dicts = optimization.state_dicts()
    state.optimizer, state.scaler = dicts["optimizer"], dicts["scaler"]
    state.rng = rng_state()


def _best_record(state: TrainState) -> dict[str, Any] | None:
    """The history record of the epoch best.pt holds (None before the first epoch)."""
    return next((h for h in state.history if h["epoch"] == state.best_epoch), None)


def _better(select: str, value: float | None, best: float | None) -> bool:
    """Whether ``value`` of the ``select`` number beats ``best``: higher for an AUC, lower for a loss; a missing value
    (an AUC of a validation set with one class) never does."""
    if value is None or not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value > best if select.endswith("auc") else value < best


def _plan(optimization: Optimization, state: TrainState, epoch: int, processes: Processes) -> None:
    """After ``epoch`` (the first or the second), fit the epochs into ``max_minutes`` at the pace of the latest one:
    the first sets a plan, the second, clear of the start-up (loader workers, cuDNN autotuning), corrects it. The
    same count on every process (the slowest one's figures), and the same after a resume (the time is the history's)."""
    spent, pace = sum(h["seconds"] for h in state.history), state.history[-1]["seconds"]
    if processes.distributed:
        spent, pace = (max(values) for values in zip(*processes.gather((spent, pace)), strict=True))
    budget = optimization.config.max_minutes * 60.0
    fits = epoch + int(max(budget - spent, 0.0) // max(pace, 1e-3))
    planned = max(epoch, min(optimization.config.epochs, fits))
    state.extra["planned_epochs"] = planned
    optimization.epochs = planned
    if processes.is_main:
        logger.info("%s: %d of %d epochs fit in %.4g min at %.1f s an epoch", state.stage, planned,
                    optimization.config.epochs, optimization.config.max_minutes, pace)


def _resume(run: Path, state: TrainState, module: nn.Module, optimization: Optimization) -> TrainState:
    last = load_state(run / "last.pt", state.stage)
    for key in ("model_name", "model_config", "preprocess"):
        if getattr(last, key) != getattr(state, key):
            raise StateError(
                f"cannot resume {run / 'last.pt'}: its {key} {getattr(last, key)!r} differs from this run's "
                f"{getattr(state, key)!r}"
            )
    if _training_share(last.config) != _training_share(state.config):
        fraction, seed = _training_share(last.config)
        raise StateError(
            f"cannot resume {run / 'last.pt'}: it trained on data.train_fraction {fraction}"
            f"{f' (split_seed {seed})' if seed is not None else ''} of the train split; resume it with the same share"
        )
    module.load_state_dict(last.weights)
    optimization.load_state_dicts(last)
    restore_rng(last.rng)
    logger.info("resuming %s from %s after epoch %d (best val loss %.4f at epoch %d)", state.stage,
                run / "last.pt", last.epoch, last.best_val_loss, last.best_epoch)
    last.config, last.inputs, last.extra = state.config, {**last.inputs, **state.inputs}, {**last.extra, **state.extra}
    return last


def _training_share(config: dict[str, Any]) -> tuple[float, int | None]:
    """Which studies of the train split a run trains on: ``data.train_fraction`` and, below 1, the seed that drew them
    (a run recorded before the key existed trained on all of them)."""
    data = config.get("data", {})
    fraction = float(data.get("train_fraction", 1.0))
    return fraction, (int(data.get("split_seed", 0)) if fraction < 1.0 else None)


def _save(run: Path, state: TrainState, improved: bool) -> None:
    save_state(run / "last.pt", state)
    if improved:
        best = TrainState(**{**state.__dict__, "optimizer": None, "scaler": None, "rng": None})
        save_state(run / "best.pt", best)
    logger.info("wrote %s%s", run / "last.pt", f" and {run / 'best.pt'}" if improved else "")
    write_json(run / "metrics.json", {
        "stage": state.stage,
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val_loss,
        "history": state.history,
        "inputs": state.inputs,
        **state.extra,
    })


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def best_summary(state: TrainState, select: str) -> str:
    """One line on the epoch that best.pt holds, named by the number that chose it."""
    best = _best_record(state)
    where = f"at epoch {state.best_epoch} of {state.epoch}"
    if select == "val_loss" or best is None or best.get(select) is None:
        return f"best val loss {state.best_val_loss:.4f} {where}"
    return f"best {select.replace('_', ' ')} {best[select]:.4f} {where} (val loss {state.best_val_loss:.4f})"
