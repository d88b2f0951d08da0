"""Studies of the evaluation phantoms: patient, clot, scan and labels, written in the RSPECT layout.

Studies are dealt in blocks of six, three without PE and one each with a clot in the pulmonary trunk (central), in a
left and in a right lobar artery, shuffled by the seed: half the studies are positive and the three locations come
equally often. Each study is one series as a CT pulmonary angiogram would be reconstructed: a 512 x 512 matrix of
0.6-0.8 mm pixels that holds the body where it fits, slices 1-2 mm thick (contiguous, or overlapping by a fifth)
from below the lung bases to above the apices, a Gaussian point spread of 0.35-0.6 mm, and quantum noise of 10-22 HU
whose texture follows a filtered-back-projection noise power spectrum (rising from zero, falling off above a cutoff
of 0.25-0.5 cycles/mm). Labels come from what was drawn: a slice shows PE where the clot's share of its pixels adds up
to at least ``VISIBLE_MM2``; ``central_pe`` for a clot of the trunk and main arteries, ``leftsided_pe`` /
``rightsided_pe`` for one of that lung's lobar arteries; the RV/LV labels from the drawn ventricles.

Everything is drawn from generators seeded by (seed, stream, study) and (seed, stream, study, slice), so a seed gives
byte-identical files and studies can be made in parallel.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from pe_node import storage
from pe_node.findings import IMAGE_LABEL
from training.evalphantoms.clot import LOCATIONS, Clot, place_clot
from training.evalphantoms.patient import Patient, build_patient
from training.evalphantoms.shapes import Grid
from training.phantoms.ctimage import SeriesEncoder, SliceGeometry, derived_uid, series_dataset, to_stored
from training.rspect import RSPECT_COLUMNS, STUDY_COLUMNS, check_labels, new_set, write_studies, write_table

log = logging.getLogger(__name__)

VISIBLE_MM2 = 5.0
"""A slice shows PE where the clot covers at least this much of it (mm^2)."""
DEFAULT_SIZE = 512
MODEL_NAME = "CTPA phantom, evaluation family"
"""ManufacturerModelName of every file: which construction made it."""
_DECK = ("negative", "negative", "negative", "central", "left", "right")
_PATIENT_STREAM, _DECK_STREAM, _NOISE_STREAM = 21, 22, 23
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pe-node:evaluation-phantom")


def location_of(seed: int, index: int) -> str:
    """Where study ``index`` of the set made with ``seed`` has its clot: ``negative`` (none) or one of LOCATIONS."""
    block, position = divmod(index, len(_DECK))
    order = np.random.default_rng([seed, _DECK_STREAM, block]).permutation(len(_DECK))
    return _DECK[order[position]]


@dataclass
class Scan:
    """How a study was reconstructed: the slice grid, where each slice lies (anatomy z, mm), the slice thickness,
    the point spread (mm) and the noise (HU, cutoff in cycles/mm, the exponent of the spectrum's rise)."""

    grid: Grid
    z: np.ndarray
    thickness: float
    blur_mm: float
    noise_hu: float
    cutoff: float
    rise: float
    table: float


@dataclass
class EvalStudy:
    """One planned study: patient, clot (None without PE), scan, labels and DICOM header values."""

    seed: int
    index: int
    location: str
    patient: Patient
    clot: Clot | None
    scan: Scan
    labels: dict[str, int]
    pe_present: np.ndarray
    header: dict[str, object]

    @property
    def slices(self) -> int:
        return len(self.scan.z)


def plan_study(seed: int, index: int, size: int = DEFAULT_SIZE, slices: tuple[int, int] | None = None) -> EvalStudy:
    """Draw study ``index``: patient, clot, scan and labels. ``slices`` (A-B) draws the slice count instead of the
    1-2 mm spacing, for small test sets; ``size`` other than 512 keeps the field of view."""
    rng = np.random.default_rng([seed, _PATIENT_STREAM, index])
    location = location_of(seed, index)
    positive = location != "negative"
    dilated = rng.random() < (0.4 if positive else 0.1)
    ratio = rng.uniform(1.0, 1.4) if dilated else rng.uniform(0.65, 0.95)
    patient = build_patient(rng, ratio)
    clot = place_clot(rng, patient, location) if positive else None
    scan = _draw_scan(rng, patient, size, slices)
    step = float(scan.z[1] - scan.z[0]) if len(scan.z) > 1 else 0.0
    for shift in (0.0, 0.5, 0.25, 0.75):  # a few widely spaced slices (``slices``) may all miss a short clot
        z = scan.z + shift * step
        pe_present = np.array([clot is not None and _shows(clot, scan, float(at)) for at in z])
        if pe_present.any() or not positive:
            scan.z = z
            break
    else:
        raise RuntimeError(f"study {index}: the {location} clot shows on no slice")
    labels = {column: 0 for column in STUDY_COLUMNS}
    labels["negative_exam_for_pe"] = int(not positive)
    if positive:
        labels[{"central": "central_pe", "left": "leftsided_pe", "right": "rightsided_pe"}[location]] = 1
        labels["rv_lv_ratio_gte_1" if ratio >= 1.0 else "rv_lv_ratio_lt_1"] = 1
    problems = check_labels({**labels, IMAGE_LABEL: int(pe_present.any())})
    if problems:
        raise RuntimeError(f"inconsistent evaluation phantom labels: {'; '.join(problems)}")
    return EvalStudy(seed, index, location, patient, clot, scan, labels, pe_present, _header(rng, seed, index))


def _draw_scan(rng: np.random.Generator, patient: Patient, size: int, slices: tuple[int, int] | None) -> Scan:
    width = 2.0 * patient.body.a * patient.shoulder(0.8 * patient.lung_height)
    spacing = float(np.clip(width * rng.uniform(1.0, 1.12) / 512, 0.6, 0.8)) * 512 / size
    fov = spacing * size
    centre_x, centre_y = rng.uniform(-8.0, 8.0), rng.uniform(5.0, 20.0)
    grid = Grid(size, spacing, centre_x - fov / 2 + spacing / 2, centre_y - fov / 2 + spacing / 2)
    thickness = float(rng.choice([1.0, 1.25, 1.5, 2.0], p=[0.2, 0.3, 0.2, 0.3]))
    low, high = -rng.uniform(5.0, 15.0), patient.lung_height + rng.uniform(5.0, 20.0)
    if slices is not None:
        count = int(rng.integers(slices[0], slices[1] + 1))
    else:
        step = thickness * (0.8 if thickness >= 1.5 and rng.random() < 0.3 else 1.0)
        count = int((high - low) // step) + 1
    z = np.linspace(high, low, count)
    if rng.random() < 0.3:
        z = z[::-1]
    return Scan(grid=grid, z=z, thickness=thickness, blur_mm=rng.uniform(0.35, 0.6), noise_hu=rng.uniform(10.0, 22.0),
                cutoff=rng.uniform(0.25, 0.5), rise=rng.uniform(0.6, 1.2), table=rng.uniform(-450.0, -150.0))


def _shows(clot: Clot, scan: Scan, z: float) -> bool:
    return float(clot.share(scan.grid, z, scan.thickness).sum()) * scan.grid.spacing**2 >= VISIBLE_MM2


def _uid(seed: int, index: int, *parts: object) -> str:
    return derived_uid(_NAMESPACE, seed, index, *parts)


def _header(rng: np.random.Generator, seed: int, index: int) -> dict[str, object]:
    """Patient, study and equipment values; dates from the seed, never from the clock."""
    day = datetime.date(2015, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 3000)))
    age = int(rng.integers(25, 90))
    birth = day - datetime.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    seconds = int(rng.integers(0, 86400))
    return {
        "PatientName": f"EVALPHANTOM^{seed}-{index:04d}", "PatientID": f"EV{seed}-{index:04d}",
        "PatientBirthDate": birth.strftime("%Y%m%d"), "PatientSex": str(rng.choice(["F", "M"])),
        "PatientAge": f"{age:03d}Y", "StudyDate": day.strftime("%Y%m%d"),
        "StudyTime": f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        "AccessionNumber": f"E{int(rng.integers(10**8, 10**9))}", "KVP": float(rng.choice([100, 120])),
        "ContrastBolusAgent": "Iomeprol 400", "ConvolutionKernel": str(rng.choice(["Br40", "B", "FC08"])),
        "Window": (100, 700), "StudyInstanceUID": _uid(seed, index, "study"),
        "SeriesInstanceUID": _uid(seed, index, "series"), "FrameOfReferenceUID": _uid(seed, index, "frame"),
    }


