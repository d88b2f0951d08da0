"""The presentation states applied by DCMTK: ``dcmp2pgm`` renders each finding's peak slice through its state.

The CT series is real files (``tests.dicom_factory``) loaded as the pipeline loads them, with two findings: one whose
attention peak lies on the patient's right, one on the left. Each finding gets a state of its own that references
its peak slice only. ``dcmp2pgm`` renders that slice through its state: the grey values follow the state's VOI (the
PE window), and the state's overlay, activated on the findings' layer, is rendered for the slice as a bitmap of the
ellipse's outline at the ellipse's place. DCMTK 3.6.7 rasterises neither graphic nor text objects, nor does it burn
graphic overlays into the main bitmap (it shows only bitmap shutters there): with ``-v`` it writes each activated
overlay as rendered for the image to ``ovl_<layer><overlay>.pgm`` in its working folder, with the overlay's place
(left, top) in its account, and lists the graphic and text objects it attaches to the image. Without a state,
nothing of the sort. dciodvfy (dicom3tools) checks each state.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from pe_node.findings import EXAM_LABELS, ExamLabel, Prediction
from pe_node.model.preprocess import PE_WINDOW
from pe_node.pipeline.series import CTSeries, load_series
from pe_node.reporting import AlgorithmInfo, ReportOptions, build_report
from pe_node.reporting.overlay import window
from pe_node.reporting.presentation import OUTLINE_WIDTH
from tests.dicom_factory import write_ct_series

pytestmark = pytest.mark.peer("dcmtk")

SLICES, SIZE = 30, 128
PEAKS = (14, 24)  # the peak slice of each finding
CAM_PEAKS = ((60, 15), (70, 110))  # row, column: 34 mm to the image left of the midline (patient's right), 35 mm right
LABELS = ("PE, right, slices 13-17 of 30, p 0.95", "PE, left, slices 24-26 of 30, p 0.90")


@dataclass
class Case:
    series: CTSeries
    states: list[Path]
    """The presentation state files, finding 1 first."""


@dataclass
class Rendering:
    """What ``dcmp2pgm -v`` made of one image: its bitmap, its account and each activated overlay as rendered
    (a boolean bitmap of the image's size: the overlay's bits placed where DCMTK put them)."""

    bitmap: np.ndarray
    account: str
    overlays: list[np.ndarray]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = tmp_path_factory.mktemp("gsps")
    write_ct_series(folder / "ct", n_slices=SLICES, size=SIZE, seed=4)
    series = load_series(folder / "ct")
    image = np.full(SLICES, 0.1)
    image[PEAKS[0] - 2 : PEAKS[0] + 3] = [0.6, 0.8, 0.95, 0.8, 0.6]
    image[PEAKS[1] - 1 : PEAKS[1] + 2] = [0.6, 0.9, 0.7]
    rows, cols = np.mgrid[:SIZE, :SIZE]
    cams = {peak: np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * 5.0**2)).astype(np.float32)
            for peak, (r, c) in zip(PEAKS, CAM_PEAKS, strict=True)}
    exam = dict.fromkeys(EXAM_LABELS, 0.1) | {ExamLabel.RIGHT.value: 0.9, ExamLabel.LEFT.value: 0.8,
                                              ExamLabel.RV_LV_LT_1.value: 0.9}
    prediction = Prediction(series.series_instance_uid, series.sop_instance_uids, exam, image,
                            np.full(SLICES, 1.0 / SLICES), cams)
    objects = build_report(series, prediction, algorithm=AlgorithmInfo("pe-node test", "1"),
                           options=ReportOptions(secondary_capture=False))
    paths = []
    for state in objects.presentation_states:
        path = folder / f"gsps-{state.InstanceNumber}.dcm"
        state.save_as(path, enforce_file_format=True)
        paths.append(path)
    return Case(series, paths)


def render(image: Path, folder: Path, state: Path | None = None) -> Rendering:
    """``dcmp2pgm -v`` of ``image`` (through ``state``), run in a fresh ``folder``, where it writes its overlays."""
    folder.mkdir(parents=True)
    command = ["dcmp2pgm", "-v", *(["-p", str(state)] if state else []), str(image), "out.pgm"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=folder)
    assert result.returncode == 0, result.stderr
    bitmap = np.asarray(Image.open(folder / "out.pgm"), dtype=np.int16)
    account = result.stdout + result.stderr
    overlays = []
    placed = r'columns=(\d+) rows=(\d+) left=(\d+) top=(\d+)\s+.*filename="(ovl_\d+\.pgm)" - written'
    for columns, rows, left, top, name in re.findall(placed, account):
        bits = np.asarray(Image.open(folder / name)) > 0
        assert bits.shape == (int(rows), int(columns))
        full = np.zeros(bitmap.shape, dtype=bool)
        full[int(top) : int(top) + int(rows), int(left) : int(left) + int(columns)] = bits
        overlays.append(full)
    assert len(overlays) == len(list(folder.glob("ovl_*.pgm"))), "every overlay file is in the account"
    return Rendering(bitmap, account, overlays)


def ellipse(state: Path) -> tuple[np.ndarray, np.ndarray]:
    """Centre (column, row) and half width and height of the state's ellipse, from its graphic object."""
    (annotation,) = pydicom.dcmread(state).GraphicAnnotationSequence
    (graphic,) = annotation.GraphicObjectSequence
    assert graphic.GraphicType == "ELLIPSE"
    points = np.reshape(np.asarray(graphic.GraphicData, dtype=np.float64), (4, 2))
    return points.mean(axis=0), (points.max(axis=0) - points.min(axis=0)) / 2


