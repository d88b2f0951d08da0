"""Series completion: quiet period, routing rules, exactly one job, re-opening by late instances."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from pe_node.config import SeriesConfig
from pe_node.db import Database, Instance, Job, JobState, Series, SeriesState
from pe_node.jobs.completion import is_eligible, sweep

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
RULES = SeriesConfig(quiet_seconds=5, min_instances=3, modalities=["CT"])


def add_series(db: Database, uid: str, count: int, *, modality: str = "CT", at: dt.datetime = T0,
               sop_class: str = CT, image_type: str = "ORIGINAL\\PRIMARY\\AXIAL") -> int:
    with db.session() as session:
        series = Series(series_instance_uid=uid, study_instance_uid="1.9", modality=modality,
                        state=SeriesState.RECEIVING, first_received_at=at, last_received_at=at)
        session.add(series)
        session.flush()
        for k in range(count):
            session.add(Instance(sop_instance_uid=f"{uid}.{k}", series_id=series.id, sop_class_uid=sop_class,
                                 transfer_syntax_uid="1.2.840.10008.1.2.1", image_type=image_type, size=1,
                                 received_at=at))
        return series.id


def state(db: Database, uid: str) -> tuple[SeriesState, str | None, list[JobState]]:
    with db.session() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == uid)).one()
        return series.state, series.reason, [j.state for j in series.jobs]


def reopen(db: Database, uid: str, at: dt.datetime) -> None:
    """What the archive does when a late instance arrives."""
    with db.session() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == uid)).one()
        series.state, series.last_received_at = SeriesState.RECEIVING, at


def test_series_is_not_complete_before_the_quiet_period(db: Database) -> None:
    add_series(db, "1.1", 5)
    assert sweep(db, RULES, now=T0 + dt.timedelta(seconds=4.9)) == []
    assert state(db, "1.1") == (SeriesState.RECEIVING, None, [])


def test_quiet_series_becomes_exactly_one_queued_job(db: Database) -> None:
    add_series(db, "1.1", 5)
    jobs = sweep(db, RULES, now=T0 + dt.timedelta(seconds=5))
    assert len(jobs) == 1
    assert sweep(db, RULES, now=T0 + dt.timedelta(seconds=60)) == []
    assert state(db, "1.1") == (SeriesState.COMPLETE, None, [JobState.QUEUED])
    with db.session() as session:
        assert session.get(Job, jobs[0]).instances == 5


def test_routing_rules_ignore_with_a_reason(db: Database) -> None:
    add_series(db, "2.1", 5, modality="MR")
    add_series(db, "2.2", 2)
    add_series(db, "2.3", 5, image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    add_series(db, "2.4", 5, sop_class=SR, modality="CT")
    add_series(db, "2.5", 5, sop_class=SECONDARY_CAPTURE)
    assert sweep(db, RULES, now=T0 + dt.timedelta(seconds=10)) == []
    assert state(db, "2.1")[1] == "modality MR is not routed (series.modalities: CT)"
    for uid in ("2.2", "2.3", "2.4", "2.5"):
        series_state, reason, jobs = state(db, uid)
        assert series_state == SeriesState.IGNORED and jobs == []
        assert "fewer than series.min_instances 3" in (reason or "")


def test_localizers_do_not_count(db: Database) -> None:
    assert is_eligible(CT, "ORIGINAL\\PRIMARY\\AXIAL")
    assert not is_eligible(CT, "ORIGINAL\\PRIMARY\\LOCALIZER")
    assert not is_eligible(CT, "ORIGINAL\\PRIMARY\\SCOUT")
    assert not is_eligible(SR, None)
    assert is_eligible(CT, None)


def test_late_instance_after_the_job_ran_queues_a_new_job(db: Database) -> None:
    add_series(db, "3.1", 5)
    [first] = sweep(db, RULES, now=T0 + dt.timedelta(seconds=5))
    with db.session() as session:
        session.get(Job, first).state = JobState.DONE
    reopen(db, "3.1", T0 + dt.timedelta(seconds=100))
    assert sweep(db, RULES, now=T0 + dt.timedelta(seconds=102)) == []
    [second] = sweep(db, RULES, now=T0 + dt.timedelta(seconds=105))
    assert second != first
    assert state(db, "3.1") == (SeriesState.COMPLETE, None, [JobState.DONE, JobState.QUEUED])


def test_late_instance_while_the_job_waits_keeps_that_one_job(db: Database) -> None:
    series_id = add_series(db, "4.1", 5)
    [job_id] = sweep(db, RULES, now=T0 + dt.timedelta(seconds=5))
    with db.session() as session:
        session.add(Instance(sop_instance_uid="4.1.9", series_id=series_id, sop_class_uid=CT,
                             transfer_syntax_uid="1.2.840.10008.1.2.1", size=1, received_at=T0))
    reopen(db, "4.1", T0 + dt.timedelta(seconds=8))
    assert sweep(db, RULES, now=T0 + dt.timedelta(seconds=20)) == []
    assert state(db, "4.1") == (SeriesState.COMPLETE, None, [JobState.QUEUED])
    with db.session() as session:
        assert session.get(Job, job_id).instances == 6


def test_ignored_series_that_grows_is_routed_again(db: Database) -> None:
    series_id = add_series(db, "5.1", 2)
    sweep(db, RULES, now=T0 + dt.timedelta(seconds=5))
    assert state(db, "5.1")[0] == SeriesState.IGNORED
    with db.session() as session:
        session.add(Instance(sop_instance_uid="5.1.9", series_id=series_id, sop_class_uid=CT,
                             transfer_syntax_uid="1.2.840.10008.1.2.1", size=1, received_at=T0))
    reopen(db, "5.1", T0 + dt.timedelta(seconds=30))
    assert len(sweep(db, RULES, now=T0 + dt.timedelta(seconds=40))) == 1
    assert state(db, "5.1") == (SeriesState.COMPLETE, None, [JobState.QUEUED])
