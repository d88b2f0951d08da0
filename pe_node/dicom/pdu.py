"""The DICOM Upper Layer wire format (PS3.8 9.3) as the acceptor reads it from an untrusted peer, and the few PDUs
it writes.

Everything here reads bytes a hostile peer chose, so every read is bounded:

- ``PduReader`` reads through one fixed buffer: memory grows with the bytes received, never with a length the peer
  claims. Each receive waits at most ``timeout`` seconds, and a PDU or a message as a whole must arrive within
  ``timeout`` seconds plus one second per ``min_rate`` bytes it has brought so far (Apache's mod_reqtimeout
  ``MinRate``; DICOM's ARTIM timer for the A-ASSOCIATE-RQ): a peer that trickles bytes to hold an association is cut
  off, one that sends a large dataset at any useful speed is not.
- ``pdv_headers`` walks the presentation data values of a P-DATA-TF as they stream past, one at a time, without
  building a list; an empty fragment that is not the last of its message is refused (it can only burn time).
- ``parse_associate_rq`` reads the A-ASSOCIATE-RQ itself, ignoring item and sub-item types it does not know, as
  DCMTK does (PS3.8 9.3.2: unknown user information sub-items are not an error), and checks every length.
- ``parse_command`` reads the small command set; the caller caps its size before it is assembled.

A peer that breaks the protocol gets ``ProtocolError`` (the association is aborted with its reason); one that goes
away or stays silent, ``PeerClosed``.
"""

from __future__ import annotations

import enum
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 1, 2, 3, 4, 5, 6, 7
NO_DATASET = 0x0101

_BUFFER = 1 << 17
_PDU_HEADER = struct.Struct(">BBI")
_PDV_HEADER = struct.Struct(">IBB")
_ITEM_HEADER = struct.Struct(">BBH")
_COMMAND_ELEMENT = struct.Struct("<HHI")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class AbortReason(enum.IntEnum):
    """A-ABORT reasons (PS3.8 9.3.8); the source is always the service provider (2) here."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    INVALID_PARAMETER = 6


class ProtocolError(Exception):
    """The peer broke the protocol (or was too slow); the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: AbortReason = AbortReason.UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


class PeerClosed(Exception):
    """The peer closed the connection or stayed silent past the network timeout."""


class Socket(Protocol):
    """What ``PduReader`` needs of a socket (a plain or TLS socket; a fake one in tests)."""

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int: ...

    def settimeout(self, value: float | None, /) -> None: ...


class PduReader:
    """Buffered, deadline-bounded reads from one connection (see the module docstring).

    ``begin(name)`` starts a deadline (a PDU, a message, the A-ASSOCIATE-RQ) and ``end(name)`` ends it; every
    receive waits no longer than the nearest one, nor than ``timeout``.
    """

    def __init__(self, sock: Socket, timeout: float, min_rate: float, buffer_size: int = _BUFFER) -> None:
        if timeout <= 0 or min_rate <= 0:
            raise ValueError(f"timeout ({timeout}) and min_rate ({min_rate}) must be positive")
        self.sock = sock
        self.timeout = timeout
        self.min_rate = min_rate
        self.received = 0
        self._buffer = memoryview(bytearray(buffer_size))
        self._start = self._end = 0
        self._spans: dict[str, tuple[float, int]] = {}

    def begin(self, name: str) -> None:
        self._spans[name] = (time.monotonic(), self.received)

    def end(self, name: str) -> None:
        self._spans.pop(name, None)

    def wait(self) -> None:
        """Wait (at most ``timeout``, or the nearest deadline) until at least one byte is ready."""
        if self._start == self._end:
            self._fill()

    def read(self, count: int) -> bytes:
        """Exactly ``count`` bytes, gathered as they arrive (a claimed length allocates nothing up front)."""
        if self._end - self._start >= count:
            data = bytes(self._buffer[self._start : self._start + count])
            self._start += count
            return data
        parts = []
        while count:
            if self._start == self._end:
                self._fill()
            take = min(count, self._end - self._start)
            parts.append(bytes(self._buffer[self._start : self._start + take]))
            self._start += take
            count -= take
        return b"".join(parts)

    def stream(self, count: int, write: Callable[[memoryview], object]) -> None:
        """Pass exactly ``count`` bytes to ``write`` in pieces as they arrive (each valid only during the call)."""
        while count:
            if self._start == self._end:
                self._fill()
            take = min(count, self._end - self._start)
            write(self._buffer[self._start : self._start + take])
            self._start += take
            count -= take

    def pdu_header(self) -> tuple[int, int]:
        """Wait for the next PDU and read its type and length; its deadline ("a PDU") starts with its first byte."""
        self.wait()
        self.begin("a PDU")
        pdu_type, _, length = _PDU_HEADER.unpack(self.read(6))
        if pdu_type not in range(ASSOCIATE_RQ, ABORT + 1):
            raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}: not a DICOM peer?",
                                AbortReason.UNRECOGNIZED_PDU)
        return pdu_type, length

    def _fill(self) -> None:
        self._start = self._end = 0
        wait, expiring = self.timeout, ""
        if self._spans:
            now = time.monotonic()
            for name, (began, at) in self._spans.items():
                left = began + self.timeout + (self.received - at) / self.min_rate - now
                if left < wait:
                    wait, expiring = left, name
            if wait <= 0:
                raise self._too_slow(expiring)
        self.sock.settimeout(wait)
        try:
            count = self.sock.recv_into(self._buffer)
        except TimeoutError:
            if expiring:
                raise self._too_slow(expiring) from None
            raise PeerClosed(f"no data for {self.timeout:.0f} s") from None
        if count == 0:
            raise PeerClosed("connection closed by the peer" + (" mid-PDU" if "a PDU" in self._spans else ""))
        self._end = count
        self.received += count

    def _too_slow(self, name: str) -> ProtocolError:
        return ProtocolError(f"{name} took longer than {self.timeout:.0f} s plus 1 s per "
                             f"{self.min_rate / 1024:.0f} KiB received", AbortReason.NOT_SPECIFIED)


