"""Synthetic CT pulmonary angiograms in the RSPECT layout: the ``pe-train phantoms`` subcommand.

``generate(out, studies, seed)`` writes ``out/train.csv`` (the 17 RSPECT columns, one row per slice) and
``out/train/<Study>/<Series>/<SOP>.dcm``: CT Image Storage, Explicit VR Little Endian, int16 with RescaleIntercept
-1024, axial slices from the lung apices to the bases.

Each study is one drawn patient (``training.phantoms.anatomy``) with or without emboli and mimics
(``training.phantoms.lesions``), scanned and reconstructed with a look of its own drawn from wide ranges (domain
randomisation: a model must learn the clot, not one scanner):

- Prevalence follows RSPECT: studies are dealt in blocks of 40, 27 negative, 12 positive and 1 indeterminate
  (67.5 / 30 / 2.5 %); the first three studies of every block are one of each class in shuffled order, so any run of
  three or more studies holds every class.
- Positive studies carry 1-7 emboli, central, lobar, segmental or subsegmental, acute (78 %), chronic (14 %) or both
  (8 %). The first (largest) embolus lies central or lobar in 90 % of studies (a fifth of the central acute ones a
  saddle embolus), the others mostly segmental or subsegmental (50 / 20 %), so small clots are common but a study with
  only small ones is the minority, as in practice. Clots are 20-90 HU; acute ones occlusive, central or eccentric,
  blunt or tapering. Labels come from what was drawn: ``pe_present_on_image`` on exactly the slices where an embolus
  shows (covers at least ``lesions.EMBOLUS_VISIBLE_MM2``, a defect about 2.5 mm across, on at least half the planes
  through the slice; the thin tapered ends of a clot are drawn but not labelled); central_pe for an embolus in the
  trunk or a main pulmonary artery, leftsided_pe / rightsided_pe for one in that lung's arteries (main artery
  included); rv_lv_ratio from the drawn heart.
- Indeterminate studies have a failed bolus (pulmonary arteries 100-150 HU, qa_contrast) and/or heavy respiratory
  motion (blur, ghosting and slices out of step, qa_motion), and no emboli. Diagnostic studies have pulmonary
  arteries of 250-550 HU, or 180-250 HU with a weak bolus (one in six); one in five moves a little (blur, and most of
  those shallow breathing between slices).
- Flow artefacts (10 %) and true filling defects that are not PE (6 %: mucus plug, lymph node, mass) appear in
  negative and positive studies alike and set their informational labels.
- Body habitus varies from slim to obese (3-45 mm of subcutaneous fat), and one patient in five lies with the arms
  beside the chest.

The reconstruction, per study: a matrix of 512 (three in four studies), 384 or 256 (``size`` fixes it); a field of
view of 0.95-1.35 times the body's width within 0.55-0.95 mm pixels at 512 (the body may be cut), centred up to 25 mm
off the patient; slice spacing 0.6-3 mm and thickness 0.8-1.6 times it (within 0.6-3 mm), each slice the mean of
the chest at about one plane a millimetre through its thickness (partial volume along z as in-plane); the scan covers
the chest when the drawn slice count (``slices``) reaches that far at that spacing, otherwise a slab holding the
bifurcation of the pulmonary trunk. Noise of 8-45 HU (growing with the body, falling with the slice thickness),
white, grainy or band-limited as kernels make it; a kernel blur of 0.25-0.8 mm and, for three studies in ten, a
sharpening with edge overshoot; for half the studies whose superior vena cava holds contrast over 500 HU, streaks
through it. The slices run up or down the patient, and InstanceNumber follows the scan (70 %), runs against it (15 %)
or is shuffled (15 %). Files are encoded by ``training.phantoms.ctimage``.

Everything is drawn from numpy generators seeded by (seed, study index) and (seed, study index, slice), and no clock
is read, so a seed gives byte-identical files, studies can be made in parallel, and ``studies=N+1`` repeats the N
studies of ``studies=N``.
"""

from __future__ import annotations

import argparse
import datetime
import enum
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from pe_node import storage
from pe_node.findings import IMAGE_LABEL
from training.phantoms.anatomy import Chest, Enhancement, Grid, TubeKind, build_chest
from training.phantoms.ctimage import (
    SeriesEncoder,
    SliceGeometry,
    derived_uid,
    series_dataset,
    to_stored,
)
from training.phantoms.lesions import (
    EmbolusSite,
    Lesion,
    LesionKind,
    covered_pixels,
    place_embolus,
    place_filling_defect,
    place_flow_artifact,
    place_saddle_embolus,
    shows,
)
from training.rspect import RSPECT_COLUMNS, STUDY_COLUMNS, check_labels, new_set, write_studies, write_table

