"""The evaluation-only phantom family: its layout, labels, determinism, the ranges of its design, and that it shares no
construction with the training family (tiny studies, seconds in all)."""

from __future__ import annotations

import ast
import csv
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage

from pe_node.findings import IMAGE_LABEL
from training.cli import main
from training.evalphantoms.study import (
    MODEL_NAME,
    generate,
    location_of,
    plan_study,
    read_locations,
    render_slice,
)
from training.rspect import STUDY_COLUMNS, read_rspect

REPO = Path(__file__).resolve().parents[2]
SEED = 4
SIZE = 64
SLICES = (8, 12)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("independent")
    generate(out, 6, SEED, SIZE, SLICES, progress=False)
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_block_of_six_holds_three_negatives_and_one_clot_in_each_place() -> None:
    for seed in range(5):
        for block in range(3):
            places = sorted(location_of(seed, 6 * block + i) for i in range(6))
            assert places == ["central", "left", "negative", "negative", "negative", "right"]


def test_the_set_is_rspect_layout_whose_labels_say_where_each_clot_lies(family: Path) -> None:
    studies = read_rspect(family)  # every file present, every study passing the RSNA label rules
    locations = read_locations(family)
    assert set(locations) == set(studies) and len(studies) == 6
    label = {"central": "central_pe", "left": "leftsided_pe", "right": "rightsided_pe"}
    for uid, study in studies.items():
        where = locations[uid]
        assert study.pe_present == (where != "negative")
        assert study.labels["negative_exam_for_pe"] == (where == "negative")
        located = {name for name, column in label.items() if study.labels[column]}
        assert located == (set() if where == "negative" else {where})
        assert not (study.labels["chronic_pe"] or study.labels["acute_and_chronic_pe"] or study.labels["indeterminate"])
    with open(family / "clots.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    for row in rows:
        positive = sum(image.pe_present_on_image for image in studies[row["StudyInstanceUID"]].images)
        assert int(row["slices_with_pe"]) == positive
        if row["location"] != "negative":
            assert 12.0 <= float(row["length_mm"]) <= 40.0 and 0.45 <= float(row["fraction"]) <= 0.8


def test_the_files_are_ct_images_of_the_evaluation_family(family: Path) -> None:
    study = next(iter(read_rspect(family).values()))
    positions = []
    for image in study.images:
        ds = pydicom.dcmread(image.path)
        assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT" and ds.Rows == ds.Columns == SIZE
        assert ds.ManufacturerModelName == MODEL_NAME and ds.RescaleType == "HU"
        positions.append(float(ds.ImagePositionPatient[2]))
    steps = np.diff(positions)
    assert np.all(steps > 0) or np.all(steps < 0)


def test_a_seed_gives_the_same_files_and_another_seed_other_ones(family: Path, tmp_path: Path) -> None:
    generate(tmp_path / "again", 2, SEED, SIZE, SLICES, progress=False)
    generate(tmp_path / "other", 2, SEED + 1, SIZE, SLICES, progress=False)
    full, again = _hashes(family / "train"), _hashes(tmp_path / "again" / "train")
    assert again and all(full[name] == digest for name, digest in again.items())
    assert not set(_hashes(tmp_path / "other" / "train").values()) & set(full.values())


def test_studies_follow_the_independent_designs_description() -> None:
    for index in range(6):
        study = plan_study(11, index)
        grid, scan = study.scan.grid, study.scan
        assert grid.size == 512 and 0.6 <= grid.spacing <= 0.8
        assert 1.0 <= scan.thickness <= 2.0 and 0.8 * scan.thickness - 1e-6 <= abs(scan.z[1] - scan.z[0])
        assert scan.z.min() < 0.0 and scan.z.max() > study.patient.lung_height  # bases to apices
        assert 260.0 <= study.patient.blood["artery"] <= 420.0 and 10.0 <= scan.noise_hu <= 22.0
        if study.clot is not None:
            assert 12.0 <= study.clot.length <= 40.0 and 0.45 <= study.clot.fraction <= 0.8
            assert study.clot.artery.startswith("trunk") == (study.location == "central")


def test_a_clot_is_a_defect_darker_than_the_contrast_around_it_on_the_slices_labelled_pe() -> None:
    index = next(i for i in range(6) if location_of(SEED, i) == "central")
    study = plan_study(SEED, index, 128, (30, 40))
    assert study.clot is not None
    shown = np.flatnonzero(study.pe_present)
    assert len(shown)
    image = render_slice(study, int(shown[len(shown) // 2]), noise=False)
    share = study.clot.share(study.scan.grid, float(study.scan.z[shown[len(shown) // 2]]), study.scan.thickness)
    assert float(image[share > 0.9].mean()) < study.patient.blood["artery"] - 100.0
    assert not any(study.clot.share(study.scan.grid, float(z), study.scan.thickness).any()
                   for z in study.scan.z[~study.pe_present][::3]
                   if abs(z - study.clot.centre[:, 2].mean()) > 60.0)


def test_it_shares_no_construction_with_the_training_family() -> None:
    training_family = ("training.phantoms.anatomy", "training.phantoms.lesions", "training.phantoms.generator")
    for path in (REPO / "training" / "evalphantoms").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in training_family, (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert not {alias.name for alias in node.names} & set(training_family), path.name
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, training.evalphantoms.study; "
         "print(sorted(m for m in sys.modules if m.startswith('training.phantoms')))"],
        capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert loaded.strip() == "['training.phantoms', 'training.phantoms.ctimage']"


def test_pe_train_phantoms_writes_the_independent_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["phantoms", "--family", "independent", "--out", str(tmp_path), "--studies", "1", "--seed", "2",
            "--size", "64", "--slices", "8-8", "--workers", "1", "--quiet"]
    assert main(argv) == 0
    assert "1 evaluation phantoms (independent family)" in capsys.readouterr().out
    with open(tmp_path / "train.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 8 and set(STUDY_COLUMNS) < set(rows[0]) and IMAGE_LABEL in rows[0]
    assert main(argv) == 2
