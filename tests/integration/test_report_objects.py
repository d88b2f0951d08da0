"""The result objects of pe-node, built from a synthetic CT series, written, validated and read back.

Validation uses the real tools of DESIGN.md: ``dciodvfy`` (dicom3tools) on every object, ``dsrdump`` and
``dsr2html`` (DCMTK) on the documents; highdicom reads each SR back. The series is 40 axial slices of 128 x 128 pixels
made in memory; one variant holds its slices as the frames of one multi-frame (Enhanced CT) image.
"""

from __future__ import annotations

import copy
import functools
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from pe_node.findings import EXAM_LABELS, ClinicalCourse, ExamLabel, NotAnalysed, NotAnalysedReason, Prediction
from pe_node.located import rank_slices
from pe_node.model.preprocess import PE_WINDOW
from pe_node.pipeline.series import CTSeries, SliceRef, load_series
from pe_node.reporting import (
    AlgorithmInfo,
    ReportObjects,
    ReportOptions,
    build_report,
    codes,
)
from pe_node.reporting.overlay import blend, window
from pe_node.reporting.sr import SUSPICIOUS_NAME, TOOL_TAG

ALGORITHM = AlgorithmInfo(name="pe-node PE CNN-LSTM", version="1.4.2")
SLICES, SIZE = 40, 128
POSITIVE = range(10, 16)  # slices with PE in the positive prediction: one finding, its peak slice 12
PEAK = 12
SUSPICIOUS = 16  # the most suspicious slice of the negative and indeterminate predictions (image x attention)
VESSEL = (int(SIZE * 0.45), int(SIZE * 0.55))  # row, column of the contrast-filled artery and the attention peak
ReadSR = Callable[[str], hd.sr.Comprehensive3DSR]
ALL_OBJECTS = ReportOptions(secondary_capture=True, max_images=4, key_object_selection=True)


# ---------------------------------------------------------------- synthetic inputs


def ct_series(slices: int = SLICES, size: int = SIZE) -> CTSeries:
    """An axial CTPA-like series: an elliptic body, an artery full of contrast, a plausible CT header."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    uids = [generate_uid() for _ in range(slices)]
    header = Dataset()
    header.SpecificCharacterSet = "ISO_IR 100"
    header.SOPClassUID = CTImageStorage
    header.SOPInstanceUID = uids[0]
    header.StudyInstanceUID, header.SeriesInstanceUID, header.FrameOfReferenceUID = study, series, frame
    header.PatientName, header.PatientID = "Doe^Jane", "PE0001"
    header.PatientBirthDate, header.PatientSex, header.PatientAge = "19600101", "F", "065Y"
    header.StudyDate, header.StudyTime, header.StudyID = "20250102", "101500", "S1"
    header.AccessionNumber, header.ReferringPhysicianName = "ACC123", "Who^Doctor"
    header.StudyDescription = "CT PULMONARY ANGIOGRAM"
    header.Modality, header.SeriesNumber, header.SeriesDescription = "CT", 3, "CTPA 2.5 mm"
    header.Manufacturer, header.ManufacturerModelName, header.SoftwareVersions = "ACME", "Scanner 9000", "1.0"
    header.InstitutionName, header.BodyPartExamined = "General Hospital", "CHEST"
    header.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    header.InstanceNumber = 1
    header.Rows = header.Columns = size
    header.PixelSpacing = [0.75, 0.75]
    header.SliceThickness = 2.5
    header.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    header.ImagePositionPatient = [-48.0, -48.0, 0.0]
    header.SamplesPerPixel, header.PhotometricInterpretation = 1, "MONOCHROME2"
    header.BitsAllocated, header.BitsStored, header.HighBit, header.PixelRepresentation = 16, 16, 15, 1
    header.RescaleIntercept, header.RescaleSlope = -1024, 1
    refs = [SliceRef(uid, CTImageStorage, Path(f"{uid}.dcm"), i * 2.5, i + 1) for i, uid in enumerate(uids)]
    rows, cols = np.mgrid[:size, :size]
    body = ((cols - size / 2) / (size * 0.45)) ** 2 + ((rows - size / 2) / (size * 0.35)) ** 2 < 1
    artery = (rows - VESSEL[0]) ** 2 + (cols - VESSEL[1]) ** 2 < (size * 0.06) ** 2
    plane = np.where(artery, 350, np.where(body, 40, -1000)).astype(np.int16)
    hu = np.repeat(plane[None], slices, axis=0)
    return CTSeries(study, series, refs, hu, (0.75, 0.75), 2.5, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), header)


def cam(size: int = SIZE) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    return np.exp(-((rows - VESSEL[0]) ** 2 + (cols - VESSEL[1]) ** 2) / (2 * (size * 0.08) ** 2))


def predict(series: CTSeries, kind: str) -> Prediction:
    """A label-consistent prediction: ``positive`` (central + right, chronic, RV/LV >= 1), ``negative`` or
    ``indeterminate``. Slice 13 of the positive one has no attention map; a non-positive one has a map of its most
    suspicious slice (``SUSPICIOUS``), as the predictor makes it."""
    rng = np.random.default_rng(7)
    image = rng.uniform(0.01, 0.3, len(series))
    attention = rng.uniform(0.5, 1.0, len(series))
    exam = dict.fromkeys(EXAM_LABELS, 0.05)
    cams = {}
    if kind == "positive":
        image[list(POSITIVE)] = [0.6, 0.8, 0.97, 0.9, 0.7, 0.55]
        attention[list(POSITIVE)] *= 5
        exam |= {
            ExamLabel.CENTRAL.value: 0.81,
            ExamLabel.RIGHT.value: 0.92,
            ExamLabel.LEFT.value: 0.2,
            ExamLabel.CHRONIC.value: 0.7,
            ExamLabel.ACUTE_AND_CHRONIC.value: 0.1,
            ExamLabel.RV_LV_GTE_1.value: 0.75,
            ExamLabel.RV_LV_LT_1.value: 0.25,
        }
        cams = {i: cam() for i in POSITIVE if i != 13}
    else:
        exam[ExamLabel.NEGATIVE.value if kind == "negative" else ExamLabel.INDETERMINATE.value] = 0.9
        cams = {rank_slices(image, attention)[0]: cam(series.hu.shape[1])}
    return Prediction(
        series.series_instance_uid, series.sop_instance_uids, exam, image, attention / attention.sum(), cams
    )


# ---------------------------------------------------------------- helpers


def write(dataset: Dataset, folder: Path) -> Path:
    path = folder / f"{dataset.Modality}_{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's Error and Warning lines for ``path``."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(("Error", "Warning"))]




def groups(sr: hd.sr.Comprehensive3DSR) -> dict[str, hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The located-finding groups under Imaging Measurements, by tracking identifier."""
    return {group.tracking_identifier: group for group in sr.content.get_image_measurement_groups()}


