"""Retention: settled series are deleted after retention.days, oldest first when the disk is short; busy ones never."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import func, select

from pe_node.config import load_config
from pe_node.db import (
    Database,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
    Study,
)
from pe_node.jobs.retention import Retention

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def add(db: Database, storage: Path, uid: str, *, age_days: float, state: SeriesState = SeriesState.ANALYSED,
        job: JobState | None = JobState.DONE, delivery: DeliveryState | None = DeliveryState.DONE) -> int:
    at = NOW - dt.timedelta(days=age_days)
    study_uid = f"9.{uid}"  # a study each: a busy study keeps all its series
    folder = storage / study_uid / uid
    folder.mkdir(parents=True)
    with db.session() as session:
        series = Series(series_instance_uid=uid, study_instance_uid=study_uid, state=state, first_received_at=at,
                        last_received_at=at)
        study = Study(study_instance_uid=study_uid, created_at=at)
        session.add_all([series, study])
        session.flush()
        for k in range(3):
            (folder / f"{uid}.{k}.dcm").write_bytes(b"x" * 100)
            session.add(Instance(sop_instance_uid=f"{uid}.{k}", series_id=series.id, sop_class_uid="1.2",
                                 transfer_syntax_uid="1.2.840.10008.1.2.1", size=100, received_at=at))
        if job is not None:
            row = Job(study_id=study.id, series_id=series.id, state=job, attempts=1, created_at=at)
            session.add(row)
            session.flush()
            results = storage / "results" / f"job-{row.id}"
            results.mkdir(parents=True)
            (results / "sr.dcm").write_bytes(b"sr")
            if delivery is not None:
                session.add(Delivery(job_id=row.id, destination="pacs", study_instance_uid="1.9",
                                     series_instance_uid="2.1", sop_instance_uid=f"{uid}.99", sop_class_uid="1.2",
                                     path=str(results / "sr.dcm"), state=delivery, attempts=1, created_at=at,
                                     next_attempt_at=at))
        return series.id


def purged(db: Database) -> dict[str, bool]:
    with db.session() as session:
        return {s.series_instance_uid: s.purged_at is not None for s in session.scalars(select(Series))}


def retention(db: Database, storage: Path, free=lambda p: 10**12) -> Retention:
    config = load_config(None, {"PE_NODE__STORAGE__PATH": str(storage), "PE_NODE__STORAGE__MIN_FREE_MB": "1",
                                "PE_NODE__RETENTION__DAYS": "7"})
    return Retention(db, config, free_bytes=free)


def test_settled_series_older_than_retention_are_deleted_with_their_results(db: Database, tmp_path: Path) -> None:
    add(db, tmp_path, "1.1", age_days=8)
    add(db, tmp_path, "1.2", age_days=6)
    add(db, tmp_path, "1.3", age_days=30, state=SeriesState.IGNORED, job=None)
    [done] = retention(db, tmp_path).run(now=NOW)
    assert (done.series, done.files) == (2, 3 + 1 + 3)
    assert purged(db) == {"1.1": True, "1.2": False, "1.3": True}
    assert not (tmp_path / "9.1.1" / "1.1").exists() and (tmp_path / "9.1.2" / "1.2").exists()
    assert not (tmp_path / "results" / "job-1").exists()
    with db.session() as session:
        assert session.scalar(select(func.count(Instance.id))) == 3
        assert session.scalar(select(func.count(Job.id))) == 2, "job rows stay as history"


def test_busy_series_are_never_deleted(db: Database, tmp_path: Path) -> None:
    add(db, tmp_path, "2.1", age_days=40, job=JobState.QUEUED, delivery=None)
    add(db, tmp_path, "2.2", age_days=40, job=JobState.RUNNING, delivery=None)
    add(db, tmp_path, "2.3", age_days=40, delivery=DeliveryState.PENDING)
    add(db, tmp_path, "2.4", age_days=40, state=SeriesState.RECEIVING, job=None)
    assert retention(db, tmp_path).run(now=NOW) == []
    assert not any(purged(db).values())
    assert all((tmp_path / f"9.{uid}" / uid).is_dir() for uid in ("2.1", "2.2", "2.3", "2.4"))


def test_failed_deliveries_and_failed_jobs_count_as_settled(db: Database, tmp_path: Path) -> None:
    add(db, tmp_path, "3.1", age_days=10, job=JobState.FAILED, delivery=None)
    add(db, tmp_path, "3.2", age_days=10, delivery=DeliveryState.FAILED)
    retention(db, tmp_path).run(now=NOW)
    assert purged(db) == {"3.1": True, "3.2": True}


def test_below_the_watermark_oldest_settled_series_go_first(db: Database, tmp_path: Path) -> None:
    for k, age in enumerate((1, 3, 2, 0.5)):
        add(db, tmp_path, f"4.{k}", age_days=age)
    add(db, tmp_path, "4.9", age_days=5, job=JobState.RUNNING, delivery=None)
    mb = 1024 * 1024

    def free(_: Path) -> int:  # every series deleted frees 0.6 MB; we start at 0.2 MB free, floor 1 MB
        return int(0.2 * mb + 0.6 * mb * sum(purged(db).values()))

    [done] = retention(db, tmp_path, free).run(now=NOW)
    assert done.series == 2 and done.reason == "disk below storage.min_free_mb"
    assert purged(db) == {"4.0": False, "4.1": True, "4.2": True, "4.3": False, "4.9": False}