def render_slice(study: EvalStudy, i: int, *, noise: bool = True) -> np.ndarray:
    """Slice ``i`` (acquisition order) in HU: the patient and clot over the slab, then the point spread, the noise
    and the scanner's reconstruction circle (``noise=False``: the slab alone)."""
    scan, z = study.scan, float(study.scan.z[i])
    image = study.patient.render(scan.grid, z, scan.thickness)
    if study.clot is not None:
        share = study.clot.share(scan.grid, z, scan.thickness)
        image += (np.float32(study.clot.hu) - image) * share
    if not noise:
        return image
    image = ndimage.gaussian_filter(image, scan.blur_mm / scan.grid.spacing)
    rng = np.random.default_rng([study.seed, _NOISE_STREAM, study.index, i])
    image += np.float32(scan.noise_hu) * _noise(rng, scan)
    size = scan.grid.size
    row, col = np.ogrid[:size, :size]
    half = (size - 1) / 2
    image[(row - half) ** 2 + (col - half) ** 2 > (half + 0.5) ** 2] = -1024.0
    return image


def _noise(rng: np.random.Generator, scan: Scan) -> np.ndarray:
    """Unit-variance noise with a filtered-back-projection-like power spectrum: f^rise, cut off above ``cutoff``."""
    size = scan.grid.size
    white = rng.standard_normal((size, size), dtype=np.float32)
    fy = np.fft.fftfreq(size)[:, None] / scan.grid.spacing
    fx = np.fft.rfftfreq(size)[None, :] / scan.grid.spacing
    f = np.sqrt(fx * fx + fy * fy)
    amplitude = np.sqrt(f**scan.rise * np.exp(-((f / scan.cutoff) ** 2)))
    shaped = np.fft.irfft2(np.fft.rfft2(white) * amplitude, s=(size, size)).astype(np.float32)
    return shaped / max(float(shaped.std()), 1e-6)


