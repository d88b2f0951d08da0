"""Schema migrations (Alembic): every database pe-node opens is brought to the newest revision at start.

Revisions live in ``versions/``; each one keeps existing rows. Several processes may start at once on one
PostgreSQL database, so the upgrade runs under an advisory lock there (SQLite serialises it with BEGIN IMMEDIATE).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import text
from sqlalchemy.engine import Engine

_LOCK_KEY = 0x70656E6F  # "peno"


def alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(Path(__file__).parent))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema behind ``engine`` to ``revision``."""
    config = alembic_config()
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
