"""``pe-node check``: is this configuration ready to run? Storage, database, destinations and model, each tested
for real (a C-ECHO to every DICOM destination, a write to every folder, a load of the checkpoint)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pe_node.config import (
    Config,
    DicomDestination,
    DicomWebDestination,
    FolderDestination,
)


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


def run_checks(config: Config) -> Iterator[CheckResult]:
    yield CheckResult("config", True, "valid")
    yield _storage(config)
    yield _database(config)
    for destination in config.destinations:
        yield _destination(config, destination)
    yield _model(config)


def _storage(config: Config) -> CheckResult:
    path = Path(config.storage.path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        _probe_write(path)
    except OSError as exc:
        return CheckResult("storage", False, f"{path}: {exc}")
    free_mb = shutil.disk_usage(path).free // (1024 * 1024)
    ok = free_mb >= config.storage.min_free_mb
    return CheckResult("storage", ok, f"{path}: {free_mb} MB free (storage.min_free_mb {config.storage.min_free_mb})")


def _database(config: Config) -> CheckResult:
    from pe_node.db import Database

    try:
        db = Database(config.database.url)
        db.dispose()
    except Exception as exc:
        return CheckResult("database", False, f"{_redacted(config.database.url)}: {exc}")
    return CheckResult("database", True, f"{_redacted(config.database.url)}: reachable, schema up to date")


def _destination(config: Config, destination: object) -> CheckResult:
    if isinstance(destination, FolderDestination):
        try:
            Path(destination.path).mkdir(parents=True, exist_ok=True)
            _probe_write(Path(destination.path))
        except OSError as exc:
            return CheckResult(f"destination {destination.name}", False, f"{destination.path}: {exc}")
        return CheckResult(f"destination {destination.name}", True, f"folder {destination.path} writable")
    if isinstance(destination, DicomDestination):
        from pe_node.dicom.scu import Peer, echo

        peer = Peer(destination.ae_title, destination.host, destination.port)
        status = echo(peer, destination.calling_ae_title or config.node.ae_title)
        if status is None:
            return CheckResult(f"destination {destination.name}", False, f"C-ECHO to {peer}: no association")
        return CheckResult(f"destination {destination.name}", status == 0, f"C-ECHO to {peer}: status 0x{status:04X}")
    if isinstance(destination, DicomWebDestination):
        from pe_node.delivery.dicomweb import probe

        ok, detail = probe(destination)
        return CheckResult(f"destination {destination.name}", ok, detail)
    raise TypeError(f"unknown destination type {type(destination).__name__}")


def _model(config: Config) -> CheckResult:
    from pe_node.model.checkpoint import CheckpointError
    from pe_node.model.predictor import Predictor

    try:
        predictor = Predictor.from_checkpoint(config.model.checkpoint, device=config.model.device,
                                              batch_size=config.model.batch_size)
    except (CheckpointError, RuntimeError, ValueError) as exc:
        return CheckResult("model", False, str(exc))
    return CheckResult("model", True, f"{config.model.checkpoint} loaded on {predictor.device}")


def _probe_write(folder: Path) -> None:
    fd, name = tempfile.mkstemp(prefix=".pe-node-check-", dir=folder)
    os.close(fd)
    os.unlink(name)


def _redacted(url: str) -> str:
    """The URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
