"""The Key Object Selection document (TID 2010, title DCM 113000 "Of Interest") of one analysis.

It flags the key CT slices and their secondary captures, so that a PACS that supports key images opens the study on
them. A key slice that is a frame of a multi-frame image is flagged with its frame number.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset

from pe_node.reporting import codes as pe_codes
from pe_node.reporting.algorithm import AlgorithmInfo

SERIES_DESCRIPTION = "pe-node key images - PRELIMINARY"
DESCRIPTION = "pe-node: slices with the strongest evidence of pulmonary embolism and their attention maps"


def key_object_selection(
    key_slices: Sequence[Dataset],
    captures: Sequence[Dataset],
    *,
    frames: Sequence[int | None],
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
) -> hd.ko.KeyObjectSelectionDocument:
    """A KOS referencing ``key_slices`` (CT, each with patient and study attributes; ``frames`` their frame
    numbers, None for single-frame images) and ``captures``."""
    selected = [*key_slices, *captures]
    content = hd.ko.KeyObjectSelection(
        document_title=pe_codes.OF_INTEREST,
        referenced_objects=selected,
        observer_device_context=algorithm.observer_context(),
        description=DESCRIPTION,
    )
    document = hd.ko.KeyObjectSelectionDocument(
        evidence=selected,
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        contributing_equipment=[algorithm.contributing_equipment()],
        series_description=SERIES_DESCRIPTION,
        **algorithm.equipment_attributes(),
    )
    # highdicom references whole instances; the CT slices are the first IMAGE items, in the order given.
    images = [item for item in document.ContentSequence if item.ValueType == "IMAGE"]
    for item, frame in zip(images, frames, strict=False):
        if frame is not None:
            item.ReferencedSOPSequence[0].ReferencedFrameNumber = frame
    return document