def pdv_headers(reader: PduReader, length: int) -> Iterator[tuple[int, int, int]]:
    """(context ID, message control header, fragment length) of each PDV of a P-DATA-TF of ``length`` bytes.

    The caller reads each fragment from ``reader`` (``read`` or ``stream``) before asking for the next header.
    """
    if length == 0:
        raise ProtocolError("P-DATA-TF without a presentation data value", AbortReason.INVALID_PARAMETER)
    left = length
    while left:
        if left < 6:
            raise ProtocolError("truncated presentation data value", AbortReason.INVALID_PARAMETER)
        item_length, context_id, control = _PDV_HEADER.unpack(reader.read(6))
        if item_length < 2 or item_length > left - 4:
            raise ProtocolError("presentation data value length outside the PDU", AbortReason.INVALID_PARAMETER)
        left -= 4 + item_length
        size = item_length - 2
        if size == 0 and not control & 0x02:
            raise ProtocolError("empty presentation data value that is not the last fragment",
                                AbortReason.INVALID_PARAMETER)
        yield context_id, control, size


@dataclass(frozen=True)
class ProposedContext:
    """A presentation context as proposed: its abstract syntax and transfer syntaxes if they are valid UIDs (None
    and left out when not)."""

    context_id: int
    abstract_syntax: str | None
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class AssociateRequest:
    """What the acceptor uses of an A-ASSOCIATE-RQ (PS3.8 9.3.2)."""

    protocol_version: int
    called_ae_title: str
    calling_ae_title: str
    titles: bytes  # the 32 bytes of both AE title fields, returned unchanged in the A-ASSOCIATE-AC
    application_context: str | None
    contexts: tuple[ProposedContext, ...]
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)  # SOP Class UID -> (SCU role, SCP role)


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """Read an A-ASSOCIATE-RQ's body (the bytes after its 6-byte PDU header); ProtocolError if malformed.

    Items and sub-items of unknown types are skipped; presentation context IDs must be odd and unique.
    """
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ shorter than its fixed fields", AbortReason.INVALID_PARAMETER)
    (version,) = struct.unpack_from(">H", body, 0)
    application_context: str | None = None
    contexts: list[ProposedContext] = []
    roles: dict[str, tuple[bool, bool]] = {}
    for item_type, value in _items(body, 68, "A-ASSOCIATE-RQ"):
        if item_type == 0x10 and application_context is None:
            application_context = _uid(value) or _ae(value[:64])
        elif item_type == 0x20:
            contexts.append(_proposed_context(value))
        elif item_type == 0x50:
            roles.update(_roles(value))
    identifiers = [cx.context_id for cx in contexts]
    if len(set(identifiers)) != len(identifiers) or any(i % 2 == 0 for i in identifiers):
        raise ProtocolError("presentation context IDs must be odd and unique", AbortReason.INVALID_PARAMETER)
    return AssociateRequest(version, _ae(body[4:20]), _ae(body[20:36]), body[4:36], application_context,
                            tuple(contexts), roles)