log = logging.getLogger(__name__)

DEFAULT_SLICES = (60, 120)
SIZES, SIZE_SHARES = (512, 384, 256), (0.75, 0.1, 0.15)
"""The matrix of a study, drawn unless given: 512 as in the clinic, 256 and 384 the minority."""
# At 512 px the field of view gives pixel spacings of 0.55-0.95 mm; other sizes keep the field of view.
MIN_FOV, MAX_FOV = 0.55 * 512, 0.95 * 512
# Outside the scanner's reconstruction circle some scanners store this (HU), far below air.
OUTSIDE_FOV_HU = -2048.0
_STUDY_STREAM, _BLOCK_STREAM, _NOISE_STREAM = 1, 2, 3
_BLOCK = 40
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pe-node:phantom")


class ExamClass(str, enum.Enum):
    """What a study is: negative, positive for PE, or non-diagnostic."""

    NEGATIVE = "negative"
    POSITIVE = "positive"
    INDETERMINATE = "indeterminate"


def exam_class(seed: int, index: int) -> ExamClass:
    """The class of study ``index``: dealt in blocks of 40 (27 negative, 12 positive, 1 indeterminate), shuffled by
    the seed, with one of each class among the first three of a block."""
    block, position = divmod(index, _BLOCK)
    rng = np.random.default_rng([seed, _BLOCK_STREAM, block])
    first = [ExamClass.POSITIVE, ExamClass.NEGATIVE, ExamClass.INDETERMINATE]
    rest = [ExamClass.NEGATIVE] * 26 + [ExamClass.POSITIVE] * 11
    deck = [first[i] for i in rng.permutation(3)] + [rest[i] for i in rng.permutation(len(rest))]
    return deck[position]


@dataclass(frozen=True)
class Motion:
    """Patient motion during the scan: a blur of ``blur_mm`` and a ghost ``ghost`` strong, ``ghost_mm`` away, along
    image ``axis`` (0: antero-posterior, 1: left-right). Respiratory steps between slices are in the slice heights."""

    blur_mm: float
    ghost: float
    ghost_mm: float
    axis: int


@dataclass
class StudyPlan:
    """Everything drawn for one study before any pixel is rendered, including its labels.

    Arrays over slices are in acquisition order, the order of the files' ImagePositionPatient along the scan.
    ``anatomy_z`` is where each slice cuts the chest (``z`` plus any respiratory step), ``patient_z`` its
    ImagePositionPatient z; each slice is the mean of the chest at ``planes`` (mm from its centre, through its
    thickness). The reconstruction: the noise's level (HU) and texture (``white``, ``grain``: smoothed by a Gaussian
    of ``noise_grain_px``, ``band``: a difference of two such), the kernel's blur (pixels) and, for a sharp kernel,
    ``sharpen`` (amount, pixels), and the ``streaks`` of dense contrast.
    """

    seed: int
    index: int
    exam_class: ExamClass
    chest: Chest
    lesions: list[Lesion]
    grid: Grid
    anatomy_z: np.ndarray
    patient_z: np.ndarray
    instance_numbers: np.ndarray
    slice_thickness: float
    planes: np.ndarray
    noise_sigma: float
    noise_texture: str
    noise_grain_px: float
    blur_px: float
    sharpen: tuple[float, float] | None
    streaks: Streaks | None
    motion: Motion | None
    outside_fov: bool
    labels: dict[str, int]
    pe_present: np.ndarray
    header: dict[str, object]

    @property
    def slices(self) -> int:
        return len(self.anatomy_z)


@dataclass
class RenderedSlice:
    """One slice in HU (float32) and the pixels where an embolus was drawn."""

    hu: np.ndarray
    embolus: np.ndarray


@dataclass(frozen=True)
class PhantomSummary:
    """What ``generate`` wrote: counts of studies by class, of slices, and of studies with each study label."""

    out: Path
    studies: int
    negative: int
    positive: int
    indeterminate: int
    slices: int
    positive_slices: int
    label_counts: dict[str, int]
    seconds: float

    def describe(self) -> str:
        rate = 60.0 * self.studies / self.seconds if self.seconds > 0 else float("inf")
        labels = ", ".join(f"{name} {count}" for name, count in self.label_counts.items() if count)
        return (f"{self.studies} studies ({self.negative} negative, {self.positive} positive, {self.indeterminate} "
                f"indeterminate), {self.slices} slices ({self.positive_slices} with PE) in {self.out} "
                f"in {self.seconds:.1f} s ({rate:.1f} studies/min); study labels: {labels}")


