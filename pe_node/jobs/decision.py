"""A study as its job sees it, and what the job leaves in the database when it has decided.

``read_study`` gathers the series a study's job weighs (every series of the study that is not being received, not
ignored by routing and not purged), reads the headers of their stored instances and splits them into stacks
(``pe_node.pipeline.stacks``). ``record`` writes back what was decided: each series' state and reason, the series
the job analysed, and which stacks the study's standing reports were made from (``Study.reported``), against which a
later job weighs a late series or a late instance.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pe_node import storage
from pe_node.db import Database, Instance, Job, Series, SeriesState, Study, utcnow
from pe_node.jobs.result import SeriesDecision
from pe_node.pipeline.stacks import Image, Stack, read_image, stacks_of

log = logging.getLogger(__name__)

#: The states of series a study's job weighs; a series received again meanwhile is left to the next job.
WEIGHED = (SeriesState.QUIET, SeriesState.DECIDING, SeriesState.ANALYSED, SeriesState.NOT_CHOSEN)


@dataclass(frozen=True)
class SeriesRow:
    id: int
    series_instance_uid: str
    modality: str | None


@dataclass
class StudyView:
    """The study's weighed series, their stacks, and the reports that stand for it."""

    study_id: int
    study_instance_uid: str
    series: list[SeriesRow]
    stacks: list[Stack]
    reported: list[dict[str, Any]] = field(default_factory=list)

    def standing(self, stack: Stack) -> dict[str, Any] | None:
        """The standing report made from exactly this stack (same series, stack and instances), if any."""
        for entry in self.reported:
            if (entry.get("series_instance_uid"), entry.get("stack"), entry.get("digest")) == (
                    stack.series_instance_uid, stack.key, stack.digest()):
                return entry
        return None

    def stands_unanalysed(self) -> bool:
        """Whether the study's standing report says that none of its series could be analysed."""
        return len(self.reported) == 1 and self.reported[0].get("series_instance_uid") is None

    def series_of(self, stack: Stack) -> SeriesRow:
        return next(row for row in self.series if row.series_instance_uid == stack.series_instance_uid)


def read_study(db: Database, root: Path | str, study_id: int) -> StudyView:
    """The study's weighed series and their stacks, from the database and the stored files' headers."""
    with db.session() as session:
        study = session.get(Study, study_id)
        if study is None:
            raise LookupError(f"study {study_id} is not in the database")
        rows = session.scalars(
            select(Series).where(Series.study_instance_uid == study.study_instance_uid, Series.state.in_(WEIGHED),
                                 Series.purged_at.is_(None)).order_by(Series.id)
        ).all()
        series = [SeriesRow(row.id, row.series_instance_uid, row.modality) for row in rows]
        instances = session.execute(
            select(Instance.series_id, Instance.sop_instance_uid).where(Instance.series_id.in_([s.id for s in series]))
            .order_by(Instance.id)
        ).all()
        view = StudyView(study.id, study.study_instance_uid, series, [], list(study.reported or []))
    by_series: dict[int, list[str]] = {}
    for series_id, sop_instance_uid in instances:
        by_series.setdefault(series_id, []).append(sop_instance_uid)
    for row in series:
        view.stacks.extend(_stacks(root, view.study_instance_uid, row, by_series.get(row.id, [])))
    return view


def _stacks(root: Path | str, study_uid: str, row: SeriesRow, sop_uids: Sequence[str]) -> list[Stack]:
    """The stacks of one stored series; files that are missing or unreadable make a stack of their own problems."""
    images: list[Image] = []
    problems: list[str] = []
    for sop_uid in sop_uids:
        path = storage.instance_path(root, study_uid, row.series_instance_uid, sop_uid)
        try:
            image = read_image(path)
        except FileNotFoundError:
            problems.append(f"stored file {path.name} is missing")
            continue
        except ValueError as error:
            problems.append(str(error).replace(str(root), "<storage>"))
            continue
        if image is not None:
            images.append(image)
    stacks = stacks_of(images)
    if problems:
        first = images[0] if images else None
        stacks.append(Stack(
            series_instance_uid=row.series_instance_uid, study_instance_uid=study_uid, modality=row.modality or "",
            series_number=first.series_number if first else None,
            description=first.series_description if first else "", label="unreadable",
            sop_class_uid=first.sop_class_uid if first else "", image_type=first.image_type if first else (),
            kernel="", contrast_agent="", multiframe=False, slices=[],
            problems=[f"{len(problems)} of {len(sop_uids)} instances cannot be read ({problems[0]})"],
        ))
    return stacks


def reported_entry(stack: Stack | None, job_id: int, sr_sop_instance_uid: str, sr_path: str,
                   outcome: str) -> dict[str, Any]:
    """What ``Study.reported`` keeps of one standing report (``stack`` None: the study-level "not analysed")."""
    return {
        "series_instance_uid": stack.series_instance_uid if stack is not None else None,
        "stack": stack.key if stack is not None else None,
        "digest": stack.digest() if stack is not None else None,
        "job_id": job_id,
        "sr_sop_instance_uid": sr_sop_instance_uid,
        "sr_path": sr_path,
        "outcome": outcome,
    }


def record(session: Session, view: StudyView, job_id: int, decisions: Sequence[SeriesDecision],
           reported: list[dict[str, Any]] | None, analysed_series: str | None, now: dt.datetime | None = None) -> None:
    """Write the decisions in ``session``: series states and reasons (a series received again meanwhile is left
    alone), the job's analysed series, and the study's standing reports (None: unchanged)."""
    now = now or utcnow()
    ids = {row.series_instance_uid: row.id for row in view.series}
    for decision in decisions:
        session.execute(
            update(Series)
            .where(Series.id == ids[decision.series_instance_uid], Series.state.in_(WEIGHED))
            .values(state=SeriesState(decision.state), reason=decision.reason, completed_at=now)
        )
    if analysed_series is not None:
        session.execute(update(Job).where(Job.id == job_id).values(series_id=ids[analysed_series]))
    study = session.get(Study, view.study_id)
    assert study is not None
    study.decided_at = now
    if reported is not None:
        study.reported = reported