def children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def is_concept(item: Dataset, code: Code) -> bool:
    name = item.ConceptNameCodeSequence[0]
    return (name.CodeValue, name.CodingSchemeDesignator) == (code.value, code.scheme_designator)


def value(item: Dataset) -> str:
    """The meaning of a CODE item's value."""
    return item.ConceptCodeSequence[0].CodeMeaning


def containers(sr: Dataset, code: Code) -> list[Dataset]:
    return [item for item in sr.ContentSequence if is_concept(item, code)]


def statements(sr: Dataset) -> dict[tuple[str, str | None], Dataset]:
    """The CODE statements under Qualitative Evaluations, by (concept name, finding site or None)."""
    (evaluations,) = containers(sr, codes.QUALITATIVE_EVALUATIONS)
    found = {}
    for item in children(evaluations):
        if item.ValueType == "CODE":
            sites = [value(c) for c in children(item) if is_concept(c, codes.FINDING_SITE)]
            found[item.ConceptNameCodeSequence[0].CodeMeaning, sites[0] if sites else None] = item
    return found


def probabilities(item: Dataset) -> list[float]:
    """The Probability NUMs a statement is inferred from."""
    return [float(c.MeasuredValueSequence[0].NumericValue) for c in children(item)
            if c.ValueType == "NUM" and is_concept(c, codes.PROBABILITY)]


def references(dataset: Dataset, skip: tuple[str, ...] = ("CurrentRequestedProcedureEvidenceSequence",)
               ) -> Iterator[Dataset]:
    """Every item in ``dataset`` that references a SOP instance, outside the sequences named in ``skip``."""
    for element in dataset:
        if element.VR == "SQ" and element.keyword not in skip:
            for item in element.value:
                if "ReferencedSOPInstanceUID" in item:
                    yield item
                yield from references(item, skip)


def html_text(path: Path) -> str:
    """What dsr2html renders of an SR, as plain text on one line."""
    html = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True, timeout=60, check=True).stdout
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


needs_dciodvfy = pytest.mark.peer("dicom3tools")
needs_dsrdump = pytest.mark.peer("dcmtk")


# ---------------------------------------------------------------- fixtures: one report per outcome, written once


@pytest.fixture(scope="module")
def series() -> CTSeries:
    return ct_series()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reports")


@pytest.fixture(scope="module")
def reports(series: CTSeries, folder: Path) -> dict[str, ReportObjects]:
    """positive, negative, indeterminate, not_analysed, and superseding (a second positive that replaces the first)."""
    built = {
        kind: build_report(series, predict(series, kind), algorithm=ALGORITHM, options=ALL_OBJECTS)
        for kind in ("positive", "negative", "indeterminate")
    }
    built["not_analysed"] = build_report(
        series, NotAnalysed(NotAnalysedReason.TOO_FEW_SLICES, "too few slices: 12 < 30"), algorithm=ALGORITHM
    )
    earlier = pydicom.dcmread(write(built["positive"].sr, folder))
    built["superseding"] = build_report(
        series, predict(series, "positive"), algorithm=ALGORITHM, options=ALL_OBJECTS, previous=[earlier]
    )
    return built


@pytest.fixture(scope="module")
def files(reports: dict[str, ReportObjects], folder: Path) -> dict[str, list[Path]]:
    return {kind: [write(dataset, folder) for dataset in objects.all()] for kind, objects in reports.items()}


@pytest.fixture(scope="module")
def read_sr(files: dict[str, list[Path]]) -> ReadSR:
    """Reads the SR of one outcome back with highdicom (once)."""

    @functools.cache
    def read(kind: str) -> hd.sr.Comprehensive3DSR:
        (path,) = [p for p in files[kind] if p.name.startswith("SR_")]
        return hd.sr.srread(path)

    return read


def multiframe_series(slices: int = SLICES) -> CTSeries:
    """``ct_series`` with its slices as the frames (1..n) of one Enhanced CT image."""
    base = ct_series(slices)
    uid = generate_uid()
    header = copy.deepcopy(base.header)
    header.SOPClassUID, header.SOPInstanceUID, header.NumberOfFrames = EnhancedCTImageStorage, uid, slices
    refs = [SliceRef(uid, EnhancedCTImageStorage, Path("enhanced.dcm"), ref.position, 1, frame=k + 1)
            for k, ref in enumerate(base.slices)]
    return CTSeries(base.study_instance_uid, base.series_instance_uid, refs, base.hu, base.pixel_spacing,
                    base.slice_spacing, base.orientation, header)


# ---------------------------------------------------------------- validity


@needs_dciodvfy
@pytest.mark.parametrize("kind", ["positive", "negative", "indeterminate", "not_analysed", "superseding"])
def test_every_object_passes_dciodvfy(files: dict[str, list[Path]], kind: str) -> None:
    for path in files[kind]:
        messages = dciodvfy(path)
        assert not [m for m in messages if m.startswith("Error")], (path.name, messages)
        # The only warning left: dicom3tools does not know the private scheme (it is declared in the SR).
        assert all(codes.PRIVATE_SCHEME in m for m in messages), (path.name, messages)


