"""The epoch loop: which epoch best.pt keeps (``select``), how a time budget (``max_minutes``) plans the epochs, and
a run that starts from trained weights (validated first, as epoch 0)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from training.config import Stage1Config, TrainConfig
from training.fitting import loop
from training.fitting.distributed import Processes
from training.fitting.state import TrainState, load_state

ALONE = Processes(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Clock:
    """A monotonic clock the test moves: training epoch N takes ``epoch_seconds[N - 1]`` (the last one after)."""

    def __init__(self, *epoch_seconds: float) -> None:
        self.now, self.epoch_seconds, self.epochs = 1000.0, epoch_seconds, 0

    def tick(self) -> None:
        self.now += self.epoch_seconds[min(self.epochs, len(self.epoch_seconds) - 1)]
        self.epochs += 1

    def __call__(self) -> float:
        return self.now


def _fit(run: Path, section: Stage1Config, validations: list[dict[str, float | None]], clock: Clock,
         monkeypatch: pytest.MonkeyPatch, resume: bool = False, validate_first: bool = False,
         module: nn.Module | None = None) -> tuple[TrainState, list[float]]:
    monkeypatch.setattr(loop.time, "monotonic", clock)
    module = module or nn.Linear(2, 1)
    optimization = loop.Optimization(module.parameters(), section, torch.device("cpu"))
    rates: list[float] = []
    validated: list[int] = []

    def train_epoch(epoch: int) -> tuple[float, dict]:
        rates.append(optimization.optimizer.param_groups[0]["lr"])
        with torch.no_grad():
            module.bias.add_(1.0)  # each epoch changes the weights
        clock.tick()
        return 1.0 / epoch, {}

    def validate() -> dict[str, float | None]:
        validated.append(len(rates))
        return validations[len(validated) - 1]

    state = TrainState(stage="stage1", model_name="m", model_config={}, preprocess={},
                       weights=module.state_dict())
    state = loop.fit(run, state, module, optimization, train_epoch, validate,
                     TrainConfig(stage1=section), ALONE, resume=resume, validate_first=validate_first)
    return state, rates


VALIDATIONS = [
    {"val_loss": 0.50, "val_image_auc": 0.60, "val_study_auc": 0.55},
    {"val_loss": 0.40, "val_image_auc": 0.70, "val_study_auc": 0.60},  # lowest loss
    {"val_loss": 0.45, "val_image_auc": 0.85, "val_study_auc": 0.80},  # highest AUCs
    {"val_loss": 0.47, "val_image_auc": None, "val_study_auc": 0.70},  # an AUC that could not be computed
]


def test_best_is_the_epoch_of_lowest_validation_loss_by_default(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    state, _ = _fit(tmp_path, Stage1Config(epochs=4, lr=1e-3), VALIDATIONS, Clock(1.0), monkeypatch)
    assert (state.best_epoch, state.best_val_loss) == (2, 0.40)
    assert load_state(tmp_path / "best.pt").epoch == 2


@pytest.mark.parametrize("select", ["val_image_auc", "val_study_auc"])
def test_select_by_auc_keeps_the_epoch_of_highest_auc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      select: str) -> None:
    section = Stage1Config(epochs=4, lr=1e-3, select=select)
    state, _ = _fit(tmp_path, section, VALIDATIONS, Clock(1.0), monkeypatch)
    assert state.best_epoch == 3
    assert state.best_val_loss == 0.45  # the loss recorded is the best epoch's
    assert load_state(tmp_path / "best.pt").epoch == 3


def test_a_time_budget_plans_the_epochs_that_fit_and_the_schedule_spans_them(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    section = Stage1Config(epochs=10, lr=1e-3, max_minutes=3.5)  # 60 s an epoch: 3 of 10 fit
    state, rates = _fit(tmp_path, section, VALIDATIONS, Clock(60.0), monkeypatch)
    assert state.epoch == 3 and state.extra["planned_epochs"] == 3
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * (e - 1) / 3)) for e in (1, 2, 3)]
    assert rates == pytest.approx(expected)  # the cosine reaches its last step over 3 epochs, not 10


def test_the_second_epoch_corrects_a_plan_the_slow_first_one_made(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The first epoch carries the start-up (120 s), the others take 60 s: after it 2 fit in 5 minutes, after the
    # second 4 (120 + 60 spent, 120 s left for two more).
    section = Stage1Config(epochs=10, lr=1e-3, max_minutes=5.0)
    state, _ = _fit(tmp_path, section, VALIDATIONS * 2, Clock(120.0, 60.0), monkeypatch)
    assert state.epoch == 4 and state.extra["planned_epochs"] == 4


def test_a_budget_larger_than_the_epochs_runs_them_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    section = Stage1Config(epochs=4, lr=1e-3, max_minutes=60.0)
    state, _ = _fit(tmp_path, section, VALIDATIONS, Clock(60.0), monkeypatch)
    assert state.epoch == 4 and state.extra["planned_epochs"] == 4


def test_a_resumed_run_keeps_the_planned_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    section = Stage1Config(epochs=10, lr=1e-3, max_minutes=2.5)  # 2 of 10 at 60 s an epoch
    state, _ = _fit(tmp_path, section, VALIDATIONS, Clock(60.0), monkeypatch)
    assert state.epoch == 2
    # Resumed on a machine ten times faster: the plan stands, so the run is already complete.
    resumed, rates = _fit(tmp_path, section, VALIDATIONS, Clock(6.0), monkeypatch, resume=True)
    assert resumed.epoch == 2 and rates == []


def test_the_summary_names_the_number_that_chose_best_pt() -> None:
    state = TrainState("stage1", "pe_cnn_lstm", {}, {}, {}, epoch=3, best_epoch=2, best_val_loss=0.41,
                       history=[{"epoch": 1, "val_loss": 0.40, "val_study_auc": 0.70},
                                {"epoch": 2, "val_loss": 0.41, "val_study_auc": 0.93},
                                {"epoch": 3, "val_loss": 0.45, "val_study_auc": 0.90}])
    assert loop.best_summary(state, "val_study_auc") == "best val study auc 0.9300 at epoch 2 of 3 (val loss 0.4100)"
    assert loop.best_summary(state, "val_loss") == "best val loss 0.4100 at epoch 2 of 3"


@pytest.mark.parametrize(("losses", "best"), [((0.30, 0.40, 0.35), 0), ((0.50, 0.40, 0.45), 1)])
def test_a_run_from_trained_weights_validates_them_first_and_keeps_them_unless_an_epoch_beats_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, losses: tuple[float, ...], best: int) -> None:
    module = nn.Linear(2, 1)
    with torch.no_grad():
        module.bias.fill_(0.25)  # exact in float32, so start + 1 + 1 == start + 2 (a random bias can round apart)
    start = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    validations = [{"val_loss": loss, "val_image_auc": 0.5, "val_study_auc": 0.5} for loss in losses]
    state, rates = _fit(tmp_path, Stage1Config(epochs=2, lr=1e-3), validations, Clock(1.0), monkeypatch,
                        validate_first=True, module=module)
    assert len(rates) == 2 and [h["epoch"] for h in state.history] == [0, 1, 2]
    assert state.history[0]["train_loss"] is None and state.history[0]["val_loss"] == losses[0]
    assert (state.best_epoch, state.best_val_loss) == (best, losses[best])
    kept = load_state(tmp_path / "best.pt")
    assert kept.epoch == best
    assert torch.equal(kept.weights["bias"], start["bias"] + best), "best.pt holds the weights of its epoch"
    assert torch.equal(load_state(tmp_path / "last.pt").weights["bias"], start["bias"] + 2)


def test_a_resumed_run_from_trained_weights_does_not_validate_them_again(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    validations = [{"val_loss": loss, "val_image_auc": 0.5, "val_study_auc": 0.5} for loss in (0.5, 0.4, 0.3)]
    first, _ = _fit(tmp_path, Stage1Config(epochs=1, lr=1e-3), validations, Clock(1.0), monkeypatch,
                    validate_first=True)
    assert [h["epoch"] for h in first.history] == [0, 1]
    resumed, rates = _fit(tmp_path, Stage1Config(epochs=2, lr=1e-3), validations[2:], Clock(1.0), monkeypatch,
                          resume=True, validate_first=True)
    assert len(rates) == 1 and [h["epoch"] for h in resumed.history] == [0, 1, 2] and resumed.best_epoch == 2


@pytest.mark.parametrize(("native", "cpu_bf16", "amp", "precision"), [
    (True, True, True, "bf16"),    # stage 1 on a CPU with AMX or AVX512-BF16
    (False, True, True, "fp32"),   # bf16 emulated: slower than float32
    (True, False, True, "fp32"),   # stage 2 (its LSTM) stays float32 on the CPU
    (True, True, False, "fp32"),   # amp: false
])
def test_on_the_cpu_a_stage_that_asks_for_it_runs_in_bf16_only_where_the_cpu_computes_it_natively(
        monkeypatch: pytest.MonkeyPatch, native: bool, cpu_bf16: bool, amp: bool, precision: str) -> None:
    monkeypatch.setattr(loop, "cpu_has_fast_bf16", lambda: native)
    module = nn.Linear(4, 1)
    optimization = loop.Optimization(module.parameters(), Stage1Config(amp=amp), torch.device("cpu"),
                                     cpu_bf16=cpu_bf16)
    assert optimization.precision == precision
    with optimization.autocast():
        output = module(torch.ones(2, 4))
    assert output.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    optimization.step(output.float().sum())  # the weights and their gradients stay float32
    assert module.weight.dtype == torch.float32 and module.weight.grad.dtype == torch.float32
