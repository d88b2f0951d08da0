"""The Comprehensive 3D SR of one analysis: TID 1500 Measurement Report with one TID 1501 group per statement.

Content tree (DESIGN.md "Result objects")::

    Imaging Measurement Report (DCM 126000), language, device observer, procedure reported
      Image Library (TID 1600): the slices referenced below (or the first slice), shared descriptors once
      Imaging Measurements
        exam:      Finding PE, site pulmonary artery, TID 4019, Probability (DCM 122157, UCUM "1"),
                   "Pulmonary embolism" = Present | Absent | Undetermined | Not Evaluated
                   (not analysed: no probability, "Reason not analysed" as a code and as text)
        positive exams only:
        location:  one group each for pulmonary trunk (central), left and right pulmonary artery,
                   Probability and Present | Absent
        course:    "Clinical course" = Acute onset | Chronic | Acute-on-chronic, with the probability of chronic
                   and of acute-on-chronic, each NUM qualified by the course it is the probability of
        RV/LV:     private finding "RV/LV diameter ratio >= 1", Probability and Present | Absent
        slices:    one group per slice with image probability > 0.5: finding, probability, source image

Negative and indeterminate exams carry only the exam group: under the RSNA-STR rules their location, course and
RV/LV labels are forced to <= 0.5 and describe an embolism the model says is not there. Every group has a
tracking identifier and a tracking UID (OHIF needs both); the UIDs are derived from the source series, so a
superseding report tracks the same findings under the same UIDs.

Evidence (Current Requested Procedure Evidence Sequence) lists every slice of the series: the model read them all.
The Image Library lists only the slices the content references, which is what TID 1500 readers (OHIF) use it for:
listing all 1,100 slices of a thin series there costs ~2 s in highdicom's SR constructor. A report that references
no slice (negative, indeterminate, not analysed) lists the first slice, so that the library is not empty and
viewers can tie the SR to its series.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import highdicom as hd
from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    ContentSequence,
    ImageContentItem,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pe_node.findings import (
    COURSE_LABELS,
    THRESHOLD,
    ClinicalCourse,
    ExamLabel,
    ExamResult,
    NotAnalysed,
    Prediction,
    clinical_course,
    exam_probability,
    exam_result,
    positive_slices,
)
from pe_node.pipeline.series import CTSeries
from pe_node.reporting import codes as pe_codes
from pe_node.reporting.algorithm import AlgorithmInfo
from pe_node.reporting.codes import (
    COURSE_CODES,
    EVALUATIONS,
    LOCATION_LABELS,
    NOT_ANALYSED_CODES,
    Evaluation,
    Location,
)
from pe_node.reporting.evidence import series_references

SERIES_DESCRIPTION = "pe-node PE analysis (SR) - PRELIMINARY"

TrackingUid = Callable[[str], str]
"""Gives the tracking UID of the group keyed by its argument."""

Group = hd.sr.MeasurementsAndQualitativeEvaluations
GroupMaker = Callable[..., Group]
"""Makes a TID 1501 group from its tracking identifier and highdicom's group arguments."""

_SOURCE = Code("260753009", "SCT", "Source")
_DESCRIBED_BY = ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient")
_PER_IMAGE_DESCRIPTORS = (
    codes.DCM.ImagePositionPatientX,
    codes.DCM.ImagePositionPatientY,
    codes.DCM.ImagePositionPatientZ,
)


def structured_report(
    series: CTSeries,
    outcome: Prediction | NotAnalysed,
    *,
    header: Dataset,
    algorithm: AlgorithmInfo,
    tracking_uid: TrackingUid,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    previous: Sequence[Dataset],
) -> hd.sr.Comprehensive3DSR:
    """The SR of ``outcome`` on ``series``; ``header`` is the private :func:`evidence.study_header` copy."""
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=algorithm.observer_context()),
        procedure_reported=pe_codes.IMAGING_PROCEDURE,
        imaging_measurements=_groups(series, outcome, algorithm, tracking_uid),
    )
    root = report[0]
    library = _image_library(series, header, _library_slices(outcome))
    root.ContentSequence.insert(len(root.ContentSequence) - 1, library)
    return hd.sr.Comprehensive3DSR(
        evidence=series_references(series, header),
        content=root,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=len(previous) + 1,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=list(previous) or None,
        contributing_equipment=[algorithm.contributing_equipment()],
        coding_schemes=[pe_codes.private_coding_scheme()] if _uses_private_scheme(root) else None,
        series_description=SERIES_DESCRIPTION,
        **algorithm.equipment_attributes(),
    )


