"""The Comprehensive 3D SR of one analysis: a TID 1500 Measurement Report of located findings and exam statements.

Content tree (DESIGN.md "Result objects"). Every container is SEPARATE, so that text renderings (DCMTK dsr2html,
the text view many PACS offer) print each item with its concept name::

    Imaging Measurement Report (DCM 126000), language, device observer, procedure reported
      Image Library (TID 1600): the slices referenced below (or the first slice), shared descriptors once
      Imaging Measurements (DCM 126010), all but a not-analysed report
        Measurement Group (TID 1501), one per located finding (pe_node.located), in slice order:
          Tracking Identifier "Cornerstone3DTools@^0.1.0:<tool>:PE finding <n>", Tracking Unique Identifier
          Finding = Pulmonary embolism
            HAS PROPERTIES SCOORD3D: the region in patient mm in the CT's frame of reference
          Finding Site = pulmonary trunk | left | right pulmonary artery (pulmonary artery when the side is not
            determined), TID 4019 algorithm identification
          Probability (the peak slice's image probability, UCUM "1")
            INFERRED FROM SCOORD ELLIPSE | POINT (pixel column/row) SELECTED FROM the peak CT slice (and frame)
          Comment: the reader's label, "PE, right, images 48-61, p 0.96"
          First slice of finding, Last slice of finding: the CT slices of its extent (private concepts)
        or, for a negative or indeterminate exam, one Measurement Group for its most suspicious slice (not a finding):
          Tracking Identifier "Cornerstone3DTools@^0.1.0:<tool>:most suspicious slice (not a finding)", Tracking UID
          TID 4019 algorithm identification
          Probability (that slice's image probability, at most 0.5)
            INFERRED FROM SCOORD ELLIPSE | POINT SELECTED FROM that CT slice (and frame)
          Pulmonary embolism = Absent | Undetermined (the exam's evaluation, TID 1501 qualitative evaluation)
          Comment: "No PE: most suspicious slice, image 40, p 0.12 (below 0.5)"
      Qualitative Evaluations (UMLS C0034375)
        TID 4019 algorithm identification
        Pulmonary embolism (site pulmonary artery) = Present | Absent | Undetermined | Not Evaluated,
          INFERRED FROM its Probability (none when not analysed)
        not analysed: "Reason not analysed" as a code and as text
        positive exams only:
        Pulmonary embolism (site pulmonary trunk, left, right pulmonary artery) = Present | Absent, INFERRED FROM
          Probability (the RSNA-STR central / left / right labels)
        Clinical course = Acute onset | Chronic | Acute-on-chronic, INFERRED FROM the probability of chronic and of
          acute-on-chronic, each NUM qualified by the course it is the probability of
        RV/LV diameter ratio >= 1 (private) = Present | Absent, INFERRED FROM Probability

What OHIF (3.13, cornerstone-dicom-sr) needs shapes the measurement groups: every group under Imaging Measurements
has spatial coordinates selected from a CT image, or loading the SR fails; the SCOORD sits alone under the group's
first NUM (the shape dcmjs writes), so the viewer draws the 2D region on the referenced slice (see
:func:`_scoord3d`); the tracking identifier names the tool the region maps to (ELLIPSE: EllipticalROI, POINT: Probe),
so the measurements panel lists it, with the Comment as its label. OHIF's SR viewport cannot open a report without
a measurement (it reads the first one unguarded), so a negative or indeterminate exam gets one group, for the slice
the model found most suspicious (``located.SuspiciousSlice``): its region and probability, and inside the group the
exam's evaluation (Absent or Undetermined), so that a text view reads "Pulmonary embolism: Absent" beside it. It
names no Finding, no finding site and no SCOORD3D, the presentation states do not draw it and captures do not call
it a finding. A not-analysed report has no Imaging Measurements: no slice was read, so there is no region to give
(OHIF loads it and lists it, but its SR viewport cannot show it; PACS text views show it in full). Exam-level
statements have no place on an image and sit in Qualitative Evaluations. Negative and indeterminate exams state
only the exam finding there: under the RSNA-STR rules their location, course and RV/LV labels are forced to <= 0.5
and describe an embolism the model says is not there.

Tracking UIDs are derived from the source series and the finding's peak slice (the most suspicious slice), so a
superseding report tracks the same finding under the same UID.

Evidence (Current Requested Procedure Evidence Sequence) lists every slice of the series: the model read them all.
The Image Library lists only the slices the content references, which is what TID 1500 readers (OHIF) use it for:
listing all 1,100 slices of a thin series there costs ~2 s in highdicom's SR constructor (~1 ms per content item,
which is also why the tree holds at most ``located.MAX_FINDINGS`` groups). A report that references no slice
lists the first slice, so that the library is not empty and viewers can tie the SR to its series.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    ContentItem,
    ContentSequence,
    ImageContentItem,
    NumContentItem,
    RelationshipTypeValues,
    Scoord3DContentItem,
    ScoordContentItem,
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
)
from pe_node.located import Finding, Region, Shape, SuspiciousSlice, describe, describe_suspicious, patient_points
from pe_node.pipeline.series import CTSeries
from pe_node.reporting import codes as pe_codes
from pe_node.reporting.algorithm import AlgorithmInfo
from pe_node.reporting.codes import (
    COURSE_CODES,
    EVALUATIONS,
    LOCATION_LABELS,
    NOT_ANALYSED_CODES,
    SIDE_LOCATIONS,
    Evaluation,
    Location,
)
from pe_node.reporting.evidence import series_references

SERIES_DESCRIPTION = "pe-node PE analysis (SR) - PRELIMINARY"
TOOL_TAG = "Cornerstone3DTools@^0.1.0"
"""The prefix of a tracking identifier that OHIF maps to a Cornerstone3D tool."""
TOOLS = {Shape.ELLIPSE: "EllipticalROI", Shape.POINT: "Probe"}
"""The Cornerstone3D tool that draws each region shape."""
SUSPICIOUS_NAME = "most suspicious slice (not a finding)"
"""The name in the tracking identifier of a non-positive exam's most suspicious slice."""

