"""Sending to other DICOM nodes (pynetdicom SCU): C-ECHO, and C-STORE of files exactly as they are stored.

Files are sent byte for byte in their own transfer syntax, never decoded or converted (pynetdicom's chunked
sending), with a presentation context proposed for each (SOP class, transfer syntax) pair; a peer that accepts
neither gets no file rather than an altered one. Every response status is checked: a warning status counts as
stored, a failure or a missing response does not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config

from pe_node.dicom.association import VERIFICATION

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8: odd context IDs 1..255


@dataclass(frozen=True)
class Peer:
    """A remote AE: ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        aet, at, address = text.partition("@")
        host, colon, port = address.rpartition(":")
        if not (aet and at and host and colon and port.isdigit()) or not 0 < int(port) < 65536 or len(aet) > 16:
            raise ValueError(f"{text!r} is not AET@HOST:PORT")
        return cls(aet, host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class SentFile:
    path: Path
    sop_instance_uid: str | None
    status: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        """Success (0x0000) or a warning (0x0001, 0xB000-0xBFFF): the peer stored it."""
        return self.status is not None and (self.status in (0x0000, 0x0001) or 0xB000 <= self.status <= 0xBFFF)


def echo(peer: Peer, calling_ae_title: str = "PE_NODE", timeout: float = 10.0) -> int | None:
    """C-ECHO; the response status, or None when no association could be made."""
    ae = _ae(calling_ae_title, timeout)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        return None
    try:
        response = assoc.send_c_echo()
        return int(response.Status) if "Status" in response else None
    finally:
        assoc.release()


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """Every regular file under the given files and folders, in a stable order."""
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def send_files(files: Sequence[Path], peer: Peer, calling_ae_title: str = "PE_NODE",
               timeout: float = 30.0) -> list[SentFile]:
    """C-STORE each file over as few associations as the 128-context limit allows."""
    readable, results = _read_headers(files)
    batches = _batches_by_contexts(readable)
    for batch in batches:
        results.extend(_send_batch(batch, peer, calling_ae_title, timeout))
    return results


def _read_headers(files: Sequence[Path]) -> tuple[list[tuple[Path, str, str, str]], list[SentFile]]:
    """SOP class, instance and transfer syntax of each file, from its File Meta group (what is sent)."""
    readable, failed = [], []
    for path in files:
        try:
            meta = read_file_meta_info(path)
            readable.append((path, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                             str(meta.TransferSyntaxUID)))
        except Exception as exc:
            failed.append(SentFile(path, None, None, f"not a DICOM Part 10 file: {exc}"))
    return readable, failed


def _batches_by_contexts(files: list[tuple[Path, str, str, str]]) -> list[list[tuple[Path, str, str, str]]]:
    batches: list[list[tuple[Path, str, str, str]]] = []
    contexts: set[tuple[str, str]] = set()
    for item in files:
        pair = (item[1], item[3])
        if not batches or (pair not in contexts and len(contexts) >= MAX_CONTEXTS):
            batches.append([])
            contexts = set()
        contexts.add(pair)
        batches[-1].append(item)
    return batches


def _send_batch(batch: list[tuple[Path, str, str, str]], peer: Peer, calling: str, timeout: float) -> list[SentFile]:
    ae = _ae(calling, timeout)
    for sop_class, syntax in sorted({(item[1], item[3]) for item in batch}):
        ae.add_requested_context(sop_class, syntax)
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are, never re-encoded
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "no association (peer down or aborted)"
        return [SentFile(path, uid, None, f"{peer}: {reason}") for path, _, uid, _ in batch]
    results = []
    try:
        for path, _, uid, _ in batch:
            results.append(_store_one(assoc, path, uid))
            if not assoc.is_established:
                results.extend(
                    SentFile(p, u, None, "association ended") for p, _, u, _ in batch[len(results):]
                )
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _store_one(assoc: object, path: Path, uid: str) -> SentFile:
    try:
        response = assoc.send_c_store(path)  # type: ignore[attr-defined]
    except Exception as exc:  # pynetdicom raises ValueError when no context fits the file
        return SentFile(path, uid, None, str(exc))
    if "Status" not in response:
        return SentFile(path, uid, None, "no response (timeout or abort)")
    status = int(response.Status)
    comment = str(response.get("ErrorComment", "")) or None
    return SentFile(path, uid, status, None if status in (0, 1) or 0xB000 <= status <= 0xBFFF else comment)


def _ae(calling: str, timeout: float) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.maximum_pdu_size = 0
    return ae