def _groups(
    series: CTSeries, outcome: Prediction | NotAnalysed, algorithm: AlgorithmInfo, tracking_uid: TrackingUid
) -> list[Group]:
    def group(name: str, *, key: str | None = None, identified: bool = True, **content: Any) -> Group:
        """A group tracked as ``name`` (UID from ``key``, default ``name``), naming the algorithm if ``identified``."""
        return Group(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(key or name), identifier=name),
            algorithm_id=algorithm.identification() if identified else None,
            **content,
        )

    if isinstance(outcome, NotAnalysed):
        return [_not_analysed_group(group, outcome)]
    result = exam_result(outcome)
    groups = [
        group(
            "PE exam",
            finding_type=pe_codes.PULMONARY_EMBOLISM,
            finding_sites=[hd.sr.FindingSite(pe_codes.PULMONARY_ARTERY)],
            measurements=[_probability(exam_probability(outcome))],
            qualitative_evaluations=[_evaluation(pe_codes.PULMONARY_EMBOLISM, EVALUATIONS[result])],
        )
    ]
    if result is ExamResult.POSITIVE:
        groups += [_location_group(group, outcome, location) for location in Location]
        groups += [_course_group(group, outcome), _rv_lv_group(group, outcome)]
    groups += [_slice_group(group, series, outcome, index) for index in positive_slices(outcome)]
    return groups


def _not_analysed_group(group: GroupMaker, outcome: NotAnalysed) -> Group:
    """The exam group of a series that was not analysed: "Not Evaluated", the coded reason and its detail."""
    exam = group(
        "PE exam",
        finding_type=pe_codes.PULMONARY_EMBOLISM,
        finding_sites=[hd.sr.FindingSite(pe_codes.PULMONARY_ARTERY)],
        qualitative_evaluations=[
            _evaluation(pe_codes.PULMONARY_EMBOLISM, Evaluation.NOT_EVALUATED),
            hd.sr.QualitativeEvaluation(name=pe_codes.REASON_NOT_ANALYSED, value=NOT_ANALYSED_CODES[outcome.reason]),
        ],
    )
    # TID 1501 row 13: a TEXT qualitative evaluation, which highdicom's constructor does not offer.
    exam[0].ContentSequence.append(
        TextContentItem(
            name=pe_codes.REASON_NOT_ANALYSED,
            value=outcome.detail,
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    )
    return exam


def _location_group(group: GroupMaker, prediction: Prediction, location: Location) -> Group:
    probability = prediction.exam[LOCATION_LABELS[location].value]
    return group(
        f"PE {location.name.lower()}",
        finding_type=pe_codes.PULMONARY_EMBOLISM,
        finding_sites=[hd.sr.FindingSite(location.value)],
        measurements=[_probability(probability)],
        qualitative_evaluations=[_evaluation(pe_codes.PULMONARY_EMBOLISM, Evaluation.of(probability > THRESHOLD))],
    )


def _course_group(group: GroupMaker, prediction: Prediction) -> Group:
    return group(
        "PE clinical course",
        finding_type=pe_codes.PULMONARY_EMBOLISM,
        finding_sites=[hd.sr.FindingSite(pe_codes.PULMONARY_ARTERY)],
        measurements=[
            _probability(prediction.exam[label.value], of_course=course) for course, label in COURSE_LABELS.items()
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=pe_codes.CLINICAL_COURSE,
                                        value=COURSE_CODES[clinical_course(prediction.exam)])
        ],
    )


def _rv_lv_group(group: GroupMaker, prediction: Prediction) -> Group:
    probability = prediction.exam[ExamLabel.RV_LV_GTE_1.value]
    return group(
        "RV/LV ratio",
        finding_type=pe_codes.RV_LV_RATIO_GTE_1,
        measurements=[_probability(probability)],
        qualitative_evaluations=[_evaluation(pe_codes.RV_LV_RATIO_GTE_1, Evaluation.of(probability > THRESHOLD))],
    )


