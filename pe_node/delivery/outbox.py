"""The outbox: one delivery row per result object and destination, sent with retries and exponential backoff.

A due row is claimed by pushing its next attempt past a claim period (so a second worker leaves it alone), sent
with the rest of its destination's batch, and then marked DONE, or rescheduled after
``initial_backoff_seconds * 2**(attempts - 1)`` (capped at ``max_backoff_seconds``), or FAILED with its last
error once ``give_up_after_hours`` have passed since it was queued. Nothing is dropped silently: every state and
error shows in ``pe-node status``, and ``pe-node resend JOB`` queues a job's objects again.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pe_node.config import Config
from pe_node.db import Database, Delivery, DeliveryState, rowcount, utcnow
from pe_node.delivery.destinations import sender_for
from pe_node.delivery.outgoing import Outgoing
from pe_node.metrics import Metrics

log = logging.getLogger(__name__)

CLAIM_SECONDS = 300
BATCH_SIZE = 200


def enqueue(session: Session, job_id: int, objects: Sequence[Outgoing], destinations: Sequence[str],
            now: dt.datetime | None = None) -> None:
    """Queue every object for every destination; an (object, destination) already queued is left as it is."""
    now = now or utcnow()
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    rows = [
        dict(job_id=job_id, destination=name, study_instance_uid=item.study_instance_uid,
             series_instance_uid=item.series_instance_uid, sop_instance_uid=item.sop_instance_uid,
             sop_class_uid=item.sop_class_uid, path=str(item.path), state=DeliveryState.PENDING, attempts=0,
             created_at=now, next_attempt_at=now)
        for item in objects
        for name in destinations
    ]
    if rows:
        session.execute(insert(Delivery).values(rows).on_conflict_do_nothing(
            index_elements=["destination", "sop_instance_uid"]))


class Outbox:
    """Sends due deliveries; safe to run in several workers at once."""

    def __init__(self, db: Database, config: Config, metrics: Metrics | None = None) -> None:
        self.db = db
        self.config = config
        self.metrics = metrics or Metrics()
        self.destinations = {d.name: d for d in config.destinations}

    def deliver_due(self, now: dt.datetime | None = None) -> int:
        """Send everything due now; the number of objects delivered."""
        delivered = 0
        while True:
            claimed = self._claim(now or utcnow())
            if not claimed:
                return delivered
            for name, rows in _by_destination(claimed).items():
                delivered += self._send(name, rows, now)
            if len(claimed) < BATCH_SIZE:
                return delivered

    def _claim(self, now: dt.datetime) -> list[Delivery]:
        with self.db.session() as session:
            rows = session.scalars(
                select(Delivery)
                .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
                .order_by(Delivery.id)
                .limit(BATCH_SIZE)
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                row.next_attempt_at = now + dt.timedelta(seconds=CLAIM_SECONDS)
            session.expunge_all()
            return list(rows)

    def _send(self, name: str, rows: list[Delivery], now: dt.datetime | None) -> int:
        destination = self.destinations.get(name)
        if destination is None:
            errors: list[str | None] = [f"destination {name!r} is no longer configured"] * len(rows)
            give_up = True
        else:
            batch = [_outgoing(row) for row in rows]
            try:
                errors = sender_for(destination)(destination, batch, self.config.node.ae_title)
            except Exception as exc:  # a sender bug must not stop the outbox; the rows keep the reason
                log.exception("sending to %s failed", name)
                errors = [f"{type(exc).__name__}: {exc}"] * len(rows)
            give_up = False
        self._record(rows, errors, now or utcnow(), give_up)
        done = sum(error is None for error in errors)
        if done:
            log.info("delivered %d objects to %s", done, name)
        return done

    def _record(self, rows: list[Delivery], errors: list[str | None], now: dt.datetime, give_up: bool) -> None:
        policy = self.config.delivery
        with self.db.session() as session:
            for row, error in zip(rows, errors):
                if error is None:
                    values = dict(state=DeliveryState.DONE, delivered_at=now, error=None, attempts=row.attempts + 1)
                    self.metrics.deliveries.labels(result="delivered").inc()
                    self.metrics.observe("delivery", (now - row.created_at).total_seconds())
                else:
                    attempts = row.attempts + 1
                    expired = now - row.created_at >= dt.timedelta(hours=policy.give_up_after_hours)
                    delay = min(policy.initial_backoff_seconds * 2 ** (attempts - 1), policy.max_backoff_seconds)
                    values = dict(attempts=attempts, error=error, next_attempt_at=now + dt.timedelta(seconds=delay))
                    self.metrics.deliveries.labels(result="failed" if give_up or expired else "retry").inc()
                    if give_up or expired:
                        values["state"] = DeliveryState.FAILED
                        log.error("delivery of %s to %s failed for good: %s", row.sop_instance_uid,
                                  row.destination, error)
                    else:
                        log.warning("delivery of %s to %s failed (attempt %d, next in %.0f s): %s",
                                    row.sop_instance_uid, row.destination, attempts, delay, error)
                session.execute(update(Delivery).where(Delivery.id == row.id).values(**values))


def _by_destination(rows: list[Delivery]) -> dict[str, list[Delivery]]:
    grouped: dict[str, list[Delivery]] = {}
    for row in rows:
        grouped.setdefault(row.destination, []).append(row)
    return grouped


def _outgoing(row: Delivery) -> Outgoing:
    return Outgoing(Path(row.path), row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid,
                    row.sop_class_uid)


def resend_job(db: Database, job_id: int, now: dt.datetime | None = None) -> int:
    """Queue all of a job's deliveries again, whatever their state; the number queued."""
    now = now or utcnow()
    with db.session() as session:
        count = rowcount(session.execute(
            update(Delivery)
            .where(Delivery.job_id == job_id)
            .values(state=DeliveryState.PENDING, attempts=0, error=None, next_attempt_at=now, created_at=now,
                    delivered_at=None)
        ))
    if not count:
        raise LookupError(f"job {job_id} has no result objects to deliver")
    return int(count)