TrackingUid = Callable[[str], str]
"""Gives the tracking UID of the finding keyed by its argument."""

_CONTAINS = RelationshipTypeValues.CONTAINS
_INFERRED_FROM = RelationshipTypeValues.INFERRED_FROM
_CONCEPT_MOD = RelationshipTypeValues.HAS_CONCEPT_MOD
_DESCRIBED_BY = ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient")
_PER_IMAGE_DESCRIPTORS = (
    codes.DCM.ImagePositionPatientX,
    codes.DCM.ImagePositionPatientY,
    codes.DCM.ImagePositionPatientZ,
)


def structured_report(
    series: CTSeries,
    outcome: Prediction | NotAnalysed,
    findings: Sequence[Finding],
    *,
    header: Dataset,
    algorithm: AlgorithmInfo,
    tracking_uid: TrackingUid,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    previous: Sequence[Dataset],
    suspicious: SuspiciousSlice | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR of ``outcome`` and its located ``findings`` on ``series``, or of a negative or indeterminate outcome
    and its ``suspicious`` slice; ``header`` is the private :func:`evidence.study_header` copy."""
    if suspicious is not None and (findings or not isinstance(outcome, Prediction)):
        raise ValueError("only a negative or indeterminate exam, which has no findings, has a most suspicious slice")
    content: list[ContentItem] = [_image_library(series, header, _library_slices(findings, suspicious))]
    if findings:
        content.append(_imaging_measurements(
            [_finding_group(series, header, finding, number, algorithm, tracking_uid)
             for number, finding in enumerate(findings, start=1)]
        ))
    elif suspicious is not None:
        result = exam_result(outcome)
        content.append(_imaging_measurements([_suspicious_group(series, suspicious, result, algorithm, tracking_uid)]))
    content.append(_qualitative_evaluations(outcome, algorithm))
    root = _root(algorithm, content)
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


def tracking_identifier(finding: Finding, number: int) -> str:
    """The tracking identifier of finding ``number`` (from 1): the OHIF tool of its region, then its name."""
    return f"{TOOL_TAG}:{TOOLS[finding.region.shape]}:PE finding {number}"


def tracking_key(series: CTSeries, finding: Finding) -> str:
    """What a finding's tracking UID is derived from: its peak slice (and frame)."""
    ref = series.slices[finding.peak]
    return f"finding {ref.sop_instance_uid} {ref.frame or ''}"


def suspicious_tracking_key(series: CTSeries, spot: SuspiciousSlice) -> str:
    """What the tracking UID of a most suspicious slice is derived from: that slice (and frame)."""
    ref = series.slices[spot.index]
    return f"most suspicious {ref.sop_instance_uid} {ref.frame or ''}"


def _root(algorithm: AlgorithmInfo, content: Sequence[ContentItem]) -> ContainerContentItem:
    """TID 1500 rows 1-4 (title, language, observer, procedure reported) holding ``content``.

    Built here rather than by highdicom's MeasurementReport, which requires Imaging Measurements.
    """
    root = ContainerContentItem(name=codes.DCM.ImagingMeasurementReport, is_content_continuous=False,
                                template_id="1500")
    root.ContentSequence = ContentSequence(
        [
            *hd.sr.LanguageOfContentItemAndDescendants(hd.sr.CodedConcept.from_code(pe_codes.ENGLISH)),
            *hd.sr.ObservationContext(observer_device_context=algorithm.observer_context()),
            CodeContentItem(name=codes.DCM.ProcedureReported, value=pe_codes.IMAGING_PROCEDURE,
                            relationship_type=_CONCEPT_MOD),
            *content,
        ]
    )
    return root


# ---------------------------------------------------------------- Imaging Measurements: located findings


def _imaging_measurements(groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations]) -> ContainerContentItem:
    container = ContainerContentItem(name=codes.DCM.ImagingMeasurements, is_content_continuous=False,
                                     relationship_type=_CONTAINS)
    container.ContentSequence = ContentSequence([item for group in groups for item in group])
    return container


