"""Retention: received series and their results are deleted after ``retention.days``, oldest first, and sooner
when the disk runs below the watermark.

A series is eligible once it is settled: decided (analysed, not chosen or ignored), no job of its study queued or
running, and no delivery of its study's results pending. Its instance files, the results of the jobs that analysed
it (and, with the study's last series, those of its study-level reports) and its instance rows are deleted; the
series, job and delivery rows stay as history, with ``purged_at`` set. Below
``storage.min_free_mb`` (where C-STORE would refuse), settled series are deleted oldest first, whatever their age,
until there is headroom again. A series that is still being received, analysed or delivered is never touched.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from pe_node import storage
from pe_node.config import Config
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
    utcnow,
)

log = logging.getLogger(__name__)

SETTLED = [state for state in SeriesState if state.settled]
HEADROOM = 1.1  # clean until 10 % above the watermark, so the next series does not hit it at once
BATCH = 50


@dataclass(frozen=True)
class Purged:
    series: int
    files: int
    reason: str


class Retention:
    def __init__(self, db: Database, config: Config,
                 free_bytes: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free) -> None:
        self.db = db
        self.config = config
        self.storage = Path(config.storage.path)
        self.free_bytes = free_bytes

    def run(self, now: dt.datetime | None = None) -> list[Purged]:
        """One pass: the expired series, then (if the disk is still short) the oldest settled ones."""
        now = now or utcnow()
        done = []
        cutoff = now - dt.timedelta(days=self.config.retention.days)
        expired = self._purge(self._settled(before=cutoff), now, "older than retention.days")
        if expired.series:
            done.append(expired)
        floor = self.config.storage.min_free_mb * 1024 * 1024
        if floor and self.free_bytes(self.storage) < floor:
            purged = Purged(0, 0, "disk below storage.min_free_mb")
            while self.free_bytes(self.storage) < floor * HEADROOM:
                batch = self._purge(self._settled(before=now, limit=1), now, purged.reason)
                if not batch.series:
                    log.error("disk below storage.min_free_mb and nothing settled is left to delete")
                    break
                purged = Purged(purged.series + batch.series, purged.files + batch.files, purged.reason)
            if purged.series:
                done.append(purged)
        return done

    def _settled(self, before: dt.datetime, limit: int = BATCH) -> list[int]:
        """Ids of settled, not yet purged series last received before ``before``, oldest first."""
        of_study = (Job.study_id == Study.id) & (Study.study_instance_uid == Series.study_instance_uid)
        busy_job = exists().where(of_study, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
        busy_delivery = exists().where(of_study, Delivery.job_id == Job.id, Delivery.state == DeliveryState.PENDING)
        with self.db.session() as session:
            return list(session.scalars(
                select(Series.id)
                .where(
                    Series.state.in_(SETTLED),
                    Series.purged_at.is_(None),
                    Series.last_received_at < before,
                    ~busy_job,
                    ~busy_delivery,
                )
                .order_by(Series.last_received_at)
                .limit(limit)
            ).all())

    def _purge(self, series_ids: list[int], now: dt.datetime, reason: str) -> Purged:
        files = 0
        purged = 0
        for series_id in series_ids:
            with self.db.session() as session:
                series = session.get(Series, series_id, with_for_update=True)
                if series is None or not _still_settled(session, series):
                    continue  # a late instance or a resend arrived meanwhile
                files += self._delete_files(session, series)
                session.execute(delete(Instance).where(Instance.series_id == series.id))
                series.purged_at = now
                purged += 1
                log.info("retention: deleted series %s (%s)", series.series_instance_uid, reason)
        return Purged(purged, files, reason)

    def _delete_files(self, session: Session, series: Series) -> int:
        count = 0
        folder = storage.series_folder(self.storage, series.study_instance_uid, series.series_instance_uid)
        if folder.is_dir():
            count += sum(1 for p in folder.iterdir() if p.is_file())
            shutil.rmtree(folder)
            _remove_if_empty(folder.parent)
        others = session.scalar(
            select(Series.id).where(Series.study_instance_uid == series.study_instance_uid, Series.id != series.id,
                                    Series.purged_at.is_(None)).limit(1)
        )
        analysed_it = Job.series_id == series.id
        if others is None:  # the study's last series: its study-level ("not analysed") results go with it
            study = select(Study.id).where(Study.study_instance_uid == series.study_instance_uid).scalar_subquery()
            analysed_it = analysed_it | (Job.series_id.is_(None) & (Job.study_id == study))
        for job_id in session.scalars(select(Job.id).where(analysed_it)):
            results = storage.results_folder(self.storage, job_id)
            if results.is_dir():
                count += sum(1 for p in results.iterdir() if p.is_file())
                shutil.rmtree(results)
        return count


def _still_settled(session: Session, series: Series) -> bool:
    if series.state not in SETTLED or series.purged_at is not None:
        return False
    of_study = select(Study.id).where(Study.study_instance_uid == series.study_instance_uid).scalar_subquery()
    busy = session.scalar(
        select(Job.id).where(Job.study_id == of_study, Job.state.in_([JobState.QUEUED, JobState.RUNNING])).limit(1)
    ) or session.scalar(
        select(Delivery.id).join(Job, Job.id == Delivery.job_id)
        .where(Job.study_id == of_study, Delivery.state == DeliveryState.PENDING).limit(1)
    )
    return busy is None


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
