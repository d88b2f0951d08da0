"""The job queue: atomic claims, leases, heartbeats, retries and failure after max_attempts."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from pe_node.config import WorkerConfig
from pe_node.db import Database, Job, JobState, Study
from pe_node.jobs.queue import JobQueue, LeaseLost, requeue_expired

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
CONFIG = WorkerConfig(lease_seconds=60, max_attempts=2)


def add_jobs(db: Database, count: int) -> list[int]:
    ids = []
    with db.session() as session:
        for k in range(count):
            study = Study(study_instance_uid=f"1.9.{k}", created_at=T0)
            session.add(study)
            session.flush()
            job = Job(study_id=study.id, state=JobState.QUEUED, attempts=0, created_at=T0)
            session.add(job)
            session.flush()
            ids.append(job.id)
    return ids


def job(db: Database, job_id: int) -> Job:
    with db.session() as session:
        found = session.get(Job, job_id)
        assert found is not None
        return found


def test_claims_oldest_first_with_a_lease(db: Database) -> None:
    first, second = add_jobs(db, 2)
    claimed = JobQueue(db, CONFIG, "w1").claim(now=T0)
    assert claimed is not None and claimed.id == first and claimed.study_instance_uid == "1.9.0"
    row = job(db, first)
    assert (row.state, row.attempts, row.lease_owner) == (JobState.RUNNING, 1, "w1")
    assert row.lease_expires_at == T0 + dt.timedelta(seconds=60)
    assert job(db, second).state == JobState.QUEUED


def test_concurrent_workers_never_claim_the_same_job(db: Database) -> None:
    ids = add_jobs(db, 20)
    claims: dict[str, list[int]] = {}

    def work(owner: str) -> None:
        queue = JobQueue(db, CONFIG, owner)
        got = claims.setdefault(owner, [])
        while (claimed := queue.claim()) is not None:
            got.append(claimed.id)

    threads = [threading.Thread(target=work, args=(f"w{k}",)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [i for got in claims.values() for i in got]
    assert sorted(everything) == ids


def test_empty_queue_gives_none(db: Database) -> None:
    assert JobQueue(db, CONFIG, "w1").claim() is None


def test_expired_lease_returns_the_job_then_fails_it_after_max_attempts(db: Database) -> None:
    [job_id] = add_jobs(db, 1)
    queue = JobQueue(db, CONFIG, "w1")
    queue.claim(now=T0)
    assert requeue_expired(db, CONFIG, now=T0 + dt.timedelta(seconds=59)) == []
    assert requeue_expired(db, CONFIG, now=T0 + dt.timedelta(seconds=61)) == [job_id]
    assert job(db, job_id).state == JobState.QUEUED
    JobQueue(db, CONFIG, "w2").claim(now=T0 + dt.timedelta(seconds=70))
    assert requeue_expired(db, CONFIG, now=T0 + dt.timedelta(seconds=200)) == [job_id]
    failed = job(db, job_id)
    assert failed.state == JobState.FAILED and failed.attempts == 2
    assert "lease of w2 expired on attempt 2 of 2" in (failed.error or "")


def test_heartbeat_extends_the_lease_and_detects_a_takeover(db: Database) -> None:
    [job_id] = add_jobs(db, 1)
    queue = JobQueue(db, CONFIG, "w1")
    queue.claim(now=T0)
    queue.heartbeat(job_id, now=T0 + dt.timedelta(seconds=50))
    assert requeue_expired(db, CONFIG, now=T0 + dt.timedelta(seconds=100)) == []
    requeue_expired(db, CONFIG, now=T0 + dt.timedelta(seconds=111))
    JobQueue(db, CONFIG, "w2").claim(now=T0 + dt.timedelta(seconds=112))
    with pytest.raises(LeaseLost):
        queue.heartbeat(job_id)
    with pytest.raises(LeaseLost):
        queue.finish(job_id, {}, {})


def test_failure_retries_then_keeps_the_error(db: Database) -> None:
    [job_id] = add_jobs(db, 1)
    queue = JobQueue(db, CONFIG, "w1")
    queue.claim()
    assert queue.fail(job_id, "corrupt pixel data") == JobState.QUEUED
    queue.claim()
    assert queue.fail(job_id, "corrupt pixel data again") == JobState.FAILED
    failed = job(db, job_id)
    assert (failed.state, failed.error, failed.attempts) == (JobState.FAILED, "corrupt pixel data again", 2)


def test_finish_stores_result_and_timings(db: Database) -> None:
    [job_id] = add_jobs(db, 1)
    queue = JobQueue(db, CONFIG, "w1")
    queue.claim()
    queue.finish(job_id, {"pe_present": True}, {"inference": 1.5})
    done = job(db, job_id)
    assert (done.state, done.result, done.timings, done.lease_owner) == (
        JobState.DONE, {"pe_present": True}, {"inference": 1.5}, None)


def test_release_gives_the_job_back_without_using_an_attempt(db: Database) -> None:
    [job_id] = add_jobs(db, 1)
    queue = JobQueue(db, CONFIG, "w1")
    queue.claim()
    queue.release(job_id)
    released = job(db, job_id)
    assert (released.state, released.attempts, released.lease_owner) == (JobState.QUEUED, 0, None)