def _slice_group(group: GroupMaker, series: CTSeries, prediction: Prediction, index: int) -> Group:
    """Slice groups are many (tens per positive exam) and highdicom's SR constructor costs ~1 ms per content item,
    so they carry only what DESIGN asks: the finding, the image probability and the source image. Its algorithm
    is the document's device observer; its tracking UID follows the slice's SOP Instance UID."""
    ref = series.slices[index]
    return group(
        f"PE slice {index + 1} of {len(series)}",
        key=ref.sop_instance_uid,
        identified=False,
        finding_type=pe_codes.PULMONARY_EMBOLISM,
        measurements=[_probability(float(prediction.image[index]))],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=ref.sop_class_uid, referenced_sop_instance_uid=ref.sop_instance_uid
            )
        ],
    )


def _probability(value: float, *, of_course: ClinicalCourse | None = None) -> hd.sr.Measurement:
    """A Probability NUM (DCM 122157, UCUM "1"), optionally qualified by the clinical course it is about."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a probability must lie in [0, 1], got {value!r}")
    measurement = hd.sr.Measurement(name=pe_codes.PROBABILITY, value=round(float(value), 4), unit=pe_codes.NO_UNITS)
    if of_course is not None:
        # HAS CONCEPT MOD qualifies the concept name of its parent: "Probability (of clinical course: chronic)".
        measurement[0].ContentSequence = ContentSequence(
            [
                CodeContentItem(
                    name=pe_codes.CLINICAL_COURSE,
                    value=COURSE_CODES[of_course],
                    relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
                )
            ]
        )
    return measurement


def _evaluation(finding: Code, evaluation: Evaluation) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name=finding, value=evaluation.value)


def _library_slices(outcome: Prediction | NotAnalysed) -> list[int]:
    """The slices the content references; the first slice (the header's) when it references none."""
    slices = positive_slices(outcome) if isinstance(outcome, Prediction) else []
    return slices or [0]


def _uses_private_scheme(item: Dataset) -> bool:
    """Whether a code of :data:`codes.PRIVATE_SCHEME` occurs in ``item``'s subtree (so it must be declared)."""
    for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
        if any(code.CodingSchemeDesignator == pe_codes.PRIVATE_SCHEME for code in item.get(keyword, [])):
            return True
    return any(_uses_private_scheme(child) for child in item.get("ContentSequence", []))


def _image_library(series: CTSeries, header: Dataset, indices: Sequence[int]) -> ContainerContentItem:
    """TID 1600 with one Image Library Group: the slices at ``indices``, the descriptors they share given once.

    The shared descriptors (modality, frame of reference, matrix, pixel spacing, orientation, slice thickness) sit at
    group level and each slice is one IMAGE item without per-image descriptors (TID 1602 is optional per entry).
    highdicom's ImageLibrary writes 15 descriptors per image at ~14 ms each; OHIF reads only the IMAGE references.
    """
    group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS)
    group.ContentSequence = ContentSequence(
        _shared_descriptors(series, header)
        + [
            ImageContentItem(
                name=_SOURCE,
                referenced_sop_class_uid=series.slices[index].sop_class_uid,
                referenced_sop_instance_uid=series.slices[index].sop_instance_uid,
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
            for index in indices
        ]
    )
    library = ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS)
    library.ContentSequence = ContentSequence([group])
    return library


def _shared_descriptors(series: CTSeries, header: Dataset) -> list[hd.sr.ContentItem]:
    """TID 1602 descriptors common to all slices; none when the header lacks the geometry to describe them.

    A "not analysed" series may be one whose geometry is broken, and its report must still be made.
    """
    if header.get("Modality") != "CT" or any(
        header.get(keyword) in (None, "") for keyword in _DESCRIBED_BY
    ):
        return []
    drop = list(_PER_IMAGE_DESCRIPTORS)
    if header.get("SliceThickness") in (None, ""):
        # Type 2 in CT and required by highdicom: describe without it rather than invent one.
        header.SliceThickness = series.slice_spacing
        drop.append(codes.DCM.SliceThickness)
    return [item for item in hd.sr.ImageLibraryEntryDescriptors(header) if item.name not in drop]