def test_each_finding_gets_a_state_of_its_own_peak_slice(case: Case) -> None:
    assert len(case.states) == 2
    for number, (path, peak) in enumerate(zip(case.states, PEAKS, strict=True), start=1):
        state = pydicom.dcmread(path)
        (series,) = state.ReferencedSeriesSequence
        assert [i.ReferencedSOPInstanceUID for i in series.ReferencedImageSequence] == \
            [case.series.sop_instance_uids[peak]]
        assert (state.InstanceNumber, state.ContentLabel) == (number, f"PE_FINDING_{number}")
        assert state[0x60001001].value == "PE_FINDINGS", "the overlay is shown on the findings' layer"
    first, second = (pydicom.dcmread(path) for path in case.states)
    assert first.SeriesInstanceUID == second.SeriesInstanceUID and first.SOPInstanceUID != second.SOPInstanceUID


def test_dcmp2pgm_shows_the_peak_slice_in_the_pe_window_through_the_state(case: Case, tmp_path: Path) -> None:
    peak_file = case.series.slices[PEAKS[0]].path
    through_state = render(peak_file, tmp_path / "state", case.states[0]).bitmap
    plain = render(peak_file, tmp_path / "plain").bitmap
    expected = window(case.series.hu[PEAKS[0]], *PE_WINDOW).astype(np.int16)
    assert through_state.shape == (SIZE, SIZE)
    assert np.abs(through_state - expected).max() <= 2, "DCMTK applied the state's PE window"
    assert np.abs(plain - expected).mean() > 10, "without the state the slice looks different"


@pytest.mark.parametrize("number", [1, 2])
def test_dcmp2pgm_draws_the_ellipse_outline_on_the_peak_slice_and_nothing_without_the_state(
        case: Case, tmp_path: Path, number: int) -> None:
    state, peak = case.states[number - 1], PEAKS[number - 1]
    seen = render(case.series.slices[peak].path, tmp_path / "state", state)
    (ring,) = seen.overlays
    centre, half = ellipse(state)
    assert centre == pytest.approx([CAM_PEAKS[number - 1][1] + 0.5, CAM_PEAKS[number - 1][0] + 0.5], abs=0.5)
    rows, columns = np.mgrid[:SIZE, :SIZE] + 0.5
    radius = np.hypot((columns - centre[0]) / half[0], (rows - centre[1]) / half[1])
    inside = radius <= 1
    deep = np.hypot((columns - centre[0]) / (half[0] - OUTLINE_WIDTH),
                    (rows - centre[1]) / (half[1] - OUTLINE_WIDTH)) < 1
    edge = inside & ~(np.roll(inside, 1, 0) & np.roll(inside, -1, 0) & np.roll(inside, 1, 1) & np.roll(inside, -1, 1))
    assert ring.any() and not (ring & ~inside).any(), "every pixel of the outline lies in the ellipse"
    assert not (ring & deep).any(), "and none deeper inside it than the outline's width"
    assert (ring[edge]).all(), "the outline is closed: every pixel on the ellipse's edge is drawn"
    top, left = np.argwhere(ring).min(axis=0)
    bottom, right = np.argwhere(ring).max(axis=0)
    assert (left, right) == (int(np.ceil(centre[0] - half[0] - 0.5)), int(np.floor(centre[0] + half[0] - 0.5)))
    assert (top, bottom) == (int(np.ceil(centre[1] - half[1] - 0.5)), int(np.floor(centre[1] + half[1] - 0.5)))
    # The slice as a viewer shows it through the state: the windowed slice with the outline drawn over it.
    shown = np.where(ring, 255, seen.bitmap)
    assert (shown != seen.bitmap).sum() > 10, "the outline shows on the slice"
    assert "Number of activated overlays: 1" in seen.account and f'label="PE finding {number}"' in seen.account
    assert "Number of graphic objects: 1" in seen.account and "type=ellipse filled=no units=pixel" in seen.account
    assert f'text 1: "{LABELS[number - 1]}"' in seen.account  # write_ct_series shuffles the instance numbers

    plain = render(case.series.slices[peak].path, tmp_path / "plain")
    assert plain.overlays == [] and "Graphic Layer" not in plain.account, "without the state, nothing is drawn"


def test_graphic_objects_belong_to_the_peak_slice_only(case: Case, tmp_path: Path) -> None:
    elsewhere = render(case.series.slices[2].path, tmp_path / "other", case.states[0])
    assert "Number of graphic objects: 0" in elsewhere.account and "Number of text objects: 0" in elsewhere.account


@pytest.mark.peer("dicom3tools")
def test_each_state_passes_dciodvfy(case: Case) -> None:
    for path in case.states:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        messages = [line for line in (result.stdout + result.stderr).splitlines()
                    if line.startswith(("Error", "Warning"))]
        assert messages == [], (path.name, messages)
