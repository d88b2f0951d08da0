"""The acceptor side of the DICOM Upper Layer (PS3.8) for a storage SCP: one thread per association.

Why not pynetdicom's own AE for receiving: its reactors poll with 1 ms sleeps and build every DIMSE command
through pydicom Datasets, which costs several milliseconds per C-STORE, more than the fsync that makes the
instance durable; a 300-slice series then takes longer to receive than Orthanc needs. This module reads PDUs
with blocking socket calls, parses the small command set directly, and answers as soon as the handler returns.
It still leans on pynetdicom for the hard parts of association negotiation: decoding the A-ASSOCIATE-RQ,
negotiating presentation contexts and encoding the A-ASSOCIATE-AC. Sending (``pe-node send``, delivery) uses
pynetdicom's SCU as it is.

Services offered: Verification (C-ECHO) and Storage (C-STORE) on the contexts given. Anything else gets an
A-ABORT. The handler object decides about association requests and C-STOREs (see ``AssociationHandler``).
"""

from __future__ import annotations

import enum
import logging
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pydicom.uid import UID
from pynetdicom import pdu as ul_pdu
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from pe_node.dicom.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

_ASSOCIATE_RQ, _ASSOCIATE_AC, _ASSOCIATE_RJ, _P_DATA, _RELEASE_RQ, _RELEASE_RP, _ABORT = 1, 2, 3, 4, 5, 6, 7
_C_STORE_RQ, _C_STORE_RSP, _C_ECHO_RQ, _C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
_NO_DATASET = 0x0101
_MAX_ASSOCIATE_RQ = 1 << 20


class AbortReason(enum.IntEnum):
    """A-ABORT reasons (PS3.8 9.3.8); the source is always the service provider (2) here."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    INVALID_PARAMETER = 6


class ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: AbortReason = AbortReason.UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


class PeerClosed(Exception):
    """The peer closed the connection or stayed silent past the network timeout."""


@dataclass(frozen=True)
class AssociationRequest:
    calling_ae_title: str
    called_ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class Rejection:
    """A-ASSOCIATE-RJ parameters (PS3.8 9.3.4) and the reason kept in the audit."""

    reason: str
    result: int
    source: int
    diagnostic: int


@dataclass(frozen=True)
class StoreRequest:
    """One complete C-STORE-RQ: its command attributes and the dataset bytes as received."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset: bytes


class AssociationHandler(Protocol):
    """What the acceptor asks of the node. ``store`` runs in the association thread; it must not raise."""

    def requested(self, key: int, request: AssociationRequest) -> Rejection | None: ...

    def store(self, key: int, request: AssociationRequest, message: StoreRequest) -> tuple[int, str | None]: ...

    def closed(self, key: int) -> None: ...


@dataclass(frozen=True)
class AcceptorSettings:
    ae_title: str
    contexts: Sequence[PresentationContext]
    max_pdu_bytes: int
    timeout_seconds: float
    max_dataset_bytes: int


