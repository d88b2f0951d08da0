"""Schema migrations: a database made by the first release keeps its data through every upgrade."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from pe_node.db import Base, Database
from pe_node.migrations import upgrade

_names = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    return request.getfixturevalue("postgres").create_database(f"migrate_{next(_names)}")


def test_upgrade_from_the_first_schema_keeps_the_data(url: str) -> None:
    engine = create_engine(url)
    upgrade(engine, "0001")
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO series (id, series_instance_uid, study_instance_uid, modality, state, first_received_at, "
            "last_received_at) VALUES (1, '1.2.3', '1.2', 'CT', 'complete', '2026-01-01 10:00:00', "
            "'2026-01-01 10:05:00')"))
        connection.execute(text(
            "INSERT INTO instances (sop_instance_uid, series_id, sop_class_uid, transfer_syntax_uid, size, "
            "received_at) VALUES ('1.2.3.4', 1, '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1', 100, "
            "'2026-01-01 10:05:00')"))
        connection.execute(text(
            "INSERT INTO jobs (id, series_id, state, attempts, instances, created_at, result) VALUES "
            "(7, 1, 'done', 1, 1, '2026-01-01 10:06:00', '{\"outcome\": \"negative\"}')"))
    engine.dispose()

    db = Database(url)  # what every pe-node process does at start: upgrade to the newest revision
    with db.engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0003"
        row = connection.execute(text(
            "SELECT s.series_instance_uid, s.purged_at, i.sop_instance_uid, j.result, s.state, st.study_instance_uid "
            "FROM series s JOIN instances i ON i.series_id = s.id JOIN jobs j ON j.series_id = s.id "
            "JOIN studies st ON st.id = j.study_id")).one()
    assert row[:3] == ("1.2.3", None, "1.2.3.4")
    assert "negative" in str(row[3])
    assert row[4:] == ("analysed", "1.2")  # a series that had a job was analysed; the job belongs to its study
    db.dispose()


def test_newest_revision_matches_the_models(url: str) -> None:
    db = Database(url)
    with db.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    db.dispose()
    assert differences == [], "models changed without a migration"