@needs_dsrdump
@pytest.mark.parametrize("kind", ["positive", "negative", "indeterminate", "not_analysed", "superseding"])
def test_documents_pass_dsrdump(files: dict[str, list[Path]], kind: str) -> None:
    for path in files[kind]:
        if path.name.startswith(("SR_", "KO_")):
            result = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            assert "error" not in result.stderr.lower() and "E:" not in result.stderr, result.stderr
            assert "Imaging Measurement Report" in result.stdout or "Of Interest" in result.stdout


@needs_dsrdump
def test_dsr2html_prints_each_value_with_its_concept_name(files: dict[str, list[Path]],
                                                        reports: dict[str, ReportObjects]) -> None:
    def sr_text(kind: str) -> str:
        (path,) = [p for p in files[kind] if p.name.startswith("SR_")]
        return html_text(path)

    positive = sr_text("positive")
    assert "Pulmonary embolism: Present (52101004, SCT)" in positive
    assert "Concept Modifier : Finding Site = Right pulmonary artery" in positive
    assert "Inferred from : Probability = 0.92 1" in positive
    assert "Clinical course: Chronic" in positive and "RV/LV diameter ratio &gt;= 1: Present" in positive
    assert "Probability: 0.97 1" in positive and "Comment: PE, central, images 11-16, p 0.97" in positive
    assert "First slice of finding: CT image" in positive and "Last slice of finding: CT image" in positive
    negative = sr_text("negative")
    assert negative.count("Pulmonary embolism: Absent (272519000, SCT)") == 2, "in the group and for the exam"
    assert "Comment: No PE: most suspicious slice, image 17, p 0.30 (below 0.5)" in negative
    assert "Pulmonary embolism: Present" not in negative and "Finding:" not in negative
    not_analysed = sr_text("not_analysed")
    assert "Pulmonary embolism: Not Evaluated" in not_analysed
    assert "Reason not analysed: Too few slices" in not_analysed
    assert "Reason not analysed: too few slices: 12 &lt; 30" in not_analysed
    for kind in ("positive", "negative", "not_analysed"):
        tree = [reports[kind].sr]
        while tree:
            item = tree.pop()
            assert item.get("ContinuityOfContent", "SEPARATE") == "SEPARATE", "a CONTINUOUS container drops names"
            tree += children(item)


# ---------------------------------------------------------------- the SR read back: exam statements


def test_positive_sr_states_the_exam_finding_probability_and_evaluation(read_sr: ReadSR) -> None:
    exam = statements(read_sr("positive"))["Pulmonary embolism", "Pulmonary artery"]
    assert exam.ConceptNameCodeSequence[0].CodeValue == codes.PULMONARY_EMBOLISM.value
    assert value(exam) == codes.Evaluation.PRESENT.value.meaning
    assert probabilities(exam) == [pytest.approx(0.97)]
    (num,) = [c for c in children(exam) if c.ValueType == "NUM"]
    assert num.RelationshipType == "INFERRED FROM"
    assert num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == codes.NO_UNITS.value


def test_positive_sr_gives_locations_course_and_rv_lv(read_sr: ReadSR) -> None:
    found = statements(read_sr("positive"))
    sites = {label: ("Pulmonary embolism", location.value.meaning) for label, location in
             [("central", codes.Location.CENTRAL), ("left", codes.Location.LEFT), ("right", codes.Location.RIGHT)]}
    assert [value(found[key]) for key in sites.values()] == ["Present", "Absent", "Present"]
    assert [probabilities(found[key])[0] for key in sites.values()] == pytest.approx([0.81, 0.2, 0.92])
    course = found["Clinical course", None]
    assert value(course) == codes.COURSE_CODES[ClinicalCourse.CHRONIC].meaning
    qualified = {
        c.ContentSequence[0].ConceptCodeSequence[0].CodeValue: float(c.MeasuredValueSequence[0].NumericValue)
        for c in children(course) if c.ValueType == "NUM"
    }
    assert qualified == {
        codes.COURSE_CODES[ClinicalCourse.CHRONIC].value: pytest.approx(0.7),
        codes.COURSE_CODES[ClinicalCourse.ACUTE_ON_CHRONIC].value: pytest.approx(0.1),
    }
    rv_lv = found[codes.RV_LV_RATIO_GTE_1.meaning, None]
    assert value(rv_lv) == "Present" and probabilities(rv_lv) == [pytest.approx(0.75)]


@pytest.mark.parametrize(("kind", "expected"), [("negative", "ABSENT"), ("indeterminate", "UNDETERMINED")])
def test_non_positive_sr_states_only_the_exam(read_sr: ReadSR, series: CTSeries, kind: str, expected: str) -> None:
    sr = read_sr(kind)
    found = statements(sr)
    assert list(found) == [("Pulmonary embolism", "Pulmonary artery")]
    exam = found["Pulmonary embolism", "Pulmonary artery"]
    assert value(exam) == codes.Evaluation[expected].value.meaning
    labels = predict(series, kind).exam  # the exam head's (1 - p(negative)) (1 - p(indeterminate)): 0.095 here
    head = (1 - labels[ExamLabel.NEGATIVE.value]) * (1 - labels[ExamLabel.INDETERMINATE.value])
    assert probabilities(exam) == [pytest.approx(head, abs=1e-4)]


