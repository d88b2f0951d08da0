"""Completion: series become quiet, a quiet study gets exactly one job, routing ignores what can never be analysed."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from pe_node.config import SeriesConfig, StudyConfig
from pe_node.db import Database, Instance, Job, JobState, Series, SeriesState, Study
from pe_node.jobs.completion import is_eligible, sweep

CT = "1.2.840.10008.5.1.4.1.1.2"
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
SERIES = SeriesConfig(quiet_seconds=5, min_instances=3, modalities=["CT"])
STUDY = StudyConfig(quiet_seconds=8)


def add_series(db: Database, uid: str, count: int, *, study: str = "1.9", modality: str = "CT", at: dt.datetime = T0,
               sop_class: str = CT, image_type: str = "ORIGINAL\\PRIMARY\\AXIAL") -> int:
    with db.session() as session:
        series = Series(series_instance_uid=uid, study_instance_uid=study, modality=modality,
                        state=SeriesState.RECEIVING, first_received_at=at, last_received_at=at)
        session.add(series)
        session.flush()
        for k in range(count):
            session.add(Instance(sop_instance_uid=f"{uid}.{k}", series_id=series.id, sop_class_uid=sop_class,
                                 transfer_syntax_uid="1.2.840.10008.1.2.1", image_type=image_type, size=1,
                                 received_at=at))
        return series.id


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def run(db: Database, seconds: float) -> list[int]:
    return sweep(db, SERIES, STUDY, now=at(seconds))


def state(db: Database, uid: str) -> tuple[SeriesState, str | None]:
    with db.session() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == uid)).one()
        return series.state, series.reason


def jobs(db: Database, study: str = "1.9") -> list[JobState]:
    with db.session() as session:
        return list(session.scalars(
            select(Job.state).join(Study, Study.id == Job.study_id).where(Study.study_instance_uid == study)
            .order_by(Job.id)
        ))


def reopen(db: Database, uid: str, seconds: float) -> None:
    """What the archive does when a late instance arrives."""
    with db.session() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == uid)).one()
        series.state, series.last_received_at = SeriesState.RECEIVING, at(seconds)


def test_a_series_is_quiet_after_series_quiet_seconds_and_its_study_after_study_quiet_seconds(db: Database) -> None:
    add_series(db, "1.1", 5)
    assert run(db, 4.9) == [] and state(db, "1.1") == (SeriesState.RECEIVING, None)
    assert run(db, 5) == [] and state(db, "1.1") == (SeriesState.QUIET, None)
    assert run(db, 7.9) == [] and jobs(db) == []
    assert len(run(db, 8)) == 1
    assert state(db, "1.1") == (SeriesState.DECIDING, None) and jobs(db) == [JobState.QUEUED]
    assert run(db, 60) == [] and jobs(db) == [JobState.QUEUED]


def test_a_whole_study_gets_one_job_however_many_series(db: Database) -> None:
    for k in range(4):
        add_series(db, f"2.{k}", 5 + k, at=at(k))
    assert run(db, 9) == []  # the last series arrived at 3 s: the study is quiet at 11 s
    [job_id] = run(db, 11)
    assert all(state(db, f"2.{k}")[0] == SeriesState.DECIDING for k in range(4))
    with db.session() as session:
        assert session.get(Job, job_id).instances == 5 + 6 + 7 + 8


def test_a_series_still_arriving_holds_back_its_study(db: Database) -> None:
    add_series(db, "3.1", 5)
    add_series(db, "3.2", 5, at=at(20))
    assert run(db, 10) == [] and state(db, "3.1")[0] == SeriesState.QUIET
    assert state(db, "3.2")[0] == SeriesState.RECEIVING
    assert len(run(db, 28)) == 1


def test_routing_ignores_what_can_never_be_analysed_with_a_reason(db: Database) -> None:
    add_series(db, "4.1", 5, modality="MR")
    add_series(db, "4.2", 1, modality="SR", sop_class=DOSE_SR)
    add_series(db, "4.3", 2, image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    add_series(db, "4.4", 3, modality="OT", sop_class=SECONDARY_CAPTURE)
    assert run(db, 5) == [] and run(db, 10) == []
    assert jobs(db) == []
    assert state(db, "4.1") == (SeriesState.IGNORED, "modality MR is not routed (series.modalities: CT)")
    assert state(db, "4.2") == (SeriesState.IGNORED, "modality SR is not routed (series.modalities: CT)")
    assert state(db, "4.3") == (SeriesState.IGNORED, "no image to analyse: localizer")
    assert state(db, "4.4")[0] == SeriesState.IGNORED


def test_a_ct_series_of_dose_reports_is_ignored_and_the_images_go_to_the_job(db: Database) -> None:
    add_series(db, "5.1", 40)
    add_series(db, "5.2", 1, sop_class=DOSE_SR)
    assert len(run(db, 10)) == 1
    assert state(db, "5.1") == (SeriesState.DECIDING, None)
    assert state(db, "5.2") == (SeriesState.IGNORED, "no image to analyse: x-ray radiation dose sr")


def test_a_late_series_after_the_job_ran_queues_a_new_job(db: Database) -> None:
    add_series(db, "6.1", 5)
    [first] = run(db, 10)
    with db.session() as session:
        session.get(Job, first).state = JobState.DONE
    add_series(db, "6.2", 5, at=at(100))
    assert run(db, 105) == []
    [second] = run(db, 108)
    assert second != first and jobs(db) == [JobState.DONE, JobState.QUEUED]
    assert state(db, "6.2")[0] == SeriesState.DECIDING
    assert state(db, "6.1")[0] == SeriesState.DECIDING  # the job left it as it was; the new one weighs both


def test_a_late_instance_while_the_job_waits_keeps_that_one_job(db: Database) -> None:
    series_id = add_series(db, "7.1", 5)
    [job_id] = run(db, 10)
    with db.session() as session:
        session.add(Instance(sop_instance_uid="7.1.9", series_id=series_id, sop_class_uid=CT,
                             transfer_syntax_uid="1.2.840.10008.1.2.1", size=1, received_at=at(12)))
    reopen(db, "7.1", 12)
    assert run(db, 30) == []
    assert jobs(db) == [JobState.QUEUED] and state(db, "7.1")[0] == SeriesState.DECIDING
    with db.session() as session:
        assert session.get(Job, job_id).instances == 6, "the queued job counts the late instance too"


def test_the_nodes_own_results_coming_back_start_no_job(db: Database) -> None:
    add_series(db, "8.1", 40)
    [first] = run(db, 10)
    with db.session() as session:
        session.get(Job, first).state = JobState.DONE
    add_series(db, "8.2", 1, modality="SR", sop_class="1.2.840.10008.5.1.4.1.1.88.34", at=at(50))
    assert run(db, 70) == []
    assert jobs(db) == [JobState.DONE] and state(db, "8.2")[0] == SeriesState.IGNORED


def test_localizers_do_not_count(db: Database) -> None:
    assert is_eligible(CT, "ORIGINAL\\PRIMARY\\AXIAL")
    assert not is_eligible(CT, "ORIGINAL\\PRIMARY\\LOCALIZER")
    assert not is_eligible(CT, "ORIGINAL\\PRIMARY\\SCOUT")
    assert not is_eligible(DOSE_SR, None)
    assert is_eligible(CT, None)
