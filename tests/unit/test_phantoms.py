"""The CTPA phantom generator: layout, labels, determinism, pixels and tags (tiny studies, a few seconds in all)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pe_node.findings import IMAGE_LABEL
from training.phantoms.anatomy import TubeKind
from training.phantoms.ctimage import (
    SeriesEncoder,
    series_dataset,
    slice_dataset,
    to_stored,
)
from training.phantoms.generator import (
    ExamClass,
    PhantomSummary,
    exam_class,
    generate,
    main_phantoms,
    plan_study,
    render_slice,
    slice_geometry,
    slice_range,
)
from training.phantoms.lesions import EMBOLUS_VISIBLE_MM2, LesionKind, covered_pixels
from training.rspect import RSPECT_COLUMNS, STUDY_COLUMNS, check_labels

SEED = 3
STUDIES = 8
SLICES = (16, 24)
SIZE = 64


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PhantomSummary]:
    out = tmp_path_factory.mktemp("phantoms")
    return out, generate(out, STUDIES, SEED, SLICES, SIZE, workers=1, progress=False)


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "train.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _first(seed: int, wanted: ExamClass) -> int:
    return next(i for i in range(200) if exam_class(seed, i) is wanted)


def test_train_csv_has_the_17_rspect_columns_and_binary_labels(phantom_set: tuple[Path, PhantomSummary]) -> None:
    out, summary = phantom_set
    with open(out / "train.csv", newline="") as stream:
        header, *rows = list(csv.reader(stream))
    assert tuple(header) == RSPECT_COLUMNS
    assert len(rows) == summary.slices
    assert all(len(row) == 17 and set(row[3:]) <= {"0", "1"} for row in rows)
    files = {p.relative_to(out / "train") for p in (out / "train").rglob("*.dcm")}
    assert files == {Path(r[0], r[1], f"{r[2]}.dcm") for r in rows}


def test_every_study_passes_the_rsna_label_rules_and_every_class_appears(
        phantom_set: tuple[Path, PhantomSummary]) -> None:
    out, summary = phantom_set
    studies: dict[str, list[dict[str, str]]] = {}
    for row in _rows(out):
        studies.setdefault(row["StudyInstanceUID"], []).append(row)
    assert len(studies) == STUDIES
    for rows in studies.values():
        labels = {c: int(rows[0][c]) for c in STUDY_COLUMNS}
        assert all({c: int(r[c]) for c in STUDY_COLUMNS} == labels for r in rows)
        positive = max(int(r[IMAGE_LABEL]) for r in rows)
        assert check_labels({**labels, IMAGE_LABEL: positive}) == []
        if labels["indeterminate"]:
            assert labels["qa_motion"] or labels["qa_contrast"]
    assert summary.negative and summary.positive and summary.indeterminate
    assert summary.negative + summary.positive + summary.indeterminate == STUDIES


def test_positive_studies_have_positive_slices_and_the_others_none(phantom_set: tuple[Path, PhantomSummary]) -> None:
    out, _ = phantom_set
    positive_slices: dict[str, int] = {}
    negative_exam: dict[str, bool] = {}
    for row in _rows(out):
        uid = row["StudyInstanceUID"]
        positive_slices[uid] = positive_slices.get(uid, 0) + int(row[IMAGE_LABEL])
        negative_exam[uid] = bool(int(row["negative_exam_for_pe"]) or int(row["indeterminate"]))
    assert any(positive_slices.values())
    for uid, count in positive_slices.items():
        assert (count == 0) == negative_exam[uid]


def test_same_seed_gives_identical_files_and_more_studies_extend_fewer(
        tmp_path: Path, phantom_set: tuple[Path, PhantomSummary]) -> None:
    out, _ = phantom_set
    fewer = tmp_path / "fewer"
    generate(fewer, 3, SEED, SLICES, SIZE, progress=False)
    full, part = _hashes(out / "train"), _hashes(fewer / "train")
    assert part and all(full[name] == digest for name, digest in part.items())
    assert (out / "train.csv").read_text().startswith((fewer / "train.csv").read_text())


def test_first_writes_the_later_studies_of_the_larger_set(
        tmp_path: Path, phantom_set: tuple[Path, PhantomSummary]) -> None:
    out, _ = phantom_set
    later = tmp_path / "later"
    summary = generate(later, 3, SEED, SLICES, SIZE, progress=False, first=STUDIES - 3)
    full, part = _hashes(out / "train"), _hashes(later / "train")
    assert summary.studies == 3 and len({name.split("/")[0] for name in part}) == 3
    assert all(full[name] == digest for name, digest in part.items())
    assert _rows(later) == _rows(out)[-len(_rows(later)):]  # train.csv: the larger set's last rows
    with pytest.raises(ValueError, match="first must be a non-negative"):
        generate(tmp_path / "bad", 1, SEED, SLICES, SIZE, progress=False, first=-1)


def test_a_different_seed_gives_different_studies(tmp_path: Path, phantom_set: tuple[Path, PhantomSummary]) -> None:
    out, _ = phantom_set
    other = tmp_path / "other"
    generate(other, 2, SEED + 1, SLICES, SIZE, progress=False)
    assert not set(_hashes(other / "train").values()) & set(_hashes(out / "train").values())
    assert _rows(other)[0]["StudyInstanceUID"] != _rows(out)[0]["StudyInstanceUID"]


def test_workers_make_the_same_files_as_one_process(tmp_path: Path) -> None:
    generate(tmp_path / "one", 2, SEED, (10, 12), 32, workers=1, progress=False)
    generate(tmp_path / "two", 2, SEED, (10, 12), 32, workers=2, progress=False)
    assert _hashes(tmp_path / "one") == _hashes(tmp_path / "two")


def test_pe_present_on_image_marks_exactly_the_slices_where_an_embolus_shows_on_half_their_planes() -> None:
    plan = plan_study(SEED, _first(SEED, ExamClass.POSITIVE), (40, 50), 128)
    area = plan.grid.spacing**2
    shown = []
    for i in range(plan.slices):
        seen = 0
        for offset in plan.planes:
            z = float(plan.anatomy_z[i] + offset)
            largest = max(covered_pixels(lesion.cover(plan.chest.tubes, plan.grid, z), lesion.kind)
                          for lesion in plan.lesions if lesion.kind.is_embolus)
            seen += largest * area >= EMBOLUS_VISIBLE_MM2
        shown.append(2 * seen >= len(plan.planes))
        if shown[-1]:
            rendered = render_slice(plan, i, noise=False)
            assert rendered.embolus.any()
            # The defect, averaged through the slice with whatever lies beside it, is darker than the contrast.
            assert float(rendered.hu[rendered.embolus].mean()) < plan.chest.enhancement.pulmonary_artery - 20.0
    assert shown == list(plan.pe_present) and any(shown)
    assert plan.labels["negative_exam_for_pe"] == 0
    negative = plan_study(SEED, _first(SEED, ExamClass.NEGATIVE), (40, 50), 128)
    assert not negative.pe_present.any()
    assert not any(render_slice(negative, i, noise=False).embolus.any() for i in range(0, negative.slices, 5))


def test_clot_ends_thinner_than_the_visible_area_are_drawn_but_not_labelled() -> None:
    found = False
    for index in range(40):
        if exam_class(SEED, index) is not ExamClass.POSITIVE:
            continue
        plan = plan_study(SEED, index, (40, 50), 256)
        for i in np.flatnonzero(~plan.pe_present):
            pixels = int(render_slice(plan, int(i), noise=False).embolus.sum())
            assert pixels * plan.grid.spacing**2 < EMBOLUS_VISIBLE_MM2 * len(plan.lesions)
            found = found or pixels > 0
        if found:
            break
    assert found


def test_dicom_files_are_ct_images_with_plausible_hounsfield_units(phantom_set: tuple[Path, PhantomSummary]) -> None:
    out, _ = phantom_set
    index = _first(SEED, ExamClass.NEGATIVE)
    plan = plan_study(SEED, index, SLICES, SIZE)
    rows = [r for r in _rows(out) if r["StudyInstanceUID"] == plan.header["StudyInstanceUID"]]
    assert len(rows) == plan.slices
    positions = []
    for i, row in enumerate(rows):
        ds = pydicom.dcmread(out / "train" / row["StudyInstanceUID"] / row["SeriesInstanceUID"]
                             / f"{row['SOPInstanceUID']}.dcm")
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
        assert ds.SOPInstanceUID == row["SOPInstanceUID"]
        assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
        assert 0.55 * 512 - 0.01 <= float(ds.PixelSpacing[0]) * SIZE <= 0.95 * 512 + 0.01
        assert 0.6 <= float(ds.SliceThickness) <= 3.0
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 1)
        assert (float(ds.RescaleIntercept), float(ds.RescaleSlope), ds.RescaleType) == (-1024.0, 1.0, "HU")
        assert ds.PatientName and ds.PatientID and ds.StudyDate and ds.FrameOfReferenceUID
        assert ds.ImageType == ["ORIGINAL", "PRIMARY", "AXIAL"] and ds.BodyPartExamined == "CHEST"
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert hu.min() >= -2048 and hu.max() <= 3071
        positions.append(float(ds.ImagePositionPatient[2]))
        assert int(ds.InstanceNumber) == plan.instance_numbers[i]
    steps = np.diff(positions)
    assert np.all(steps > 0) or np.all(steps < 0)
    assert np.allclose(steps, steps[0], atol=0.01) and 0.6 - 0.01 <= abs(steps[0]) <= 3.0 + 0.01


def _hu(plan_index: int, slice_index: int, out: Path) -> np.ndarray:
    plan = plan_study(SEED, plan_index, SLICES, SIZE)
    study = plan.header["StudyInstanceUID"]
    row = [r for r in _rows(out) if r["StudyInstanceUID"] == study][slice_index]
    ds = pydicom.dcmread(out / "train" / study / row["SeriesInstanceUID"] / f"{row['SOPInstanceUID']}.dcm")
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_lungs_are_near_minus_850_and_the_pulmonary_trunk_is_over_200_hu(
        phantom_set: tuple[Path, PhantomSummary]) -> None:
    out, _ = phantom_set
    index = _first(SEED, ExamClass.NEGATIVE)
    plan = plan_study(SEED, index, SLICES, SIZE)
    grid, chest = plan.grid, plan.chest
    middle = int(np.argmin(np.abs(plan.anatomy_z - 0.6 * chest.lung_height)))
    x, y = np.meshgrid(grid.xs, grid.ys)
    lung = chest.lung_mask(x, y, np.full_like(x, plan.anatomy_z[middle]))
    assert lung.sum() > 20
    assert -920.0 <= float(np.median(_hu(index, middle, out)[lung])) <= -760.0
    tubes = chest.tubes
    trunk = np.flatnonzero((tubes.kind == TubeKind.ARTERY) & (tubes.order == 0) & (tubes.side == 0))
    crossings = [(t, i) for t in trunk for i in range(plan.slices)
                 if tubes.start[t, 2] + 3 < plan.anatomy_z[i] < tubes.end[t, 2] - 3]
    assert crossings
    t, i = crossings[0]
    start, end = tubes.start[t], tubes.end[t]
    point = start + (plan.anatomy_z[i] - start[2]) / (end[2] - start[2]) * (end - start)
    col, row = round((point[0] - grid.x0) / grid.spacing), round((point[1] - grid.y0) / grid.spacing)
    assert plan.chest.enhancement.pulmonary_artery >= 180.0
    assert float(_hu(index, i, out)[row, col]) > 200.0


def test_indeterminate_studies_have_a_poor_bolus_or_motion_and_no_emboli() -> None:
    seen = set()
    for seed in range(40):
        plan = plan_study(seed, _first(seed, ExamClass.INDETERMINATE), (10, 12), 48)
        assert plan.labels["indeterminate"] == 1 and not plan.pe_present.any()
        assert not any(lesion.kind.is_embolus for lesion in plan.lesions)
        if plan.labels["qa_contrast"]:
            assert plan.chest.enhancement.pulmonary_artery <= 150.0
            seen.add("qa_contrast")
        if plan.labels["qa_motion"]:
            assert plan.motion is not None and plan.motion.blur_mm >= 5.0
            seen.add("qa_motion")
        if len(seen) == 2:
            break
    assert seen == {"qa_contrast", "qa_motion"}


def test_classes_are_dealt_as_in_rspect_and_any_three_studies_hold_every_class() -> None:
    classes = [exam_class(11, i) for i in range(400)]
    assert classes.count(ExamClass.NEGATIVE) == 270
    assert classes.count(ExamClass.POSITIVE) == 120
    assert classes.count(ExamClass.INDETERMINATE) == 10
    for seed in range(20):
        assert {exam_class(seed, i) for i in range(3)} == set(ExamClass)


def test_instance_numbers_are_sometimes_out_of_position_order() -> None:
    plans = [plan_study(5, i, (10, 14), 32) for i in range(30)]
    orders = set()
    for plan in plans:
        assert sorted(plan.instance_numbers) == list(range(1, plan.slices + 1))
        steps = np.diff(plan.instance_numbers)
        orders.add("scan" if np.all(steps == 1) else "reversed" if np.all(steps == -1) else "shuffled")
    assert orders == {"scan", "reversed", "shuffled"}
    assert {bool(p.patient_z[1] > p.patient_z[0]) for p in plans} == {True, False}


def test_positive_studies_show_pe_on_a_minority_of_slices() -> None:
    shares = [plan_study(0, i, (60, 80), 256).pe_present.mean()
              for i in range(60) if exam_class(0, i) is ExamClass.POSITIVE][:12]
    assert all(share > 0 for share in shares)
    assert 0.05 <= float(np.mean(shares)) <= 0.3


def test_cli_writes_a_set_and_refuses_an_existing_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path), "--studies", "2", "--seed", "1", "--slices", "10-12", "--size", "48",
            "--workers", "1", "--quiet"]
    assert main_phantoms(argv) == 0
    assert "2 studies" in capsys.readouterr().out
    assert len(_rows(tmp_path)) >= 20
    assert main_phantoms(argv) == 2
    assert "train exists" in capsys.readouterr().err


def test_slice_range_parses_a_to_b_and_rejects_nonsense() -> None:
    assert slice_range("60-120") == (60, 120)
    assert slice_range("40") == (40, 40)
    for bad in ("120-60", "a-b", "2-4"):
        with pytest.raises(Exception, match="expected"):
            slice_range(bad)


def test_generate_rejects_bad_arguments_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="studies"):
        generate(tmp_path / "a", 0, 1)
    with pytest.raises(ValueError, match="size"):
        generate(tmp_path / "b", 1, 1, size=8)
    with pytest.raises(ValueError, match="seed"):
        generate(tmp_path / "c", 1, -1)


def test_series_encoder_writes_the_bytes_dcmwrite_writes(tmp_path: Path) -> None:
    plan = plan_study(SEED, 0, (10, 12), 48)
    series = series_dataset(plan.header, size=48, spacing=plan.grid.spacing, thickness=plan.slice_thickness)
    encoder = SeriesEncoder(series)
    for i in (0, plan.slices - 1):
        stored = to_stored(render_slice(plan, i).hu)
        where = slice_geometry(plan, i)
        pydicom.dcmwrite(tmp_path / "reference.dcm", slice_dataset(series, f"1.2.3.{i}", where, stored),
                         enforce_file_format=True)
        assert encoder.encode(f"1.2.3.{i}", where, stored) == (tmp_path / "reference.dcm").read_bytes()
    with pytest.raises(ValueError, match="InstanceNumber"):
        SeriesEncoder(slice_dataset(series, "1.2.3", slice_geometry(plan, 0), stored))


def test_each_study_draws_its_rendering_from_wide_ranges() -> None:
    plans = [plan_study(7, i, (20, 40)) for i in range(60)]
    sizes = [p.grid.size for p in plans]
    assert set(sizes) == {512, 384, 256} and sizes.count(512) > len(plans) / 2
    for p in plans:
        assert 0.55 * 512 - 0.01 <= p.grid.spacing * p.grid.size <= 0.95 * 512 + 0.01
        assert 0.6 <= p.slice_thickness <= 3.0 and 0.6 - 1e-6 <= abs(p.anatomy_z[1] - p.anatomy_z[0]) <= 3.0 + 1e-6
        assert len(p.planes) == max(1, round(p.slice_thickness)) and abs(p.planes.mean()) < 1e-9
        assert 8.0 <= p.noise_sigma <= 45.0
    thickness = [p.slice_thickness for p in plans]
    assert min(thickness) < 1.0 and max(thickness) > 2.5
    diagnostic = [p.chest.enhancement.pulmonary_artery for p in plans if not p.labels["qa_contrast"]]
    assert min(diagnostic) < 250.0 and max(diagnostic) > 450.0 and min(diagnostic) >= 180.0
    assert {p.noise_texture for p in plans} == {"white", "grain", "band"}
    assert any(p.sharpen for p in plans) and not all(p.sharpen for p in plans)
    assert any(p.streaks for p in plans) and any(p.chest.arm_mm for p in plans)
    acute = [lesion for p in plans for lesion in p.lesions if lesion.kind is LesionKind.ACUTE]
    assert min(lesion.hu for lesion in acute) < 35.0 and max(lesion.hu for lesion in acute) > 75.0
    assert any(lesion.fraction > 1.0 for lesion in acute) and any(lesion.fraction < 0.5 for lesion in acute)
    assert any(lesion.taper > 6.0 for lesion in acute) and any(lesion.offset > 0.2 for lesion in acute)


def test_a_study_too_short_to_cover_the_chest_is_a_slab_through_the_pulmonary_bifurcation() -> None:
    slabs = 0
    for i in range(20):
        plan = plan_study(4, i, (12, 16), 64)
        spacing = abs(plan.anatomy_z[1] - plan.anatomy_z[0])
        if spacing * (plan.slices - 1) < plan.chest.lung_height:
            tubes = plan.chest.tubes
            trunk = (tubes.kind == TubeKind.ARTERY) & (tubes.order == 0) & (tubes.side == 0)
            bifurcation = tubes.end[trunk, 2].max()
            assert plan.anatomy_z.min() - 4.0 <= bifurcation <= plan.anatomy_z.max() + 4.0  # breathing moves a few mm
            slabs += 1
    assert slabs > 5


def test_a_studys_drawn_look_is_the_same_for_the_same_seed() -> None:
    first, again = plan_study(9, 3, (10, 12)), plan_study(9, 3, (10, 12))
    assert first.grid == again.grid and first.slice_thickness == again.slice_thickness
    assert np.array_equal(render_slice(first, 0).hu, render_slice(again, 0).hu)
