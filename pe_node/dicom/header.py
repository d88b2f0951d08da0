"""What the receiver reads from a dataset as it arrives: a structural check of its encoding and the few
attributes the node routes on.

pydicom reads a truncated or garbled byte stream without complaint (it stops at the end of the bytes), so the
element structure is walked here first: every element's length must fit inside the stream, undefined-length
sequences and encapsulated pixel data must close with their delimiters, and the last element must end exactly at
the end of the data. The few routing attributes are picked up on the same walk (pydicom's Dataset machinery
would cost more than the rest of a C-STORE).

A deflated dataset is walked as it inflates, a bounded chunk at a time, and refused past a cap, so a small
"deflate bomb" costs neither memory nor disk. Group 0002 inside the dataset is refused: behind the node's own File
Meta group it would be read as part of it, and a reader would decode the file in another transfer syntax than the
one it was checked in.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Literal

from pydicom.charset import decode_bytes
from pydicom.uid import UID

from pe_node.dicom.incoming import Buffer

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_CHARSET, _IMAGE_TYPE, _SOP_CLASS, _SOP_INSTANCE = 0x00080005, 0x00080008, 0x00080016, 0x00080018
_MODALITY, _SERIES_DESCRIPTION = 0x00080060, 0x0008103E
_STUDY, _SERIES, _INSTANCE_NUMBER = 0x0020000D, 0x0020000E, 0x00200013
_ROUTING_VALUE_LIMIT = 1024  # routing attributes are UI, CS, LO or IS: far shorter; a longer one is not read whole
_INFLATE_CHUNK = 1 << 18
DEFAULT_MAX_INFLATED_BYTES = 2048 * 2**20  # node.max_dataset_mb's default
_ROUTING_TAGS = frozenset(
    (_CHARSET, _IMAGE_TYPE, _SOP_CLASS, _SOP_INSTANCE, _MODALITY, _SERIES_DESCRIPTION, _STUDY, _SERIES,
     _INSTANCE_NUMBER)
)


class HeaderError(ValueError):
    """The dataset cannot be accepted; ``bad_uid`` tells a missing or invalid UID from a badly encoded stream, and
    ``too_large`` a dataset that inflates past the size limit."""

    def __init__(self, message: str, *, bad_uid: bool = False, too_large: bool = False) -> None:
        super().__init__(message)
        self.bad_uid = bad_uid
        self.too_large = too_large


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


def read_header(data: Buffer, transfer_syntax_uid: str, *,
                max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> InstanceHeader:
    """Check the encoding of a received dataset and read its routing attributes; raise HeaderError if unusable.

    A deflated dataset is inflated in bounded chunks as the walk goes, never whole: past ``max_inflated_bytes`` of
    output it is refused (``HeaderError.too_large``).
    """
    syntax = UID(transfer_syntax_uid)
    if not syntax.is_transfer_syntax:
        raise HeaderError(f"unknown transfer syntax {transfer_syntax_uid[:80]}")
    if bytes(data[:2]) == b"\x02\x00":
        # Behind the node's File Meta group these bytes would read as more of it (PS3.10 7.1), whatever the syntax.
        raise HeaderError("the dataset starts like a File Meta Information element (0002,xxxx)")
    source: _Source = _Inflating(data, max_inflated_bytes) if syntax.is_deflated else _Bytes(data)
    values = _walk(source, implicit=syntax.is_implicit_VR, little=syntax.is_little_endian)
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


def check_structure(data: Buffer, *, implicit: bool, little: bool) -> dict[int, bytes]:
    """Walk the element structure of an encoded dataset; raise HeaderError where it does not hold together.

    Returns the raw values of the top-level routing attributes met on the way (at most 1 KiB of each).
    """
    return _walk(_Bytes(data), implicit=implicit, little=little)


class _Bytes:
    """A dataset held whole (in memory or memory-mapped): its size is known, so lengths are checked up front."""

    def __init__(self, data: Buffer) -> None:
        self.data = data
        self.size: int | None = len(data)
        self.pos = 0
        self._length = len(data)

    def read(self, count: int) -> bytes:
        chunk = bytes(self.data[self.pos : self.pos + count])
        self.pos += len(chunk)
        return chunk

    def unpack(self, layout: struct.Struct, end: int | None) -> tuple[Any, ...] | None:
        """The fields of ``layout`` at the current position if they lie before ``end``, else None."""
        if self.pos + layout.size > (self._length if end is None else end):
            return None
        fields = layout.unpack_from(self.data, self.pos)
        self.pos += layout.size
        return fields

    def skip(self, count: int) -> int:
        count = min(count, self._length - self.pos)
        self.pos += count
        return count

    def available(self, end: int | None) -> int | None:
        return (self._length if end is None else end) - self.pos

    def at(self, end: int | None) -> bool:
        return self.pos >= (self._length if end is None else end)


class _Inflating:
    """A deflated dataset (PS3.5 A.5), inflated a bounded chunk at a time as the walk asks for bytes.

    Its inflated size is known only at its end, so an element longer than what is left shows when the stream ends.
    Bytes after the end of the deflate stream (the padding to even length) are ignored.
    """

    def __init__(self, data: Buffer, limit: int) -> None:
        self.data = data
        self.limit = limit
        self.size: int | None = None
        self.pos = 0
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._taken = 0  # bytes of ``data`` handed to the inflater
        self._inflated = 0
        self._buffer = b""
        self._at = 0  # the next unread byte of ``_buffer``

    def _more(self) -> bool:
        """Inflate another chunk into the buffer; False at the end of the deflate stream."""
        try:
            while True:
                if self._inflater.eof:
                    return False
                if self._inflater.unconsumed_tail:
                    piece = self._inflater.decompress(self._inflater.unconsumed_tail, _INFLATE_CHUNK)
                elif self._taken < len(self.data):
                    fed = bytes(self.data[self._taken : self._taken + _INFLATE_CHUNK])
                    self._taken += len(fed)
                    piece = self._inflater.decompress(fed, _INFLATE_CHUNK)
                else:  # all input given: output may still be pending inside the inflater
                    piece = self._inflater.decompress(b"", _INFLATE_CHUNK)
                    if not piece and not self._inflater.eof:
                        raise HeaderError("deflated dataset does not inflate: the deflate stream is truncated")
                if piece:
                    break
        except zlib.error as exc:
            raise HeaderError(f"deflated dataset does not inflate: {exc}") from None
        self._inflated += len(piece)
        if self._inflated > self.limit:
            raise HeaderError(f"deflated dataset inflates to more than {self.limit / 2**20:.0f} MB "
                              "(node.max_dataset_mb)", too_large=True)
        self._buffer = self._buffer[self._at :] + piece
        self._at = 0
        return True

    def read(self, count: int) -> bytes:
        while len(self._buffer) - self._at < count and self._more():
            pass
        chunk = self._buffer[self._at : self._at + count]
        self._at += len(chunk)
        self.pos += len(chunk)
        return chunk

    def unpack(self, layout: struct.Struct, end: int | None) -> tuple[Any, ...] | None:
        data = self.read(layout.size if end is None else max(0, min(layout.size, end - self.pos)))
        return layout.unpack(data) if len(data) == layout.size else None

    def skip(self, count: int) -> int:
        skipped = 0
        while skipped < count:
            if self._at == len(self._buffer) and not self._more():
                break
            step = min(count - skipped, len(self._buffer) - self._at)
            self._at += step
            skipped += step
        self.pos += skipped
        return skipped

    def available(self, end: int | None) -> int | None:
        return None if end is None else end - self.pos

    def at(self, end: int | None) -> bool:
        if end is not None:
            return self.pos >= end
        return self._at == len(self._buffer) and not self._more()


_Source = _Bytes | _Inflating


def _walk(source: _Source, *, implicit: bool, little: bool) -> dict[int, bytes]:
    if source.at(None):
        raise HeaderError("empty dataset")
    values: dict[int, bytes] = {}
    if _walk_dataset(source, None, implicit, "<" if little else ">", 0, values):
        raise HeaderError(f"item delimiter outside a sequence at byte {source.pos - 8}")
    return values


def _walk_dataset(source: _Source, end: int | None, implicit: bool, order: str, depth: int,
                  collect: dict[int, bytes] | None = None) -> bool:
    """Walk elements up to ``end`` (None: the end of the data) or an item delimiter; True if a delimiter ended it."""
    if depth > 32:
        raise HeaderError("sequences nested deeper than 32 levels")
    last_tag = -1
    while not source.at(end):
        start = source.pos
        tag, vr, length = _element_header(source, end, implicit, order)
        if tag == _ITEM_END:
            return True
        if collect is not None:
            if tag <= last_tag:
                raise HeaderError(f"element {_tag(tag)} out of order at byte {source.pos}")
            if tag >> 16 == 0x0002:
                raise HeaderError(f"File Meta Information element {_tag(tag)} inside the dataset at byte {start}")
        last_tag = tag
        if length != _UNDEFINED:
            _skip_value(source, end, tag, length, collect if collect is not None and tag in _ROUTING_TAGS else None)
        elif vr == b"UN":
            # An undefined-length UN holds a sequence encoded in Implicit VR Little Endian (PS3.5 6.2.2).
            _walk_sequence(source, end, True, "<", depth)
        elif vr == b"SQ" or (implicit and tag != _PIXEL_DATA):
            _walk_sequence(source, end, implicit, order, depth)
        else:
            _walk_fragments(source, end, order)
    return False


def _skip_value(source: _Source, end: int | None, tag: int, length: int, collect: dict[int, bytes] | None) -> None:
    available = source.available(end)
    if available is not None and length > available:
        raise HeaderError(f"element {_tag(tag)} is {length} bytes but only {available} remain")
    kept = b""
    if collect is not None:
        kept = collect[tag] = source.read(min(length, _ROUTING_VALUE_LIMIT))
    skipped = len(kept) + source.skip(length - len(kept)) if kept else source.skip(length)
    if skipped < length:
        raise HeaderError(f"element {_tag(tag)} is {length} bytes but the data end after {skipped}")


_LAYOUTS = {order: (struct.Struct(order + "HH4s"), struct.Struct(order + "I"), struct.Struct(order + "HHI"))
            for order in "<>"}
_BYTE_ORDER: dict[str, Literal["little", "big"]] = {"<": "little", ">": "big"}


def _element_header(source: _Source, end: int | None, implicit: bool, order: str) -> tuple[int, bytes, int]:
    offset = source.pos
    header, extended, _ = _LAYOUTS[order]
    fields = source.unpack(header, end)
    if fields is None:
        raise HeaderError(f"truncated element header at byte {offset}")
    group, element, rest = fields
    tag = group << 16 | element
    if group == 0xFFFE or implicit:
        return tag, b"", int.from_bytes(rest, _BYTE_ORDER[order])
    vr = rest[:2]
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise HeaderError(f"no valid VR at byte {offset + 4}: not an explicit VR dataset")
    if vr in _LONG_VRS:
        length = source.unpack(extended, end)
        if length is None:
            raise HeaderError(f"truncated element header at byte {offset}")
        return tag, vr, length[0]
    return tag, vr, int.from_bytes(rest[2:], _BYTE_ORDER[order])


def _item_header(source: _Source, end: int | None, order: str) -> tuple[int, int] | None:
    fields = source.unpack(_LAYOUTS[order][2], end)
    if fields is None:
        return None
    group, element, length = fields
    return group << 16 | element, length


def _walk_sequence(source: _Source, end: int | None, implicit: bool, order: str, depth: int) -> None:
    while True:
        offset = source.pos
        item = _item_header(source, end, order)
        if item is None:
            raise HeaderError("sequence without its delimiter before the end of the data")
        tag, length = item
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM:
            raise HeaderError(f"expected a sequence item at byte {offset}")
        if length == _UNDEFINED:
            if not _walk_dataset(source, end, implicit, order, depth + 1):
                raise HeaderError("sequence item without its delimiter")
            continue
        available = source.available(end)
        if available is not None and length > available:
            raise HeaderError(f"sequence item of {length} bytes but only {available} remain")
        item_end = source.pos + length
        if _walk_dataset(source, item_end, implicit, order, depth + 1) and source.pos < item_end:
            source.skip(item_end - source.pos)  # an item delimiter inside a defined-length item ends it early
        if source.pos != item_end:
            raise HeaderError(f"sequence item of {length} bytes but the data end before it does")


def _walk_fragments(source: _Source, end: int | None, order: str) -> None:
    """Encapsulated pixel data: items of defined length up to the sequence delimiter."""
    while True:
        offset = source.pos
        item = _item_header(source, end, order)
        if item is None:
            raise HeaderError("encapsulated pixel data without its delimiter")
        tag, length = item
        if tag == _SEQUENCE_END:
            return
        available = source.available(end)
        if tag != _ITEM or length == _UNDEFINED or (available is not None and length > available):
            raise HeaderError(f"bad pixel data fragment at byte {offset}")
        if source.skip(length) < length:
            raise HeaderError(f"pixel data fragment at byte {offset} runs past the end of the data")


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