@pytest.mark.parametrize(("kind", "expected", "label"), [
    ("negative", "ABSENT", "No PE: most suspicious slice, image 17, p 0.30 (below 0.5)"),
    ("indeterminate", "UNDETERMINED",
     "Indeterminate exam, no PE located: most suspicious slice, image 17, p 0.30 (below 0.5)"),
])
def test_non_positive_sr_locates_its_most_suspicious_slice_and_calls_it_no_finding(
        read_sr: ReadSR, series: CTSeries, kind: str, expected: str, label: str) -> None:
    """OHIF opens an SR in its SR viewport only with a measurement: the one group of a non-positive exam is the
    slice the model found most suspicious, with the exam's evaluation inside it and nothing that reads as a PE."""
    prediction = predict(series, kind)
    assert rank_slices(prediction.image, prediction.attention)[0] == SUSPICIOUS
    sr = read_sr(kind)
    (name, group), = groups(sr).items()
    assert name == f"{TOOL_TAG}:EllipticalROI:{SUSPICIOUS_NAME}" and group.tracking_uid
    assert group.finding_type is None and group.finding_sites == []
    (probability,) = group.get_measurements(name=codes.PROBABILITY)
    assert probability.value == pytest.approx(prediction.image[SUSPICIOUS], abs=1e-4) and probability.value < 0.5
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.name == codes.PULMONARY_EMBOLISM and evaluation.value == codes.Evaluation[expected].value
    items = children(group[0])
    (comment,) = [i.TextValue for i in items if is_concept(i, codes.COMMENT)]
    assert comment == label
    (num,) = [i for i in items if i.ValueType == "NUM"]
    (scoord,) = children(num)
    assert (scoord.GraphicType, scoord.RelationshipType) == ("ELLIPSE", "INFERRED FROM")
    assert np.reshape(scoord.GraphicData, (4, 2)).mean(axis=0) == pytest.approx([VESSEL[1] + 0.5, VESSEL[0] + 0.5],
                                                                                abs=0.5), "the region of its map"
    (source,) = children(scoord)
    assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == series.sop_instance_uids[SUSPICIOUS]
    tree = list(items)
    while tree:
        item = tree.pop()
        assert item.ValueType != "SCOORD3D" and not is_concept(item, codes.codes.DCM.Finding)
        tree += children(item)
    (library,) = containers(sr, codes.codes.DCM.ImageLibrary)
    images = [i for i in children(library.ContentSequence[0]) if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == \
        [series.sop_instance_uids[SUSPICIOUS]]


def test_suspicious_slice_without_a_map_is_a_probe_point(series: CTSeries) -> None:
    prediction = predict(series, "negative")
    prediction.cams = {}
    objects = build_report(series, prediction, algorithm=ALGORITHM, options=ReportOptions(secondary_capture=False))
    (name,) = groups(hd.sr.Comprehensive3DSR.from_dataset(objects.sr))
    assert name == f"{TOOL_TAG}:Probe:{SUSPICIOUS_NAME}"
    assert objects.presentation_states == (), "no presentation state draws it"


def test_not_analysed_is_told_apart_from_negative_by_its_codes(read_sr: ReadSR) -> None:
    negative = statements(read_sr("negative"))["Pulmonary embolism", "Pulmonary artery"]
    sr = read_sr("not_analysed")
    found = statements(sr)
    not_analysed = found["Pulmonary embolism", "Pulmonary artery"]
    assert value(not_analysed) == codes.Evaluation.NOT_EVALUATED.value.meaning != value(negative)
    assert probabilities(not_analysed) == [] and groups(sr) == {}
    too_few = codes.NOT_ANALYSED_CODES[NotAnalysedReason.TOO_FEW_SLICES]
    assert found[codes.REASON_NOT_ANALYSED.meaning, None].ConceptCodeSequence[0].CodeValue == too_few.value
    (evaluations,) = containers(sr, codes.QUALITATIVE_EVALUATIONS)
    (text,) = [i.TextValue for i in children(evaluations) if i.ValueType == "TEXT"
               and is_concept(i, codes.REASON_NOT_ANALYSED)]
    assert text == "too few slices: 12 < 30"


def test_private_scheme_is_declared_where_it_is_used(reports: dict[str, ReportObjects]) -> None:
    declared = [item.CodingSchemeDesignator for item in reports["positive"].sr.CodingSchemeIdentificationSequence]
    assert declared == [codes.PRIVATE_SCHEME]
    assert "CodingSchemeIdentificationSequence" not in reports["negative"].sr


# ---------------------------------------------------------------- the SR read back: located findings


def test_positive_sr_has_one_located_group_per_finding(read_sr: ReadSR, series: CTSeries) -> None:
    sr = read_sr("positive")
    (name, group), = groups(sr).items()
    assert name == f"{TOOL_TAG}:EllipticalROI:PE finding 1" and group.tracking_uid
    assert group.finding_type == codes.PULMONARY_EMBOLISM
    assert [site.value for site in group.finding_sites] == [codes.Location.CENTRAL.value]
    (probability,) = group.get_measurements(name=codes.PROBABILITY)
    assert probability.value == pytest.approx(0.97) and probability.unit == codes.NO_UNITS
    items = children(group[0])
    (comment,) = [i for i in items if is_concept(i, codes.COMMENT)]
    assert comment.TextValue == "PE, central, images 11-16, p 0.97"
    extent = {i.ConceptNameCodeSequence[0].CodeValue: i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
              for i in items if i.ValueType == "IMAGE"}
    uids = series.sop_instance_uids
    assert extent == {codes.FIRST_SLICE.value: uids[POSITIVE[0]], codes.LAST_SLICE.value: uids[POSITIVE[-1]]}
    (library,) = containers(sr, codes.codes.DCM.ImageLibrary)
    images = [i for i in children(library.ContentSequence[0]) if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [uids[10], uids[PEAK], uids[15]]


def test_finding_region_is_an_ellipse_on_the_peak_slice_in_pixels_and_millimetres(read_sr: ReadSR,
                                                                                  series: CTSeries) -> None:
    (group,) = groups(read_sr("positive")).values()
    (num,) = [i for i in children(group[0]) if i.ValueType == "NUM"]
    (scoord,) = children(num)
    assert (scoord.ValueType, scoord.GraphicType, scoord.RelationshipType) == ("SCOORD", "ELLIPSE", "INFERRED FROM")
    points = np.reshape(scoord.GraphicData, (4, 2))
    assert points.mean(axis=0) == pytest.approx([VESSEL[1] + 0.5, VESSEL[0] + 0.5], abs=0.5)
    (source,) = children(scoord)
    assert source.RelationshipType == "SELECTED FROM"
    assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == series.sop_instance_uids[PEAK]
    (finding,) = [i for i in children(group[0]) if is_concept(i, codes.codes.DCM.Finding)]
    (scoord3d,) = children(finding)
    assert (scoord3d.ValueType, scoord3d.GraphicType, scoord3d.RelationshipType) == ("SCOORD3D", "ELLIPSE",
                                                                                     "HAS PROPERTIES")
    assert scoord3d.ReferencedFrameOfReferenceUID == series.header.FrameOfReferenceUID
    millimetres = np.reshape(scoord3d.GraphicData, (4, 3)).mean(axis=0)
    assert millimetres == pytest.approx([-48 + VESSEL[1] * 0.75, -48 + VESSEL[0] * 0.75, PEAK * 2.5], abs=0.5)


@pytest.mark.parametrize("kind", ["positive", "negative", "indeterminate", "not_analysed", "superseding"])
def test_every_measurement_group_has_what_ohif_draws_and_lists(read_sr: ReadSR, kind: str) -> None:
    """OHIF 3.13 (cornerstone-dicom-sr): one SCOORD alone under the first NUM, selected from one image (an SCOORD3D
    there or beside the NUM keeps OHIF from drawing it on the CT); a tracking identifier naming the tool of the
    graphic type; a Comment for the label."""
    tools = {"ELLIPSE": "EllipticalROI", "POINT": "Probe"}
    for imaging in containers(read_sr(kind), codes.codes.DCM.ImagingMeasurements):
        for group in children(imaging):
            items = children(group)
            (identifier,) = [i.TextValue for i in items if is_concept(i, codes.codes.DCM.TrackingIdentifier)]
            assert [i for i in items if is_concept(i, codes.codes.DCM.TrackingUniqueIdentifier)]
            assert [i for i in items if is_concept(i, codes.COMMENT) and i.TextValue]
            first_num = next(i for i in items if i.ValueType == "NUM")
            graphics = [i for i in children(first_num) if i.ValueType in ("SCOORD", "SCOORD3D")]
            assert [g.ValueType for g in graphics] == ["SCOORD"]
            assert len(children(graphics[0])) == 1 and "ReferencedSOPSequence" in children(graphics[0])[0]
            assert identifier.startswith(f"{TOOL_TAG}:{tools[graphics[0].GraphicType]}:")
            assert not [i for i in items if i.ValueType in ("SCOORD", "SCOORD3D")], "coordinates only under the NUM"


def test_finding_without_an_attention_map_is_a_probe_point(series: CTSeries) -> None:
    prediction = predict(series, "positive")
    prediction.cams = {}
    objects = build_report(series, prediction, algorithm=ALGORITHM, options=ReportOptions(secondary_capture=False))
    (name, group), = groups(hd.sr.Comprehensive3DSR.from_dataset(objects.sr)).items()
    assert name == f"{TOOL_TAG}:Probe:PE finding 1"
    assert [site.value for site in group.finding_sites] == [codes.PULMONARY_ARTERY]
    (num,) = [i for i in children(group[0]) if i.ValueType == "NUM"]
    assert [(i.ValueType, i.GraphicType) for i in children(num)] == [("SCOORD", "POINT")]
    (comment,) = [i.TextValue for i in children(group[0]) if is_concept(i, codes.COMMENT)]
    assert comment == "PE, side not determined, images 11-16, p 0.97"


def test_sr_belongs_to_the_source_study_in_a_new_series(read_sr: ReadSR, series: CTSeries) -> None:
    sr = read_sr("positive")
    assert sr.StudyInstanceUID == series.study_instance_uid
    assert sr.SeriesInstanceUID != series.series_instance_uid
    assert (sr.PatientName, sr.PatientID, sr.AccessionNumber) == ("Doe^Jane", "PE0001", "ACC123")
    assert (sr.PatientBirthDate, sr.PatientSex, sr.StudyID) == ("19600101", "F", "S1")
    assert sr.SeriesDescription == "pe-node PE analysis (SR) - PRELIMINARY"
    assert (sr.PreliminaryFlag, sr.VerificationFlag, sr.CompletionFlag) == ("PRELIMINARY", "UNVERIFIED", "COMPLETE")
    evidence = sr.get_evidence()
    assert [uid for _, _, uid, _ in evidence] == series.sop_instance_uids


@pytest.mark.parametrize("kind", ["positive", "negative"])
def test_algorithm_identification_matches_contributing_equipment(read_sr: ReadSR, kind: str) -> None:
    sr = read_sr(kind)
    (evaluations,) = containers(sr, codes.QUALITATIVE_EVALUATIONS)
    holders = [evaluations, *(group[0] for group in groups(sr).values())]
    assert len(holders) == 2
    for holder in holders:
        tid_4019 = {
            item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
            for item in children(holder)
            if item.ValueType == "TEXT" and item.RelationshipType == "HAS CONCEPT MOD"
        }
        assert tid_4019 == {
            "Algorithm Name": ALGORITHM.name,
            "Algorithm Version": ALGORITHM.version,
            "Algorithm Manufacturer": ALGORITHM.manufacturer,
        }
    (ours,) = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == ALGORITHM.manufacturer]
    assert (ours.ManufacturerModelName, ours.SoftwareVersions) == (ALGORITHM.name, ALGORITHM.version)
    assert (sr.Manufacturer, sr.SoftwareVersions) == (ALGORITHM.manufacturer, ALGORITHM.version)


def test_not_analysed_report_is_the_sr_alone(reports: dict[str, ReportObjects]) -> None:
    objects = reports["not_analysed"]
    assert objects.secondary_captures == () and objects.key_object_selection is None
    assert objects.presentation_states == ()
    assert objects.all() == [objects.sr]
    assert containers(objects.sr, codes.codes.DCM.ImagingMeasurements) == [], "no slice was read, no region to give"


# ---------------------------------------------------------------- secondary captures


def test_positive_report_captures_the_top_slices(reports: dict[str, ReportObjects], series: CTSeries) -> None:
    captures = reports["positive"].secondary_captures
    sources = [sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in captures]
    uids = series.sop_instance_uids
    assert len(captures) == 4 and {uids.index(s) for s in sources} <= set(POSITIVE)
    assert [sc.InstanceNumber for sc in captures] == [1, 2, 3, 4]
    prediction = predict(series, "positive")
    best = max(POSITIVE, key=lambda i: prediction.attention[i] * prediction.image[i])
    assert sources[0] == uids[best]


def test_capture_is_a_flagged_rgb_secondary_capture_of_its_slice(
    files: dict[str, list[Path]], series: CTSeries
) -> None:
    for path in [p for p in files["positive"] if p.name.startswith("OT_")]:
        sc = pydicom.dcmread(path)
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        assert sc.StudyInstanceUID == series.study_instance_uid and sc.PatientID == "PE0001"
        assert (sc.BurnedInAnnotation, sc.ConversionType) == ("YES", "WSD")
        assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription
        assert (sc.PhotometricInterpretation, sc.SamplesPerPixel) == ("RGB", 3)
        assert sc.pixel_array.shape[0] > SIZE and sc.pixel_array.shape[1:] == (SIZE, 3), "the slice and a band"
        assert [float(v) for v in sc.PixelSpacing] == [0.75, 0.75] and list(sc.PatientOrientation) == ["L", "P"]
        source = sc.SourceImageSequence[0]
        assert source.ReferencedSOPClassUID == CTImageStorage
        assert source.ReferencedSOPInstanceUID in series.sop_instance_uids
        assert sc.ImageComments.startswith("PE, central, images 11-16, p 0.97 (finding 1 of 1); slice PE probability")


def test_capture_shows_the_whole_slice_unobstructed_and_the_text_in_a_band_below(
    reports: dict[str, ReportObjects], series: CTSeries
) -> None:
    prediction = predict(series, "positive")
    for sc in reports["positive"].secondary_captures:
        index = series.sop_instance_uids.index(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)
        rgb = sc.pixel_array
        expected = blend(window(series.hu[index], *PE_WINDOW), prediction.cams.get(index))
        assert (rgb[:SIZE] == expected).all(), "every pixel of the slice as windowed, with the overlay only"
        row, col = VESSEL
        assert (len({*rgb[row, col]}) > 1) == (index != 13), f"overlay on slice {index}"
        band = rgb[SIZE:]
        yellow = (band[..., 0] > 200) & (band[..., 1] > 200) & (band[..., 2] < 100)
        white = (band > 200).all(axis=-1)
        assert yellow.any() and white.any(), "banner and text in the band"


def test_negative_report_has_captures_only_when_configured(series: CTSeries) -> None:
    negative = predict(series, "negative")
    assert build_report(series, negative, algorithm=ALGORITHM).secondary_captures == ()
    options = ReportOptions(captures_for_negative=True, max_images=2)
    captures = build_report(series, negative, algorithm=ALGORITHM, options=options).secondary_captures
    assert len(captures) == 2 and captures[0].ImageComments.startswith("no located PE finding on this slice")
    assert captures[0].SourceImageSequence[0].ReferencedSOPInstanceUID == series.sop_instance_uids[SUSPICIOUS]


# ---------------------------------------------------------------- presentation state


def test_presentation_state_draws_each_finding_on_its_peak_slice(reports: dict[str, ReportObjects],
                                                                 series: CTSeries) -> None:
    objects = reports["positive"]
    (state,) = objects.presentation_states
    assert state.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage
    assert state.StudyInstanceUID == series.study_instance_uid and state.PatientID == "PE0001"
    assert state.SeriesInstanceUID not in {series.series_instance_uid, objects.sr.SeriesInstanceUID}
    (referenced,) = state.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == series.series_instance_uid
    peak = series.sop_instance_uids[PEAK]
    assert [i.ReferencedSOPInstanceUID for i in referenced.ReferencedImageSequence] == [peak]
    (voi,) = state.SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == PE_WINDOW
    (annotation,) = state.GraphicAnnotationSequence
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == peak
    (ellipse,) = annotation.GraphicObjectSequence
    (group,) = groups(hd.sr.Comprehensive3DSR.from_dataset(objects.sr)).values()
    (num,) = [i for i in children(group[0]) if i.ValueType == "NUM"]
    assert ellipse.GraphicType == "ELLIPSE" and ellipse.GraphicData == pytest.approx(children(num)[0].GraphicData)
    assert (ellipse.TrackingID, ellipse.TrackingUID) == (group.tracking_identifier, group.tracking_uid)
    (text,) = annotation.TextObjectSequence
    assert text.UnformattedTextValue == "PE, central, images 11-16, p 0.97"
    assert objects.all() == [*objects.secondary_captures, state, objects.sr, objects.key_object_selection]


def test_presentation_state_overlay_outlines_the_ellipse_on_the_findings_layer(
        reports: dict[str, ReportObjects]) -> None:
    """The overlay plane (6000) of the state, for renderers that draw overlays but not graphic objects: the whole
    slice, 1 bit, set on the ellipse's outline only, shown on the layer of the graphic annotation."""
    (state,) = reports["positive"].presentation_states
    assert (state[0x60000010].value, state[0x60000011].value) == (SIZE, SIZE)
    assert (state[0x60000040].value, list(state[0x60000050].value)) == ("G", [1, 1])
    assert (state[0x60000100].value, state[0x60000102].value) == (1, 0)
    assert state[0x60001001].value == state.GraphicLayerSequence[0].GraphicLayer == "PE_FINDINGS"
    bits = np.unpackbits(np.frombuffer(state[0x60003000].value, dtype=np.uint8), bitorder="little")
    ring = bits[: SIZE * SIZE].reshape(SIZE, SIZE).astype(bool)
    points = np.reshape(state.GraphicAnnotationSequence[0].GraphicObjectSequence[0].GraphicData, (4, 2))
    (column, row), (half_width, half_height) = points.mean(axis=0), (points.max(axis=0) - points.min(axis=0)) / 2
    rows, columns = np.mgrid[:SIZE, :SIZE] + 0.5
    radius = np.hypot((columns - column) / half_width, (rows - row) / half_height)
    assert ring.any() and (radius[ring] <= 1).all() and (radius[ring] > 0.5).all(), "on the outline"
    assert ring[int(row), int(column - half_width + 1)] and not ring[int(row), int(column)], "not filled"


def test_presentation_state_is_optional_and_needs_a_finding(series: CTSeries) -> None:
    positive = predict(series, "positive")
    off = ReportOptions(secondary_capture=False, presentation_state=False)
    assert build_report(series, positive, algorithm=ALGORITHM, options=off).presentation_states == ()
    assert build_report(series, predict(series, "negative"), algorithm=ALGORITHM).presentation_states == ()


# ---------------------------------------------------------------- key object selection


def test_key_object_selection_references_key_slices_and_captures(reports: dict[str, ReportObjects]) -> None:
    objects = reports["positive"]
    kos = objects.key_object_selection
    assert kos is not None and kos.Modality == "KO"
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113000", "DCM")
    referenced = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for item in kos.ContentSequence if item.ValueType == "IMAGE"}
    captures = {sc.SOPInstanceUID for sc in objects.secondary_captures}
    key_ct = {sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in objects.secondary_captures}
    assert referenced == captures | key_ct


