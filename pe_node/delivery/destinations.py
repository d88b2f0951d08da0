"""Destination types: where result objects go. A registry of senders keyed by the config's ``type``.

Every sender takes a batch of files for one destination and returns, per file, None (stored there) or the error.
Sending is idempotent on SOP Instance UID at every destination type (a PACS stores an instance once, the folder
destination overwrites the same path), so a retry after a lost response never makes a duplicate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pe_node import storage
from pe_node.config import DicomDestination, DicomWebDestination, FolderDestination
from pe_node.delivery import dicomweb
from pe_node.delivery.outgoing import Outgoing

Sender = Callable[[Any, Sequence[Outgoing], str], list[str | None]]


def send_dicom(destination: DicomDestination, batch: Sequence[Outgoing], calling_ae_title: str) -> list[str | None]:
    """C-STORE over one association; a file counts as delivered only on a success or warning status."""
    from pe_node.dicom.scu import Peer, send_files

    peer = Peer(destination.ae_title, destination.host, destination.port)
    results = send_files([item.path for item in batch], peer, destination.calling_ae_title or calling_ae_title)
    by_path = {result.path: result for result in results}
    errors: list[str | None] = []
    for item in batch:
        result = by_path[item.path]
        if result.ok:
            errors.append(None)
        else:
            status = f"status 0x{result.status:04X}" if result.status is not None else "no status"
            errors.append(f"C-STORE to {peer}: {status}{': ' + result.error if result.error else ''}")
    return errors


def send_dicomweb(destination: DicomWebDestination, batch: Sequence[Outgoing],
                  calling_ae_title: str) -> list[str | None]:
    return dicomweb.store(destination, batch)


def send_folder(destination: FolderDestination, batch: Sequence[Outgoing], calling_ae_title: str) -> list[str | None]:
    """Copy each file durably to ``<path>/<Study>/<Series>/<SOP>.dcm`` (temporary name, fsync, rename)."""
    errors: list[str | None] = []
    for item in batch:
        target = storage.instance_path(destination.path, item.study_instance_uid, item.series_instance_uid,
                                       item.sop_instance_uid)
        try:
            storage.atomic_write(target, item.path.read_bytes())
            errors.append(None)
        except OSError as exc:
            errors.append(f"cannot write {target}: {exc.strerror or exc}")
    return errors


SENDERS: dict[type, Sender] = {
    DicomDestination: send_dicom,
    DicomWebDestination: send_dicomweb,
    FolderDestination: send_folder,
}


def sender_for(destination: object) -> Sender:
    try:
        return SENDERS[type(destination)]
    except KeyError:
        raise TypeError(f"no sender for destination type {type(destination).__name__}") from None