def _items(data: bytes, offset: int, where: str) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each item (type, reserved byte, 2-byte length) from ``offset`` to the end of ``data``."""
    while offset < len(data):
        if offset + 4 > len(data):
            raise ProtocolError(f"truncated item in the {where}", AbortReason.INVALID_PARAMETER)
        item_type, _, length = _ITEM_HEADER.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise ProtocolError(f"item of {length} bytes runs past the end of the {where}",
                                AbortReason.INVALID_PARAMETER)
        yield item_type, data[offset : offset + length]
        offset += length


def _proposed_context(value: bytes) -> ProposedContext:
    if len(value) < 4:
        raise ProtocolError("presentation context item shorter than its fixed fields", AbortReason.INVALID_PARAMETER)
    abstract: str | None = None
    syntaxes: list[str] = []
    for sub_type, sub_value in _items(value, 4, "presentation context item"):
        if sub_type == 0x30 and abstract is None:
            abstract = _uid(sub_value) or ""
        elif sub_type == 0x40 and (uid := _uid(sub_value)) is not None:
            syntaxes.append(uid)
    return ProposedContext(value[0], abstract or None, tuple(syntaxes))


def _roles(value: bytes) -> dict[str, tuple[bool, bool]]:
    """SCP/SCU Role Selection sub-items (0x54) of a User Information item; every other sub-item is not used here."""
    roles = {}
    for sub_type, sub_value in _items(value, 0, "user information item"):
        if sub_type != 0x54:
            continue
        if len(sub_value) < 2:
            raise ProtocolError("truncated role selection sub-item", AbortReason.INVALID_PARAMETER)
        (uid_length,) = struct.unpack_from(">H", sub_value, 0)
        if len(sub_value) != uid_length + 4:
            raise ProtocolError("role selection sub-item of the wrong length", AbortReason.INVALID_PARAMETER)
        uid = _uid(sub_value[2 : 2 + uid_length])
        if uid is not None:
            roles[uid] = (bool(sub_value[-2]), bool(sub_value[-1]))
    return roles


def _uid(raw: bytes) -> str | None:
    """A UID value (trailing NUL or space padding removed) if it is one: digits and dots, at most 64."""
    text = raw.rstrip(b"\x00 ")
    if len(text) > 64 or not text.isascii():
        return None
    uid = text.decode("ascii")
    return uid if _UID.match(uid) else None


def _ae(raw: bytes) -> str:
    """An AE title field as text: padding removed, anything outside ASCII replaced (it never matches a config)."""
    return raw.decode("ascii", "replace").strip("\x00 ")


def parse_command(data: bytes) -> dict[int, bytes]:
    """The command set (group 0000, always Implicit VR Little Endian) as element number -> value bytes."""
    fields: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise ProtocolError("truncated command set", AbortReason.INVALID_PARAMETER)
        group, element, length = _COMMAND_ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(data):
            raise ProtocolError("malformed command set", AbortReason.INVALID_PARAMETER)
        fields[element] = data[offset : offset + length]
        offset += length
    for required in (0x0100, 0x0110, 0x0800):
        if required not in fields:
            raise ProtocolError(f"command set lacks (0000,{required:04X})", AbortReason.INVALID_PARAMETER)
    return fields


def command_us(fields: dict[int, bytes], element: int) -> int:
    """A US command element; ProtocolError if absent or not two bytes."""
    value = fields.get(element, b"")
    if len(value) != 2:
        raise ProtocolError(f"command element (0000,{element:04X}) is not a US value", AbortReason.INVALID_PARAMETER)
    return int(struct.unpack("<H", value)[0])


def command_uid(fields: dict[int, bytes], element: int) -> str | None:
    """A UI command element if it holds a valid UID; None if it is absent, not ASCII or not a UID."""
    return _uid(fields.get(element, b""))


def shown(raw: bytes, limit: int = 64) -> str:
    """A value from the peer fit for a log line: printable, and at most ``limit`` characters of it."""
    return repr(raw[:limit].decode("latin-1")) + (f" (+{len(raw) - limit} bytes)" if len(raw) > limit else "")


def _element(element: int, value: bytes) -> bytes:
    return _COMMAND_ELEMENT.pack(0x0000, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def response_pdu(context_id: int, command_field: int, message_id: int, sop_class: str | None,
                 sop_instance: str | None, status: int, comment: str | None) -> bytes:
    """A C-xxx-RSP command set in one P-DATA-TF PDU (command, last fragment). The affected UIDs are optional in a
    response (PS3.7 9.3.1.2: U(=)) and left out when the request's were not valid UIDs."""
    elements = _element(0x0002, _uid_value(sop_class)) if sop_class else b""
    elements += _element(0x0100, struct.pack("<H", command_field))
    elements += _element(0x0120, struct.pack("<H", message_id)) + _element(0x0800, struct.pack("<H", NO_DATASET))
    elements += _element(0x0900, struct.pack("<H", status))
    if comment:
        text = comment.encode("ascii", "replace")[:64]
        elements += _element(0x0902, text + b" " if len(text) % 2 else text)
    if sop_instance:
        elements += _element(0x1000, _uid_value(sop_instance))
    command = _element(0x0000, struct.pack("<I", len(elements))) + elements
    pdv = _PDV_HEADER.pack(len(command) + 2, context_id, 0x03) + command
    return _PDU_HEADER.pack(P_DATA, 0, len(pdv)) + pdv


def abort_pdu(reason: AbortReason) -> bytes:
    return struct.pack(">BBIBBBB", ABORT, 0, 4, 0, 0, 2, int(reason))


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", ASSOCIATE_RJ, 0, 4, 0, result, source, reason)


def release_rp_pdu() -> bytes:
    return struct.pack(">BBII", RELEASE_RP, 0, 4, 0)
