"""The RSPECT layout reader and the RSNA label rules, on a tiny phantom set and on hand-made CSVs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pe_node.findings import EXAM_LABELS, IMAGE_LABEL
from training.phantoms.generator import generate, plan_study
from training.rspect import (
    RSPECT_COLUMNS,
    STUDY_COLUMNS,
    RSPECTError,
    check_labels,
    read_rspect,
)

SEED = 5


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rspect")
    generate(root, 4, SEED, (10, 14), 48, progress=False)
    return root


def _table(root: Path) -> list[list[str]]:
    with open(root / "train.csv", newline="") as stream:
        return list(csv.reader(stream))


def _write(root: Path, table: list[list[str]]) -> None:
    with open(root / "train.csv", "w", newline="") as stream:
        csv.writer(stream).writerows(table)


def _copy_csv(src: Path, dst: Path) -> list[list[str]]:
    table = _table(src)
    (dst / "train").mkdir(parents=True, exist_ok=True)
    _write(dst, table)
    return table


def test_reader_round_trips_a_generated_set(phantom_root: Path) -> None:
    studies = read_rspect(phantom_root)
    assert len(studies) == 4
    for index, study in enumerate(studies.values()):
        plan = plan_study(SEED, index, (10, 14), 48)
        assert study.study_instance_uid == plan.header["StudyInstanceUID"]
        assert study.series_instance_uid == plan.header["SeriesInstanceUID"]
        assert study.labels == plan.labels
        assert [image.pe_present_on_image for image in study.images] == [int(p) for p in plan.pe_present]
        assert all(image.path.is_file() for image in study.images)
        assert list(study.exam_labels) == list(EXAM_LABELS)
        assert study.pe_present == bool(plan.pe_present.any())


def test_reader_accepts_columns_in_another_order(phantom_root: Path, tmp_path: Path) -> None:
    table = _table(phantom_root)
    flipped = [row[::-1] for row in table]
    (tmp_path / "train").symlink_to(phantom_root / "train")
    _write(tmp_path, flipped)
    assert read_rspect(tmp_path).keys() == read_rspect(phantom_root).keys()


def test_reader_rejects_a_csv_without_a_column_naming_it(phantom_root: Path, tmp_path: Path) -> None:
    table = _table(phantom_root)
    drop = RSPECT_COLUMNS.index("central_pe")
    _write(tmp_path, [row[:drop] + row[drop + 1:] for row in table])
    with pytest.raises(RSPECTError, match="missing column.*central_pe"):
        read_rspect(tmp_path, check_files=False)


@pytest.mark.parametrize("column, value", [("pe_present_on_image", "0.7"), ("qa_motion", "yes"), ("chronic_pe", "")])
def test_reader_rejects_a_bad_label_naming_line_column_and_value(phantom_root: Path, tmp_path: Path, column: str,
                                                                 value: str) -> None:
    table = _copy_csv(phantom_root, tmp_path)
    table[1][RSPECT_COLUMNS.index(column)] = value
    _write(tmp_path, table)
    with pytest.raises(RSPECTError, match=rf"train.csv:2: {column} is {value!r}"):
        read_rspect(tmp_path, check_files=False)


def test_reader_rejects_study_labels_that_differ_between_rows(phantom_root: Path, tmp_path: Path) -> None:
    table = _copy_csv(phantom_root, tmp_path)
    column = RSPECT_COLUMNS.index("flow_artifact")
    table[3][column] = "1" if table[3][column] == "0" else "0"
    _write(tmp_path, table)
    with pytest.raises(RSPECTError, match="train.csv:4: study .*flow_artifact differs"):
        read_rspect(tmp_path, check_files=False)


def test_reader_rejects_a_bad_uid_naming_it(phantom_root: Path, tmp_path: Path) -> None:
    table = _copy_csv(phantom_root, tmp_path)
    table[2][2] = "../../etc/passwd"
    _write(tmp_path, table)
    with pytest.raises(RSPECTError, match=r"train.csv:3: SOPInstanceUID '../../etc/passwd' is not a UID"):
        read_rspect(tmp_path, check_files=False)


def test_reader_rejects_labels_that_break_the_rsna_rules(phantom_root: Path, tmp_path: Path) -> None:
    table = _copy_csv(phantom_root, tmp_path)
    study = table[1][0]
    column = RSPECT_COLUMNS.index("central_pe")
    for row in table[1:]:
        if row[0] == study:
            row[column] = "1"
            row[3] = "0"
    _write(tmp_path, table)
    with pytest.raises(RSPECTError, match=f"study {study}: .*central_pe"):
        read_rspect(tmp_path, check_files=False)


def test_reader_rejects_a_missing_file(phantom_root: Path, tmp_path: Path) -> None:
    table = _table(phantom_root)
    table.append([table[1][0], table[1][1], "1.2.3.999", "0", *table[1][4:]])
    (tmp_path / "train").symlink_to(phantom_root / "train")
    _write(tmp_path, table)
    with pytest.raises(RSPECTError, match="1 file.*missing.*1.2.3.999.dcm"):
        read_rspect(tmp_path)


def test_reader_accepts_the_anonymised_uids_of_the_real_data_set(tmp_path: Path) -> None:
    labels = {c: 0 for c in STUDY_COLUMNS} | {"negative_exam_for_pe": 1}
    rows = [["6897fa9de148", "2bfbb7fd2e8b", sop, "0", *[str(labels[c]) for c in STUDY_COLUMNS]]
            for sop in ("c0f3cb036d06", "f57ffd3883b6")]
    _write(tmp_path, [list(RSPECT_COLUMNS), *rows])
    study = read_rspect(tmp_path, check_files=False)["6897fa9de148"]
    assert [i.path for i in study.images] == [tmp_path / "train/6897fa9de148/2bfbb7fd2e8b/c0f3cb036d06.dcm",
                                              tmp_path / "train/6897fa9de148/2bfbb7fd2e8b/f57ffd3883b6.dcm"]
    assert study.labels["negative_exam_for_pe"] == 1


def _labels(**set_: int) -> dict[str, int]:
    return {c: 0 for c in STUDY_COLUMNS} | {IMAGE_LABEL: 0} | set_


def test_check_labels_accepts_consistent_studies() -> None:
    assert check_labels(_labels(negative_exam_for_pe=1, flow_artifact=1)) == []
    assert check_labels(_labels(indeterminate=1, qa_contrast=1)) == []
    assert check_labels(_labels(pe_present_on_image=1, rv_lv_ratio_lt_1=1, rightsided_pe=1)) == []
    assert check_labels(_labels(pe_present_on_image=1, rv_lv_ratio_gte_1=1, central_pe=1, chronic_pe=1)) == []


@pytest.mark.parametrize("labels, problem", [
    (_labels(pe_present_on_image=1, negative_exam_for_pe=1, rv_lv_ratio_lt_1=1, leftsided_pe=1), "negative"),
    (_labels(pe_present_on_image=1, leftsided_pe=1), "rv_lv"),
    (_labels(pe_present_on_image=1, rv_lv_ratio_lt_1=1, rv_lv_ratio_gte_1=1, leftsided_pe=1), "rv_lv"),
    (_labels(pe_present_on_image=1, rv_lv_ratio_lt_1=1), "central_pe, leftsided_pe, rightsided_pe"),
    (_labels(pe_present_on_image=1, rv_lv_ratio_lt_1=1, central_pe=1, chronic_pe=1, acute_and_chronic_pe=1),
     "both chronic"),
    (_labels(), "exactly one of negative_exam_for_pe and indeterminate"),
    (_labels(negative_exam_for_pe=1, indeterminate=1), "exactly one of negative_exam_for_pe and indeterminate"),
    (_labels(negative_exam_for_pe=1, rightsided_pe=1), "rightsided_pe set"),
])
def test_check_labels_names_the_broken_rule(labels: dict[str, int], problem: str) -> None:
    problems = check_labels(labels)
    assert len(problems) == 1 and problem in problems[0]