def test_key_object_selection_without_captures_references_ct_only(series: CTSeries) -> None:
    options = ReportOptions(secondary_capture=False, key_object_selection=True, max_images=3)
    objects = build_report(series, predict(series, "positive"), algorithm=ALGORITHM, options=options)
    assert objects.secondary_captures == ()
    kos = objects.key_object_selection
    referenced = [
        item.ReferencedSOPSequence[0].ReferencedSOPClassUID for item in kos.ContentSequence if item.ValueType == "IMAGE"
    ]
    assert referenced == [CTImageStorage] * 3


def test_negative_report_has_no_key_object_selection(reports: dict[str, ReportObjects]) -> None:
    assert reports["negative"].key_object_selection is None


# ---------------------------------------------------------------- slices that are frames of a multi-frame image


@needs_dciodvfy
def test_every_reference_to_a_frame_names_the_frame(folder: Path) -> None:
    series = multiframe_series()
    objects = build_report(series, predict(series, "positive"), algorithm=ALGORITHM, options=ALL_OBJECTS)
    assert objects.presentation_states and objects.key_object_selection is not None
    enhanced = series.slices[0].sop_instance_uid
    for dataset in objects.all():
        found = [item for item in references(dataset) if item.ReferencedSOPInstanceUID == enhanced]
        assert found, dataset.Modality
        assert all("ReferencedFrameNumber" in item for item in found), dataset.Modality
        messages = dciodvfy(write(dataset, folder))
        assert not [m for m in messages if m.startswith("Error")], (dataset.Modality, messages)
    (group,) = groups(hd.sr.Comprehensive3DSR.from_dataset(objects.sr)).values()
    (num,) = [i for i in children(group[0]) if i.ValueType == "NUM"]
    (source,) = children(children(num)[0])
    assert source.ReferencedSOPSequence[0].ReferencedFrameNumber == PEAK + 1
    extent = [i.ReferencedSOPSequence[0].ReferencedFrameNumber for i in children(group[0]) if i.ValueType == "IMAGE"]
    assert extent == [POSITIVE[0] + 1, POSITIVE[-1] + 1]
    assert group.tracking_identifier.endswith("PE finding 1")
    (comment,) = [i.TextValue for i in children(group[0]) if is_concept(i, codes.COMMENT)]
    assert comment == "PE, central, frames 11-16, p 0.97"
    (state,) = objects.presentation_states
    assert state.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedFrameNumber == PEAK + 1
    assert state.GraphicAnnotationSequence[0].ReferencedImageSequence[0].ReferencedFrameNumber == PEAK + 1
    key_frames = {sc.SourceImageSequence[0].ReferencedFrameNumber for sc in objects.secondary_captures}
    assert key_frames <= {i + 1 for i in POSITIVE}
    negative = build_report(series, predict(series, "negative"), algorithm=ALGORITHM).sr
    assert {int(item.ReferencedFrameNumber) for item in references(negative)} == {SUSPICIOUS + 1}, \
        "the most suspicious slice is named by its frame"
    assert not [m for m in dciodvfy(write(negative, folder)) if m.startswith("Error")]


