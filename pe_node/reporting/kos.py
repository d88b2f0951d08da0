"""The Key Object Selection document (TID 2010, title DCM 113000 "Of Interest") of one analysis.

It flags the key CT slices and their secondary captures, so that a PACS that supports key images opens the study on
them.
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
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
) -> hd.ko.KeyObjectSelectionDocument:
    """A KOS referencing ``key_slices`` (CT, each with patient and study attributes) and ``captures``."""
    selected = [*key_slices, *captures]
    content = hd.ko.KeyObjectSelection(
        document_title=pe_codes.OF_INTEREST,
        referenced_objects=selected,
        observer_device_context=algorithm.observer_context(),
        description=DESCRIPTION,
    )
    return hd.ko.KeyObjectSelectionDocument(
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
