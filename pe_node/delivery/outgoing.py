"""One result object on its way to the destinations: the file a job wrote and the UIDs every sender needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Outgoing:
    """One result object to deliver: its file and UIDs."""

    path: Path
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