# ---------------------------------------------------------------- superseding, identity, refusal, cost


def test_superseding_sr_references_its_predecessor(reports: dict[str, ReportObjects], read_sr: ReadSR) -> None:
    earlier, later = reports["positive"].sr, read_sr("superseding")
    (study,) = later.PredecessorDocumentsSequence
    (series_item,) = study.ReferencedSeriesSequence
    (instance,) = series_item.ReferencedSOPSequence
    assert study.StudyInstanceUID == earlier.StudyInstanceUID
    assert series_item.SeriesInstanceUID == earlier.SeriesInstanceUID
    assert instance.ReferencedSOPClassUID == earlier.SOPClassUID
    assert instance.ReferencedSOPInstanceUID == earlier.SOPInstanceUID
    assert later.SOPInstanceUID != earlier.SOPInstanceUID and later.InstanceNumber == 2
    (same_finding,) = groups(hd.sr.Comprehensive3DSR.from_dataset(earlier)).values()
    assert [g.tracking_uid for g in groups(later).values()] == [same_finding.tracking_uid]


def test_same_inputs_give_the_same_uids(series: CTSeries) -> None:
    first = build_report(series, predict(series, "positive"), algorithm=ALGORITHM, options=ALL_OBJECTS)
    again = build_report(series, predict(series, "positive"), algorithm=ALGORITHM, options=ALL_OBJECTS)
    other = build_report(series, predict(series, "negative"), algorithm=ALGORITHM, options=ALL_OBJECTS)
    assert [d.SOPInstanceUID for d in first.all()] == [d.SOPInstanceUID for d in again.all()]
    assert first.sr.SOPInstanceUID != other.sr.SOPInstanceUID
    assert len({d.SOPInstanceUID for d in first.all()}) == len(first.all())
    assert len({d.SeriesInstanceUID for d in first.all()}) == 4
    assert [d.SeriesNumber for d in first.all()] == [9001] * 4 + [9003, 9000, 9002]


