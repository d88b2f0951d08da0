"""The code commit an exported checkpoint records: git's, or, in a copy of the tree, the one it is told; and a stage
read back from a checkpoint keeps its own commit, never the export's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pe_node.model import save_checkpoint
from tests.tiny_models import TINY_PREPROCESS, tiny_model
from training.fitting.export import SOURCE_COMMIT_VARIABLE, source_code, stage1_record
from training.fitting.state import load_state

REPO = Path(__file__).resolve().parents[2]


def test_a_checkout_records_its_own_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SOURCE_COMMIT_VARIABLE, raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    code = source_code(REPO)
    assert code["git_commit"] == head.stdout.strip()
    assert isinstance(code["uncommitted_changes"], bool)


def test_a_named_commit_wins_over_a_stale_git_in_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SOURCE_COMMIT_VARIABLE, "0" * 40)
    code = source_code(REPO)
    assert code["git_commit"] == "0" * 40
    assert SOURCE_COMMIT_VARIABLE in code["from"]


def test_a_copy_without_git_records_the_commit_it_is_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SOURCE_COMMIT_VARIABLE, " 29e148c5 \n")
    code = source_code(tmp_path)
    assert code["git_commit"] == "29e148c5"
    assert SOURCE_COMMIT_VARIABLE in code["from"]


def test_a_copy_without_git_and_without_a_name_records_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SOURCE_COMMIT_VARIABLE, raising=False)
    assert source_code(tmp_path) == {"git_commit": None}


@pytest.mark.parametrize(("own", "expected"), [({"git_commit": "a" * 40}, {"git_commit": "a" * 40}), (None, None)])
def test_a_stage_1_read_from_a_checkpoint_keeps_its_own_commit_not_the_exports(
        tmp_path: Path, own: dict[str, str] | None, expected: dict[str, str] | None) -> None:
    stage1 = {"best_epoch": 2, "epochs": 2, "config": {}, **({"code": own} if own else {})}
    path = save_checkpoint(tmp_path / "pe.pt", tiny_model(), TINY_PREPROCESS,
                           provenance={"stage1": stage1, "code": {"git_commit": "e" * 40}})
    state = load_state(path, "stage1")
    assert state.extra["code"] == expected
    assert stage1_record(state, path)["code"] == expected
