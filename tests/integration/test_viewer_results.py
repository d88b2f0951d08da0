"""What a radiologist sees in the OHIF Viewer (3.13, tests/viewer) of a study after pe-node has reported on it.

The whole loop: a CTPA series goes to ``pe-node serve`` with DCMTK storescu, and the node sends its results (SR,
presentation state, capture) to Orthanc over DICOM, as to a PACS; Orthanc already holds the CT. OHIF, served against
Orthanc's DICOMweb, opens the study in headless Chromium, and the test asserts that the SR opens without console
errors, that the measurements panel lists each located group under the label the SR gives it, and that the CT
viewport draws the group's region on its slice (annotation-coloured pixels at the region's edges; none on that slice
before the SR is opened). Once for a positive study (a located finding) and once for a negative one (its most
suspicious slice).

A random tiny model gives arbitrary outputs, so each study gets a tiny checkpoint whose outputs are forced, fitted to
this phantom by least squares (:func:`forced_checkpoint`): the image head scores a run of slices around the middle of
the series (above 0.5 for the positive study, below for the negative one), the exam head calls the exam positive
(right, RV/LV < 1) or negative, and the stage-1 image head makes the class-activation map peak on the phantom's
contrast-filled vessel, so that the region lies there.

Set PE_NODE_VIEWER_SHOTS to a folder to keep the screenshots and result.json there (one folder per study).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch

from pe_node.findings import EXAM_LABELS, ExamLabel
from pe_node.model import PreprocessConfig, save_checkpoint
from pe_node.model.preprocess import preprocess_slices
from pe_node.reporting.sr import SUSPICIOUS_NAME, TOOL_TAG
from tests.dicom_factory import phantom_volume, write_ct_series
from tests.peers import NodeProcess, Orthanc, run_dcmtk, wait_until
from tests.tiny_models import tiny_model
from tests.viewer.ohif import OHIFServer, annotation_pixels, store, view_study

pytestmark = pytest.mark.peer("ohif", "orthanc", "orthanc-dicomweb", "chromium", "dcmtk")

SLICES, SIZE, SEED = 32, 256, 3
VESSEL = (0.45, 0.5)
"""Row and column of the phantom's contrast-filled vessel, as shares of the slice (tests.dicom_factory)."""
PEAK_LOGIT = {"positive": 3.0, "negative": -2.0}
"""The image head's logit on the slice it scores highest (p 0.95, p 0.12)."""
SPREAD = 3.0
"""How far the image head's logit falls from that slice to the slice at the 75th centile of the scores: a positive
study's run of slices above 0.5 is the top quarter."""
EXAM_LOGITS = {
    "positive": {ExamLabel.RIGHT: 6.0, ExamLabel.RV_LV_LT_1: 6.0},
    "negative": {ExamLabel.NEGATIVE: 6.0},
}
"""Exam-head logits of each study (every other label -6): a consistent positive and a consistent negative exam."""
TOOLS = {"ELLIPSE": "EllipticalROI", "POINT": "Probe"}


@dataclass(frozen=True)
class Group:
    """One located group of the node's SR, as OHIF should show it."""

    label: str
    tracking_identifier: str
    graphic_type: str
    points: np.ndarray
    """[n, 2] column, row in image pixels."""
    sop_instance_uid: str


