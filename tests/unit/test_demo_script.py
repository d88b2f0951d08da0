"""training/demo.sh: the steps it runs, and what INIT, STAGE1_SEED, STAGE1_CHECKPOINT, STAGE1_OPTIONS and AVERAGE
change.

``PE_TRAIN`` points the script at a command that writes down the arguments of each call instead of training, so the
test reads the recipe the script runs; the steps themselves are tested with the real pe-train in
tests/integration/test_training.py.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "training" / "demo.sh"
SETTINGS = {"CONFIG", "OUT", "PE_TRAIN", "STUDIES", "STAGE1_SEED", "STAGE1_SLICES", "STAGE2_STUDIES", "TEST_STUDIES",
            "SLICES", "INDEPENDENT_STUDIES", "WORKERS", "INIT", "STAGE1_CHECKPOINT", "STAGE1_OPTIONS", "AVERAGE"}
"""What demo.sh reads from its environment: none may leak in from the one the tests run in."""


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    calls = tmp_path / "calls.txt"
    record = tmp_path / "record.py"
    record.write_text("import shlex, sys\n"
                      f"with open({str(calls)!r}, 'a') as log:\n"
                      "    log.write(shlex.join(sys.argv[1:]) + '\\n')\n", encoding="utf-8")
    recorder = tmp_path / "pe-train"  # a sh script, so that a long interpreter path needs no #! line
    recorder.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(record))} "$@"\n',
                        encoding="utf-8")
    recorder.chmod(0o755)
    environment = {key: value for key, value in os.environ.items() if key not in SETTINGS | {"BASH_ENV", "ENV"}}
    environment.update(PE_TRAIN=str(recorder), **env)
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "work")], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=60)
    lines = calls.read_text(encoding="utf-8").splitlines() if calls.exists() else []
    return result, [shlex.split(line) for line in lines]


def _call(calls: list[list[str]], command: str, option: str, value: str) -> list[str]:
    return next(call for call in calls if call[0] == command and call[call.index(option) + 1] == value)


def _value(call: list[str], option: str) -> str:
    return call[call.index(option) + 1]


def test_the_default_recipe_trains_stage_1_from_the_configs_start_and_goes_on_from_its_best_epoch(
        tmp_path: Path) -> None:
    result, calls = _run(tmp_path)
    assert result.returncode == 0, result.stderr
    work = tmp_path / "work"
    assert [call[0] for call in calls] == ["phantoms"] * 4 + ["prepare"] * 4 + [
        "stage1", "features", "features", "features", "stage2", "stage2", "evaluate", "export"]
    assert [_value(call, "--seed") for call in calls[:4]] == ["11", "3", "1", "2027"]
    assert [_value(call, "--studies") for call in calls[:4]] == ["600", "320", "280", "72"]
    independent = calls[3]
    assert _value(independent, "--family") == "independent", "the evaluation-only family"
    assert all("--family" not in call for call in calls[:3])
    stage1 = _call(calls, "stage1", "--cache", str(work / "cache-train"))
    assert stage1 == ["stage1", "--config", "training/configs/demo.yaml", "--cache", str(work / "cache-train"),
                      "--out", str(work / "stage1")]
    best = str(work / "stage1" / "best.pt")
    for call in calls[9:]:
        if call[0] != "stage2":
            assert _value(call, "--stage1") == best, call
    evaluate = next(call for call in calls if call[0] == "evaluate")
    assert _value(evaluate, "--independent") == str(work / "features-independent")
    assert _value(calls[-1], "--out") == str(work / "pe-demo.pt")


def test_init_fine_tunes_a_trained_stage_1_on_phantoms_of_the_seed_asked_and_uses_the_checkpoint_asked(
        tmp_path: Path) -> None:
    start = tmp_path / "pe-demo-before.pt"
    start.write_bytes(b"weights")
    result, calls = _run(tmp_path, CONFIG="training/configs/finetune-cpu.yaml", INIT=str(start), STUDIES="600",
                         STAGE1_SEED="5", STAGE1_CHECKPOINT="last.pt",
                         STAGE1_OPTIONS="--set stage1.epochs=2 --set stage1.max_minutes=null")
    assert result.returncode == 0, result.stderr
    work = tmp_path / "work"
    training = _call(calls, "phantoms", "--out", str(work / "phantoms-train"))
    assert (_value(training, "--seed"), _value(training, "--studies")) == ("5", "600")
    assert _value(_call(calls, "phantoms", "--out", str(work / "phantoms-stage2")), "--seed") == "3"
    assert _value(_call(calls, "phantoms", "--out", str(work / "phantoms-test")), "--seed") == "1"
    stage1 = next(call for call in calls if call[0] == "stage1")
    assert _value(stage1, "--init") == str(start)
    sets = [stage1[i + 1] for i, option in enumerate(stage1) if option == "--set"]
    assert sets == ["stage1.epochs=2", "stage1.max_minutes=null"]
    assert _value(stage1, "--config") == "training/configs/finetune-cpu.yaml"
    last = str(work / "stage1" / "last.pt")
    downstream = [call for call in calls if call[0] in {"features", "evaluate", "export"}]
    assert len(downstream) == 5
    assert all(_value(call, "--stage1") == last for call in downstream)


def test_average_takes_the_mean_of_the_checkpoints_named_and_this_runs_best_and_last_downstream(
        tmp_path: Path) -> None:
    earlier = [tmp_path / "finetune3-best.pt", tmp_path / "finetune4-last.pt"]
    for path in earlier:
        path.write_bytes(b"weights")
    result, calls = _run(tmp_path, CONFIG="training/configs/finetune-cpu.yaml", AVERAGE=" ".join(map(str, earlier)))
    assert result.returncode == 0, result.stderr
    work = tmp_path / "work"
    assert [call[0] for call in calls][8:] == ["stage1", "average", "features", "features", "features", "stage2",
                                               "stage2", "evaluate", "export"]
    average = next(call for call in calls if call[0] == "average")
    assert average == ["average", "--config", "training/configs/finetune-cpu.yaml", "--out",
                       str(work / "average" / "best.pt"), *map(str, earlier), str(work / "stage1" / "best.pt"),
                       str(work / "stage1" / "last.pt")]
    downstream = [call for call in calls if call[0] in {"features", "evaluate", "export"}]
    assert len(downstream) == 5
    assert all(_value(call, "--stage1") == str(work / "average" / "best.pt") for call in downstream)


@pytest.mark.parametrize(("env", "message"), [
    ({"STAGE1_CHECKPOINT": "epoch3.pt"}, "STAGE1_CHECKPOINT must be best.pt or last.pt"),
    ({"INIT": "/nonexistent/pe-demo.pt"}, "INIT: no such file: /nonexistent/pe-demo.pt"),
    ({"STAGE1_OPTIONS": "--set stage1.epochs=2 --init start.pt"}, "STAGE1_OPTIONS: give the starting weights as INIT"),
    ({"AVERAGE": "/nonexistent/best.pt"}, "AVERAGE: no such file: /nonexistent/best.pt"),
])
def test_a_wrong_setting_stops_the_script_before_any_step(tmp_path: Path, env: dict[str, str], message: str) -> None:
    result, calls = _run(tmp_path, **env)
    assert result.returncode == 2
    assert message in result.stderr
    assert calls == []
