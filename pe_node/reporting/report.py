"""The one entry point of reporting: :func:`build_report` turns an outcome on a series into DICOM result objects.

All objects go into the source study (patient and study attributes copied from the series header), each kind in
its own new series: the SR at ``series_number_base``, the captures at ``+1``, the key object selection at ``+2``,
the presentation states (one per finding) at ``+3``. The SR, the captures and the presentation states all show the
same located findings (``pe_node.located``), found once here; the SR of a negative or indeterminate exam shows its
most suspicious slice instead, which no other object calls a finding.

UIDs are derived, not random: every UID of a report is a hash of what the report is made from (the source series
and its slices, the outcome, the algorithm, the options and the reports it supersedes). A job that crashes after
building or sending its objects and runs again produces the same UIDs, so a PACS stores each object once; a report
made from different inputs (a late instance, a new model version) gets new UIDs. Tracking UIDs depend on the source
series and a finding's peak slice only, so a superseding report tracks the same findings under the same UIDs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from pe_node.findings import EXAM_LABELS, THRESHOLD, ExamResult, NotAnalysed, Prediction, exam_result
from pe_node.located import Finding, locate_findings, locate_most_suspicious, rank_slices
from pe_node.pipeline.series import CTSeries
from pe_node.reporting.algorithm import AlgorithmInfo
from pe_node.reporting.capture import secondary_capture
from pe_node.reporting.evidence import slice_header, study_header
from pe_node.reporting.kos import key_object_selection
from pe_node.reporting.presentation import presentation_state
from pe_node.reporting.sr import structured_report

MAX_SERIES_NUMBER = 2**31 - 1

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportOptions:
    """Which objects to make besides the SR (``outputs`` of config.yaml); presentation states are made only when
    there are located findings to draw, one per finding."""

    secondary_capture: bool = True
    max_images: int = 4
    captures_for_negative: bool = False
    key_object_selection: bool = False
    presentation_state: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or not 0 <= self.max_images <= 64:
            raise ValueError(f"ReportOptions.max_images must be an integer from 0 to 64, got {self.max_images!r}")


@dataclass(frozen=True)
class ReportObjects:
    """The result objects of one report."""

    sr: Dataset
    secondary_captures: tuple[Dataset, ...] = ()
    key_object_selection: Dataset | None = None
    presentation_states: tuple[Dataset, ...] = ()

    def all(self) -> list[Dataset]:
        """Every object, each before the objects that reference it: captures, presentation states, SR, key object
        selection (which references the captures)."""
        kos = [self.key_object_selection] if self.key_object_selection is not None else []
        return [*self.secondary_captures, *self.presentation_states, self.sr, *kos]


def build_report(
    series: CTSeries,
    outcome: Prediction | NotAnalysed,
    *,
    algorithm: AlgorithmInfo,
    options: ReportOptions = ReportOptions(),
    previous: Sequence[Dataset] = (),
    series_number_base: int = 9000,
) -> ReportObjects:
    """The SR, the key-slice captures, the presentation states and the key object selection (as ``options`` say) of
    ``outcome`` on ``series``.

    ``previous`` are earlier SRs of this series that this report supersedes (a re-opened series); the SR lists them
    in its Predecessor Documents Sequence. Raises ValueError when the outcome does not belong to the series.
    """
    started = time.perf_counter()
    _check_inputs(series, outcome, previous, series_number_base)
    uid = _uid_source(series, outcome, algorithm, options, previous)
    header = study_header(series)
    findings = locate_findings(outcome, series) if isinstance(outcome, Prediction) else []
    suspicious = locate_most_suspicious(outcome, series) if isinstance(outcome, Prediction) else None

    def tracking_uid(key: str) -> str:
        return generate_uid(entropy_srcs=[_joined(series.series_instance_uid, "tracking", key)])

    sr = structured_report(
        series,
        outcome,
        findings,
        header=header,
        algorithm=algorithm,
        tracking_uid=tracking_uid,
        series_instance_uid=uid("sr-series"),
        series_number=series_number_base,
        sop_instance_uid=uid("sr"),
        previous=previous,
        suspicious=suspicious,
    )
    if isinstance(outcome, NotAnalysed):
        return _logged(series, f"NOT_ANALYSED ({outcome.reason.name})", ReportObjects(sr=sr), started)
    keys = key_slices(outcome, exam_result(outcome), options)
    captures = tuple(
        secondary_capture(
            series,
            outcome,
            index,
            findings,
            header=header,
            algorithm=algorithm,
            series_instance_uid=uid("sc-series"),
            series_number=series_number_base + 1,
            sop_instance_uid=uid("sc", str(index)),
            instance_number=rank,
        )
        for rank, index in enumerate(keys if options.secondary_capture else [], start=1)
    )
    kos = None
    if options.key_object_selection and keys:
        kos = key_object_selection(
            [slice_header(series, header, index) for index in keys],
            captures,
            frames=[series.slices[index].frame for index in keys],
            algorithm=algorithm,
            series_instance_uid=uid("ko-series"),
            series_number=series_number_base + 2,
            sop_instance_uid=uid("ko"),
        )
    states = tuple(
        presentation_state(
            series,
            finding,
            number,
            len(findings),
            header=header,
            algorithm=algorithm,
            tracking_uid=tracking_uid,
            series_instance_uid=uid("pr-series"),
            series_number=series_number_base + 3,
            sop_instance_uid=uid("pr", str(finding.peak)),
        )
        for number, finding in enumerate(findings if options.presentation_state else [], start=1)
    )
    objects = ReportObjects(sr=sr, secondary_captures=captures, key_object_selection=kos, presentation_states=states)
    return _logged(series, exam_result(outcome).name, objects, started, findings)


def key_slices(prediction: Prediction, result: ExamResult, options: ReportOptions) -> list[int]:
    """The slices worth a capture, best first: ranked by attention x image probability, at most ``max_images``.

    A positive exam shows only slices with image probability above 0.5; a negative or indeterminate exam shows none
    unless ``captures_for_negative``, and then its most suspicious slices.
    """
    if result is ExamResult.POSITIVE:
        candidates = np.flatnonzero(np.asarray(prediction.image, dtype=np.float64) > THRESHOLD)
    elif options.captures_for_negative:
        candidates = None
    else:
        return []
    return rank_slices(prediction.image, prediction.attention, candidates)[: options.max_images]


def _logged(
    series: CTSeries, result: str, objects: ReportObjects, started: float, findings: Sequence[Finding] = ()
) -> ReportObjects:
    logger.info(
        "report for series %s: %s, %d located findings, SR %s, %d captures, %d presentation states, "
        "key objects %s, %.3f s",
        series.series_instance_uid,
        result,
        len(findings),
        objects.sr.SOPInstanceUID,
        len(objects.secondary_captures),
        len(objects.presentation_states),
        "yes" if objects.key_object_selection is not None else "no",
        time.perf_counter() - started,
    )
    return objects


def _check_inputs(
    series: CTSeries, outcome: Prediction | NotAnalysed, previous: Sequence[Dataset], series_number_base: int
) -> None:
    if not isinstance(outcome, (Prediction, NotAnalysed)):
        raise TypeError(f"outcome must be a Prediction or NotAnalysed, got {type(outcome).__name__}")
    if not 1 <= series_number_base <= MAX_SERIES_NUMBER - 3:
        raise ValueError(f"series_number_base must lie in 1..{MAX_SERIES_NUMBER - 3}, got {series_number_base}")
    for dataset in previous:
        if dataset.get("Modality") != "SR" or dataset.get("StudyInstanceUID") != series.study_instance_uid:
            raise ValueError(
                f"previous report {dataset.get('SOPInstanceUID')} is not an SR of study {series.study_instance_uid}"
            )
    if isinstance(outcome, Prediction):
        _check_prediction(series, outcome)


def _check_prediction(series: CTSeries, prediction: Prediction) -> None:
    if prediction.series_instance_uid != series.series_instance_uid:
        raise ValueError(
            f"prediction is for series {prediction.series_instance_uid}, not {series.series_instance_uid}"
        )
    if list(prediction.sop_instance_uids) != series.sop_instance_uids:
        raise ValueError(f"prediction slices differ from the slices of series {series.series_instance_uid}")
    for name in ("image", "attention"):
        if np.shape(getattr(prediction, name)) != (len(series),):
            raise ValueError(f"prediction.{name} has shape {np.shape(getattr(prediction, name))}, not ({len(series)},)")
    missing = [label for label in EXAM_LABELS if label not in prediction.exam]
    if missing:
        raise ValueError(f"prediction.exam lacks the labels {missing}")
    for index, cam in prediction.cams.items():
        if not 0 <= index < len(series):
            raise ValueError(f"prediction.cams has slice index {index}, the series has {len(series)} slices")
        if np.shape(cam) != series.hu.shape[1:]:
            raise ValueError(f"prediction.cams[{index}] has shape {np.shape(cam)}, the slices {series.hu.shape[1:]}")


def _uid_source(
    series: CTSeries,
    outcome: Prediction | NotAnalysed,
    algorithm: AlgorithmInfo,
    options: ReportOptions,
    previous: Sequence[Dataset],
):
    """A function of a few strings giving the UID of one object of this report (see the module docstring)."""
    digest = hashlib.sha256()
    for part in (
        series.series_instance_uid,
        *series.sop_instance_uids,
        repr(algorithm),
        repr(options),
        *(str(d.SOPInstanceUID) for d in previous),
    ):
        digest.update(part.encode() + b"\x1f")
    if isinstance(outcome, NotAnalysed):
        digest.update(repr(outcome).encode())
    else:
        digest.update(repr(sorted(outcome.exam.items())).encode())
        digest.update(np.ascontiguousarray(outcome.image, dtype=np.float64).tobytes())
        digest.update(np.ascontiguousarray(outcome.attention, dtype=np.float64).tobytes())
    seed = digest.hexdigest()
    return lambda *parts: generate_uid(entropy_srcs=[_joined(seed, *parts)])


def _joined(*parts: str) -> str:
    return "\x1f".join(parts)
