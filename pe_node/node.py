"""The running node: receiver, completion sweep, lease sweep and (when enabled) the worker, started and stopped
together. ``pe-node serve`` runs all of it; ``pe-node serve --no-worker`` and ``pe-node worker`` split it
across processes and machines that share the database and the storage path.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler

from pe_node.config import Config
from pe_node.db import Database
from pe_node.dicom.archive import Archive
from pe_node.dicom.audit import AssociationAudit
from pe_node.dicom.scp import Receiver
from pe_node.jobs.completion import sweep
from pe_node.jobs.queue import requeue_expired
from pe_node.jobs.retention import Retention
from pe_node.metrics import Metrics
from pe_node.web import WebServer

if TYPE_CHECKING:
    from pe_node.worker import Worker

log = logging.getLogger(__name__)

LEASE_SWEEP_SECONDS = 5.0
RETENTION_SWEEP_SECONDS = 60.0


@dataclass(frozen=True)
class Roles:
    receive: bool
    work: bool


class StartError(RuntimeError):
    """The node cannot start as configured (a port in use, ...); the message says which setting."""


class Node:
    """Everything one process runs, built from one frozen Config."""

    def __init__(self, config: Config, roles: Roles,
                 worker_factory: Callable[[Config, Database, Metrics], Worker] | None = None,
                 db: Database | None = None) -> None:
        self.config = config
        self.roles = roles
        self.db = db or Database(config.database.url)
        self.metrics = Metrics()
        self.metrics.watch(self.db, Path(config.storage.path))
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1})
        self.receiver: Receiver | None = None
        self.worker: Worker | None = None
        self.web: WebServer | None = None
        if roles.receive:
            archive = Archive(config.storage, self.db)
            archive.remove_stale_temporaries()
            self.receiver = Receiver(config.node, archive, AssociationAudit(self.db), self.metrics)
            self.scheduler.add_job(self._sweep, "interval", seconds=config.series.sweep_seconds, id="completion")
            self.retention = Retention(self.db, config)
            self.scheduler.add_job(self._retain, "interval", seconds=RETENTION_SWEEP_SECONDS, id="retention")
        self.scheduler.add_job(self._requeue, "interval", seconds=LEASE_SWEEP_SECONDS, id="leases")
        if roles.work:
            if worker_factory is None:
                raise ValueError("a working node needs a worker factory")
            self.worker = worker_factory(config, self.db, self.metrics)
        if config.web.enabled:
            receiver = self.receiver
            self.web = WebServer(config.web, self.db, self.metrics, self._model_info(),
                                 receiving=(lambda: receiver.listening) if receiver is not None else None)

    def _model_info(self) -> dict[str, object]:
        if self.worker is not None:
            info = dict(self.worker.predictor.model_info())
            info["algorithm"] = f"{self.worker.algorithm.name} {self.worker.algorithm.version}"
            return info
        return {"checkpoint": str(self.config.model.checkpoint), "analysed by": "pe-node worker processes"}

    def start(self) -> None:
        """Start every part; a port already in use is a StartError naming the config key."""
        if self.receiver is not None:
            try:
                self.receiver.start()
            except OSError as exc:
                raise StartError(f"node.port {self.config.node.port} on {self.config.node.host}: {exc.strerror}") \
                    from None
        if self.web is not None:
            try:
                self.web.start()
            except OSError as exc:
                raise StartError(f"web.port {self.config.web.port} on {self.config.web.host}: {exc.strerror} "
                                 "(give each process on a host its own, e.g. PE_NODE__WEB__PORT)") from None
        self.scheduler.start()
        if self.worker is not None:
            self.worker.start()

    def stop(self) -> None:
        """Graceful: answer the C-STOREs in flight, stop the sweeps, release the job being worked on."""
        log.info("stopping")
        if self.receiver is not None:
            self.receiver.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.worker is not None:
            self.worker.stop()
        if self.web is not None:
            self.web.stop()
        self.db.dispose()
        log.info("stopped")

    def run_until_signalled(self) -> None:
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            stop.wait()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _sweep(self) -> None:
        try:
            sweep(self.db, self.config.series, self.config.study, metrics=self.metrics)
        except Exception:
            log.exception("completion sweep failed; retrying at the next tick")

    def _retain(self) -> None:
        try:
            self.retention.run()
        except Exception:
            log.exception("retention sweep failed; retrying at the next tick")

    def _requeue(self) -> None:
        try:
            requeue_expired(self.db, self.config.worker)
        except Exception:
            log.exception("lease sweep failed; retrying at the next tick")