class IncomingAssociation:
    """One accepted TCP connection, from A-ASSOCIATE-RQ to release, abort or close."""

    def __init__(self, sock: socket.socket, peer: tuple[str, int], settings: AcceptorSettings,
                 handler: AssociationHandler) -> None:
        self.sock = sock
        self.peer = peer
        self.settings = settings
        self.handler = handler
        self.key = id(self)
        self._contexts: dict[int, PresentationContext] = {}
        self._request: AssociationRequest | None = None

    def run(self) -> None:
        """Serve the connection; never raises."""
        try:
            self.sock.settimeout(self.settings.timeout_seconds)
            if self._negotiate():
                self._serve()
        except PeerClosed as exc:
            log.info("association with %s:%s ended: %s", *self.peer, exc)
        except ProtocolError as exc:
            log.warning("aborting association with %s:%s: %s", *self.peer, exc)
            self._send_quietly(_abort_pdu(exc.reason))
        except (OSError, ssl.SSLError) as exc:
            log.info("connection with %s:%s failed: %s", *self.peer, exc)
        except Exception:
            log.exception("association with %s:%s failed unexpectedly", *self.peer)
            self._send_quietly(_abort_pdu(AbortReason.NOT_SPECIFIED))
        finally:
            if self._request is not None:
                self.handler.closed(self.key)
            close_socket(self.sock)

    def abort(self) -> None:
        """Break the association from another thread (shutdown): the blocked read fails and the thread ends."""
        self._send_quietly(_abort_pdu(AbortReason.NOT_SPECIFIED))
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _negotiate(self) -> bool:
        pdu_type, body = self._read_pdu(limit=_MAX_ASSOCIATE_RQ)
        if pdu_type != _ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        rq = ul_pdu.A_ASSOCIATE_RQ()
        try:
            rq.decode(struct.pack(">BBI", pdu_type, 0, len(body)) + bytes(body))
            primitive = rq.to_primitive()
        except Exception as exc:
            raise ProtocolError(f"undecodable A-ASSOCIATE-RQ: {exc}", AbortReason.INVALID_PARAMETER) from None
        self._request = AssociationRequest(
            calling_ae_title=str(primitive.calling_ae_title).strip(),
            called_ae_title=str(primitive.called_ae_title).strip(),
            host=self.peer[0],
            port=self.peer[1],
        )
        rejection = self.handler.requested(self.key, self._request)
        if rejection is not None:
            self._send(struct.pack(">BBIBBBB", _ASSOCIATE_RJ, 0, 4, 0, rejection.result, rejection.source,
                                   rejection.diagnostic))
            return False
        self._send(self._accept(primitive))
        return True

    def _accept(self, request: A_ASSOCIATE) -> bytes:
        roles = {
            uid: (item.scu_role, item.scp_role) for uid, item in _role_items(request).items()
        }
        proposed = request.presentation_context_definition_list
        results, role_replies = negotiate_as_acceptor(proposed, list(self.settings.contexts), roles)
        _prefer_requestor_order(results, proposed, self.settings.contexts)
        self._contexts = {cx.context_id: cx for cx in results if cx.result == 0x00 and cx.context_id is not None}
        accept = A_ASSOCIATE()
        accept.application_context_name = UID(APPLICATION_CONTEXT)
        accept.calling_ae_title = request.calling_ae_title
        accept.called_ae_title = request.called_ae_title
        accept.result = 0x00
        accept.result_source = 0x01
        accept.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.settings.max_pdu_bytes
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        accept.user_information = [max_length, class_uid, version, *role_replies]
        ac = ul_pdu.A_ASSOCIATE_AC()
        ac.from_primitive(accept)
        return ac.encode()

    def _serve(self) -> None:
        """Read P-DATA until release: assemble each command and its dataset, answer each message."""
        assert self._request is not None
        command = bytearray()
        data = bytearray()
        oversized = 0  # bytes of a dataset over the size limit, read and dropped to stay in step with the peer
        fields: dict[int, bytes] | None = None
        context_id = 0
        while True:
            pdu_type, body = self._read_pdu(limit=self._read_limit())
            if pdu_type == _RELEASE_RQ:
                self._send(struct.pack(">BBII", _RELEASE_RP, 0, 4, 0))
                return
            if pdu_type == _ABORT:
                raise PeerClosed("aborted by the peer")
            if pdu_type != _P_DATA:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} during the association",
                                    AbortReason.UNRECOGNIZED_PDU if pdu_type > 7 else AbortReason.UNEXPECTED_PDU)
            for pdv_context, is_command, is_last, fragment in _pdvs(body):
                if pdv_context not in self._contexts:
                    raise ProtocolError(f"P-DATA on presentation context {pdv_context}, which was not accepted",
                                        AbortReason.INVALID_PARAMETER)
                if is_command:
                    if fields is not None:
                        raise ProtocolError("a command fragment arrived while a dataset was expected")
                    command += fragment
                    context_id = pdv_context
                    if is_last:
                        fields = _parse_command(bytes(command))
                        command.clear()
                        if _us(fields, 0x0800) == _NO_DATASET:
                            self._dispatch(context_id, fields, b"")
                            fields = None
                else:
                    if fields is None or pdv_context != context_id:
                        raise ProtocolError("a dataset fragment arrived without its command")
                    if oversized or len(data) + len(fragment) > self.settings.max_dataset_bytes:
                        oversized += len(data) + len(fragment)
                        data.clear()
                    else:
                        data += fragment
                    if is_last:
                        if oversized:
                            self._refuse_oversized(context_id, fields, oversized)
                        else:
                            self._dispatch(context_id, fields, bytes(data))
                        data.clear()
                        oversized = 0
                        fields = None

    def _dispatch(self, context_id: int, fields: dict[int, bytes], dataset: bytes) -> None:
        assert self._request is not None
        command_field = _us(fields, 0x0100)
        message_id = _us(fields, 0x0110)
        context = self._contexts[context_id]
        if command_field == _C_ECHO_RQ:
            self._send(_response(context_id, _C_ECHO_RSP, message_id, VERIFICATION, None, 0x0000, None))
            return
        if command_field != _C_STORE_RQ:
            raise ProtocolError(f"unsupported DIMSE command 0x{command_field:04X}", AbortReason.INVALID_PARAMETER)
        sop_class = _ui(fields, 0x0002)
        sop_instance = _ui(fields, 0x1000)
        comment: str | None
        if sop_class != str(context.abstract_syntax):
            status, comment = 0x0122, f"SOP Class {sop_class} not negotiated on this presentation context"
        else:
            message = StoreRequest(message_id, sop_class, sop_instance, str(context.transfer_syntax[0]), dataset)
            status, comment = self.handler.store(self.key, self._request, message)
        self._send(_response(context_id, _C_STORE_RSP, message_id, sop_class, sop_instance, status, comment))

    def _refuse_oversized(self, context_id: int, fields: dict[int, bytes], size: int) -> None:
        limit_mb = self.settings.max_dataset_bytes / 2**20
        log.warning("refused a dataset of %d bytes from %s:%s: over node.max_dataset_mb (%.0f MB)", size,
                    *self.peer, limit_mb)
        self._send(_response(context_id, _C_STORE_RSP, _us(fields, 0x0110), _ui(fields, 0x0002), _ui(fields, 0x1000),
                             0xA700, f"dataset larger than {limit_mb:.0f} MB (node.max_dataset_mb)"))

    def _read_limit(self) -> int:
        return self.settings.max_pdu_bytes + 6 if self.settings.max_pdu_bytes else 1 << 31

    def _read_pdu(self, limit: int) -> tuple[int, bytearray]:
        header = self._read_exact(6)
        pdu_type, _, length = struct.unpack(">BBI", header)
        if pdu_type not in range(1, 8):
            raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}: not a DICOM peer?",
                                AbortReason.UNRECOGNIZED_PDU)
        if length > limit:
            raise ProtocolError(f"PDU of {length} bytes exceeds the negotiated maximum", AbortReason.INVALID_PARAMETER)
        return pdu_type, self._read_exact(length)

    def _read_exact(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        received = 0
        while received < size:
            try:
                count = self.sock.recv_into(view[received:], size - received)
            except TimeoutError:
                raise PeerClosed(f"no data for {self.settings.timeout_seconds:.0f} s") from None
            if count == 0:
                raise PeerClosed("connection closed by the peer" + (" mid-PDU" if received else ""))
            received += count
        return buffer

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass


def _prefer_requestor_order(results: list[PresentationContext], proposed: list[PresentationContext],
                            supported: Sequence[PresentationContext]) -> None:
    """Accept, of the transfer syntaxes we support, the one the requestor listed first.

    pynetdicom picks the first in the acceptor's list; a requestor lists its preferred syntax (usually the
    file's own) first, and taking it spares it a conversion, so the data arrive as they were stored there.
    """
    ours = {str(cx.abstract_syntax): {str(ts) for ts in cx.transfer_syntax} for cx in supported}
    requested = {cx.context_id: cx for cx in proposed}
    for result in results:
        if result.result != 0x00:
            continue
        offer = requested[result.context_id]
        accepted = ours.get(str(result.abstract_syntax), set())
        first = next((ts for ts in offer.transfer_syntax if str(ts) in accepted), None)
        if first is not None:
            result.transfer_syntax = [first]


def _role_items(request: A_ASSOCIATE) -> dict[UID, SCP_SCU_RoleSelectionNegotiation]:
    return {
        item.sop_class_uid: item
        for item in request.user_information
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None
    }


def _pdvs(body: bytearray) -> list[tuple[int, bool, bool, memoryview]]:
    """Split a P-DATA-TF body into presentation data values (PS3.8 9.3.5.1)."""
    view = memoryview(body)
    items = []
    offset = 0
    while offset < len(body):
        if offset + 6 > len(body):
            raise ProtocolError("truncated presentation data value", AbortReason.INVALID_PARAMETER)
        (length,) = struct.unpack_from(">I", body, offset)
        if length < 2 or offset + 4 + length > len(body):
            raise ProtocolError("presentation data value length outside the PDU", AbortReason.INVALID_PARAMETER)
        context_id, control = body[offset + 4], body[offset + 5]
        items.append((context_id, bool(control & 0x01), bool(control & 0x02), view[offset + 6 : offset + 4 + length]))
        offset += 4 + length
    return items


def _parse_command(data: bytes) -> dict[int, bytes]:
    """The command set (group 0000, always Implicit VR Little Endian) as element number -> value bytes."""
    fields: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise ProtocolError("truncated command set", AbortReason.INVALID_PARAMETER)
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(data):
            raise ProtocolError("malformed command set", AbortReason.INVALID_PARAMETER)
        fields[element] = data[offset : offset + length]
        offset += length
    for required in (0x0100, 0x0110, 0x0800):
        if required not in fields:
            raise ProtocolError(f"command set lacks (0000,{required:04X})", AbortReason.INVALID_PARAMETER)
    return fields


def _us(fields: dict[int, bytes], element: int) -> int:
    value = fields.get(element, b"")
    if len(value) != 2:
        raise ProtocolError(f"command element (0000,{element:04X}) is not a US value", AbortReason.INVALID_PARAMETER)
    return int(struct.unpack("<H", value)[0])


def _ui(fields: dict[int, bytes], element: int) -> str:
    return fields.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _response(context_id: int, command_field: int, message_id: int, sop_class: str, sop_instance: str | None,
              status: int, comment: str | None) -> bytes:
    """A C-xxx-RSP command set in one P-DATA-TF PDU (command, last fragment)."""
    elements = _element(0x0002, _uid_value(sop_class)) + _element(0x0100, struct.pack("<H", command_field))
    elements += _element(0x0120, struct.pack("<H", message_id)) + _element(0x0800, struct.pack("<H", _NO_DATASET))
    elements += _element(0x0900, struct.pack("<H", status))
    if comment:
        text = comment.encode("ascii", "replace")[:64]
        elements += _element(0x0902, text + b" " if len(text) % 2 else text)
    if sop_instance:
        elements += _element(0x1000, _uid_value(sop_instance))
    command = _element(0x0000, struct.pack("<I", len(elements))) + elements
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", _P_DATA, 0, len(pdv)) + pdv


def _abort_pdu(reason: AbortReason) -> bytes:
    return struct.pack(">BBIBBBB", _ABORT, 0, 4, 0, 0, 2, int(reason))


def close_socket(sock: socket.socket) -> None:
    """Shut a socket down both ways (waking any thread blocked on it) and close it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