def _uid(seed: int, index: int, *parts: object) -> str:
    return derived_uid(_UID_NAMESPACE, seed, index, *parts)


def _draw_enhancement(rng: np.random.Generator, poor_bolus: bool) -> Enhancement:
    """The contrast bolus: pulmonary arteries 250-550 HU when well timed, 180-250 HU in a diagnostic study with a
    weak bolus (one in six); 100-150 HU when it failed or came late (then the left heart and aorta may be the
    brighter)."""
    if poor_bolus:
        pa = rng.uniform(100.0, 150.0)
        left = rng.uniform(200.0, 320.0) if rng.random() < 0.5 else pa * rng.uniform(0.6, 0.9)
        return Enhancement(pa, pa * rng.uniform(0.9, 1.2), left, left * rng.uniform(0.85, 1.0),
                           rng.uniform(150.0, 600.0), rng.uniform(50.0, 110.0), rng.uniform(70.0, 110.0),
                           rng.uniform(50.0, 70.0), rng.uniform(70.0, 110.0))
    pa = rng.uniform(180.0, 250.0) if rng.random() < 1 / 6 else rng.uniform(250.0, 550.0)
    vein = pa * rng.uniform(0.55, 0.85)
    return Enhancement(pa, pa * rng.uniform(1.0, 1.3), vein * rng.uniform(0.85, 1.05), vein,
                       rng.uniform(350.0, 1200.0), rng.uniform(60.0, 140.0), rng.uniform(90.0, 140.0),
                       rng.uniform(55.0, 80.0), rng.uniform(80.0, 130.0))


def plan_study(seed: int, index: int, slices: tuple[int, int] = DEFAULT_SLICES,
               size: int | None = None) -> StudyPlan:
    """Draw study ``index`` of the set made with ``seed``: patient, acquisition, lesions and labels; ``size`` fixes
    the matrix (drawn from SIZES otherwise)."""
    rng = np.random.default_rng([seed, _STUDY_STREAM, index])
    cls = exam_class(seed, index)
    poor_bolus = moving = False
    if cls is ExamClass.INDETERMINATE:
        reason = rng.choice(["contrast", "motion", "both"], p=[0.6, 0.25, 0.15])
        poor_bolus, moving = reason in ("contrast", "both"), reason in ("motion", "both")
    gte = rng.random() < (0.43 if cls is ExamClass.POSITIVE else 0.12)
    ratio = rng.uniform(1.0, 1.5) if gte else rng.uniform(0.6, 0.95)
    chest = build_chest(rng, rv_lv_ratio=ratio, enhancement=_draw_enhancement(rng, poor_bolus))

    size = size or int(rng.choice(SIZES, p=SIZE_SHARES))
    fov = float(np.clip(chest.body_width * rng.uniform(0.95, 1.35), MIN_FOV, MAX_FOV))
    spacing = fov / size
    centre_x, centre_y = rng.uniform(-25.0, 25.0), chest.body_y / 2 + rng.uniform(-20.0, 20.0)
    grid = Grid(size, spacing, centre_x - fov / 2 + spacing / 2, centre_y - fov / 2 + spacing / 2)

    z, thickness = _draw_slices(rng, chest, slices)
    count = len(z)
    table = rng.uniform(-400.0, -100.0)
    patient_z = np.round(z + table, 3)
    motion, steps = _draw_motion(rng, moving, count)
    anatomy_z = z + steps
    order = rng.choice(["scan", "reversed", "shuffled"], p=[0.7, 0.15, 0.15])
    instance_numbers = np.arange(1, count + 1)
    if order == "reversed":
        instance_numbers = instance_numbers[::-1].copy()
    elif order == "shuffled":
        instance_numbers = rng.permutation(instance_numbers)
    planes = thickness * ((np.arange(_planes(thickness)) + 0.5) / _planes(thickness) - 0.5)

    lesions = _draw_lesions(rng, chest, cls)
    lesions, pe_present, labels = _label(rng, chest, grid, anatomy_z, planes, cls, lesions, poor_bolus, moving)
    # Noise grows with the body and falls with the slice thickness; the dose scales it by 0.7-1.4.
    noise = rng.uniform(0.7, 1.4) * (10.0 + 20.0 * (chest.body_a - 125.0) / 80.0) * np.sqrt(1.25 / thickness)
    noise = float(np.clip(noise + rng.uniform(-4.0, 4.0), 8.0, 45.0))
    return StudyPlan(
        seed=seed, index=index, exam_class=cls, chest=chest, lesions=lesions, grid=grid, anatomy_z=anatomy_z,
        patient_z=patient_z, instance_numbers=instance_numbers, slice_thickness=thickness, planes=planes,
        noise_sigma=noise, noise_texture=str(rng.choice(["white", "grain", "band"], p=[0.25, 0.45, 0.3])),
        noise_grain_px=rng.uniform(0.3, 1.0) / spacing, blur_px=rng.uniform(0.25, 0.8) / spacing,
        sharpen=(rng.uniform(0.3, 1.0), rng.uniform(0.8, 1.5) / spacing) if rng.random() < 0.3 else None,
        streaks=_draw_streaks(rng, chest), motion=motion, outside_fov=bool(rng.random() < 0.4), labels=labels,
        pe_present=pe_present, header=_draw_header(rng, seed, index, chest),
    )


