"""The result objects of pe-node, built from a synthetic CT series, written, validated and read back.

Validation uses the real tools of DESIGN.md: ``dciodvfy`` (dicom3tools) on every object and ``dsrdump`` (DCMTK) on the
documents; highdicom reads each SR back. The series is 40 axial slices of 128 x 128 pixels made in memory.
"""

from __future__ import annotations

import copy
import functools
import subprocess
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage, generate_uid

from pe_node.findings import EXAM_LABELS, ClinicalCourse, ExamLabel, NotAnalysed, NotAnalysedReason, Prediction
from pe_node.model.preprocess import PE_WINDOW
from pe_node.pipeline.series import CTSeries, SliceRef, load_series
from pe_node.reporting import (
    AlgorithmInfo,
    ReportObjects,
    ReportOptions,
    build_report,
    codes,
)
from pe_node.reporting.overlay import window

ALGORITHM = AlgorithmInfo(name="pe-node PE CNN-LSTM", version="1.4.2")
SLICES, SIZE = 40, 128
POSITIVE = range(10, 16)  # slices with PE in the positive prediction
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
    ``indeterminate``. Slice 13 of the positive one has no attention map."""
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
    return {group.tracking_identifier: group for group in sr.content.get_image_measurement_groups()}


def evaluation(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: object) -> str:
    (found,) = group.get_qualitative_evaluations(name=name)
    return found.value.value


def probabilities(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> list[float]:
    return [m.value for m in group.get_measurements(name=codes.PROBABILITY)]


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


# ---------------------------------------------------------------- the SR read back


def test_positive_sr_states_the_exam_finding_probability_and_evaluation(read_sr: ReadSR) -> None:
    sr = read_sr("positive")
    exam = groups(sr)["PE exam"]
    assert exam.finding_type == codes.PULMONARY_EMBOLISM
    assert [site.value for site in exam.finding_sites] == [codes.PULMONARY_ARTERY]
    assert probabilities(exam) == [pytest.approx(0.97)]
    assert exam.get_measurements(name=codes.PROBABILITY)[0].unit == codes.NO_UNITS
    assert evaluation(exam, codes.PULMONARY_EMBOLISM) == codes.Evaluation.PRESENT.value.value


def test_positive_sr_gives_locations_course_and_rv_lv(read_sr: ReadSR) -> None:
    found = groups(read_sr("positive"))
    sites = {name: found[name].finding_sites[0].value.value for name in ("PE central", "PE left", "PE right")}
    assert sites == {
        "PE central": codes.Location.CENTRAL.value.value,
        "PE left": codes.Location.LEFT.value.value,
        "PE right": codes.Location.RIGHT.value.value,
    }
    present = codes.Evaluation.PRESENT.value.value
    absent = codes.Evaluation.ABSENT.value.value
    assert [evaluation(found[n], codes.PULMONARY_EMBOLISM) for n in sites] == [present, absent, present]
    assert [probabilities(found[n])[0] for n in sites] == pytest.approx([0.81, 0.2, 0.92])
    course = found["PE clinical course"]
    assert evaluation(course, codes.CLINICAL_COURSE) == codes.COURSE_CODES[ClinicalCourse.CHRONIC].value
    qualified = {
        m[0].ContentSequence[0].ConceptCodeSequence[0].CodeValue: m.value
        for m in course.get_measurements(name=codes.PROBABILITY)
    }
    assert qualified == {
        codes.COURSE_CODES[ClinicalCourse.CHRONIC].value: pytest.approx(0.7),
        codes.COURSE_CODES[ClinicalCourse.ACUTE_ON_CHRONIC].value: pytest.approx(0.1),
    }
    rv_lv = found["RV/LV ratio"]
    assert rv_lv.finding_type == codes.RV_LV_RATIO_GTE_1
    assert evaluation(rv_lv, codes.RV_LV_RATIO_GTE_1) == present


def test_private_scheme_is_declared_where_it_is_used(reports: dict[str, ReportObjects]) -> None:
    declared = [item.CodingSchemeDesignator for item in reports["positive"].sr.CodingSchemeIdentificationSequence]
    assert declared == [codes.PRIVATE_SCHEME]
    assert "CodingSchemeIdentificationSequence" not in reports["negative"].sr


def test_positive_sr_has_one_group_per_positive_slice_with_its_image(read_sr: ReadSR, series: CTSeries) -> None:
    sr = read_sr("positive")
    slice_groups = [g for name, g in groups(sr).items() if name.startswith("PE slice")]
    referenced = [g.source_images[0].referenced_sop_instance_uid for g in slice_groups]
    assert referenced == [series.slices[i].sop_instance_uid for i in POSITIVE]
    assert [probabilities(g)[0] for g in slice_groups] == pytest.approx([0.6, 0.8, 0.97, 0.9, 0.7, 0.55])
    (library,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"]
    images = [item for item in library.ContentSequence[0].ContentSequence if item.ValueType == "IMAGE"]
    assert [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in images] == referenced


def test_every_group_is_tracked_for_ohif(read_sr: ReadSR) -> None:
    for name, group in groups(read_sr("positive")).items():
        assert name and group.tracking_uid, name


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


def test_algorithm_identification_matches_contributing_equipment(read_sr: ReadSR) -> None:
    sr = read_sr("positive")
    exam = groups(sr)["PE exam"][0]
    tid_4019 = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
        for item in exam.ContentSequence
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


@pytest.mark.parametrize(("kind", "expected"), [("negative", "ABSENT"), ("indeterminate", "UNDETERMINED")])
def test_non_positive_sr_has_only_the_exam_group(read_sr: ReadSR, series: CTSeries, kind: str, expected: str) -> None:
    found = groups(read_sr(kind))
    assert list(found) == ["PE exam"]
    assert evaluation(found["PE exam"], codes.PULMONARY_EMBOLISM) == codes.Evaluation[expected].value.value
    exam = predict(series, kind).exam  # the exam head's (1 - p(negative)) (1 - p(indeterminate)): 0.095 here
    head = (1 - exam[ExamLabel.NEGATIVE.value]) * (1 - exam[ExamLabel.INDETERMINATE.value])
    assert probabilities(found["PE exam"]) == [pytest.approx(head, abs=1e-4)]


def test_not_analysed_is_told_apart_from_negative_by_its_codes(read_sr: ReadSR) -> None:
    negative = groups(read_sr("negative"))["PE exam"]
    not_analysed = groups(read_sr("not_analysed"))["PE exam"]
    assert evaluation(not_analysed, codes.PULMONARY_EMBOLISM) == codes.Evaluation.NOT_EVALUATED.value.value
    assert evaluation(not_analysed, codes.PULMONARY_EMBOLISM) != evaluation(negative, codes.PULMONARY_EMBOLISM)
    assert probabilities(not_analysed) == []
    too_few = codes.NOT_ANALYSED_CODES[NotAnalysedReason.TOO_FEW_SLICES]
    assert evaluation(not_analysed, codes.REASON_NOT_ANALYSED) == too_few.value
    (text,) = [i.TextValue for i in not_analysed[0].ContentSequence if i.ValueType == "TEXT"
               and i.ConceptNameCodeSequence[0].CodeValue == codes.REASON_NOT_ANALYSED.value]
    assert text == "too few slices: 12 < 30"


def test_not_analysed_report_is_the_sr_alone(reports: dict[str, ReportObjects]) -> None:
    objects = reports["not_analysed"]
    assert objects.secondary_captures == () and objects.key_object_selection is None
    assert objects.all() == [objects.sr]


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
        assert sc.pixel_array.shape == (SIZE, SIZE, 3)
        source = sc.SourceImageSequence[0]
        assert source.ReferencedSOPClassUID == CTImageStorage
        assert source.ReferencedSOPInstanceUID in series.sop_instance_uids


def test_capture_has_banner_and_overlay_where_attention_is(reports: dict[str, ReportObjects], series: CTSeries) -> None:
    for sc in reports["positive"].secondary_captures:
        index = series.sop_instance_uids.index(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)
        grey = window(series.hu[index], *PE_WINDOW)
        rgb = sc.pixel_array.astype(int)
        band = rgb[:12]
        assert (band != grey[:12, :, None]).any(), "no banner"
        yellow = (band[..., 0] > 200) & (band[..., 1] > 200) & (band[..., 2] < 100)
        assert yellow.any(), "banner text missing"
        row, col = VESSEL
        coloured = len({*rgb[row, col]}) > 1
        assert coloured == (index != 13), f"overlay on slice {index}"
        assert (rgb[-2, 2] == grey[-2, 2]).all(), "pixels far from the attention changed"


def test_negative_report_has_captures_only_when_configured(series: CTSeries) -> None:
    negative = predict(series, "negative")
    assert build_report(series, negative, algorithm=ALGORITHM).secondary_captures == ()
    options = ReportOptions(captures_for_negative=True, max_images=2)
    assert len(build_report(series, negative, algorithm=ALGORITHM, options=options).secondary_captures) == 2


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
    assert objects.all() == [*objects.secondary_captures, objects.sr, kos]


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


# ---------------------------------------------------------------- superseding, identity, refusal


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
    same_finding = groups(hd.sr.Comprehensive3DSR.from_dataset(earlier))["PE exam"].tracking_uid
    assert groups(later)["PE exam"].tracking_uid == same_finding


def test_same_inputs_give_the_same_uids(series: CTSeries) -> None:
    first = build_report(series, predict(series, "positive"), algorithm=ALGORITHM, options=ALL_OBJECTS)
    again = build_report(series, predict(series, "positive"), algorithm=ALGORITHM, options=ALL_OBJECTS)
    other = build_report(series, predict(series, "negative"), algorithm=ALGORITHM, options=ALL_OBJECTS)
    assert [d.SOPInstanceUID for d in first.all()] == [d.SOPInstanceUID for d in again.all()]
    assert first.sr.SOPInstanceUID != other.sr.SOPInstanceUID
    assert len({d.SOPInstanceUID for d in first.all()}) == len(first.all())
    assert len({d.SeriesInstanceUID for d in first.all()}) == 3


def test_prediction_of_another_series_is_refused(series: CTSeries) -> None:
    other = ct_series(slices=SLICES)
    with pytest.raises(ValueError, match="series"):
        build_report(series, predict(other, "positive"), algorithm=ALGORITHM)


def test_previous_report_of_another_study_is_refused(series: CTSeries) -> None:
    elsewhere = ct_series()
    foreign = build_report(elsewhere, predict(elsewhere, "negative"), algorithm=ALGORITHM).sr
    with pytest.raises(ValueError, match="previous report"):
        build_report(series, predict(series, "negative"), algorithm=ALGORITHM, previous=[foreign])


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
    exam = groups(hd.sr.srread(path))["PE exam"]
    assert evaluation(exam, codes.REASON_NOT_ANALYSED) == codes.NOT_ANALYSED_CODES[NotAnalysedReason.UNREADABLE].value
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
    for dataset in objects.all():
        path = write(dataset, folder)
        messages = dciodvfy(path)
        assert not [m for m in messages if m.startswith("Error")], (path.name, messages)
        assert dataset.PatientID == loaded.header.PatientID
    exam_group = groups(hd.sr.Comprehensive3DSR.from_dataset(objects.sr))["PE exam"]
    assert probabilities(exam_group) == [pytest.approx(0.9)]
