"""The worker: claims jobs, decides what to analyse in each study, analyses it, writes and queues the results.

One job is one study, start to end: claim under a lease (kept alive by a heartbeat thread); read the headers of
the study's series and split them into stacks (``pe_node.jobs.decision``); rank them with the selection rules
(``pe_node.pipeline.selection``, ``study.rules``); load the best stack, check its suitability (a stack that fails
gives way to the next), run the Predictor and build the report; write the objects to
``<storage>/results/job-<id>/``; record per series what was analysed and why the others were not; queue one
delivery per object and destination; mark the job done with its ``JobResult``. A study none of whose stacks can be
analysed gets one "not analysed" report listing each and why, never silence. A study whose standing report was made
from the stack that still ranks first, unchanged, gets nothing new: a late series that is not better is recorded
and no object goes to PACS; a better one, or a late instance of the reported stack, makes a report that supersedes
the standing one.

Every step is idempotent: report UIDs are derived from the inputs and deliveries are unique per (destination, SOP
Instance UID), so a job that runs again after a crash makes the same objects and sends each once. An error fails
the attempt with its reason (the queue retries until ``worker.max_attempts``); a stop request between phases
releases the job untouched.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from pe_node import __version__, storage
from pe_node.config import Config
from pe_node.db import Database, JobState, SeriesState
from pe_node.delivery.outbox import Outbox, enqueue
from pe_node.delivery.outgoing import Outgoing
from pe_node.findings import MAX_DETAIL, NotAnalysed, NotAnalysedReason, Prediction, exam_result
from pe_node.jobs.decision import StudyView, read_study, record, reported_entry
from pe_node.jobs.queue import ClaimedJob, JobQueue, LeaseLost, worker_id
from pe_node.jobs.result import JobResult, Report, ResultObject, SeriesDecision
from pe_node.metrics import Metrics
from pe_node.pipeline.selection import Choice, choose, explain
from pe_node.pipeline.series import CTSeries, ImageTooLarge, SeriesError, SliceRef, load_stack
from pe_node.pipeline.stacks import Stack, read_header
from pe_node.pipeline.suitability import SuitabilityRules, check_suitability
from pe_node.reporting import AlgorithmInfo, ReportObjects, ReportOptions, build_report
from pe_node.reporting.report import key_slices

log = logging.getLogger(__name__)

ALGORITHM_NAME = "pe-node PE CNN-LSTM"


class StopRequested(Exception):
    """The node is stopping: give the job back instead of finishing it."""


class Worker:
    """A thread that works the queue until stopped; also sends due deliveries between jobs."""

    def __init__(self, config: Config, db: Database, predictor: Any, metrics: Metrics | None = None,
                 owner: str | None = None) -> None:
        self.config = config
        self.db = db
        self.predictor = predictor
        self.metrics = metrics or Metrics()
        self.queue = JobQueue(db, config.worker, owner or worker_id())
        self.outbox = Outbox(db, config, self.metrics)
        self.rules = SuitabilityRules.of(config.series)
        capture = config.outputs.secondary_capture
        self.options = ReportOptions(
            secondary_capture=capture.enabled,
            max_images=capture.max_images,
            captures_for_negative=capture.for_negative,
            key_object_selection=config.outputs.key_object_selection,
            presentation_state=config.outputs.presentation_state,
        )
        info = predictor.model_info()
        self.algorithm = AlgorithmInfo(ALGORITHM_NAME, f"{__version__} weights {str(info.get('sha256') or '-')[:12]}")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: Config, db: Database, metrics: Metrics | None = None) -> Worker:
        """Load the configured checkpoint now, so a bad one stops the node at start with a clear message."""
        from pe_node.model.predictor import Predictor

        predictor = Predictor.from_checkpoint(config.model.checkpoint, device=config.model.device,
                                              batch_size=config.model.batch_size)
        log.info("model %s loaded on %s", config.model.checkpoint, predictor.device)
        return cls(config, db, predictor, metrics)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 120.0) -> None:
        """Stop after the current phase; a job in progress goes back to the queue."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("worker still busy after %.0f s; its lease will expire and the job will run again",
                            timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.outbox.deliver_due()
                job = self.queue.claim()
            except Exception:
                log.exception("worker cannot reach the database; retrying")
                self._stop.wait(self.config.worker.poll_seconds * 4)
                continue
            if job is None:
                self._stop.wait(self.config.worker.poll_seconds)
                continue
            self.run(job)

    def run(self, job: ClaimedJob) -> None:
        """Work one claimed job to its end state; never raises."""
        try:
            with self._heartbeat(job.id) as lost:
                self._process(job, lost)
            self.outbox.deliver_due()
        except StopRequested:
            self._quietly(self.queue.release, job.id)
        except LeaseLost as exc:
            log.warning("job %d abandoned: %s", job.id, exc)
        except Exception as exc:
            log.exception("job %d failed", job.id)
            self._quietly(self._fail, job.id, f"{type(exc).__name__}: {exc}")

    def _process(self, job: ClaimedJob, lost: threading.Event) -> None:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        self._checkpoint(lost)
        with _timed(timings, "decide"):
            view = read_study(self.db, self.config.storage.path, job.study_id)
            choice = choose(view.stacks, self.config.study.rules, self.config.series)
        plan = self._plan(view, choice, lost, timings)
        self._checkpoint(lost)
        with _timed(timings, "report"):
            reports, outgoing, reported = self._report(job, view, plan)
        self._checkpoint(lost)
        timings["total"] = time.perf_counter() - started
        decisions = _decisions(view, choice, plan)
        result = JobResult(tuple(reports), tuple(decisions), unchanged=not reports)
        analysed = next((a.stack.series_instance_uid for a in plan.analyses if a.stack is not None), None)
        with self.db.session() as session:  # the decisions, the deliveries and the job's end commit together
            record(session, view, job.id, decisions, reported, analysed)
            enqueue(session, job.id, outgoing, [d.name for d in self.config.destinations])
            self.queue.finish(job.id, result.to_json(), timings, session=session)
        self.metrics.observe("queue_wait", job.queued_seconds)
        for phase in ("load", "inference", "report"):
            if phase in timings:
                self.metrics.observe(phase, timings[phase])
        self.metrics.jobs_finished.labels(outcome=result.outcome).inc()
        log.info("job %d for study %s: %s in %.2f s", job.id, job.study_instance_uid,
                 ", ".join(f"{r.outcome.value} ({r.series_instance_uid or 'no series'})" for r in reports)
                 or "unchanged, the study's report stands", timings["total"])

    def _plan(self, view: StudyView, choice: Choice, lost: threading.Event, timings: dict[str, float]) -> Plan:
        """What to report: with ``study.analyse: best`` the first ranked stack that loads and passes the checks
        (nothing, when the study's standing report was made from exactly it), else one "not analysed" report for
        the study; with ``all`` every ranked stack not reported as it is."""
        plan = Plan()
        for stack in choice.ranked:
            if view.standing(stack) is not None:
                plan.kept.append(stack)
                if self.config.study.analyse == "best":
                    return plan
                continue
            self._checkpoint(lost)
            series, refusal = self._load(stack, timings)
            if refusal is None:
                plan.analyses.append(Analysis(stack, series, self._predict(series, timings)))
                if self.config.study.analyse == "best":
                    return plan
            else:
                plan.failures[stack] = refusal
                if self.config.study.analyse == "all":  # every usable stack gets its report, a refusal too
                    plan.analyses.append(Analysis(stack, series, refusal))
                log.info("study %s: %s not analysed: %s", view.study_instance_uid, stack.describe(), refusal.detail)
        if not plan.analyses and not plan.kept and not view.stands_unanalysed():
            plan.analyses.append(_nothing_usable(view, choice, plan))
        return plan

    def _load(self, stack: Stack, timings: dict[str, float]) -> tuple[CTSeries, NotAnalysed | None]:
        """The stack's volume and why the model cannot read it (None when it can)."""
        with _timed(timings, "load"):
            try:
                series = load_stack(stack, self.config.series)
            except ImageTooLarge as exc:
                return _headers_only(stack), NotAnalysed(NotAnalysedReason.IMAGE_TOO_LARGE, str(exc))
            except SeriesError as exc:
                detail = str(exc).replace(str(Path(self.config.storage.path)), "<storage>")[:MAX_DETAIL]
                return _headers_only(stack), NotAnalysed(NotAnalysedReason.UNREADABLE, detail)
        with _timed(timings, "suitability"):
            return series, check_suitability(series, self.rules)

    def _predict(self, series: CTSeries, timings: dict[str, float]) -> Prediction:
        prediction: Prediction = self.predictor.predict(series, cam_slices=self.options.max_images)
        for phase, seconds in prediction.timings.items():
            key = "inference" if phase == "total" else f"inference_{phase}"
            timings[key] = timings.get(key, 0.0) + seconds
        return prediction

    def _report(self, job: ClaimedJob, view: StudyView, plan: Plan
                ) -> tuple[list[Report], list[Outgoing], list[dict[str, Any]] | None]:
        """Build, write and describe each planned report; the study's standing reports after them (None: kept)."""
        reports: list[Report] = []
        outgoing: list[Outgoing] = []
        standing = [entry for entry in view.reported if any(view.standing(s) is entry for s in plan.kept)]
        for index, analysis in enumerate(plan.analyses):
            previous = self._superseded(view, analysis.stack, first=index == 0)
            objects = build_report(analysis.series, analysis.outcome, algorithm=self.algorithm, options=self.options,
                                   previous=previous)
            written = self._write(job, objects)
            outgoing.extend(written)
            sr_uid = str(objects.sr.SOPInstanceUID)
            report = Report.of(
                analysis.outcome,
                [ResultObject(item.sop_instance_uid, item.sop_class_uid, str(item.path)) for item in written],
                sr_uid,
                series_instance_uid=analysis.stack.series_instance_uid if analysis.stack else None,
                stack=analysis.stack.key if analysis.stack else None,
                supersedes=[str(ds.SOPInstanceUID) for ds in previous],
                key_slices=key_slices(analysis.outcome, exam_result(analysis.outcome), self.options)
                if isinstance(analysis.outcome, Prediction) else (),
                frames=[s.frame for s in analysis.series.slices] if isinstance(analysis.outcome, Prediction)
                else None,
            )
            reports.append(report)
            standing.append(reported_entry(analysis.stack, job.id, sr_uid, report.sr_path, report.outcome.value))
        return reports, outgoing, standing if reports else None

    def _superseded(self, view: StudyView, stack: Stack | None, first: bool) -> list[Dataset]:
        """The standing SRs a new report replaces: with ``best`` all of the study's; with ``all`` the one of the
        same stack, and a study-level "not analysed" one with the first new report."""
        best = self.config.study.analyse == "best"
        replaced = [
            entry for entry in view.reported
            if best or (stack is not None and (entry.get("series_instance_uid"), entry.get("stack"))
                        == (stack.series_instance_uid, stack.key))
            or (first and entry.get("series_instance_uid") is None)
        ]
        previous: list[Dataset] = []
        for entry in replaced:
            path = Path(str(entry.get("sr_path") or ""))
            if path.is_file():
                previous.append(pydicom.dcmread(path))
            else:
                log.warning("study %s: the SR of job %s is no longer stored; the new report cannot name it",
                            view.study_instance_uid, entry.get("job_id"))
        return previous

    def _write(self, job: ClaimedJob, objects: ReportObjects) -> list[Outgoing]:
        folder = storage.results_folder(self.config.storage.path, job.id)
        outgoing = []
        for ds in objects.all():
            path = storage.atomic_write(folder / f"{ds.SOPInstanceUID}.dcm", _encoded(ds))
            outgoing.append(Outgoing(path, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                     str(ds.SOPInstanceUID), str(ds.SOPClassUID)))
        return outgoing

    @contextmanager
    def _heartbeat(self, job_id: int) -> Iterator[threading.Event]:
        """Renew the lease every third of its length while the job runs; set the event if it is lost."""
        lost = threading.Event()
        done = threading.Event()
        interval = self.config.worker.lease_seconds / 3

        def beat() -> None:
            while not done.wait(interval):
                try:
                    self.queue.heartbeat(job_id)
                except LeaseLost:
                    lost.set()
                    return
                except Exception:
                    log.exception("heartbeat of job %d failed; trying again", job_id)

        thread = threading.Thread(target=beat, name=f"heartbeat-{job_id}", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            done.set()
            thread.join()

    def _checkpoint(self, lost: threading.Event) -> None:
        if lost.is_set():
            raise LeaseLost("the lease expired while the job ran")
        if self._stop.is_set():
            raise StopRequested()

    def _fail(self, job_id: int, error: str) -> None:
        if self.queue.fail(job_id, error) == JobState.FAILED:
            self.metrics.jobs_finished.labels(outcome="failed").inc()

    @staticmethod
    def _quietly(action: Any, *args: Any) -> None:
        try:
            action(*args)
        except Exception:
            log.exception("could not record the end of a job")


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - started


def _encoded(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _headers_only(stack: Stack) -> CTSeries:
    """The stack as far as its headers go, for a "not analysed" report of a stack whose pixels cannot be used."""
    header = _first_header(stack)
    slices = [SliceRef(s.sop_instance_uid, s.sop_class_uid, s.path, float(i), s.instance_number, s.frame)
              for i, s in enumerate(stack.slices)] or [SliceRef(header.SOPInstanceUID, str(header.SOPClassUID),
                                                               Path(), 0.0, None)]
    return CTSeries(
        study_instance_uid=stack.study_instance_uid,
        series_instance_uid=stack.series_instance_uid,
        slices=slices,
        hu=np.zeros((0, 0, 0), dtype=np.int16),
        pixel_spacing=(1.0, 1.0),
        slice_spacing=0.0,
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        header=header,
    )


def _first_header(stack: Stack) -> Dataset:
    """The header of the stack's first readable file, or a bare one naming its study and series."""
    for piece in stack.slices:
        try:
            return read_header(piece.path)
        except Exception:  # a damaged file: a not-analysed report must still be made
            continue
    header = Dataset()
    header.StudyInstanceUID = stack.study_instance_uid
    header.SeriesInstanceUID = stack.series_instance_uid
    header.SOPInstanceUID = generate_uid(entropy_srcs=[stack.series_instance_uid, "no readable instance"])
    header.SOPClassUID = stack.sop_class_uid or CTImageStorage
    header.Modality = stack.modality or "CT"
    return header


@dataclass
class Analysis:
    """One planned report: the stack (None: the study as a whole), its volume or headers, and the outcome."""

    stack: Stack | None
    series: CTSeries
    outcome: Prediction | NotAnalysed


@dataclass
class Plan:
    """What a job reports (``analyses``), which standing reports it keeps (``kept``), and why ranked stacks
    failed the checks after loading (``failures``)."""

    analyses: list[Analysis] = field(default_factory=list)
    kept: list[Stack] = field(default_factory=list)
    failures: dict[Stack, NotAnalysed] = field(default_factory=dict)


def _nothing_usable(view: StudyView, choice: Choice, plan: Plan) -> Analysis:
    """One "not analysed" report for a study none of whose stacks could be analysed: the one stack's own reason, or
    each stack and why."""
    failed = [(stack, plan.failures[stack]) for stack in choice.ranked if stack in plan.failures]
    why = [*choice.dropped, *failed]
    if not why:
        raise RuntimeError(f"study {view.study_instance_uid}: no stack to weigh and none analysed")
    source = min((stack for stack, _ in why), key=lambda s: (bool(choice.why(s)), -len(s.slices)))
    if len(why) == 1:
        return Analysis(None, _headers_only(source), why[0][1])
    listed = "; ".join(f"{stack.describe()}: {reason.detail}" for stack, reason in why)
    detail = f"no series of the study could be analysed: {listed}"
    if len(detail) > MAX_DETAIL:
        detail = detail[: MAX_DETAIL - 4] + " ..."
    return Analysis(None, _headers_only(source), NotAnalysed(NotAnalysedReason.NO_USABLE_SERIES, detail))


def _decisions(view: StudyView, choice: Choice, plan: Plan) -> list[SeriesDecision]:
    """Each weighed series' state and reason after the plan: analysed (a report stands from it) or not chosen."""
    analysed = [a.stack for a in plan.analyses if a.stack is not None and not isinstance(a.outcome, NotAnalysed)]
    analysed += plan.kept
    order = [*choice.ranked, *(s for s, _ in choice.dropped)]
    decisions = []
    for row in view.series:
        stacks = [s for s in order if s.series_instance_uid == row.series_instance_uid]
        if any(s in analysed for s in stacks):
            others = [s for s in stacks if s not in analysed]
            reason = "; ".join(f"stack {s.label}: {explain(s, choice, analysed, plan.failures)}" for s in others)
            decisions.append(SeriesDecision(row.series_instance_uid, SeriesState.ANALYSED.value, reason or None))
        elif stacks:
            decisions.append(SeriesDecision(row.series_instance_uid, SeriesState.NOT_CHOSEN.value,
                                            explain(stacks[0], choice, analysed, plan.failures)))
        else:
            decisions.append(SeriesDecision(row.series_instance_uid, SeriesState.NOT_CHOSEN.value,
                                            "no instances to read"))
    return decisions