def _draw_slices(rng: np.random.Generator, chest: Chest, slices: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Where the slices lie (anatomy z, mm, in scan order) and how thick they are.

    The spacing is drawn from 0.6-3 mm (half the studies thinner than 1.5 mm) and the thickness from 0.8-1.6 times
    it, within 0.6-3 mm. The scan covers the chest from below the lung bases to above the apices when the drawn
    slice count (``slices``) reaches that far at that spacing; otherwise the slices make a slab that holds the
    bifurcation of the pulmonary trunk (a reconstruction of the central arteries).
    """
    spacing = rng.uniform(0.6, 1.5) if rng.random() < 0.5 else rng.uniform(1.5, 3.0)
    thickness = float(np.clip(spacing * rng.uniform(0.8, 1.6), 0.6, 3.0))
    low, high = -rng.uniform(5.0, 25.0), chest.lung_height + rng.uniform(5.0, 20.0)
    count = int(rng.integers(slices[0], slices[1] + 1))
    if (count - 1) * spacing < high - low:
        tubes = chest.tubes
        trunk = (tubes.kind == TubeKind.ARTERY) & (tubes.order == 0) & (tubes.side == 0)
        bifurcation = float(tubes.end[trunk, 2].max())
        span = (count - 1) * spacing
        low = float(np.clip(bifurcation - rng.uniform(0.2, 0.8) * span, low, high - span))
        high = low + span
    else:
        count = int((high - low) // spacing) + 1
    z = low + spacing * np.arange(count)
    return (z[::-1].copy() if rng.random() < 0.5 else z), thickness  # half the scans from the apices down


def _planes(thickness: float) -> int:
    """How many planes a slice of ``thickness`` mm is the mean of (about one a millimetre)."""
    return max(1, round(thickness))


@dataclass(frozen=True)
class Streaks:
    """Streaks from dense contrast in the superior vena cava: dark and bright lines through its centre at
    ``angles`` (radians) with ``amplitudes`` (HU), ``width_mm`` wide, fading over ``decay_mm``."""

    angles: np.ndarray
    amplitudes: np.ndarray
    width_mm: float
    decay_mm: float


def _draw_streaks(rng: np.random.Generator, chest: Chest) -> Streaks | None:
    """Streaks for half the studies whose superior vena cava holds dense contrast (over 500 HU)."""
    dense = chest.enhancement.superior_vena_cava
    if dense < 500.0 or rng.random() < 0.5:
        return None
    count = int(rng.integers(3, 9))
    scale = min((dense - 300.0) / 600.0, 1.5)
    return Streaks(rng.uniform(0.0, np.pi, count), scale * rng.uniform(40.0, 160.0, count) * rng.choice([-1, 1], count),
                   rng.uniform(0.7, 2.0), rng.uniform(40.0, 120.0))


def _draw_motion(rng: np.random.Generator, moving: bool, count: int) -> tuple[Motion | None, np.ndarray]:
    """Heavy motion (blur, ghost, and respiratory steps of a few mm between slices) for a qa_motion study; slight
    blur for one in five of the others, most of them with shallow breathing too; none otherwise."""
    if moving:
        motion = Motion(rng.uniform(5.0, 12.0), rng.uniform(0.25, 0.45), rng.uniform(6.0, 15.0), int(rng.integers(2)))
        steps = np.clip(np.cumsum(rng.normal(0.0, rng.uniform(2.0, 4.0), count)), -10.0, 10.0)
        return motion, steps
    if rng.random() < 0.2:
        breathing = np.zeros(count)
        if rng.random() < 0.6:  # shallow breathing: steps of a millimetre or two between slices
            breathing = np.clip(np.cumsum(rng.normal(0.0, rng.uniform(0.3, 1.0), count)), -4.0, 4.0)
        return Motion(rng.uniform(1.0, 2.5), rng.uniform(0.0, 0.1), rng.uniform(3.0, 6.0), 0), breathing
    return None, np.zeros(count)


def _draw_lesions(rng: np.random.Generator, chest: Chest, cls: ExamClass) -> list[Lesion]:
    """Emboli for a positive study, mimics for any diagnostic one."""
    lesions = []
    if cls is ExamClass.POSITIVE:
        count = int(min(1 + rng.poisson(2.2), 7))
        course = rng.choice(["acute", "chronic", "mixed"], p=[0.78, 0.14, 0.08])
        if course == "mixed":
            count = max(count, 2)
        for i in range(count):
            site = EmbolusSite(rng.choice([s.value for s in EmbolusSite], p=[0.03, 0.27, 0.5, 0.2]))
            if i == 0:
                # The first embolus is the study's largest: a thrombus that reaches the lungs usually lodges whole
                # in a main or lobar artery and showers fragments further out; isolated segmental or subsegmental
                # disease is the smaller share.
                site = EmbolusSite(rng.choice([s.value for s in EmbolusSite], p=[0.2, 0.7, 0.1, 0.0]))
            chronic = course == "chronic" or (course == "mixed" and i % 2 == 1)
            kind = (LesionKind.WEB if rng.random() < 0.3 else LesionKind.CHRONIC) if chronic else LesionKind.ACUTE
            if i == 0 and site is EmbolusSite.CENTRAL and kind is LesionKind.ACUTE and rng.random() < 0.2:
                lesions.append(place_saddle_embolus(rng, chest))
            else:
                lesions.append(place_embolus(rng, chest, site, kind))
    if cls is not ExamClass.INDETERMINATE:
        if rng.random() < 0.10:
            lesions.append(place_flow_artifact(rng, chest))
        if rng.random() < 0.06:
            lesions.append(place_filling_defect(rng, chest))
    return lesions


def _visibility(chest: Chest, grid: Grid, anatomy_z: np.ndarray, planes: np.ndarray,
                lesion: Lesion) -> tuple[np.ndarray, set[int]]:
    """On which slices the lesion shows (see lesions.shows) on at least half of the planes through the slice, and in
    which tubes."""
    shown = np.zeros(len(anatomy_z), dtype=bool)
    tubes: set[int] = set()
    for i, z in enumerate(anatomy_z):
        seen = 0
        for offset in planes:
            covers = lesion.cover(chest.tubes, grid, float(z + offset))
            if shows(covers, lesion.kind, grid.spacing):
                seen += 1
                tubes.update(c.tube for c in covers if covered_pixels([c], lesion.kind))
        shown[i] = 2 * seen >= len(planes)
    return shown, tubes


def _label(rng: np.random.Generator, chest: Chest, grid: Grid, anatomy_z: np.ndarray, planes: np.ndarray,
           cls: ExamClass, lesions: list[Lesion], poor_bolus: bool,
           moving: bool) -> tuple[list[Lesion], np.ndarray, dict[str, int]]:
    """The study's labels from what its lesions show on its slices.

    Lesions that show on no slice are dropped. A positive study whose emboli all fall between slices or below a
    pixel gets further emboli, each more central than the last and finally one filling the trunk and both main
    arteries, until one shows.
    """
    shown = [(lesion, *_visibility(chest, grid, anatomy_z, planes, lesion)) for lesion in lesions]
    if cls is ExamClass.POSITIVE:
        fallback = [EmbolusSite.SEGMENTAL, EmbolusSite.LOBAR, EmbolusSite.LOBAR, EmbolusSite.CENTRAL, None]
        for site in fallback:
            if any(lesion.kind.is_embolus and slices.any() for lesion, slices, _ in shown):
                break
            if site is None:
                lesion = place_saddle_embolus(rng, chest)
            else:
                lesion = place_embolus(rng, chest, site, LesionKind.ACUTE)
            shown.append((lesion, *_visibility(chest, grid, anatomy_z, planes, lesion)))
        if not any(lesion.kind.is_embolus and slices.any() for lesion, slices, _ in shown):
            raise RuntimeError("no embolus shows on any slice, not even one filling the main pulmonary arteries")
    shown = [item for item in shown if item[1].any()]
    emboli = [item for item in shown if item[0].kind.is_embolus]
    pe_present = np.zeros(len(anatomy_z), dtype=bool)
    embolus_tubes: set[int] = set()
    for _, slices, tubes in emboli:
        pe_present |= slices
        embolus_tubes |= tubes
    positive = bool(pe_present.any())
    sides = {int(chest.tubes.side[t]) for t in embolus_tubes}
    central = any(chest.tubes.order[t] == 0 for t in embolus_tubes)
    chronic = any(lesion.kind.is_chronic for lesion, _, _ in emboli)
    acute = any(not lesion.kind.is_chronic for lesion, _, _ in emboli)
    labels = {
        "negative_exam_for_pe": int(cls is ExamClass.NEGATIVE),
        "qa_motion": int(moving),
        "qa_contrast": int(poor_bolus),
        "flow_artifact": int(any(item[0].kind is LesionKind.FLOW_ARTIFACT for item in shown)),
        "rv_lv_ratio_gte_1": int(positive and chest.rv_lv_ratio >= 1.0),
        "rv_lv_ratio_lt_1": int(positive and chest.rv_lv_ratio < 1.0),
        "leftsided_pe": int(1 in sides),
        "chronic_pe": int(chronic and not acute),
        "true_filling_defect_not_pe": int(any(item[0].kind.is_filling_defect_not_pe for item in shown)),
        "rightsided_pe": int(-1 in sides),
        "acute_and_chronic_pe": int(chronic and acute),
        "central_pe": int(central),
        "indeterminate": int(cls is ExamClass.INDETERMINATE),
    }
    problems = check_labels({**labels, IMAGE_LABEL: int(positive)})
    if problems:
        raise RuntimeError(f"inconsistent phantom labels: {'; '.join(problems)}")
    return [item[0] for item in shown], pe_present, labels


def _draw_header(rng: np.random.Generator, seed: int, index: int, chest: Chest) -> dict[str, object]:
    """Patient, study and equipment attributes; dates come from the seed, never from the clock."""
    study_date = datetime.date(2012, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 3650)))
    age = int(rng.integers(22, 91))
    birth = study_date - datetime.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    seconds = int(rng.integers(0, 86400))
    return {
        "PatientName": f"PHANTOM^{seed}-{index:05d}", "PatientID": f"PH{seed}-{index:05d}",
        "PatientBirthDate": birth.strftime("%Y%m%d"), "PatientSex": str(rng.choice(["F", "M"])),
        "PatientAge": f"{age:03d}Y", "StudyDate": study_date.strftime("%Y%m%d"),
        "StudyTime": f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        "AccessionNumber": f"A{int(rng.integers(10**9, 10**10))}", "KVP": float(rng.choice([80, 100, 120])),
        "ContrastBolusAgent": str(rng.choice(["Iohexol 350", "Iopamidol 370", "Iodixanol 320"])),
        "ConvolutionKernel": str(rng.choice(["STANDARD", "B30f", "FC17", "SOFT"])),
        "Window": [(40, 400), (100, 700)][int(rng.integers(2))],
        "StudyInstanceUID": _uid(seed, index, "study"), "SeriesInstanceUID": _uid(seed, index, "series"),
        "FrameOfReferenceUID": _uid(seed, index, "frame"),
    }


def render_slice(plan: StudyPlan, i: int, *, noise: bool = True) -> RenderedSlice:
    """Slice ``i`` (acquisition order) in HU: anatomy and lesions averaged over the planes through its thickness,
    then the streaks of dense contrast, the kernel's blur (and sharpening), the patient's motion and quantum noise
    (``noise=False`` leaves out all after the planes)."""
    grid = plan.grid
    image = np.zeros((grid.size, grid.size), dtype=np.float32)
    embolus = np.zeros(image.shape, dtype=bool)
    for offset in plan.planes:
        z = float(plan.anatomy_z[i] + offset)
        plane = plan.chest.render(grid, z)
        for lesion in sorted(plan.lesions, key=lambda item: item.kind.is_embolus):
            for cover in lesion.paint(plane, plan.chest.tubes, grid, z):
                if lesion.kind.is_embolus:
                    embolus[cover.rows, cover.cols] |= cover.weight > 0
        image += plane
    image /= np.float32(len(plan.planes))
    if not noise:
        return RenderedSlice(image, embolus)
    if plan.streaks is not None:
        _streak(image, plan, float(plan.anatomy_z[i]))
    if plan.blur_px >= 0.3:
        image = ndimage.gaussian_filter(image, plan.blur_px)
    if plan.sharpen is not None:
        amount, width = plan.sharpen
        image += np.float32(amount) * (image - ndimage.gaussian_filter(image, width))
    if plan.motion is not None:
        image = _move(image, plan.motion, grid.spacing)
    image += np.float32(plan.noise_sigma) * _noise(plan, i, image.shape)
    if plan.outside_fov:
        y, x = np.ogrid[: grid.size, : grid.size]
        half = (grid.size - 1) / 2
        image[(x - half) ** 2 + (y - half) ** 2 > (half + 0.5) ** 2] = OUTSIDE_FOV_HU
    return RenderedSlice(image, embolus)


def _noise(plan: StudyPlan, i: int, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance noise of the study's texture for slice ``i``."""
    rng = np.random.default_rng([plan.seed, _NOISE_STREAM, plan.index, i])
    grain = rng.standard_normal(shape, dtype=np.float32)
    if plan.noise_texture == "white" or plan.noise_grain_px < 0.3:
        return grain
    smooth = ndimage.gaussian_filter(grain, plan.noise_grain_px)
    if plan.noise_texture == "band":  # a sharper kernel's noise: mid frequencies, little of the lowest
        smooth -= 0.7 * ndimage.gaussian_filter(grain, 2.5 * plan.noise_grain_px)
    return smooth / max(float(smooth.std()), 1e-6)


def _streak(image: np.ndarray, plan: StudyPlan, z: float) -> None:
    """Add the streaks of the dense superior vena cava, where the slice crosses it."""
    streaks, tubes, grid = plan.streaks, plan.chest.tubes, plan.grid
    assert streaks is not None
    dense = np.flatnonzero((tubes.kind == TubeKind.SYSTEMIC)
                           & (tubes.lumen_hu == np.float32(plan.chest.enhancement.superior_vena_cava)))
    low, high = np.minimum(tubes.start[dense, 2], tubes.end[dense, 2]), np.maximum(tubes.start[dense, 2],
                                                                                     tubes.end[dense, 2])
    crossing = dense[(low <= z) & (z <= high)]
    if not len(crossing):
        return
    a, b = tubes.start[crossing[0]], tubes.end[crossing[0]]
    t = (z - a[2]) / (b[2] - a[2]) if b[2] != a[2] else 0.0
    cx, cy = a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])
    dx, dy = grid.xs[None, :] - np.float32(cx), grid.ys[:, None] - np.float32(cy)
    fade = np.exp(-np.sqrt(dx * dx + dy * dy) / np.float32(streaks.decay_mm))
    for angle, amplitude in zip(streaks.angles, streaks.amplitudes, strict=True):
        across = dx * np.float32(np.sin(angle)) - dy * np.float32(np.cos(angle))
        image += np.float32(amplitude) * np.exp(-((across / np.float32(streaks.width_mm)) ** 2)) * fade