def _finding_group(
    series: CTSeries, header: Dataset, finding: Finding, number: int, algorithm: AlgorithmInfo,
    tracking_uid: TrackingUid,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one located finding: the peak probability with its region, the label and the extent."""
    probability = _measurement(finding.probability)
    probability[0].ContentSequence = ContentSequence([_scoord(series, finding.peak, finding.region)])
    site = SIDE_LOCATIONS[finding.side].value if finding.side is not None else pe_codes.PULMONARY_ARTERY
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(tracking_key(series, finding)), identifier=tracking_identifier(finding, number)
        ),
        finding_type=pe_codes.PULMONARY_EMBOLISM,
        finding_sites=[hd.sr.FindingSite(site)],
        algorithm_id=algorithm.identification(),
        measurements=[probability],
    )
    container = group[0]
    container.ContinuityOfContent = "SEPARATE"
    scoord3d = _scoord3d(series, header, finding)
    if scoord3d is not None:
        (finding_item,) = [i for i in container.ContentSequence if i.name == codes.DCM.Finding]
        finding_item.ContentSequence = ContentSequence([scoord3d])
    container.ContentSequence.extend(
        [
            TextContentItem(name=pe_codes.COMMENT, value=describe(finding, series), relationship_type=_CONTAINS),
            _slice_item(series, finding.first, pe_codes.FIRST_SLICE, _CONTAINS),
            _slice_item(series, finding.last, pe_codes.LAST_SLICE, _CONTAINS),
        ]
    )
    return group


def _suspicious_group(
    series: CTSeries, spot: SuspiciousSlice, result: ExamResult, algorithm: AlgorithmInfo, tracking_uid: TrackingUid
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for the most suspicious slice of a negative or indeterminate exam: its probability with its region,
    the exam's evaluation and a label that says no PE was found (see the module docstring)."""
    probability = _measurement(spot.probability)
    probability[0].ContentSequence = ContentSequence([_scoord(series, spot.index, spot.region)])
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(suspicious_tracking_key(series, spot)),
            identifier=f"{TOOL_TAG}:{TOOLS[spot.region.shape]}:{SUSPICIOUS_NAME}",
        ),
        algorithm_id=algorithm.identification(),
        measurements=[probability],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=pe_codes.PULMONARY_EMBOLISM, value=EVALUATIONS[result].value)
        ],
    )
    container = group[0]
    container.ContinuityOfContent = "SEPARATE"
    container.ContentSequence.append(
        TextContentItem(name=pe_codes.COMMENT, value=describe_suspicious(spot, series, result),
                        relationship_type=_CONTAINS)
    )
    return group


