"""The code commit an exported checkpoint records: git's, or, in a copy of the tree, the one it is told."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from training.export import SOURCE_COMMIT_VARIABLE, source_code

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
