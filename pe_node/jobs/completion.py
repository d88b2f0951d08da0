"""Series completion: a series that has been quiet for ``series.quiet_seconds`` is routed, once.

The sweep runs every ``series.sweep_seconds`` (APScheduler). A quiet series that passes the routing rules
(modality in ``series.modalities``, at least ``series.min_instances`` image instances that are not localizers)
becomes COMPLETE with one queued job; one that does not becomes IGNORED with the reason. A late instance puts
either back to RECEIVING (see ``Archive``), so the next quiet period routes it again: a series whose job already
ran gets a new job, while a series whose job is still queued keeps that one, since it reads the instances only
when it runs.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from pynetdicom import sop_class
from sqlalchemy import select
from sqlalchemy.orm import Session

from pe_node.config import SeriesConfig
from pe_node.db import Database, Instance, Job, JobState, Series, SeriesState, utcnow
from pe_node.metrics import Metrics

log = logging.getLogger(__name__)

#: Image storage SOP classes whose instances count towards a series (acquired images, not screenshots).
IMAGE_STORAGE_CLASSES: frozenset[str] = frozenset(
    str(uid)
    for name, uid in vars(sop_class).items()
    if name.endswith("ImageStorage") and "SecondaryCapture" not in name and isinstance(uid, str)
)
LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM"})


def is_eligible(sop_class_uid: str, image_type: str | None) -> bool:
    """An image instance that can be analysed: an acquired image, and not a localizer or scout."""
    if sop_class_uid not in IMAGE_STORAGE_CLASSES:
        return False
    values = {v.strip().upper() for v in (image_type or "").split("\\")}
    return not values & LOCALIZER_TYPES


@dataclass(frozen=True)
class Routing:
    """The decision for one quiet series."""

    accepted: bool
    reason: str | None
    eligible: int


def route(series: Series, instances: Iterable[tuple[str, str | None]], rules: SeriesConfig) -> Routing:
    """Apply the routing rules to a series and its (SOP class, ImageType) pairs."""
    eligible = sum(1 for sop_class_uid, image_type in instances if is_eligible(sop_class_uid, image_type))
    allowed = {m.upper() for m in rules.modalities}
    if (series.modality or "").upper() not in allowed:
        return Routing(False, f"modality {series.modality or 'missing'} is not routed "
                              f"(series.modalities: {', '.join(rules.modalities)})", eligible)
    if eligible < rules.min_instances:
        return Routing(False, f"{eligible} image instances (localizers excluded), fewer than "
                              f"series.min_instances {rules.min_instances}", eligible)
    return Routing(True, None, eligible)


def sweep(db: Database, rules: SeriesConfig, now: dt.datetime | None = None,
          metrics: Metrics | None = None) -> list[int]:
    """Route every series quiet since ``now - quiet_seconds``; return the ids of the jobs queued."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=rules.quiet_seconds)
    queued = []
    with db.session() as session:
        candidates = session.scalars(
            select(Series)
            .where(Series.state == SeriesState.RECEIVING, Series.last_received_at <= cutoff)
            .order_by(Series.last_received_at)
            .with_for_update(skip_locked=True)
        ).all()
        for series in candidates:
            job_id = _complete(session, series, rules, now)
            if job_id is not None:
                queued.append(job_id)
            if metrics is not None:
                metrics.series.labels(routing=series.state.value).inc()
                if job_id is not None:
                    metrics.observe("receive_to_complete", (now - series.last_received_at).total_seconds())
    return queued


def _complete(session: Session, series: Series, rules: SeriesConfig, now: dt.datetime) -> int | None:
    instances = session.execute(
        select(Instance.sop_class_uid, Instance.image_type).where(Instance.series_id == series.id)
    ).all()
    decision = route(series, instances, rules)
    series.completed_at = now
    if not decision.accepted:
        series.state = SeriesState.IGNORED
        series.reason = decision.reason
        log.info("series %s ignored: %s", series.series_instance_uid, decision.reason)
        return None
    series.state = SeriesState.COMPLETE
    series.reason = None
    waiting = session.scalars(
        select(Job).where(Job.series_id == series.id, Job.state == JobState.QUEUED).limit(1)
    ).first()
    if waiting is not None:
        waiting.instances = decision.eligible
        log.info("series %s complete again with %d instances; job %d is still queued and will read them all",
                 series.series_instance_uid, decision.eligible, waiting.id)
        return None
    job = Job(series_id=series.id, state=JobState.QUEUED, attempts=0, instances=decision.eligible, created_at=now)
    session.add(job)
    session.flush()
    log.info("series %s complete with %d instances: job %d queued", series.series_instance_uid,
             decision.eligible, job.id)
    return job.id