def _scoord(series: CTSeries, index: int, region: Region) -> ScoordContentItem:
    """``region`` in pixels, selected from slice ``index``: what the probability is inferred from."""
    scoord = ScoordContentItem(name=pe_codes.IMAGE_REGION, graphic_type=region.shape.value,
                               graphic_data=np.array(region.points), relationship_type=_INFERRED_FROM)
    scoord.ContentSequence = ContentSequence(
        [_slice_item(series, index, pe_codes.SOURCE, RelationshipTypeValues.SELECTED_FROM)]
    )
    return scoord


def _scoord3d(series: CTSeries, header: Dataset, finding: Finding) -> Scoord3DContentItem | None:
    """The region in patient mm, a property of the finding; None where the geometry is not known.

    It sits under the Finding, not under the NUM next to the SCOORD: OHIF 3.13 restores a group with an SCOORD3D
    there as a 3D annotation and then draws nothing on the CT slice (tried in tests/viewer's harness).
    """
    points = patient_points(series, finding.peak, finding.region)
    if points is None or not header.get("FrameOfReferenceUID"):
        return None
    return Scoord3DContentItem(name=pe_codes.IMAGE_REGION, graphic_type=finding.region.shape.value,
                               graphic_data=points, frame_of_reference_uid=header.FrameOfReferenceUID,
                               relationship_type=RelationshipTypeValues.HAS_PROPERTIES)


def _slice_item(series: CTSeries, index: int, name: Code, relationship: RelationshipTypeValues) -> ImageContentItem:
    ref = series.slices[index]
    return ImageContentItem(name=name, referenced_sop_class_uid=ref.sop_class_uid,
                            referenced_sop_instance_uid=ref.sop_instance_uid, referenced_frame_numbers=ref.frame,
                            relationship_type=relationship)


# ---------------------------------------------------------------- Qualitative Evaluations: the exam


def _qualitative_evaluations(outcome: Prediction | NotAnalysed, algorithm: AlgorithmInfo) -> ContainerContentItem:
    container = ContainerContentItem(name=pe_codes.QUALITATIVE_EVALUATIONS, is_content_continuous=False,
                                     relationship_type=_CONTAINS)
    items: list[ContentItem] = [*algorithm.identification()]
    if isinstance(outcome, NotAnalysed):
        items += [
            _statement(pe_codes.PULMONARY_EMBOLISM, Evaluation.NOT_EVALUATED.value, site=pe_codes.PULMONARY_ARTERY),
            CodeContentItem(name=pe_codes.REASON_NOT_ANALYSED, value=NOT_ANALYSED_CODES[outcome.reason],
                            relationship_type=_CONTAINS),
            TextContentItem(name=pe_codes.REASON_NOT_ANALYSED, value=outcome.detail, relationship_type=_CONTAINS),
        ]
    else:
        result = exam_result(outcome)
        items.append(_statement(pe_codes.PULMONARY_EMBOLISM, EVALUATIONS[result].value,
                                site=pe_codes.PULMONARY_ARTERY, probabilities=[_num(exam_probability(outcome))]))
        if result is ExamResult.POSITIVE:
            items += [_location(outcome, location) for location in Location]
            items += [_course(outcome), _rv_lv(outcome)]
    container.ContentSequence = ContentSequence(items)
    return container


