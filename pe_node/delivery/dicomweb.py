"""DICOMweb destinations: STOW-RS through dicomweb-client, with the per-instance outcome read from the response."""

from __future__ import annotations

from collections.abc import Sequence

import pydicom
import requests

from pe_node.config import DicomWebDestination
from pe_node.delivery.outgoing import Outgoing

TIMEOUT_SECONDS = 30


def _client(destination: DicomWebDestination):  # noqa: ANN202 - dicomweb_client.DICOMwebClient
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=destination.url, headers=dict(destination.headers), timeout=TIMEOUT_SECONDS)


def store(destination: DicomWebDestination, batch: Sequence[Outgoing]) -> list[str | None]:
    """STOW-RS the batch, one request per study; None for each instance the server stored, else the reason."""
    errors: dict[str, str | None] = {}
    by_study: dict[str, list[Outgoing]] = {}
    for item in batch:
        by_study.setdefault(item.study_instance_uid, []).append(item)
    for study, items in by_study.items():
        try:
            datasets = [pydicom.dcmread(item.path) for item in items]
            response = _client(destination).store_instances(datasets, study_instance_uid=study)
        except (requests.RequestException, OSError, ValueError) as exc:
            for item in items:
                errors[item.sop_instance_uid] = f"STOW-RS to {destination.url}: {_short(exc)}"
            continue
        stored = {str(ref.ReferencedSOPInstanceUID) for ref in response.get("ReferencedSOPSequence", [])}
        failed = {
            str(ref.ReferencedSOPInstanceUID): int(ref.get("FailureReason", 0))
            for ref in response.get("FailedSOPSequence", [])
        }
        for item in items:
            uid = item.sop_instance_uid
            if uid in stored:
                errors[uid] = None
            elif uid in failed:
                errors[uid] = f"STOW-RS to {destination.url}: failure reason 0x{failed[uid]:04X}"
            else:
                errors[uid] = f"STOW-RS to {destination.url}: instance missing from the response"
    return [errors[item.sop_instance_uid] for item in batch]


def probe(destination: DicomWebDestination) -> tuple[bool, str]:
    """A QIDO-RS query for one study: is the server there and answering?"""
    try:
        _client(destination).search_for_studies(limit=1)
    except (requests.RequestException, ValueError) as exc:
        return False, f"QIDO-RS to {destination.url}: {_short(exc)}"
    return True, f"QIDO-RS to {destination.url}: answering"


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
