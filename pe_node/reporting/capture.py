"""Secondary captures of key slices: single-frame RGB, the overlay and a "NOT FOR DIAGNOSTIC USE" banner burned in.

Each capture is a highdicom SC image in the source study, with BurnedInAnnotation YES, Conversion Type WSD
(made on a workstation), and a SourceImageSequence item that points at the CT slice it shows.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pe_node.findings import Prediction
from pe_node.model.preprocess import PE_WINDOW
from pe_node.pipeline.series import CTSeries
from pe_node.reporting import codes as pe_codes
from pe_node.reporting.algorithm import AlgorithmInfo
from pe_node.reporting.overlay import render

SERIES_DESCRIPTION = "pe-node attention maps - NOT FOR DIAGNOSTIC USE"

# Patient axis letters (PS3.3 C.7.6.1.1.1) of the +x, +y, +z patient directions and their opposites.
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


def secondary_capture(
    series: CTSeries,
    prediction: Prediction,
    index: int,
    *,
    header: Dataset,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
) -> hd.sc.SCImage:
    """The capture of slice ``index`` (slice order) of ``series``; ``header`` gives patient and study."""
    probability = float(prediction.image[index])
    attention = _relative_attention(prediction.attention, index)
    position = f"slice {index + 1}/{len(series)}"
    number = series.slices[index].instance_number
    pixels = render(
        series.hu[index],
        prediction.cams.get(index),
        [
            f"PE probability {probability:.2f}  attention {attention:.2f} of max",
            position if number is None else f"CT image {number} ({position})",
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
        f"CT slice in window WL {PE_WINDOW[0]:g} / WW {PE_WINDOW[1]:g} with the model's attention map; "
        "not for diagnostic use"
    )
    capture.ImageComments = f"PE probability {probability:.4f}; NOT FOR DIAGNOSTIC USE"
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


def _source_image(series: CTSeries, index: int) -> Dataset:
    ref = series.slices[index]
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(pe_codes.SOURCE_FOR_PROCESSING)]
    return item