def forced_checkpoint(path: Path, volume: np.ndarray, outcome: str) -> Path:
    """A tiny checkpoint (256 px input) whose outputs on ``volume`` are those of a ``positive`` or ``negative`` exam.

    Stage 1 keeps its random weights; its image head, which only the class-activation maps read, is the ridge
    regression of the feature maps onto one-hot maps of the feature cell that holds the vessel. Stage 2 keeps its
    random LSTM and dense layer; its image head scores the slices by how much their dense features resemble the
    middle slice's (the phantom changes slowly along the series), scaled so that the highest score is
    ``PEAK_LOGIT`` and the 75th centile ``SPREAD`` below it. The exam head is its bias.
    """
    model = tiny_model()
    preprocess = PreprocessConfig(size=SIZE)
    with torch.no_grad():
        features = model.encoder.forward_features(preprocess_slices(volume, preprocess)).double()
        count, channels, height, width = features.shape
        target = torch.zeros(count, height, width, dtype=torch.float64)
        target[:, int(VESSEL[0] * height), int(VESSEL[1] * width)] = 1.0
        cells = features.permute(0, 2, 3, 1).reshape(-1, channels)
        ridge = 1e-2 * cells.pow(2).sum() / len(cells) * torch.eye(channels, dtype=torch.float64)
        cam_weights = torch.linalg.solve(cells.T @ cells + ridge, cells.T @ target.reshape(-1))
        model.encoder.image_head.weight.copy_(cam_weights.float()[None])

        dense = model.sequence(model.encoder.pool(features.float())[None]).slices[0].double()
        mean = dense.mean(dim=0)
        direction = dense[count // 2] - mean
        score = (dense - mean) @ direction
        high = score.max()
        scale = SPREAD / (high - score.quantile(0.75))
        sequence = model.sequence
        sequence.image_head.weight.copy_((direction * scale).float()[None])
        sequence.image_head.bias.fill_(float(PEAK_LOGIT[outcome] - scale * (high + mean @ direction)))
        sequence.exam_head.weight.zero_()
        sequence.exam_head.bias.copy_(torch.tensor([EXAM_LOGITS[outcome].get(ExamLabel(label), -6.0)
                                                    for label in EXAM_LABELS]))
    return save_checkpoint(path, model, preprocess, provenance={"data": "forced outputs", "purpose": "tests"})


def located_groups(sr: pydicom.Dataset) -> list[Group]:
    """The measurement groups under Imaging Measurements: label, tracking identifier and region of each."""
    found = []
    for container in sr.ContentSequence:
        if container.ConceptNameCodeSequence[0].CodeValue != "126010":  # Imaging Measurements
            continue
        for group in container.ContentSequence:
            items = list(group.ContentSequence)
            (label,) = [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == "121106"]
            (identifier,) = [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == "112039"]
            num = next(i for i in items if i.ValueType == "NUM")
            (scoord,) = num.ContentSequence
            (source,) = scoord.ContentSequence
            points = np.reshape(np.asarray(scoord.GraphicData, dtype=np.float64), (-1, 2))
            found.append(Group(label, identifier, scoord.GraphicType, points,
                               str(source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)))
    return found


def settled(node: NodeProcess, timeout: float = 90) -> dict[str, Any]:
    """The node's status once its one job ended and every delivery is done."""
    def done() -> dict[str, Any] | None:
        status = node.status()
        ended = [j for j in status["jobs"] if j["state"] in ("done", "failed")]
        pending = [d for d in status["deliveries"] if d["state"] != "done"]
        return status if ended and status["deliveries"] and not pending else None

    return wait_until(done, timeout=timeout, interval=0.3, what="the job done and its results delivered")


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return phantom_volume(n_slices=SLICES, size=SIZE, seed=SEED)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    kept = os.environ.get("PE_NODE_VIEWER_SHOTS")
    return Path(kept) if kept else tmp_path / "viewer"


@pytest.mark.parametrize("outcome", ["positive", "negative"])
def test_ohif_opens_the_nodes_report_lists_its_labels_and_draws_its_region(
        start_node, tmp_path: Path, shots: Path, volume: np.ndarray, outcome: str) -> None:
    checkpoint = forced_checkpoint(tmp_path / f"{outcome}.pt", volume, outcome)
    files = write_ct_series(tmp_path / "ct", n_slices=SLICES, size=SIZE, seed=SEED, shuffle_instance_numbers=False)
    ct = [pydicom.dcmread(path) for path in files]
    with Orthanc(tmp_path / "orthanc", dicomweb=True) as orthanc, OHIFServer(orthanc) as server:
        node = start_node(
            model={"checkpoint": str(checkpoint), "device": "cpu", "batch_size": 16},
            worker={"enabled": True, "lease_seconds": 30, "max_attempts": 1, "poll_seconds": 0.2},
            destinations=[{"type": "dicom", "name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                           "port": orthanc.dicom_port}],
            outputs={"secondary_capture": {"enabled": True, "max_images": 1}},
        )
        store(orthanc, ct)  # the PACS holds the study it routes to the node
        sent = run_dcmtk("storescu", "-aec", "PE_NODE", "127.0.0.1", str(node.port), *map(str, files))
        assert sent.returncode == 0, sent.stderr
        status = settled(node)
        [job] = status["jobs"]
        assert job["state"] == "done", job["error"]
        [report] = job["result"]["reports"]
        assert report["outcome"] == outcome
        sr = pydicom.dcmread(report["sr_path"])
        groups = located_groups(sr)
        assert groups, "every analysed exam's SR has a located group"
        seen = view_study(server, sr.StudyInstanceUID, shots / outcome, sr_series_uid=sr.SeriesInstanceUID,
                          ct_series_uid=ct[0].SeriesInstanceUID, ct_sop_uid=groups[0].sop_instance_uid, timeout=60)

    if outcome == "positive":
        assert all(g.label.startswith("PE, ") and ":PE finding " in g.tracking_identifier for g in groups)
    else:
        (group,) = groups
        assert group.label.startswith("No PE: most suspicious slice, image ") and "(below 0.5)" in group.label
        assert group.tracking_identifier.endswith(SUSPICIOUS_NAME)
    assert all(g.tracking_identifier.startswith(f"{TOOL_TAG}:{TOOLS[g.graphic_type]}:") for g in groups)

    # The SR opens: no error, hydrated into one measurement per group, each listed under the SR's label.
    assert seen.error is None, seen.error
    assert seen.console_errors == [], seen.console_errors
    assert seen.server_failures == [] and seen.raw["failedRequests"] == []
    assert seen.sr_opened and seen.hydrated, seen.raw["sr"]
    assert [(m["label"], m["toolName"], m["SOPInstanceUID"]) for m in seen.raw["measurements"]] == [
        (g.label, TOOLS[g.graphic_type], g.sop_instance_uid) for g in groups]
    assert len(seen.measurement_labels) == len(groups)
    for row, group in zip(seen.measurement_labels, groups, strict=True):
        assert group.label in row, (row, group.label)

    # The viewport shows the first group's slice with its region drawn; the same slice before the SR, nothing.
    first = groups[0]
    assert f"/instances/{first.sop_instance_uid}/" in seen.raw["viewport"]["imageId"]
    assert len(annotation_pixels(seen.screenshots["ct"])) == 0
    canvas = seen.canvas_box
    assert canvas is not None
    drawn = annotation_pixels(seen.screenshots["page"], canvas)
    # OHIF fits the image into the canvas, centred, scaled to the canvas's short side.
    scale = min(canvas["width"], canvas["height"]) / SIZE
    screen = np.stack([canvas["y"] + canvas["height"] / 2 + (first.points[:, 1] - SIZE / 2) * scale,
                       canvas["x"] + canvas["width"] / 2 + (first.points[:, 0] - SIZE / 2) * scale], axis=1)
    slack = 10  # screen pixels: line width, the handle marker, rounding
    top, left = screen.min(axis=0) - slack
    bottom, right = screen.max(axis=0) + slack
    inside = drawn[(drawn[:, 0] >= top) & (drawn[:, 0] <= bottom) & (drawn[:, 1] >= left) & (drawn[:, 1] <= right)]
    assert len(inside) > 20, f"{len(inside)} annotation pixels in the region's box, {len(drawn)} in all"
    for point in screen:  # the ends of both axes of an ellipse (a probe's point): each lies on the drawn outline
        distance = np.hypot(*(inside - point).T).min()
        assert distance <= slack, f"nothing drawn within {slack} px of {point} (nearest {distance:.1f})"
