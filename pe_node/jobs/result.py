"""The result of a finished job, as the worker stores it in the job row and everything else reads it.

A job decides about one study: ``decisions`` says, per series it weighed, whether it was analysed and why not;
``reports`` holds what each analysis made (one with ``study.analyse: best``; one per usable stack with ``all``; a
study with nothing usable gets one "not analysed" report). A job that found nothing new to say (a late series that
is not better than the one reported) has no reports and ``unchanged`` set.

One schema, written by the worker and read by ``pe-node status``, ``/api/status``, the status page and
``make demo`` (``JobResult.from_json``). The row holds ``to_json()``: plain JSON, so tools can read it too; the
first report's fields are repeated at the top level, where tools reading one report per job find them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pe_node.findings import (
    ExamResult,
    NotAnalysed,
    NotAnalysedReason,
    Prediction,
    exam_probability,
    exam_result,
)

UNCHANGED = "unchanged"


@dataclass(frozen=True)
class ResultObject:
    """One DICOM object a job made (SR, capture, key object selection, presentation state) and its file."""

    sop_instance_uid: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True)
class ImageScore:
    """The image probability of one slice (and frame, for a multi-frame image), in slice order."""

    sop_instance_uid: str
    pe_present_on_image: float
    frame: int | None = None


@dataclass(frozen=True)
class Report:
    """What one analysis found and made. ``outcome`` is the exam result; a "not analysed" report has
    ``reason``/``detail``, an analysed one the probabilities. ``series_instance_uid`` and ``stack`` name what was
    analysed (None for a study none of whose series could be)."""

    outcome: ExamResult
    sr_path: str
    objects: tuple[ResultObject, ...]
    series_instance_uid: str | None = None
    stack: str | None = None
    supersedes: tuple[str, ...] = ()
    model: Mapping[str, Any] | None = None
    reason: NotAnalysedReason | None = None
    detail: str | None = None
    pe_probability: float | None = None
    exam: Mapping[str, float] = field(default_factory=dict)
    images: tuple[ImageScore, ...] = ()
    attention: tuple[float, ...] = ()
    key_slices: tuple[str, ...] = ()

    @classmethod
    def of(cls, outcome: Prediction | NotAnalysed, objects: Sequence[ResultObject], sr_sop_instance_uid: str, *,
           series_instance_uid: str | None, stack: str | None, supersedes: Sequence[str],
           key_slices: Sequence[int] = (), frames: Sequence[int | None] | None = None) -> Report:
        """The report of ``outcome``; ``key_slices`` are slice indices, ``frames`` each slice's frame number."""
        sr_path = next(item.path for item in objects if item.sop_instance_uid == sr_sop_instance_uid)
        if isinstance(outcome, NotAnalysed):
            return cls(ExamResult.NOT_ANALYSED, sr_path, tuple(objects), series_instance_uid, stack,
                       tuple(supersedes), reason=outcome.reason, detail=outcome.detail)
        frames = list(frames) if frames is not None else [None] * len(outcome.sop_instance_uids)
        return cls(
            exam_result(outcome),
            sr_path,
            tuple(objects),
            series_instance_uid,
            stack,
            tuple(supersedes),
            model=outcome.model,
            pe_probability=exam_probability(outcome),
            exam={label: float(p) for label, p in outcome.exam.items()},
            images=tuple(
                ImageScore(uid, round(float(p), 5), frame)
                for uid, p, frame in zip(outcome.sop_instance_uids, np.asarray(outcome.image), frames, strict=True)
            ),
            attention=tuple(round(float(a), 6) for a in outcome.attention),
            key_slices=tuple(outcome.sop_instance_uids[i] for i in key_slices),
        )

    @property
    def positive(self) -> bool:
        return self.outcome is ExamResult.POSITIVE

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "outcome": self.outcome.value,
            "series_instance_uid": self.series_instance_uid,
            "stack": self.stack,
            "model": dict(self.model) if self.model is not None else None,
            "sr_path": self.sr_path,
            "objects": [vars(item) for item in self.objects],
            "supersedes": list(self.supersedes),
        }
        if self.outcome is ExamResult.NOT_ANALYSED:
            data["reason"] = self.reason.value if self.reason is not None else None
            data["detail"] = self.detail
            return data
        data.update(
            pe_probability=self.pe_probability,
            exam=dict(self.exam),
            images=[
                {"sop_instance_uid": image.sop_instance_uid, "pe_present_on_image": image.pe_present_on_image}
                | ({"frame": image.frame} if image.frame is not None else {})
                for image in self.images
            ],
            attention=list(self.attention),
            key_slices=list(self.key_slices),
        )
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Report:
        reason = data.get("reason")
        return cls(
            outcome=ExamResult(data["outcome"]),
            sr_path=str(data["sr_path"]),
            objects=tuple(ResultObject(**item) for item in data.get("objects", [])),
            series_instance_uid=data.get("series_instance_uid"),
            stack=data.get("stack"),
            supersedes=tuple(data.get("supersedes", [])),
            model=data.get("model"),
            reason=NotAnalysedReason(reason) if reason is not None else None,
            detail=data.get("detail"),
            pe_probability=data.get("pe_probability"),
            exam=dict(data.get("exam") or {}),
            images=tuple(ImageScore(**image) for image in data.get("images", [])),
            attention=tuple(data.get("attention", [])),
            key_slices=tuple(data.get("key_slices", [])),
        )


@dataclass(frozen=True)
class SeriesDecision:
    """What the job decided about one series of the study: ``state`` is a ``SeriesState`` value."""

    series_instance_uid: str
    state: str
    reason: str | None = None


@dataclass(frozen=True)
class JobResult:
    """What one job decided and made (see the module docstring)."""

    reports: tuple[Report, ...] = ()
    decisions: tuple[SeriesDecision, ...] = ()
    unchanged: bool = False

    @property
    def primary(self) -> Report | None:
        """The study's report: the first one (the best stack's)."""
        return self.reports[0] if self.reports else None

    @property
    def outcome(self) -> str:
        """The first report's exam result, or "unchanged"."""
        return self.primary.outcome.value if self.primary is not None else UNCHANGED

    @property
    def objects(self) -> tuple[ResultObject, ...]:
        return tuple(item for report in self.reports for item in report.objects)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = self.primary.to_json() if self.primary is not None else {"outcome": UNCHANGED}
        data["reports"] = [report.to_json() for report in self.reports]
        data["decisions"] = [vars(decision) for decision in self.decisions]
        data["unchanged"] = self.unchanged
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobResult:
        """Read a stored result (also one made before jobs decided per study); raises ValueError if it is none."""
        try:
            if "reports" not in data:  # a result of one series' analysis, stored by an earlier pe-node
                return cls(reports=(Report.from_json(data),))
            return cls(
                reports=tuple(Report.from_json(report) for report in data["reports"]),
                decisions=tuple(SeriesDecision(**decision) for decision in data.get("decisions", [])),
                unchanged=bool(data.get("unchanged", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a job result: {type(exc).__name__}: {exc}") from None