def _location(prediction: Prediction, location: Location) -> CodeContentItem:
    probability = prediction.exam[LOCATION_LABELS[location].value]
    return _statement(pe_codes.PULMONARY_EMBOLISM, Evaluation.of(probability > THRESHOLD).value,
                      site=location.value, probabilities=[_num(probability)])


def _course(prediction: Prediction) -> CodeContentItem:
    return _statement(
        pe_codes.CLINICAL_COURSE,
        COURSE_CODES[clinical_course(prediction.exam)],
        probabilities=[_num(prediction.exam[label.value], of_course=course) for course, label in COURSE_LABELS.items()],
    )


def _rv_lv(prediction: Prediction) -> CodeContentItem:
    probability = prediction.exam[ExamLabel.RV_LV_GTE_1.value]
    return _statement(pe_codes.RV_LV_RATIO_GTE_1, Evaluation.of(probability > THRESHOLD).value,
                      probabilities=[_num(probability)])


def _statement(
    name: Code, value: Code, *, site: Code | None = None, probabilities: Sequence[NumContentItem] = ()
) -> CodeContentItem:
    """TID 1500 row 13: ``name`` = ``value``, at ``site`` (a concept modifier of the name), inferred from
    ``probabilities``."""
    item = CodeContentItem(name=name, value=value, relationship_type=_CONTAINS)
    children: list[ContentItem] = []
    if site is not None:
        children.append(CodeContentItem(name=pe_codes.FINDING_SITE, value=site, relationship_type=_CONCEPT_MOD))
    children += probabilities
    if children:
        item.ContentSequence = ContentSequence(children)
    return item


# ---------------------------------------------------------------- probabilities


def _measurement(value: float) -> hd.sr.Measurement:
    """A Probability measurement (TID 300) of a finding group."""
    return hd.sr.Measurement(name=pe_codes.PROBABILITY, value=_checked(value), unit=pe_codes.NO_UNITS)


def _num(value: float, *, of_course: ClinicalCourse | None = None) -> NumContentItem:
    """A Probability NUM (DCM 122157, UCUM "1") that a statement is inferred from, optionally qualified by the
    clinical course it is about."""
    item = NumContentItem(name=pe_codes.PROBABILITY, value=_checked(value), unit=pe_codes.NO_UNITS,
                          relationship_type=_INFERRED_FROM)
    if of_course is not None:
        # HAS CONCEPT MOD qualifies the concept name of its parent: "Probability (of clinical course: chronic)".
        item.ContentSequence = ContentSequence(
            [CodeContentItem(name=pe_codes.CLINICAL_COURSE, value=COURSE_CODES[of_course],
                             relationship_type=_CONCEPT_MOD)]
        )
    return item


def _checked(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a probability must lie in [0, 1], got {value!r}")
    return round(float(value), 4)


# ---------------------------------------------------------------- image library


def _library_slices(findings: Sequence[Finding], suspicious: SuspiciousSlice | None) -> list[int]:
    """The slices the content references (peak, first and last of each finding, the most suspicious slice); the
    first slice when none."""
    indices = {index for f in findings for index in (f.first, f.peak, f.last)}
    if suspicious is not None:
        indices.add(suspicious.index)
    return sorted(indices) or [0]


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
    group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup, is_content_continuous=False,
                                 relationship_type=_CONTAINS)
    group.ContentSequence = ContentSequence(
        _shared_descriptors(series, header) + [_slice_item(series, i, pe_codes.SOURCE, _CONTAINS) for i in indices]
    )
    library = ContainerContentItem(name=codes.DCM.ImageLibrary, is_content_continuous=False,
                                   relationship_type=_CONTAINS)
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

