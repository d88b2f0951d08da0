"""What a radiologist sees in the OHIF Viewer (3.13, tests/viewer) of a study holding a CT series and an SR.

The SR is built here in the shape OHIF reads back into a measurement (what OHIF itself writes for a cornerstone
EllipticalROI): one TID 1501 group with the tracking identifier ``Cornerstone3DTools@^0.1.0:EllipticalROI``, the label
as a Comment (DCM 121106) and, as its first NUM, an Area INFERRED FROM an SCOORD ELLIPSE SELECTED FROM one CT slice.
Both go into Orthanc; OHIF, served against its DICOMweb, opens the SR from the study browser in headless Chromium.
The test asserts that nothing errs, that the measurements panel lists the label, and that the viewport shows the
ellipse where the SR put it on that slice (annotation-coloured pixels, none on the same slice without the SR).

Set PE_NODE_VIEWER_SHOTS to a folder to keep the screenshots and result.json there.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from tests.dicom_factory import make_ct_dataset, phantom_slice
from tests.peers import Orthanc
from tests.viewer.ohif import OHIFServer, annotation_pixels, store, view_study

pytestmark = pytest.mark.peer("ohif", "orthanc", "orthanc-dicomweb", "chromium")

SIZE, SLICES, ON = 256, 4, 2  # 256 x 256 slices; the finding is on slice ON (position order)
SPACING = 0.7
CENTRE = (128.0, 115.0)  # column, row of the finding: around the contrast-filled vessel of the phantom
HALF_AXES = (22.0, 12.0)  # half the major (vertical) and minor (horizontal) axes, in pixels
LABEL = "PE clot (viewer test)"
TRACKING_IDENTIFIER = "Cornerstone3DTools@^0.1.0:EllipticalROI"
PULMONARY_EMBOLISM = Code("59282003", "SCT", "Pulmonary embolism")


def ct_slices() -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    slices = []
    for k in range(SLICES):
        ds = make_ct_dataset(phantom_slice(k, SLICES, SIZE, seed=2), position=(-90.0, -90.0, -100.0 + 2.5 * k),
                             study_uid=study, series_uid=series, instance_number=k + 1,
                             pixel_spacing=(SPACING, SPACING), slice_thickness=2.5)
        ds.PatientBirthDate, ds.PatientSex = "", ""  # type 2, and highdicom copies them into the SR
        slices.append(ds)
    return slices


def finding_sr(ct: list[Dataset], on: Dataset) -> hd.sr.Comprehensive3DSR:
    """An Imaging Measurement Report with one EllipticalROI finding on ``on``, shaped as OHIF 3.13 reads it back.

    The ellipse's major axis comes first (DICOM) and is vertical: cornerstone takes the four points as top, bottom,
    left, right, and a horizontal major axis would read as an oblique ellipse ("Area: Oblique not supported").
    """
    (column, row), (major, minor) = CENTRE, HALF_AXES
    ellipse = np.array([[column, row - major], [column, row + major], [column - minor, row], [column + minor, row]])
    region = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.ELLIPSE,
        graphic_data=ellipse,
        source_image=hd.sr.SourceImageForRegion(on.SOPClassUID, on.SOPInstanceUID),
    )
    area = hd.sr.Measurement(
        name=codes.SCT.Area,
        value=round(math.pi * major * minor * SPACING**2, 1),
        unit=codes.UCUM.SquareMillimeter,
        referenced_coordinates=[region],
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=TRACKING_IDENTIFIER),
        finding_type=PULMONARY_EMBOLISM,
        measurements=[area],  # the NUM holding the SCOORD must be the group's first NUM
    )
    comment = hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=LABEL, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    group[0].ContentSequence.append(comment)  # OHIF's label
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=Code("RPID16", "RADLEX", "CT Chest Pulmonary Angiogram"),
        imaging_measurements=[group],
        referenced_images=[on],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=ct,
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="pe-node tests",
        series_description="viewer test SR",
        is_complete=True,
    )


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    kept = os.environ.get("PE_NODE_VIEWER_SHOTS")
    return Path(kept) if kept else tmp_path / "viewer"


def test_ohif_lists_and_draws_the_finding_of_an_sr(tmp_path: Path, shots: Path) -> None:
    ct = ct_slices()
    sr = finding_sr(ct, ct[ON])
    with Orthanc(tmp_path / "orthanc", dicomweb=True) as orthanc, OHIFServer(orthanc) as server:
        store(orthanc, [*ct, sr])
        seen = view_study(server, sr.StudyInstanceUID, shots, sr_series_uid=sr.SeriesInstanceUID,
                          ct_series_uid=ct[0].SeriesInstanceUID, ct_sop_uid=ct[ON].SOPInstanceUID, timeout=60)

    assert seen.error is None, seen.error
    assert seen.console_errors == [], seen.console_errors
    assert seen.server_failures == [] and seen.raw["failedRequests"] == []
    # OHIF took the SR's group for a cornerstone EllipticalROI and tracks it as a measurement of the CT slice.
    assert seen.sr_opened and seen.hydrated, seen.raw["sr"]
    (measurement,) = seen.raw["measurements"]
    assert (measurement["toolName"], measurement["label"]) == ("EllipticalROI", LABEL)
    assert measurement["SOPInstanceUID"] == ct[ON].SOPInstanceUID
    (row,) = seen.measurement_labels
    assert LABEL in row and "mm²" in row, row

    # The viewport shows that slice with the ellipse drawn around CENTRE; the same slice before the SR, none.
    assert f"/instances/{ct[ON].SOPInstanceUID}/" in seen.raw["viewport"]["imageId"]
    assert len(annotation_pixels(seen.screenshots["ct"])) == 0
    canvas = seen.canvas_box
    assert canvas is not None
    drawn = annotation_pixels(seen.screenshots["page"], canvas)
    # OHIF fits the image into the canvas, centred, scaled to the canvas's short side.
    scale = min(canvas["width"], canvas["height"]) / SIZE
    x = canvas["x"] + canvas["width"] / 2 + (CENTRE[0] + 0.5 - SIZE / 2) * scale
    y = canvas["y"] + canvas["height"] / 2 + (CENTRE[1] + 0.5 - SIZE / 2) * scale
    major, minor = HALF_AXES[0] * scale, HALF_AXES[1] * scale
    slack = 10  # screen pixels: line width, the handle marker, rounding
    near = drawn[(np.abs(drawn[:, 0] - y) <= major + slack) & (np.abs(drawn[:, 1] - x) <= minor + slack)]
    assert len(near) > 2 * math.pi * minor, f"{len(near)} annotation pixels near the finding, {len(drawn)} in all"
    top, left = near.min(axis=0)
    bottom, right = near.max(axis=0)
    assert abs(top - (y - major)) <= slack and abs(bottom - (y + major)) <= slack, (top, bottom, y, major)
    assert abs(left - (x - minor)) <= slack and abs(right - (x + minor)) <= slack, (left, right, x, minor)
