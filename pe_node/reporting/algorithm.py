"""Who made a result object: the algorithm (TID 4019 in the SR) and the same facts as Contributing Equipment.

One :class:`AlgorithmInfo` feeds the SR's Algorithm Identification, its Device Observer, the General Equipment
module (Manufacturer, Manufacturer's Model Name, Software Versions) and the Contributing Equipment item of every
object, so that a PACS shows the same name and version wherever it looks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid


class EquipmentAttributes(TypedDict):
    """The General Equipment module as highdicom's constructors take it."""

    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    institution_name: str | None


@dataclass(frozen=True)
class AlgorithmInfo:
    """The algorithm that produced a report. ``version`` is the model/checkpoint version, not pe-node's."""

    name: str
    version: str
    manufacturer: str = "pe-node"
    institution: str | None = None

    def __post_init__(self) -> None:
        # Manufacturer, model name and software versions are LO (64 characters) in every object we write.
        for field in ("name", "version", "manufacturer", "institution"):
            value = getattr(self, field)
            if value is None and field == "institution":
                continue
            if not isinstance(value, str) or not value.strip() or len(value) > 64 or "\\" in value:
                raise ValueError(f"AlgorithmInfo.{field} must be 1 to 64 characters without backslash, got {value!r}")

    @property
    def device_uid(self) -> str:
        """A stable Device Observer UID for this algorithm name (same for every report of every version)."""
        return generate_uid(entropy_srcs=[f"{self.manufacturer}\x1f{self.name}"])

    def identification(self) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification."""
        return hd.sr.AlgorithmIdentification(name=self.name, version=self.version, manufacturer=self.manufacturer)

    def observer_context(self) -> hd.sr.ObserverContext:
        """TID 1002 with a device observer (TID 1004): pe-node made the observations, no person did."""
        return hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=self.device_uid, name=self.name, manufacturer_name=self.manufacturer, model_name=self.name
            ),
        )

    def contributing_equipment(self) -> hd.ContributingEquipment:
        """The Contributing Equipment item (purpose: Processing Equipment) naming the algorithm and its version."""
        return hd.ContributingEquipment(
            manufacturer=self.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.name,
            software_versions=self.version,
            institution_name=self.institution,
            contribution_description="Automated pulmonary embolism detection",
        )

    def equipment_attributes(self) -> EquipmentAttributes:
        """Keyword arguments of highdicom's SOP classes for the General Equipment module."""
        return EquipmentAttributes(manufacturer=self.manufacturer, manufacturer_model_name=self.name,
                                   software_versions=self.version, institution_name=self.institution)
