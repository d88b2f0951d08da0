"""The Grayscale Softcopy Presentation State of one analysis: the located findings drawn on the CT slices.

For PACS viewers that show presentation states but not SR coordinates. It references the peak slice of each
located finding (with its frame number when the slice is a frame), shows them in the PE window (VOI WL 100 /
WW 700, the window of the captures) and holds one graphic annotation per finding on its peak slice, in one graphic
layer: the finding's region (ELLIPSE, or POINT where there was no attention map) and a short text, the finding's
label, in a box above the region (below it when there is no room) with its anchor on the region. Each graphic
object carries the tracking identifier and UID of the finding's SR group, so both objects name a finding alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from pe_node.located import Finding, Region, describe
from pe_node.model.preprocess import PE_WINDOW
from pe_node.pipeline.series import CTSeries
from pe_node.reporting.algorithm import AlgorithmInfo
from pe_node.reporting.evidence import image_reference, slice_header
from pe_node.reporting.sr import tracking_identifier, tracking_key

SERIES_DESCRIPTION = "pe-node PE findings (GSPS) - PRELIMINARY"
CONTENT_LABEL = "PE_FINDINGS"
DESCRIPTION = "PE findings of pe-node, preliminary and unverified"
LAYER_NAME = "PE_FINDINGS"

_TEXT_HEIGHT = 0.06
"""Height of a text box as a share of the slice's rows."""
_TEXT_WIDTH = 0.6
"""Width of a text box as a share of the slice's columns."""


def presentation_state(
    series: CTSeries,
    findings: Sequence[Finding],
    *,
    header: Dataset,
    algorithm: AlgorithmInfo,
    tracking_uid: Callable[[str], str],
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The GSPS drawing ``findings`` (at least one) on ``series``; ``header`` gives patient and study."""
    if not findings:
        raise ValueError("a presentation state needs at least one located finding to draw")
    peaks = list(dict.fromkeys(f.peak for f in findings))
    images = {index: slice_header(series, header, index) for index in peaks}
    layer = hd.pr.GraphicLayer(layer_name=LAYER_NAME, order=1, description="Located pulmonary emboli (pe-node)",
                               display_color=hd.color.CIELabColor.from_rgb(255, 255, 0))
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=list(images.values()),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=None,  # type: ignore[arg-type]  # documented as optional, annotated as str
        content_label=CONTENT_LABEL,
        content_description=DESCRIPTION,
        graphic_annotations=[
            _annotation(series, images[finding.peak], layer, finding, number, tracking_uid)
            for number, finding in enumerate(findings, start=1)
        ],
        graphic_layers=[layer],
        modality_lut_transformation=_modality_lut(header),
        voi_lut_transformations=[
            hd.pr.SoftcopyVOILUTTransformation(
                window_center=PE_WINDOW[0], window_width=PE_WINDOW[1], window_explanation="PE window"
            )
        ],
        institution_name=algorithm.institution,
        contributing_equipment=[algorithm.contributing_equipment()],
        series_description=SERIES_DESCRIPTION,
    )
    # Without it Laterality (General Series, 2C) is required: the state shows the chest, an unpaired part.
    state.BodyPartExamined = header.get("BodyPartExamined") or "CHEST"
    state.ReferencedSeriesSequence[0].ReferencedImageSequence = _image_references(series, peaks)
    return state


def _modality_lut(header: Dataset) -> hd.ModalityLUTTransformation | None:
    """The CT's rescale to HU, from the series header (its first slice) or, in an Enhanced CT, the shared functional
    groups; None without one.

    Given explicitly because highdicom reads it from a multi-frame image only when it is referenced once.
    """
    source = header
    if "RescaleSlope" not in header and "SharedFunctionalGroupsSequence" in header:
        source = header.SharedFunctionalGroupsSequence[0].get("PixelValueTransformationSequence", [Dataset()])[0]
    if "RescaleSlope" not in source or "RescaleIntercept" not in source:
        return None
    return hd.ModalityLUTTransformation(rescale_intercept=float(source.RescaleIntercept),
                                        rescale_slope=float(source.RescaleSlope),
                                        rescale_type=source.get("RescaleType") or "HU")


def _annotation(
    series: CTSeries, image: Dataset, layer: hd.pr.GraphicLayer, finding: Finding, number: int,
    tracking_uid: Callable[[str], str],
) -> hd.pr.GraphicAnnotation:
    """The region and label of one finding on its peak slice ``image``."""
    tracking = (tracking_identifier(finding, number), tracking_uid(tracking_key(series, finding)))
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[image],
        graphic_layer=layer,
        graphic_objects=[
            hd.pr.GraphicObject(
                graphic_type=finding.region.shape.value,
                graphic_data=np.array(finding.region.points),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                tracking_id=tracking[0],
                tracking_uid=tracking[1],
            )
        ],
        text_objects=[_label(series, finding, tracking)],
    )
    frame = series.slices[finding.peak].frame
    if frame is not None:
        annotation.ReferencedImageSequence[0].ReferencedFrameNumber = frame
    return annotation


def _label(series: CTSeries, finding: Finding, tracking: tuple[str, str]) -> hd.pr.TextObject:
    """The finding's label in a box above its region (below when there is no room), anchored on the region."""
    rows, columns = series.hu.shape[1:]
    height, width = max(8.0, rows * _TEXT_HEIGHT), columns * _TEXT_WIDTH
    top_of_region, bottom_of_region, centre = _extent(finding.region)
    if top_of_region - 2 - height >= 0:
        top, anchor = top_of_region - 2 - height, (centre, top_of_region)
    else:
        top, anchor = min(rows - height, bottom_of_region + 2), (centre, bottom_of_region)
    left = min(max(0.0, centre - width / 2), columns - width)
    return hd.pr.TextObject(
        text_value=describe(finding, series),
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=(left, top, left + width, top + height),
        anchor_point=anchor,
        anchor_point_visible=True,
        tracking_id=tracking[0],
        tracking_uid=tracking[1],
    )


def _extent(region: Region) -> tuple[float, float, float]:
    """Top and bottom row and centre column of a region."""
    columns, rows = zip(*region.points, strict=True)
    return min(rows), max(rows), region.centre[0]


def _image_references(series: CTSeries, indices: Sequence[int]) -> list[Dataset]:
    """Referenced Image Sequence items of slices ``indices``: one per instance, naming its frames if it has any."""
    items: dict[str, Dataset] = {}
    frames: dict[str, list[int]] = {}
    for index in indices:
        ref = series.slices[index]
        items.setdefault(ref.sop_instance_uid, image_reference(series, index))
        if ref.frame is not None:
            frames.setdefault(ref.sop_instance_uid, []).append(ref.frame)
    for uid, numbers in frames.items():
        items[uid].ReferencedFrameNumber = numbers if len(numbers) > 1 else numbers[0]
    return list(items.values())