def _move(image: np.ndarray, motion: Motion, spacing: float) -> np.ndarray:
    """Motion blur along one axis plus a displaced ghost of the slice."""
    width = max(1, round(motion.blur_mm / spacing))
    moved = ndimage.uniform_filter1d(image, width, axis=motion.axis) if width > 1 else image
    shift = round(motion.ghost_mm / spacing)
    if motion.ghost > 0 and shift:
        moved = (1.0 - motion.ghost) * moved + motion.ghost * np.roll(image, shift, axis=motion.axis)
    return moved.astype(np.float32)


def write_study(plan: StudyPlan, images: Path) -> list[list[object]]:
    """Render and write every slice of a study under ``images/<Study>/<Series>/``; return its train.csv rows."""
    series = series_dataset(plan.header, size=plan.grid.size, spacing=plan.grid.spacing,
                            thickness=plan.slice_thickness)
    encoder = SeriesEncoder(series)
    study, series_uid = series.StudyInstanceUID, series.SeriesInstanceUID
    folder = storage.series_folder(images, study, series_uid)
    folder.mkdir(parents=True, exist_ok=True)
    study_values = [plan.labels[c] for c in STUDY_COLUMNS]
    rows = []
    for i in range(plan.slices):
        rendered = render_slice(plan, i)
        if plan.pe_present[i] and not rendered.embolus.any():
            raise RuntimeError(f"study {plan.index} slice {i}: pe_present_on_image without an embolus drawn")
        sop = _uid(plan.seed, plan.index, "image", i)
        encoded = encoder.encode(sop, slice_geometry(plan, i), to_stored(rendered.hu))
        storage.instance_path(images, study, series_uid, sop).write_bytes(encoded)
        rows.append([study, series_uid, sop, int(plan.pe_present[i]), *study_values])
    return rows


