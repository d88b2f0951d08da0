"""The RSPECT data set layout (RSNA-STR Pulmonary Embolism CT): ``train.csv`` and ``train/<Study>/<Series>/<SOP>.dcm``.

``train.csv`` has one row per slice with the 17 columns of RSPECT_COLUMNS: three UIDs, the image label
``pe_present_on_image`` and thirteen study-level labels repeated on every row of the study. Every label is 0 or 1.
The real data set has 7,279 studies and 1.79 M rows, so the reader streams the file with the csv module and keeps one
small record per slice. Its UIDs are anonymised strings rather than DICOM UIDs, so they are checked only for being
safe file names.

The study labels follow the RSNA label-consistency rules (``check_labels``), which every phantom study and every study
of the real data set pass.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar

from pe_node import storage
from pe_node.findings import EXAM_LABELS, IMAGE_LABEL

UID_COLUMNS: tuple[str, ...] = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
RSPECT_COLUMNS: tuple[str, ...] = (
    *UID_COLUMNS, IMAGE_LABEL, "negative_exam_for_pe", "qa_motion", "qa_contrast", "flow_artifact",
    "rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1", "leftsided_pe", "chronic_pe", "true_filling_defect_not_pe",
    "rightsided_pe", "acute_and_chronic_pe", "central_pe", "indeterminate",
)
# The thirteen columns that hold one value per study, in file order.
STUDY_COLUMNS: tuple[str, ...] = RSPECT_COLUMNS[4:]
# The labels that only a positive study may set: the RSNA checker's "seven PE labels".
PE_LABELS: tuple[str, ...] = (
    "rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1", "central_pe", "leftsided_pe", "rightsided_pe", "chronic_pe",
    "acute_and_chronic_pe",
)
_UID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}")
_BINARY = frozenset({"0", "1"})


class RSPECTError(ValueError):
    """A train.csv or train/ folder that does not follow the RSPECT layout; the message names the file, the line or
    study and the bad value."""


class RSPECTImage(NamedTuple):
    """One slice: its SOP Instance UID, the series folder its file is in, and whether PE is visible on it."""

    sop_instance_uid: str
    folder: Path
    pe_present_on_image: int

    @property
    def path(self) -> Path:
        """The slice's file, ``<folder>/<SOPInstanceUID>.dcm`` (made on demand: 1.79 M Path objects cost seconds)."""
        return self.folder / f"{self.sop_instance_uid}{storage.DICOM_SUFFIX}"


@dataclass
class RSPECTStudy:
    """One study (RSPECT has one series per study): its images in file order and its thirteen study labels."""

    study_instance_uid: str
    series_instance_uid: str
    labels: dict[str, int]
    images: list[RSPECTImage] = field(default_factory=list)

    @property
    def pe_present(self) -> bool:
        """Whether PE is visible on any slice: the RSNA definition of a positive exam."""
        return any(image.pe_present_on_image for image in self.images)

    @property
    def exam_labels(self) -> dict[str, int]:
        """The nine labels the model predicts, in pe_node.findings.EXAM_LABELS order."""
        return {label: self.labels[label] for label in EXAM_LABELS}


def check_labels(row: Mapping[str, int]) -> list[str]:
    """The RSNA label-consistency rules that a study's labels break; empty when they are consistent.

    ``row`` holds the thirteen study labels and ``pe_present_on_image`` as the study's maximum over its slices.
    A positive study (some slice with PE) is neither negative nor indeterminate, has exactly one of the two RV/LV
    labels, at least one of central/left/right and at most one of chronic and acute-and-chronic (neither: acute).
    A study without PE on any slice is exactly one of negative and indeterminate and has none of the seven PE labels.
    """
    problems = []
    if row[IMAGE_LABEL]:
        if row["negative_exam_for_pe"] or row["indeterminate"]:
            problems.append("PE on some slice but negative_exam_for_pe or indeterminate is 1")
        if row["rv_lv_ratio_gte_1"] + row["rv_lv_ratio_lt_1"] != 1:
            problems.append("PE present but not exactly one of rv_lv_ratio_gte_1 and rv_lv_ratio_lt_1 is 1")
        if not (row["central_pe"] or row["leftsided_pe"] or row["rightsided_pe"]):
            problems.append("PE present but none of central_pe, leftsided_pe, rightsided_pe is 1")
        if row["chronic_pe"] and row["acute_and_chronic_pe"]:
            problems.append("both chronic_pe and acute_and_chronic_pe are 1")
    else:
        if row["negative_exam_for_pe"] + row["indeterminate"] != 1:
            problems.append("no PE on any slice but not exactly one of negative_exam_for_pe and indeterminate is 1")
        present = [label for label in PE_LABELS if row[label]]
        if present:
            problems.append(f"no PE on any slice but {', '.join(present)} set")
    return problems


