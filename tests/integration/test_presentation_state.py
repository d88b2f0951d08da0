"""The presentation state applied by DCMTK: ``dcmp2pgm`` renders the annotated CT slice through it.

The CT series is real files (``tests.dicom_factory``) loaded as the pipeline loads them, with one finding whose
attention peak lies on the patient's right. ``dcmp2pgm`` renders its peak slice through the state: the grey values
follow the state's VOI (the PE window), and DCMTK attaches the finding's ellipse and label to that slice and to no
other. DCMTK 3.6.7 does not rasterise graphic or text objects into its bitmap (a state with and one without them
render the same pixels), so the annotation is checked as DCMTK reads it for the image (``-v`` lists it).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pe_node.findings import EXAM_LABELS, ExamLabel, Prediction
from pe_node.model.preprocess import PE_WINDOW
from pe_node.pipeline.series import CTSeries, load_series
from pe_node.reporting import AlgorithmInfo, ReportOptions, build_report
from pe_node.reporting.overlay import window
from tests.dicom_factory import write_ct_series

pytestmark = pytest.mark.peer("dcmtk")

SLICES, SIZE, PEAK = 30, 128, 14
CAM_PEAK = (60, 15)  # row, column: 34 mm to the image left of the midline, the patient's right


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[CTSeries, Path]:
    """The loaded series and its presentation state written to a file."""
    folder = tmp_path_factory.mktemp("gsps")
    write_ct_series(folder / "ct", n_slices=SLICES, size=SIZE, seed=4)
    series = load_series(folder / "ct")
    image = np.full(SLICES, 0.1)
    image[PEAK - 2 : PEAK + 3] = [0.6, 0.8, 0.95, 0.8, 0.6]
    rows, cols = np.mgrid[:SIZE, :SIZE]
    cam = np.exp(-((rows - CAM_PEAK[0]) ** 2 + (cols - CAM_PEAK[1]) ** 2) / (2 * 5.0**2)).astype(np.float32)
    exam = dict.fromkeys(EXAM_LABELS, 0.1) | {ExamLabel.RIGHT.value: 0.9, ExamLabel.RV_LV_LT_1.value: 0.9}
    prediction = Prediction(series.series_instance_uid, series.sop_instance_uids, exam, image,
                            np.full(SLICES, 1.0 / SLICES), {PEAK: cam})
    objects = build_report(series, prediction, algorithm=AlgorithmInfo("pe-node test", "1"),
                           options=ReportOptions(secondary_capture=False))
    assert objects.presentation_state is not None
    path = folder / "gsps.dcm"
    objects.presentation_state.save_as(path, enforce_file_format=True)
    return series, path


def render(image: Path, out: Path, state: Path | None = None) -> tuple[np.ndarray, str]:
    """dcmp2pgm's bitmap of ``image`` (through ``state``) and its verbose account of the state."""
    command = ["dcmp2pgm", "-v", *(["-p", str(state)] if state else []), str(image), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return np.asarray(Image.open(out), dtype=np.int16), result.stdout + result.stderr


def test_dcmp2pgm_shows_the_peak_slice_in_the_pe_window_through_the_state(case: tuple[CTSeries, Path],
                                                                           tmp_path: Path) -> None:
    series, state = case
    peak_file = series.slices[PEAK].path
    through_state, _ = render(peak_file, tmp_path / "state.pgm", state)
    plain, _ = render(peak_file, tmp_path / "plain.pgm")
    expected = window(series.hu[PEAK], *PE_WINDOW).astype(np.int16)
    assert through_state.shape == (SIZE, SIZE)
    assert np.abs(through_state - expected).max() <= 2, "DCMTK applied the state's PE window"
    assert np.abs(plain - expected).mean() > 10, "without the state the slice looks different"


def test_dcmp2pgm_finds_the_findings_ellipse_and_label_on_the_peak_slice_only(case: tuple[CTSeries, Path],
                                                                              tmp_path: Path) -> None:
    series, state = case
    _, account = render(series.slices[PEAK].path, tmp_path / "peak.pgm", state)
    assert "Graphic Layer #1 [PE_FINDINGS]" in account
    assert "Number of graphic objects: 1" in account and "type=ellipse filled=no units=pixel" in account
    coordinates = re.search(r"coordinates: ([-\d.\\, ]+)", account)
    assert coordinates is not None
    pairs = [pair for pair in coordinates.group(1).split(",") if pair.strip()]
    points = np.array([[float(v) for v in pair.split("\\")] for pair in pairs])
    assert points.shape == (4, 2)
    assert points.mean(axis=0) == pytest.approx([CAM_PEAK[1] + 0.5, CAM_PEAK[0] + 0.5], abs=0.5), "at the map's peak"
    # write_ct_series shuffles the instance numbers, so the label counts slices
    assert 'text 1: "PE, right, slices 13-17 of 30, p 0.95"' in account
    _, elsewhere = render(series.slices[2].path, tmp_path / "other.pgm", state)
    assert "Number of graphic objects: 0" in elsewhere and "Number of text objects: 0" in elsewhere