def slice_geometry(plan: StudyPlan, i: int) -> SliceGeometry:
    """Where slice ``i`` lies in the patient frame, and its InstanceNumber."""
    return SliceGeometry(plan.grid.x0, plan.grid.y0, float(plan.patient_z[i]), int(plan.instance_numbers[i]))


@dataclass(frozen=True)
class _StudyResult:
    exam_class: ExamClass
    rows: list[list[object]]
    labels: dict[str, int]


def _make_study(job: tuple[Path, int, int, tuple[int, int], int]) -> _StudyResult:
    """Plan and write one study (a worker's unit of work)."""
    images, seed, index, slices, size = job
    plan = plan_study(seed, index, slices, size)
    rows = write_study(plan, images)
    log.debug("phantom study %d (%s): %d slices", index, plan.exam_class.value, plan.slices)
    return _StudyResult(plan.exam_class, rows, plan.labels)


def generate(out: Path, studies: int, seed: int, slices: tuple[int, int] = DEFAULT_SLICES, size: int | None = None,
             workers: int = 1, progress: bool = True, first: int = 0) -> PhantomSummary:
    """Write ``studies`` phantom studies made with ``seed`` to ``out`` in the RSPECT layout.

    ``slices`` bounds each study's slice count, ``size`` fixes its Rows and Columns (drawn per study if None);
    ``workers`` processes make studies in parallel (the files do not depend on it). ``out`` may exist but must not
    hold train.csv or train/ yet.
    A study depends on the seed and its index alone: ``first`` starts at that index, so ``first=400, studies=400``
    writes the same files as studies 400-799 of ``studies=800``, and a set can be grown, or made in parts on several
    machines, and merged (train.csv rows one after the other, the train/ folders side by side).
    """
    if studies < 1:
        raise ValueError(f"studies must be at least 1, got {studies}")
    if first < 0:
        raise ValueError(f"first must be a non-negative study index, got {first}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if not (8 <= slices[0] <= slices[1]):
        raise ValueError(f"slices must be a range A-B with 8 <= A <= B, got {slices[0]}-{slices[1]}")
    if size is not None and not 32 <= size <= 2048:
        raise ValueError(f"size must be 32-2048 pixels, got {size}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    out = Path(out)
    images = new_set(out)
    started = time.monotonic()
    jobs = [(images, seed, index, slices, size) for index in range(first, first + studies)]
    results = write_studies(_make_study, jobs, workers, progress, "phantoms")
    write_table(out / "train.csv", RSPECT_COLUMNS, [row for result in results for row in result.rows])
    classes = [r.exam_class for r in results]
    return PhantomSummary(
        out=out, studies=studies, negative=classes.count(ExamClass.NEGATIVE),
        positive=classes.count(ExamClass.POSITIVE), indeterminate=classes.count(ExamClass.INDETERMINATE),
        slices=sum(len(r.rows) for r in results), positive_slices=sum(row[3] for r in results for row in r.rows),
        label_counts={c: sum(r.labels[c] for r in results) for c in STUDY_COLUMNS},
        seconds=time.monotonic() - started,
    )


def slice_range(text: str) -> tuple[int, int]:
    """Parse ``--slices A-B`` (or a single count ``N``)."""
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A-B slice counts such as 60-120, got {text!r}") from None
    if not 8 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 8 <= A <= B, got {text!r}")
    return bounds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``pe-train phantoms``."""
    parser.add_argument("--out", type=Path, required=True, help="folder to write train.csv and train/ into")
    parser.add_argument("--studies", type=int, required=True, help="number of studies")
    parser.add_argument("--seed", type=int, default=0, help="random seed; a seed gives byte-identical output")
    parser.add_argument("--first", type=int, default=0, metavar="INDEX",
                        help="index of the first study (default 0): --first 400 --studies 400 writes studies 400-799 "
                        "of the seed, the same files as those of --studies 800")
    parser.add_argument("--slices", type=slice_range, metavar="A-B",
                        help=f"slices per study, drawn from A-B (default {DEFAULT_SLICES[0]}-{DEFAULT_SLICES[1]})")
    parser.add_argument("--size", type=int,
                        help="rows and columns of every study (default: drawn per study, 512 for most, some 384 and "
                        "256; the independent family: 512)")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="processes making studies in parallel (default: the CPU count, at most 8)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    """Run ``pe-train phantoms`` with parsed arguments; print the summary. Returns the exit status."""
    try:
        summary = generate(args.out, args.studies, args.seed, args.slices or DEFAULT_SLICES, args.size,
                           args.workers, progress=not args.quiet, first=args.first)
    except (ValueError, FileExistsError) as error:
        print(f"pe-train phantoms: {error}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0


def main_phantoms(argv: list[str] | None = None) -> int:
    """``pe-train phantoms`` on its own (``python -m training.phantoms.generator``): the same arguments and exits."""
    parser = argparse.ArgumentParser(prog="pe-train phantoms", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main_phantoms())
