"""Secondary captures of key slices: single-frame RGB, the overlay burned in, a "NOT FOR DIAGNOSTIC USE" band below.

Each capture is a highdicom SC image in the source study, with BurnedInAnnotation YES, Conversion Type WSD
(made on a workstation), and a SourceImageSequence item that points at the CT slice it shows (and its frame).

The capture is the whole slice with a black band added below it (:func:`overlay.with_band`), so it is taller than
the slice. The text sits outside the image, where it neither hides anatomy nor lies under the text and the cine
control that viewers (OHIF) draw over the top of an image. It names the finding the slice belongs to (side,
extent) and the slice's own probability. Pixel (row, column) of the slice is the same pixel of the capture, so
PixelSpacing and PatientOrientation stay true for the image part; the band's rows show no anatomy.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pe_node.findings import Prediction
from pe_node.located import Finding, describe
from pe_node.model.preprocess import PE_WINDOW
from pe_node.pipeline.series import CTSeries
from pe_node.reporting import codes as pe_codes
from pe_node.reporting.algorithm import AlgorithmInfo
from pe_node.reporting.evidence import image_reference
from pe_node.reporting.overlay import render

SERIES_DESCRIPTION = "pe-node attention maps - NOT FOR DIAGNOSTIC USE"

# Patient axis letters (PS3.3 C.7.6.1.1.1) of the +x, +y, +z patient directions and their opposites.
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


def secondary_capture(
    series: CTSeries,
    prediction: Prediction,
    index: int,
    findings: Sequence[Finding],
    *,
    header: Dataset,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
) -> hd.sc.SCImage:
    """The capture of slice ``index`` (slice order) of ``series``, naming the finding of ``findings`` it lies in;
    ``header`` gives patient and study."""
    probability = float(prediction.image[index])
    finding = _finding_line(series, findings, index)
    pixels = render(
        series.hu[index],
        prediction.cams.get(index),
        [
            finding,
            f"this slice: {_slice_name(series, index)}, p {probability:.2f}, "
            f"attention {_relative_attention(prediction.attention, index):.2f} of max",
        ],
    )
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        pixel_spacing=series.pixel_spacing,  # type: ignore[arg-type]  # highdicom annotates it as integers
        patient_orientation=patient_orientation(series.orientation),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[algorithm.contributing_equipment()],
        series_description=SERIES_DESCRIPTION,
        **algorithm.equipment_attributes(),
    )
    # Attributes of the SC and General Image modules that highdicom's constructor leaves out or fixes.
    capture.ConversionType = "WSD"
    # Without it Laterality (General Series, 2C) is required: the capture shows the chest, an unpaired part.
    capture.BodyPartExamined = header.get("BodyPartExamined") or "CHEST"
    capture.BurnedInAnnotation = "YES"
    capture.SourceImageSequence = [_source_image(series, index)]
    capture.DerivationDescription = (
        f"CT slice in window WL {PE_WINDOW[0]:g} / WW {PE_WINDOW[1]:g} with the model's attention map, "
        "a text band added below; not for diagnostic use"
    )
    capture.ImageComments = f"{finding}; slice PE probability {probability:.4f}; NOT FOR DIAGNOSTIC USE"
    return capture


def patient_orientation(orientation: tuple[float, ...]) -> tuple[str, str]:
    """Patient Orientation letters of the row and column directions: the dominant axis of each direction cosine."""
    letters = []
    for cosines in (orientation[:3], orientation[3:]):
        axis = int(np.argmax(np.abs(cosines)))
        letters.append(_AXIS_LETTERS[axis][0 if cosines[axis] > 0 else 1])
    return letters[0], letters[1]


def _relative_attention(attention: np.ndarray, index: int) -> float:
    peak = float(np.max(attention)) if len(attention) else 0.0
    return float(attention[index]) / peak if peak > 0 else 0.0


def _finding_line(series: CTSeries, findings: Sequence[Finding], index: int) -> str:
    for number, finding in enumerate(findings, start=1):
        if index in finding:
            return f"{describe(finding, series)} (finding {number} of {len(findings)})"
    return "no located PE finding on this slice"


def _slice_name(series: CTSeries, index: int) -> str:
    ref = series.slices[index]
    position = f"slice {index + 1}/{len(series)}"
    if ref.frame is not None:
        return f"frame {ref.frame} ({position})"
    return position if ref.instance_number is None else f"CT image {ref.instance_number} ({position})"


def _source_image(series: CTSeries, index: int) -> Dataset:
    item = image_reference(series, index)
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(pe_codes.SOURCE_FOR_PROCESSING)]
    return item
