"""The result of a finished job, as the worker stores it in the job row and everything else reads it.

One schema, written by the worker (``JobResult.of``) and read by ``pe-node status``, ``/api/status``, the status page
and ``make demo`` (``JobResult.from_json``). The row holds ``to_json()``: plain JSON, so tools can read it too.
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
class JobResult:
    """What one job found and made. ``outcome`` is the exam result; a not-analysed job has ``reason``/``detail``,
    an analysed one the probabilities."""

    outcome: ExamResult
    sr_path: str
    objects: tuple[ResultObject, ...]
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
    def of(cls, outcome: Prediction | NotAnalysed, objects: Sequence[ResultObject], sr_sop_instance_uid: str,
           supersedes: Sequence[str], key_slices: Sequence[int] = (),
           frames: Sequence[int | None] | None = None) -> JobResult:
        """The result of ``outcome``; ``key_slices`` are slice indices, ``frames`` each slice's frame number."""
        sr_path = next(item.path for item in objects if item.sop_instance_uid == sr_sop_instance_uid)
        if isinstance(outcome, NotAnalysed):
            return cls(ExamResult.NOT_ANALYSED, sr_path, tuple(objects), tuple(supersedes), reason=outcome.reason,
                       detail=outcome.detail)
        frames = list(frames) if frames is not None else [None] * len(outcome.sop_instance_uids)
        return cls(
            exam_result(outcome),
            sr_path,
            tuple(objects),
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

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "outcome": self.outcome.value,
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
    def from_json(cls, data: Mapping[str, Any]) -> JobResult:
        """Read a stored result; raises ValueError naming what is missing or wrong."""
        try:
            reason = data.get("reason")
            return cls(
                outcome=ExamResult(data["outcome"]),
                sr_path=str(data["sr_path"]),
                objects=tuple(ResultObject(**item) for item in data.get("objects", [])),
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
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a job result: {type(exc).__name__}: {exc}") from None

    @property
    def positive(self) -> bool:
        return self.outcome is ExamResult.POSITIVE
