"""Grayscale Softcopy Presentation States of one analysis: each located finding drawn on its peak slice.

For PACS viewers that show presentation states but not SR coordinates. There is one state per finding, referencing
that finding's peak slice only (with its frame number when the slice is a frame), because an overlay plane of a
presentation state applies to every image the state references. Each state shows its slice in the PE window
(VOI WL 100 / WW 700, the window of the captures) and draws the finding twice, on one graphic layer:

- a graphic annotation: the finding's region (ELLIPSE, or POINT where there was no attention map) and a short text,
  the finding's label, in a box above the region (below it when there is no room) with its anchor on the region;
  each object carries the tracking identifier and UID of the finding's SR group, so both objects name it alike;
- an overlay plane (6000, graphics, 1 bit, the slice's size) holding the outline of the same ellipse
  (:func:`outline`; a small circle around a POINT), activated on that layer. Viewers and renderers that do not draw
  graphic objects draw overlays: DCMTK's ``dcmp2pgm`` 3.6.7 renders the overlay of a state for the image it is
  applied to, never its ellipse or text.

States of one report share a series; their instance numbers are the findings' numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.pixels import pack_bits

from pe_node.located import Finding, Region, Shape, describe
from pe_node.model.preprocess import PE_WINDOW
from pe_node.pipeline.series import CTSeries
from pe_node.reporting.algorithm import AlgorithmInfo
from pe_node.reporting.evidence import image_reference, slice_header
from pe_node.reporting.sr import tracking_identifier, tracking_key

SERIES_DESCRIPTION = "pe-node PE findings (GSPS) - PRELIMINARY"
CONTENT_LABEL = "PE_FINDING_{number}"
DESCRIPTION = "PE finding {number} of {count} of pe-node, preliminary and unverified"
LAYER_NAME = "PE_FINDINGS"
OVERLAY_GROUP = 0x6000
OUTLINE_WIDTH = 2
"""Width (pixels) of the ellipse's outline in the overlay, inside the ellipse."""
POINT_RADIUS = 4.0
"""Radius (pixels) of the circle the overlay draws around a POINT region."""

_TEXT_HEIGHT = 0.06
"""Height of a text box as a share of the slice's rows."""
_TEXT_WIDTH = 0.6
"""Width of a text box as a share of the slice's columns."""


def presentation_state(
    series: CTSeries,
    finding: Finding,
    number: int,
    count: int,
    *,
    header: Dataset,
    algorithm: AlgorithmInfo,
    tracking_uid: Callable[[str], str],
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The GSPS drawing ``finding``, number ``number`` of ``count``, on its peak slice of ``series``; ``header``
    gives patient and study."""
    if not 1 <= number <= count:
        raise ValueError(f"finding number {number} must lie in 1..{count}")
    image = slice_header(series, header, finding.peak)
    layer = hd.pr.GraphicLayer(layer_name=LAYER_NAME, order=1, description="Located pulmonary emboli (pe-node)",
                               display_color=hd.color.CIELabColor.from_rgb(255, 255, 0))
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[image],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=number,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=None,  # type: ignore[arg-type]  # documented as optional, annotated as str
        content_label=CONTENT_LABEL.format(number=number),
        content_description=DESCRIPTION.format(number=number, count=count),
        graphic_annotations=[_annotation(series, image, layer, finding, number, tracking_uid)],
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
    state.ReferencedSeriesSequence[0].ReferencedImageSequence = [image_reference(series, finding.peak)]
    _add_overlay(state, outline(finding.region, cast(tuple[int, int], series.hu.shape[1:])), number,
                 describe(finding, series))
    return state


def outline(region: Region, shape: tuple[int, int]) -> np.ndarray:
    """The pixels [rows, columns] of an image of ``shape`` that draw ``region``'s outline: the pixels of the ellipse
    (whose centres lie inside it) within ``OUTLINE_WIDTH`` pixels of its edge; for a POINT, a circle of
    ``POINT_RADIUS`` around it. Coordinates as in :class:`located.Region` (0, 0 the top left corner)."""
    (column, row), (half_width, half_height) = _axes(region)
    rows, columns = np.mgrid[: shape[0], : shape[1]].astype(np.float64) + 0.5
    inside = ((columns - column) / half_width) ** 2 + ((rows - row) / half_height) ** 2 <= 1
    inner_width, inner_height = half_width - OUTLINE_WIDTH, half_height - OUTLINE_WIDTH
    if inner_width <= 0 or inner_height <= 0:
        return inside
    core = ((columns - column) / inner_width) ** 2 + ((rows - row) / inner_height) ** 2 < 1
    return inside & ~core


def _axes(region: Region) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centre (column, row) and half width and height of the ellipse a region's outline draws."""
    if region.shape is Shape.POINT:
        return region.centre, (POINT_RADIUS, POINT_RADIUS)
    columns, rows = zip(*region.points, strict=True)
    return region.centre, ((max(columns) - min(columns)) / 2, (max(rows) - min(rows)) / 2)


def _add_overlay(state: Dataset, bits: np.ndarray, number: int, label: str) -> None:
    """Overlay Plane (PS3.3 C.9.2) and Overlay Activation (C.11.7) modules: ``bits`` over the whole referenced
    slice, a graphics overlay shown on the findings' layer."""
    rows, columns = bits.shape

    def tag(element: int) -> int:
        return (OVERLAY_GROUP << 16) | element

    state.add_new(tag(0x0010), "US", rows)
    state.add_new(tag(0x0011), "US", columns)
    state.add_new(tag(0x0022), "LO", label[:64])  # Overlay Description
    state.add_new(tag(0x0040), "CS", "G")  # graphics, not ROI
    state.add_new(tag(0x0050), "SS", [1, 1])  # origin: the top left pixel is 1\1
    state.add_new(tag(0x0100), "US", 1)
    state.add_new(tag(0x0102), "US", 0)
    state.add_new(tag(0x1001), "CS", LAYER_NAME)  # Overlay Activation Layer
    state.add_new(tag(0x1500), "LO", f"PE finding {number}")  # Overlay Label
    state.add_new(tag(0x3000), "OW", pack_bits(bits.ravel()))


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
