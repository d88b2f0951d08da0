"""Fixtures for the node's unit tests: a fresh SQLite database per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pe_node.db import Database


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'pe-node.db'}")
    yield database
    database.dispose()