def test_prediction_of_another_series_is_refused(series: CTSeries) -> None:
    other = ct_series(slices=SLICES)
    with pytest.raises(ValueError, match="series"):
        build_report(series, predict(other, "positive"), algorithm=ALGORITHM)


def test_attention_map_of_another_size_is_refused(series: CTSeries) -> None:
    prediction = predict(series, "positive")
    prediction.cams[PEAK] = cam(SIZE // 2)
    with pytest.raises(ValueError, match=r"prediction.cams\[12\] has shape \(64, 64\)"):
        build_report(series, prediction, algorithm=ALGORITHM)


def test_previous_report_of_another_study_is_refused(series: CTSeries) -> None:
    elsewhere = ct_series()
    foreign = build_report(elsewhere, predict(elsewhere, "negative"), algorithm=ALGORITHM).sr
    with pytest.raises(ValueError, match="previous report"):
        build_report(series, predict(series, "negative"), algorithm=ALGORITHM, previous=[foreign])


def test_report_on_many_positive_slices_stays_small_and_fast() -> None:
    """1,100 slices with 300 positive ones in 30 runs: at most eight findings, a report in well under a second
    (one group per positive slice took ~2 s)."""
    series = ct_series(slices=1100, size=64)
    prediction = predict(series, "negative")
    image = np.full(len(series), 0.1)
    for start in range(50, 1050, 33):
        image[start : start + 10] = 0.8
    prediction.image = image
    started = time.perf_counter()
    objects = build_report(series, prediction, algorithm=ALGORITHM, options=ReportOptions(secondary_capture=False))
    assert time.perf_counter() - started < 1.5
    assert 1 <= len(groups(hd.sr.Comprehensive3DSR.from_dataset(objects.sr))) <= 8


@needs_dciodvfy
def test_not_analysed_report_survives_a_broken_header(series: CTSeries, folder: Path) -> None:
    header = copy.deepcopy(series.header)
    for keyword in ("ImagePositionPatient", "PixelSpacing", "SliceThickness", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        delattr(header, keyword)
    broken = CTSeries(series.study_instance_uid, series.series_instance_uid, series.slices, series.hu,
                      series.pixel_spacing, series.slice_spacing, series.orientation, header)
    outcome = NotAnalysed(NotAnalysedReason.UNREADABLE, "ImagePositionPatient missing on 40 of 40 slices")
    sr = build_report(broken, outcome, algorithm=ALGORITHM).sr
    path = write(sr, folder)
    assert not [m for m in dciodvfy(path) if m.startswith("Error")]
    reason = statements(hd.sr.srread(path))[codes.REASON_NOT_ANALYSED.meaning, None]
    assert reason.ConceptCodeSequence[0].CodeValue == codes.NOT_ANALYSED_CODES[NotAnalysedReason.UNREADABLE].value
    assert "SliceThickness" not in header and "PatientSex" not in header, "the series header was changed"


@needs_dciodvfy
def test_report_on_a_series_loaded_from_files_is_valid(ct_series_dir: Path, folder: Path) -> None:
    """The same objects from a series as the pipeline loads it (tests.dicom_factory files, ``load_series``)."""
    loaded = load_series(ct_series_dir)
    rng = np.random.default_rng(1)
    image = rng.uniform(0.0, 0.3, len(loaded))
    image[18:22] = 0.9
    exam = dict.fromkeys(EXAM_LABELS, 0.1) | {ExamLabel.LEFT.value: 0.8, ExamLabel.RV_LV_LT_1.value: 0.9}
    size = loaded.hu.shape[1]
    prediction = Prediction(
        loaded.series_instance_uid,
        loaded.sop_instance_uids,
        exam,
        image,
        np.full(len(loaded), 1.0 / len(loaded)),
        {i: cam(size) for i in range(18, 22)},
    )
    objects = build_report(loaded, prediction, algorithm=ALGORITHM, options=ALL_OBJECTS)
    assert len(objects.secondary_captures) == 4 and objects.key_object_selection is not None
    assert len(objects.presentation_states) == 1
    for dataset in objects.all():
        path = write(dataset, folder)
        messages = dciodvfy(path)
        assert not [m for m in messages if m.startswith("Error")], (path.name, messages)
        assert dataset.PatientID == loaded.header.PatientID
    sr = hd.sr.Comprehensive3DSR.from_dataset(objects.sr)
    assert probabilities(statements(sr)["Pulmonary embolism", "Pulmonary artery"]) == [pytest.approx(0.9)]
    assert len(groups(sr)) == 1
