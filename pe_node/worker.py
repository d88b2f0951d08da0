"""The worker: claims jobs, analyses the series, writes the result objects and queues their delivery.

One job, start to end: claim under a lease (kept alive by a heartbeat thread), read the series' instances, check
suitability, run the Predictor, build the report (a "not analysed" SR when the series is unsuitable or
unreadable, never silence), write the objects to ``<storage>/results/job-<id>/``, record the whole result in the
job row, queue one delivery per object and destination, and mark the job done. Every step is idempotent: report
UIDs are derived from the inputs and deliveries are unique per (destination, SOP Instance UID), so a job that runs
again after a crash makes the same objects and sends each once. An error fails the attempt with its reason (the
queue retries until ``worker.max_attempts``); a stop request between phases releases the job untouched.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset
from sqlalchemy import select

from pe_node import __version__, storage
from pe_node.config import Config
from pe_node.db import Database, Instance, Job, JobState
from pe_node.delivery.outbox import Outbox, enqueue
from pe_node.delivery.outgoing import Outgoing
from pe_node.findings import NotAnalysed, NotAnalysedReason, Prediction, exam_result
from pe_node.jobs.completion import is_eligible
from pe_node.jobs.queue import ClaimedJob, JobQueue, LeaseLost, worker_id
from pe_node.jobs.result import JobResult, ResultObject
from pe_node.metrics import Metrics
from pe_node.pipeline.series import CTSeries, SeriesError, SliceRef, load_series
from pe_node.pipeline.suitability import SuitabilityRules, check_suitability
from pe_node.reporting import (
    AlgorithmInfo,
    ReportObjects,
    ReportOptions,
    build_report,
)
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
        self.rules = SuitabilityRules(min_slices=config.series.min_instances)
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
        with _timed(timings, "load"):
            series, refusal = self._load(job, self._slice_refs(job))
        self._checkpoint(lost)
        if refusal is None:
            with _timed(timings, "suitability"):
                refusal = check_suitability(series, self.rules)
        outcome: Prediction | NotAnalysed
        if refusal is None:
            prediction: Prediction = self.predictor.predict(series, cam_slices=self.options.max_images)
            timings.update({f"inference_{k}": v for k, v in prediction.timings.items() if k != "total"})
            timings["inference"] = prediction.timings.get("total", 0.0)
            outcome = prediction
        else:
            outcome = refusal
        self._checkpoint(lost)
        with _timed(timings, "report"):
            previous = self._previous_reports(job)
            objects = build_report(series, outcome, algorithm=self.algorithm, options=self.options,
                                   previous=previous)
            outgoing = self._write(job, objects)
        self._checkpoint(lost)
        timings["total"] = time.perf_counter() - started
        result = JobResult.of(
            outcome,
            [ResultObject(item.sop_instance_uid, item.sop_class_uid, str(item.path)) for item in outgoing],
            str(objects.sr.SOPInstanceUID),
            [str(ds.SOPInstanceUID) for ds in previous],
            key_slices(outcome, exam_result(outcome), self.options) if isinstance(outcome, Prediction) else (),
        )
        with self.db.session() as session:
            enqueue(session, job.id, outgoing, [d.name for d in self.config.destinations])
        self.queue.finish(job.id, result.to_json(), timings)
        self.metrics.observe("queue_wait", job.queued_seconds)
        for phase in ("load", "inference", "report"):
            if phase in timings:
                self.metrics.observe(phase, timings[phase])
        self.metrics.jobs_finished.labels(outcome=result.outcome.value).inc()
        log.info("job %d for series %s: %s in %.2f s", job.id, job.series_instance_uid, result.outcome.value,
                 timings["total"])

    def _slice_refs(self, job: ClaimedJob) -> list[SliceRef]:
        """The eligible instances of the series as they are now (late instances included)."""
        with self.db.session() as session:
            rows = session.execute(
                select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.image_type, Instance.instance_number)
                .where(Instance.series_id == job.series_id)
                .order_by(Instance.id)
            ).all()
        root = self.config.storage.path
        return [
            SliceRef(row.sop_instance_uid, row.sop_class_uid,
                     storage.instance_path(root, job.study_instance_uid, job.series_instance_uid, row.sop_instance_uid),
                     0.0, row.instance_number)
            for row in rows
            if is_eligible(row.sop_class_uid, row.image_type)
        ]

    def _load(self, job: ClaimedJob, refs: list[SliceRef]) -> tuple[CTSeries, NotAnalysed | None]:
        """The series in slice order with its pixels, or its headers and why its pixels cannot be used."""
        missing = [ref.path.name for ref in refs if not ref.path.is_file()]
        if missing:
            detail = f"{len(missing)} stored instance files are missing (first: {missing[0]})"
            return _headers_only(job, refs), NotAnalysed(NotAnalysedReason.UNREADABLE, detail)
        try:
            return load_series([ref.path for ref in refs]), None
        except SeriesError as exc:
            log.warning("job %d: series %s cannot be read: %s", job.id, job.series_instance_uid, exc)
            detail = str(exc).replace(str(Path(self.config.storage.path)), "<storage>")[:1024]
            return _headers_only(job, refs), NotAnalysed(NotAnalysedReason.UNREADABLE, detail)

    def _previous_reports(self, job: ClaimedJob) -> list[Dataset]:
        """The newest earlier SR of this series, which the new report supersedes."""
        with self.db.session() as session:
            rows = session.scalars(
                select(Job.result)
                .where(Job.series_id == job.series_id, Job.state == JobState.DONE, Job.id != job.id)
                .order_by(Job.id.desc())
            ).all()
        for stored in rows:
            sr = JobResult.from_json(stored).sr_path if stored else None
            if sr and Path(sr).is_file():
                return [pydicom.dcmread(sr)]
        return []

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


def _headers_only(job: ClaimedJob, refs: list[SliceRef]) -> CTSeries:
    """The series as far as its headers go, for a "not analysed" report of a series whose pixels cannot be read."""
    header: Dataset | None = None
    for ref in refs:
        try:
            header = pydicom.dcmread(ref.path, stop_before_pixels=True)
            break
        except Exception:
            continue
    if header is None:
        header = Dataset()
        header.StudyInstanceUID = job.study_instance_uid
        header.SeriesInstanceUID = job.series_instance_uid
        header.Modality = "CT"
    return CTSeries(
        study_instance_uid=job.study_instance_uid,
        series_instance_uid=job.series_instance_uid,
        slices=refs,
        hu=np.zeros((0, 0, 0), dtype=np.int16),
        pixel_spacing=(1.0, 1.0),
        slice_spacing=0.0,
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        header=header,
    )