def write_table(path: Path, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a CSV table (``train.csv`` with ``RSPECT_COLUMNS``, or a phantom set's own table) whole or not at all."""
    with storage.replacing(path) as partial, open(partial, "w", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def new_set(out: Path) -> Path:
    """Make ``out/train`` for a set about to be written and return it; ``out`` may exist but must not hold train.csv
    or train/ yet."""
    images = out / "train"
    for existing in (images, out / "train.csv"):
        if existing.exists():
            raise FileExistsError(f"{existing} exists; phantoms are written to a fresh folder")
    images.mkdir(parents=True)
    return images


Job = TypeVar("Job")
Made = TypeVar("Made")


def write_studies(make: Callable[[Job], Made], jobs: Sequence[Job], workers: int, progress: bool,
                  what: str) -> list[Made]:
    """``make`` each study of a set (one job each), in ``workers`` spawned processes when more than one, and return
    the results in job order; with ``progress``, count the studies made on stderr as ``what``."""
    made: list[Made] = []
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        for result in pool.imap(make, jobs) if pool is not None else map(make, jobs):
            made.append(result)
            if progress:
                print(f"\r{what}: {len(made)}/{len(jobs)} studies", end="", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if progress:
        print(file=sys.stderr)
    return made


def read_rspect(root: Path, *, csv_name: str = "train.csv", images: str = "train", check_files: bool = True,
                check_consistency: bool = True) -> dict[str, RSPECTStudy]:
    """Read an RSPECT data set: ``root/csv_name`` and the DICOM files under ``root/images``.

    Returns the studies by StudyInstanceUID in the order they first appear in the CSV. Raises RSPECTError naming the
    line and column of a missing column, a bad UID or a label other than 0/1, a study whose study labels differ
    between rows or that has two series, a study whose labels break the RSNA rules (``check_consistency``), and slices
    whose files are missing (``check_files``: one directory listing per series, not a stat per file).
    """
    csv_path = root / csv_name
    studies = _read_csv(csv_path, root / images)
    if check_consistency:
        for study in studies.values():
            problems = check_labels({**study.labels, IMAGE_LABEL: int(study.pe_present)})
            if problems:
                raise RSPECTError(f"{csv_path}: study {study.study_instance_uid}: {'; '.join(problems)}")
    if check_files:
        for study in studies.values():
            _check_files(study)
    return studies


def _read_csv(csv_path: Path, image_root: Path) -> dict[str, RSPECTStudy]:
    """Parse and validate train.csv row by row into studies."""
    studies: dict[str, RSPECTStudy] = {}
    with open(csv_path, newline="") as stream:
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None:
            raise RSPECTError(f"{csv_path}: empty file, expected the header {','.join(RSPECT_COLUMNS)}")
        missing = [c for c in RSPECT_COLUMNS if c not in header]
        if missing:
            raise RSPECTError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        order = [header.index(c) for c in RSPECT_COLUMNS]
        in_order = order == list(range(len(RSPECT_COLUMNS)))
        study: RSPECTStudy | None = None
        study_values: list[str] = []
        folder = image_root
        for line, raw in enumerate(reader, start=2):
            if len(raw) != len(header):
                raise RSPECTError(f"{csv_path}:{line}: {len(raw)} values, the header has {len(header)}")
            row = raw if in_order else [raw[i] for i in order]
            if study is None or row[0] != study.study_instance_uid:
                study = studies.get(row[0])
                if study is None:
                    study = _new_study(csv_path, line, row)
                    studies[study.study_instance_uid] = study
                study_values = [str(study.labels[c]) for c in STUDY_COLUMNS]
                folder = storage.series_folder(image_root, study.study_instance_uid, study.series_instance_uid)
            if row[1] != study.series_instance_uid:
                raise RSPECTError(f"{csv_path}:{line}: study {row[0]} has a second series {row[1]!r} "
                                  f"(first {study.series_instance_uid}); RSPECT has one series per study")
            if row[4:] != study_values:
                column = next(c for c, a, b in zip(STUDY_COLUMNS, row[4:], study_values) if a != b)
                raise RSPECTError(f"{csv_path}:{line}: study {row[0]}: {column} differs between rows of the study")
            if row[3] not in _BINARY:
                raise RSPECTError(f"{csv_path}:{line}: {IMAGE_LABEL} is {row[3]!r}, expected 0 or 1")
            sop = row[2]
            if not _UID.fullmatch(sop):
                raise RSPECTError(f"{csv_path}:{line}: SOPInstanceUID {sop!r} is not a UID")
            study.images.append(RSPECTImage(sop, folder, int(row[3])))
    return studies


def _new_study(csv_path: Path, line: int, row: list[str]) -> RSPECTStudy:
    """The study that begins at this row, its UIDs and study labels validated."""
    for column, value in zip(UID_COLUMNS[:2], row[:2]):
        if not _UID.fullmatch(value):
            raise RSPECTError(f"{csv_path}:{line}: {column} {value!r} is not a UID")
    for column, value in zip(STUDY_COLUMNS, row[4:]):
        if value not in _BINARY:
            raise RSPECTError(f"{csv_path}:{line}: {column} is {value!r}, expected 0 or 1")
    return RSPECTStudy(row[0], row[1], {c: int(v) for c, v in zip(STUDY_COLUMNS, row[4:])})


def _check_files(study: RSPECTStudy) -> None:
    """Raise RSPECTError unless every slice of the study has its file."""
    folder = study.images[0].folder
    try:
        present = {entry.name for entry in os.scandir(folder)}
    except FileNotFoundError:
        raise RSPECTError(f"study {study.study_instance_uid}: folder {folder} is missing") from None
    names = (image.sop_instance_uid + storage.DICOM_SUFFIX for image in study.images)
    missing = [name for name in names if name not in present]
    if missing:
        raise RSPECTError(f"study {study.study_instance_uid}: {len(missing)} file(s) missing in {folder}, "
                          f"e.g. {missing[0]}")