def write_study(study: EvalStudy, images: Path) -> list[list[object]]:
    """Render and write every slice under ``images/<Study>/<Series>/``; return the study's train.csv rows."""
    grid = study.scan.grid
    series = series_dataset(study.header, size=grid.size, spacing=grid.spacing, thickness=study.scan.thickness)
    series.ManufacturerModelName = MODEL_NAME
    encoder = SeriesEncoder(series)
    study_uid, series_uid = str(series.StudyInstanceUID), str(series.SeriesInstanceUID)
    storage.series_folder(images, study_uid, series_uid).mkdir(parents=True, exist_ok=True)
    values = [study.labels[column] for column in STUDY_COLUMNS]
    rows: list[list[object]] = []
    for i in range(study.slices):
        sop = _uid(study.seed, study.index, "image", i)
        where = SliceGeometry(grid.x0, grid.y0, round(float(study.scan.z[i]) + study.scan.table, 3), i + 1)
        encoded = encoder.encode(sop, where, to_stored(render_slice(study, i)))
        storage.instance_path(images, study_uid, series_uid, sop).write_bytes(encoded)
        rows.append([study_uid, series_uid, sop, int(study.pe_present[i]), *values])
    return rows


@dataclass(frozen=True)
class _Made:
    location: str
    rows: list[list[object]]
    clot: dict[str, object] | None


def _make(job: tuple[Path, int, int, int, tuple[int, int] | None]) -> _Made:
    images, seed, index, size, slices = job
    study = plan_study(seed, index, size, slices)
    rows = write_study(study, images)
    clot = None
    if study.clot is not None:
        clot = {"artery": study.clot.artery, "length_mm": round(study.clot.length, 1),
                "fraction": round(study.clot.fraction, 3), "hu": round(study.clot.hu, 1)}
    return _Made(study.location, rows, clot)


CLOT_COLUMNS = ("StudyInstanceUID", "location", "artery", "length_mm", "fraction", "hu", "slices_with_pe")
"""clots.csv: each study's clot (location ``negative`` and empty fields for a study without one)."""


def generate(out: Path, studies: int, seed: int, size: int = DEFAULT_SIZE, slices: tuple[int, int] | None = None,
             workers: int = 1, progress: bool = True, first: int = 0) -> dict[str, int]:
    """Write ``studies`` evaluation phantoms made with ``seed`` to ``out`` (train.csv, train/ and clots.csv), from
    study index ``first`` on; returns the count of studies by location (``negative`` for those without PE)."""
    if studies < 1:
        raise ValueError(f"studies must be at least 1, got {studies}")
    if first < 0:
        raise ValueError(f"first must be a non-negative study index, got {first}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if not 64 <= size <= 1024:
        raise ValueError(f"size must be 64-1024 pixels, got {size}")
    out = Path(out)
    images = new_set(out)
    started = time.monotonic()
    jobs = [(images, seed, index, size, slices) for index in range(first, first + studies)]
    made = write_studies(_make, jobs, workers, progress, "evaluation phantoms")
    write_table(out / "train.csv", RSPECT_COLUMNS, [row for result in made for row in result.rows])
    clots = []
    for result in made:
        clot = result.clot or {}
        clots.append([result.rows[0][0], result.location, *(clot.get(key, "") for key in CLOT_COLUMNS[2:6]),
                      sum(int(row[3]) for row in result.rows)])
    write_table(out / "clots.csv", CLOT_COLUMNS, clots)
    counts = {name: sum(r.location == name for r in made) for name in ("negative", *LOCATIONS)}
    log.info("%d evaluation phantoms in %s in %.0f s: %s", studies, out, time.monotonic() - started, counts)
    return counts


def run(args: argparse.Namespace) -> int:
    """``pe-train phantoms --family independent`` with parsed arguments (those of the training family's
    ``add_arguments``); prints the counts. Returns the exit status."""
    try:
        counts = generate(args.out, args.studies, args.seed, args.size or DEFAULT_SIZE, args.slices, args.workers,
                          progress=not args.quiet, first=args.first)
    except (ValueError, FileExistsError) as error:
        print(f"pe-train phantoms: {error}", file=sys.stderr)
        return 2
    print(f"{args.studies} evaluation phantoms (independent family) in {args.out}: "
          + ", ".join(f"{name} {count}" for name, count in counts.items()))
    return 0


def read_locations(root: Path) -> dict[str, str]:
    """clots.csv of an evaluation phantom set: study UID to clot location (``negative`` without one)."""
    with open(Path(root) / "clots.csv", newline="") as stream:
        return {row["StudyInstanceUID"]: row["location"] for row in csv.DictReader(stream)}
