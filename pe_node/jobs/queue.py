"""The job queue: workers claim the oldest queued job atomically, under a lease they keep alive.

A claim is one transaction: on PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED`` lets many workers claim at once
without blocking each other; on SQLite the transaction holds the write lock (BEGIN IMMEDIATE), so the select and
the update cannot interleave with another claim. The update is guarded with ``state='queued'`` either way. A
worker that dies stops renewing its lease; ``requeue_expired`` gives its job back to the queue, or fails it with
the reason once ``worker.max_attempts`` attempts have been used.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pe_node.config import WorkerConfig
from pe_node.db import Database, Job, JobState, Study, rowcount, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run a job it holds the lease of."""

    id: int
    study_id: int
    study_instance_uid: str
    attempt: int
    queued_seconds: float


def worker_id() -> str:
    """This process as a lease owner: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaseLost(RuntimeError):
    """The job's lease expired or was taken over; the worker must stop working on it."""


class JobQueue:
    def __init__(self, db: Database, config: WorkerConfig, owner: str) -> None:
        self.db = db
        self.config = config
        self.owner = owner

    def claim(self, now: dt.datetime | None = None) -> ClaimedJob | None:
        """Take the oldest queued job under a fresh lease, or None when the queue is empty."""
        now = now or utcnow()
        with self.db.session() as session:
            job = session.scalars(
                select(Job)
                .where(Job.state == JobState.QUEUED)
                .order_by(Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if job is None:
                return None
            claimed = rowcount(session.execute(
                update(Job)
                .where(Job.id == job.id, Job.state == JobState.QUEUED)
                .values(
                    state=JobState.RUNNING,
                    attempts=Job.attempts + 1,
                    lease_owner=self.owner,
                    lease_expires_at=now + dt.timedelta(seconds=self.config.lease_seconds),
                    started_at=now,
                )
                .execution_options(synchronize_session=False)
            ))
            if claimed != 1:
                return None
            session.refresh(job)
            study = session.get(Study, job.study_id)
            assert study is not None
            log.info("job %d claimed by %s (attempt %d) for study %s", job.id, self.owner, job.attempts,
                     study.study_instance_uid)
            return ClaimedJob(job.id, study.id, study.study_instance_uid, job.attempts,
                              (now - job.created_at).total_seconds())

    def heartbeat(self, job_id: int, now: dt.datetime | None = None) -> None:
        """Extend the lease; raise LeaseLost if this worker no longer holds it."""
        now = now or utcnow()
        with self.db.session() as session:
            renewed = rowcount(session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == self.owner)
                .values(lease_expires_at=now + dt.timedelta(seconds=self.config.lease_seconds))
            ))
        if renewed != 1:
            raise LeaseLost(f"job {job_id}: lease no longer held by {self.owner}")

    def finish(self, job_id: int, result: dict[str, Any] | None, timings: dict[str, float],
               now: dt.datetime | None = None, session: Session | None = None) -> None:
        """Mark the job done with its result; raise LeaseLost if the lease was lost meanwhile. Given ``session``,
        in its transaction, so that what the job leaves elsewhere commits with it or not at all."""
        self._end(job_id, JobState.DONE, now, session, result=result, timings=timings, error=None)
        log.info("job %d done", job_id)

    def fail(self, job_id: int, error: str, now: dt.datetime | None = None) -> JobState:
        """Record a failed attempt: back to the queue while attempts remain, else FAILED. Returns the new state."""
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is None or job.state != JobState.RUNNING or job.lease_owner != self.owner:
                raise LeaseLost(f"job {job_id}: lease no longer held by {self.owner}")
            attempts = job.attempts
        state = JobState.FAILED if attempts >= self.config.max_attempts else JobState.QUEUED
        self._end(job_id, state, now, error=error)
        log.warning("job %d attempt %d failed (%s): %s", job_id, attempts, state.value, error)
        return state

    def release(self, job_id: int) -> None:
        """Give a job back untouched (graceful shutdown): the attempt does not count."""
        with self.db.session() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == self.owner)
                .values(state=JobState.QUEUED, attempts=Job.attempts - 1, lease_owner=None, lease_expires_at=None)
            )
        log.info("job %d released back to the queue", job_id)

    def _end(self, job_id: int, state: JobState, now: dt.datetime | None, session: Session | None = None,
             **values: Any) -> None:
        now = now or utcnow()
        finished = now if state in (JobState.DONE, JobState.FAILED) else None
        with contextlib.nullcontext(session) if session is not None else self.db.session() as active:
            ended = rowcount(active.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == self.owner)
                .values(state=state, lease_owner=None, lease_expires_at=None, finished_at=finished, **values)
            ))
        if ended != 1:
            raise LeaseLost(f"job {job_id}: lease no longer held by {self.owner}")


def requeue_expired(db: Database, config: WorkerConfig, now: dt.datetime | None = None) -> list[int]:
    """Return jobs whose lease ran out to the queue, or fail them after ``max_attempts``; return their ids."""
    now = now or utcnow()
    touched = []
    with db.session() as session:
        expired = session.scalars(
            select(Job)
            .where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
            .with_for_update(skip_locked=True)
        ).all()
        for job in expired:
            owner = job.lease_owner
            job.lease_owner = None
            job.lease_expires_at = None
            if job.attempts >= config.max_attempts:
                job.state = JobState.FAILED
                job.finished_at = now
                job.error = (job.error + "; " if job.error else "") + (
                    f"lease of {owner} expired on attempt {job.attempts} of {config.max_attempts} (worker died?)"
                )
                log.error("job %d failed: %s", job.id, job.error)
            else:
                job.state = JobState.QUEUED
                log.warning("job %d: lease of %s expired, back in the queue", job.id, owner)
            touched.append(job.id)
    return touched
