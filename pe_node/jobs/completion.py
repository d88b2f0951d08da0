"""Completion: series become quiet, then their study is handed to one job that decides what to analyse.

The sweep runs every ``series.sweep_seconds`` (APScheduler). A series with no new instance for
``series.quiet_seconds`` becomes QUIET. A study whose series are all quiet, and that received nothing for
``study.quiet_seconds``, is decided: each newly quiet series that routing can never analyse (its modality is not in
``series.modalities``, or it holds no image instances besides localizers: a dose report, secondary captures, a
presentation state, the node's own results coming back) becomes IGNORED with the reason and no job; if some newly
quiet series can be analysed, it becomes DECIDING and the study gets one queued job (a job already queued for the
study stays the one: it reads the study as it is when it runs). The job (``pe_node.worker``) applies the selection
rules to every stack of the study and records, per series, what it analysed and why it left the others.

A late instance puts its series back to RECEIVING (see ``Archive``), so the study is decided again once quiet; a
series that arrives after the study was reported is weighed against what was reported, by the same job.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence

from pydicom.uid import UID
from pynetdicom import sop_class
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pe_node.config import SeriesConfig, StudyConfig
from pe_node.db import Database, Instance, Job, JobState, Series, SeriesState, Study, utcnow
from pe_node.metrics import Metrics
from pe_node.pipeline.selection import LOCALIZER_TYPES

log = logging.getLogger(__name__)

#: Image storage SOP classes whose instances count towards a series (acquired images, not screenshots).
IMAGE_STORAGE_CLASSES: frozenset[str] = frozenset(
    str(uid)
    for name, uid in vars(sop_class).items()
    if name.endswith("ImageStorage") and "SecondaryCapture" not in name and isinstance(uid, str)
)


def is_eligible(sop_class_uid: str, image_type: str | None) -> bool:
    """An image instance that can be analysed: an acquired image, and not a localizer or scout."""
    if sop_class_uid not in IMAGE_STORAGE_CLASSES:
        return False
    values = {v.strip().upper() for v in (image_type or "").split("\\")}
    return not values & LOCALIZER_TYPES


def not_routed(modality: str | None, instances: Sequence[tuple[str, str | None]], rules: SeriesConfig) -> str | None:
    """Why a series can never be analysed (its modality, or no image instance but localizers), or None."""
    allowed = {m.upper() for m in rules.modalities}
    if (modality or "").upper() not in allowed:
        return f"modality {modality or 'missing'} is not routed (series.modalities: {', '.join(rules.modalities)})"
    if any(is_eligible(sop_class_uid, image_type) for sop_class_uid, image_type in instances):
        return None
    kinds = sorted({_kind(sop_class_uid, image_type) for sop_class_uid, image_type in instances})
    return f"no image to analyse: {', '.join(kinds) or 'no instances'}"


def _kind(sop_class_uid: str, image_type: str | None) -> str:
    if sop_class_uid in IMAGE_STORAGE_CLASSES:
        return "localizer"
    name = UID(sop_class_uid).name
    return name.removesuffix(" Storage").lower() if name != sop_class_uid else f"SOP class {sop_class_uid}"


def sweep(db: Database, series_rules: SeriesConfig, study_rules: StudyConfig, now: dt.datetime | None = None,
          metrics: Metrics | None = None) -> list[int]:
    """Mark quiet series, decide quiet studies; return the ids of the jobs queued."""
    now = now or utcnow()
    with db.session() as session:
        session.execute(
            update(Series)
            .where(Series.state == SeriesState.RECEIVING,
                   Series.last_received_at <= now - dt.timedelta(seconds=series_rules.quiet_seconds))
            .values(state=SeriesState.QUIET)
        )
        studies = session.scalars(
            select(Series.study_instance_uid).where(Series.state == SeriesState.QUIET).distinct()
        ).all()
    queued = []
    for study_uid in studies:
        job_id = _decide_if_quiet(db, study_uid, series_rules, study_rules, now, metrics)
        if job_id is not None:
            queued.append(job_id)
    return queued


def _decide_if_quiet(db: Database, study_uid: str, series_rules: SeriesConfig, study_rules: StudyConfig,
                     now: dt.datetime, metrics: Metrics | None) -> int | None:
    """Hand a quiet study to a job, or ignore its new series; None when it is not quiet or needs no new job."""
    with db.session() as session:
        rows = session.scalars(
            select(Series).where(Series.study_instance_uid == study_uid, Series.purged_at.is_(None))
            .with_for_update()
        ).all()
        if any(s.state == SeriesState.RECEIVING for s in rows):
            return None
        last = max(s.last_received_at for s in rows)
        if last > now - dt.timedelta(seconds=study_rules.quiet_seconds):
            return None
        fresh = [s for s in rows if s.state == SeriesState.QUIET]
        if not fresh:
            return None  # another sweep took it
        routed = []
        for series in fresh:
            reason = not_routed(series.modality, _instances(session, series), series_rules)
            series.completed_at = now
            if reason is None:
                series.state, series.reason = SeriesState.DECIDING, None
                routed.append(series)
            else:
                series.state, series.reason = SeriesState.IGNORED, reason
                log.info("series %s ignored: %s", series.series_instance_uid, reason)
            if metrics is not None:
                metrics.series.labels(routing=series.state.value).inc()
        if not routed:
            return None
        job_id = _queue(session, study_uid, routed, now)
        if metrics is not None and job_id is not None:
            metrics.observe("receive_to_complete", (now - last).total_seconds())
        return job_id


def _instances(session: Session, series: Series) -> list[tuple[str, str | None]]:
    return [(row.sop_class_uid, row.image_type) for row in session.execute(
        select(Instance.sop_class_uid, Instance.image_type).where(Instance.series_id == series.id)
    ).all()]


def _queue(session: Session, study_uid: str, routed: Iterable[Series], now: dt.datetime) -> int | None:
    """One queued job for the study: a new one, or None when one is already queued (it will read these too)."""
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        study = Study(study_instance_uid=study_uid, created_at=now)
        session.add(study)
        session.flush()
    names = ", ".join(s.series_instance_uid for s in routed)
    count = session.scalar(
        select(func.count(Instance.id)).join(Series, Series.id == Instance.series_id)
        .where(Series.study_instance_uid == study_uid, Series.purged_at.is_(None))
    ) or 0
    waiting = session.scalars(
        select(Job).where(Job.study_id == study.id, Job.state == JobState.QUEUED).limit(1)
    ).first()
    if waiting is not None:
        waiting.instances = int(count)
        log.info("study %s: series %s quiet; job %d is still queued and will weigh them", study_uid, names, waiting.id)
        return None
    job = Job(study_id=study.id, state=JobState.QUEUED, attempts=0, instances=int(count), created_at=now)
    session.add(job)
    session.flush()
    log.info("study %s quiet (series %s): job %d queued", study_uid, names, job.id)
    return job.id
