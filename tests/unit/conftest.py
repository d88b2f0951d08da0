"""Fixtures for the node's unit tests: a fresh database per test, on SQLite and on PostgreSQL.

Every test that takes ``db`` runs twice: on SQLite (the embedded default) and on a real PostgreSQL server started
once per session (the scale-out path), so the same code is shown to work on both.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from pe_node.db import Database
from tests.peers import PostgresServer, missing_peers, on_ci

_names = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    missing = missing_peers(["postgresql"])
    if missing:
        (pytest.fail if on_ci() else pytest.skip)(f"{missing[0]} not installed (make test installs it)")
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'pe-node.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"unit_{next(_names)}")
    database = Database(url)
    yield database
    database.dispose()
