"""What the receiver reads from a dataset as it arrives: a structural check of its encoding and the few
attributes the node routes on.

pydicom reads a truncated or garbled byte stream without complaint (it stops at the end of the bytes), so the
element structure is walked here first: every element's length must fit inside the stream, undefined-length
sequences and encapsulated pixel data must close with their delimiters, and the last element must end exactly at
the end of the data. The few routing attributes are picked up on the same walk (pydicom's Dataset machinery
would cost more than the rest of a C-STORE).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from pydicom.charset import decode_bytes
from pydicom.uid import UID

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_CHARSET, _IMAGE_TYPE, _SOP_CLASS, _SOP_INSTANCE = 0x00080005, 0x00080008, 0x00080016, 0x00080018
_MODALITY, _SERIES_DESCRIPTION = 0x00080060, 0x0008103E
_STUDY, _SERIES, _INSTANCE_NUMBER = 0x0020000D, 0x0020000E, 0x00200013
_ROUTING_TAGS = frozenset(
    (_CHARSET, _IMAGE_TYPE, _SOP_CLASS, _SOP_INSTANCE, _MODALITY, _SERIES_DESCRIPTION, _STUDY, _SERIES,
     _INSTANCE_NUMBER)
)


class HeaderError(ValueError):
    """The dataset cannot be accepted; ``bad_uid`` tells a missing or invalid UID from a badly encoded stream."""

    def __init__(self, message: str, *, bad_uid: bool = False) -> None:
        super().__init__(message)
        self.bad_uid = bad_uid


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of one received instance that routing and storage need."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    series_description: str | None
    instance_number: int | None
    image_type: str | None


def check_uid(name: str, value: object) -> str:
    """A UID that is safe as a path part: digits and dots, at most 64 characters (PS3.5 9.1)."""
    if value is None or str(value).strip("\x00 ") == "":
        raise HeaderError(f"{name} is missing", bad_uid=True)
    uid = str(value).strip("\x00 ")
    if len(uid) > 64 or not UID_PATTERN.match(uid):
        raise HeaderError(f"{name} {uid[:80]!r} is not a valid UID (digits and dots, at most 64)", bad_uid=True)
    return uid


def read_header(data: bytes, transfer_syntax_uid: str) -> InstanceHeader:
    """Check the encoding of a received dataset and read its routing attributes; raise HeaderError if unusable."""
    syntax = UID(transfer_syntax_uid)
    if not syntax.is_transfer_syntax:
        raise HeaderError(f"unknown transfer syntax {transfer_syntax_uid}")
    if syntax.is_deflated:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise HeaderError(f"deflated dataset does not inflate: {exc}") from None
    values = check_structure(data, implicit=syntax.is_implicit_VR, little=syntax.is_little_endian)
    return _routing_attributes(values, little=syntax.is_little_endian)


def _routing_attributes(values: dict[int, bytes], little: bool) -> InstanceHeader:
    """Decode the routing attributes (all of them UI, CS, IS or LO) from their raw values."""
    charsets = _text(values.get(_CHARSET)).split("\\") if _CHARSET in values else ["ISO_IR 6"]
    description = values.get(_SERIES_DESCRIPTION)
    number = _text(values.get(_INSTANCE_NUMBER))
    try:
        instance_number = int(number.split("\\")[0]) if number else None
    except ValueError:
        instance_number = None  # a malformed IS is the sender's business; ordering never relies on it
    return InstanceHeader(
        sop_class_uid=check_uid("SOP Class UID", _text(values.get(_SOP_CLASS))),
        sop_instance_uid=check_uid("SOP Instance UID", _text(values.get(_SOP_INSTANCE))),
        study_instance_uid=check_uid("Study Instance UID", _text(values.get(_STUDY))),
        series_instance_uid=check_uid("Series Instance UID", _text(values.get(_SERIES))),
        modality=_text(values.get(_MODALITY)) or None,
        series_description=(decode_bytes(description, charsets, set()).strip()[:64] or None) if description else None,
        instance_number=instance_number,
        image_type=_text(values.get(_IMAGE_TYPE))[:128] or None,
    )


def _text(raw: bytes | None) -> str:
    return raw.decode("ascii", "replace").strip("\x00 ") if raw else ""


def check_structure(data: bytes, *, implicit: bool, little: bool) -> dict[int, bytes]:
    """Walk the element structure of an encoded dataset; raise HeaderError where it does not hold together.

    Returns the raw values of the top-level routing attributes met on the way.
    """
    if not data:
        raise HeaderError("empty dataset")
    values: dict[int, bytes] = {}
    end = _walk_dataset(data, 0, len(data), implicit, little, depth=0, collect=values)
    if end != len(data):
        raise HeaderError(f"dataset structure ends at byte {end} of {len(data)}")
    return values


def _walk_dataset(
    data: bytes, offset: int, end: int, implicit: bool, little: bool, depth: int,
    collect: dict[int, bytes] | None = None,
) -> int:
    """Walk elements from ``offset`` up to ``end`` or an item delimiter; return the offset after the last one."""
    if depth > 32:
        raise HeaderError("sequences nested deeper than 32 levels")
    order = "<" if little else ">"
    last_tag = -1
    while offset < end:
        tag, vr, length, offset = _element_header(data, offset, end, implicit, order)
        if tag == _ITEM_END:
            if depth == 0:
                raise HeaderError(f"item delimiter outside a sequence at byte {offset - 8}")
            return offset - 8
        if tag <= last_tag and depth == 0:
            raise HeaderError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) out of order at byte {offset}")
        last_tag = tag
        if length != _UNDEFINED:
            if offset + length > end:
                raise HeaderError(
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) is {length} bytes but only {end - offset} remain"
                )
            if collect is not None and tag in _ROUTING_TAGS:
                collect[tag] = bytes(data[offset : offset + length])
            offset += length
        elif vr == b"UN":
            # An undefined-length UN holds a sequence encoded in Implicit VR Little Endian (PS3.5 6.2.2).
            offset = _walk_sequence(data, offset, end, True, True, depth)
        elif vr == b"SQ" or (implicit and tag != _PIXEL_DATA):
            offset = _walk_sequence(data, offset, end, implicit, little, depth)
        else:
            offset = _walk_fragments(data, offset, end, order)
    return offset


def _element_header(data: bytes, offset: int, end: int, implicit: bool, order: str) -> tuple[int, bytes, int, int]:
    if offset + 8 > end:
        raise HeaderError(f"truncated element header at byte {offset}")
    group, element = struct.unpack_from(order + "HH", data, offset)
    tag = group << 16 | element
    if group == 0xFFFE or implicit:
        (length,) = struct.unpack_from(order + "I", data, offset + 4)
        return tag, b"", length, offset + 8
    vr = data[offset + 4 : offset + 6]
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise HeaderError(f"no valid VR at byte {offset + 4}: not an explicit VR dataset")
    if vr in _LONG_VRS:
        if offset + 12 > end:
            raise HeaderError(f"truncated element header at byte {offset}")
        (length,) = struct.unpack_from(order + "I", data, offset + 8)
        return tag, vr, length, offset + 12
    (length,) = struct.unpack_from(order + "H", data, offset + 6)
    return tag, vr, length, offset + 8


def _walk_sequence(data: bytes, offset: int, end: int, implicit: bool, little: bool, depth: int) -> int:
    order = "<" if little else ">"
    while True:
        if offset + 8 > end:
            raise HeaderError("sequence without its delimiter before the end of the data")
        tag = _tag_at(data, offset, order)
        (length,) = struct.unpack_from(order + "I", data, offset + 4)
        offset += 8
        if tag == _SEQUENCE_END:
            return offset
        if tag != _ITEM:
            raise HeaderError(f"expected a sequence item at byte {offset - 8}")
        if length == _UNDEFINED:
            offset = _walk_dataset(data, offset, end, implicit, little, depth + 1)
            if offset + 8 > end or _tag_at(data, offset, order) != _ITEM_END:
                raise HeaderError("sequence item without its delimiter")
            offset += 8
        elif offset + length > end:
            raise HeaderError(f"sequence item of {length} bytes but only {end - offset} remain")
        else:
            _walk_dataset(data, offset, offset + length, implicit, little, depth + 1)
            offset += length


def _walk_fragments(data: bytes, offset: int, end: int, order: str) -> int:
    """Encapsulated pixel data: items of defined length up to the sequence delimiter."""
    while True:
        if offset + 8 > end:
            raise HeaderError("encapsulated pixel data without its delimiter")
        tag = _tag_at(data, offset, order)
        (length,) = struct.unpack_from(order + "I", data, offset + 4)
        offset += 8
        if tag == _SEQUENCE_END:
            return offset
        if tag != _ITEM or length == _UNDEFINED or offset + length > end:
            raise HeaderError(f"bad pixel data fragment at byte {offset - 8}")
        offset += length


def _tag_at(data: bytes, offset: int, order: str) -> int:
    group, element = struct.unpack_from(order + "HH", data, offset)
    return group << 16 | element
