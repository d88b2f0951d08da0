"""The association audit: one row per association request, accepted or rejected, with what it sent."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from sqlalchemy import update

from pe_node.db import AssociationRecord, Database, utcnow

log = logging.getLogger(__name__)


@dataclass
class _Open:
    record_id: int
    received: int = 0
    failed: int = 0


class AssociationAudit:
    """Records association requests and, when they close, how many instances each stored or failed."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._open: dict[int, _Open] = {}
        self._lock = threading.Lock()

    def requested(
        self, key: int, *, calling: str, called: str, host: str, port: int, accepted: bool, reason: str | None
    ) -> int:
        with self.db.session() as session:
            record = AssociationRecord(
                calling_ae_title=calling[:16],
                called_ae_title=called[:16],
                peer_host=host[:255],
                peer_port=port,
                accepted=accepted,
                reason=reason,
                started_at=utcnow(),
            )
            session.add(record)
            session.flush()
            record_id = record.id
        with self._lock:
            self._open[key] = _Open(record_id)
        return record_id

    def record_id(self, key: int) -> int | None:
        with self._lock:
            entry = self._open.get(key)
            return entry.record_id if entry else None

    def count(self, key: int, *, stored: bool) -> None:
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                return
            if stored:
                entry.received += 1
            else:
                entry.failed += 1

    def closed(self, key: int) -> None:
        with self._lock:
            entry = self._open.pop(key, None)
        if entry is None:
            return
        with self.db.session() as session:
            session.execute(
                update(AssociationRecord)
                .where(AssociationRecord.id == entry.record_id)
                .values(ended_at=utcnow(), instances_received=entry.received, instances_failed=entry.failed)
            )
