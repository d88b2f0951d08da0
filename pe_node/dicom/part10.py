"""DICOM Part 10 files: the preamble and File Meta Information group written in front of a received dataset.

The receiver stores the dataset bytes exactly as they arrived on the wire, so the only thing to encode per
instance is the small group 0002. It is encoded here directly (Explicit VR Little Endian, PS3.10 7.1) because
building it through pydicom's Dataset machinery costs about half a millisecond per instance, a noticeable share
of a C-STORE's time budget.
"""

from __future__ import annotations

import struct
import uuid

from pe_node import __version__

PREAMBLE = b"\x00" * 128 + b"DICM"
IMPLEMENTATION_CLASS_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/pe-node/pe-node").int)
IMPLEMENTATION_VERSION_NAME = f"PE_NODE_{__version__}"[:16]


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element of group 0002 with a 2-byte length field."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")  # a calling AE title is whatever the peer sent: never fail on it
    return raw + b" " if len(raw) % 2 else raw


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str = "") -> bytes:
    """The encoded File Meta Information group (0002,xxxx), group length first."""
    body = (
        struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2)
        + b"\x00\x01"
        + _element(0x0002, b"UI", _ui(sop_class_uid))
        + _element(0x0003, b"UI", _ui(sop_instance_uid))
        + _element(0x0010, b"UI", _ui(transfer_syntax_uid))
        + _element(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID))
        + _element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME))
    )
    if source_ae_title.strip():
        body += _element(0x0016, b"AE", _text(source_ae_title.strip()))
    return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                source_ae_title: str = "") -> bytes:
    """Preamble, ``DICM`` prefix and File Meta Information: prepend this to a dataset to make a Part 10 file."""
    return PREAMBLE + file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid, source_ae_title)
