"""The acceptor side of the DICOM Upper Layer (PS3.8) for a storage SCP: one thread per association.

Why not pynetdicom's own AE for receiving: its reactors poll with 1 ms sleeps and build every DIMSE command
through pydicom Datasets, which costs several milliseconds per C-STORE, more than the fsync that makes the
instance durable; a 300-slice series then takes longer to receive than Orthanc needs. This module reads PDUs
with blocking socket calls (``pdu.py``: bounded in memory and in time), parses the small command set directly,
streams each dataset fragment into the node's sink as it arrives (never holding a dataset twice), and answers as
soon as the handler returns. Negotiating presentation contexts and encoding the A-ASSOCIATE-AC are pynetdicom's.

Services offered: Verification (C-ECHO) and Storage (C-STORE) on the contexts given. Anything else gets an
A-ABORT. An association request is refused here when it is malformed in a way PS3.8 has a rejection for (protocol
version, application context, called AE title, no presentation context, as DCMTK does), and otherwise by the node's
handler (allow-list, limits; see ``AssociationHandler``), which also decides every C-STORE.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom import pdu as ul_pdu
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from pe_node.dicom.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pe_node.dicom.pdu import (
    ABORT,
    ASSOCIATE_RQ,
    NO_DATASET,
    P_DATA,
    RELEASE_RQ,
    AbortReason,
    AssociateRequest,
    PduReader,
    PeerClosed,
    ProposedContext,
    ProtocolError,
    abort_pdu,
    command_uid,
    command_us,
    parse_associate_rq,
    parse_command,
    pdv_headers,
    reject_pdu,
    release_rp_pdu,
    response_pdu,
    shown,
)

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

_C_STORE_RQ, _C_STORE_RSP, _C_ECHO_RQ, _C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
_MAX_ASSOCIATE_RQ = 1 << 20
_MESSAGE = "a message"
_REQUEST = "the A-ASSOCIATE-RQ"
_STAND_IN_AE = "PE_NODE"
# Each fragment costs a fixed amount of work, so a message's fragments must carry 256 bytes each on average (after
# 16 free ones): no sender splits that finely (DCMTK's smallest PDU is 4 KiB), and 1-byte fragments stop at once.
_FREE_FRAGMENTS, _MIN_AVERAGE_FRAGMENT = 16, 256


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
class StoreCommand:
    """One C-STORE-RQ's command: its message ID, its (valid) affected UIDs and the context's transfer syntax."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


class DatasetSink(Protocol):
    """Where a dataset's fragments go as they arrive; ``discard`` frees whatever it holds (called once the message
    is answered or abandoned, also after the handler stored it)."""

    def write(self, fragment: memoryview) -> None: ...

    def discard(self) -> None: ...


class AssociationHandler(Protocol):
    """What the acceptor asks of the node; every method runs in the association thread and must not raise.

    ``requested`` gets the acceptor's own refusal (None when the request is well-formed) and returns the
    rejection to send, if any; ``dataset`` gives the sink for a C-STORE's dataset, and ``store`` decides it.
    """

    def requested(self, key: int, request: AssociationRequest, refusal: Rejection | None) -> Rejection | None: ...

    def dataset(self, key: int, request: AssociationRequest, command: StoreCommand) -> DatasetSink: ...

    def store(self, key: int, request: AssociationRequest, command: StoreCommand,
              dataset: DatasetSink) -> tuple[int, str | None]: ...

    def closed(self, key: int) -> None: ...


@dataclass(frozen=True)
class AcceptorSettings:
    """The acceptor's limits: every one bounds what a peer can make the node hold or wait for."""

    ae_title: str
    contexts: Sequence[PresentationContext]
    max_pdu_bytes: int
    timeout_seconds: float
    max_dataset_bytes: int
    max_command_bytes: int = 4096
    min_rate_bytes: float = 32 * 1024
    negotiated: Negotiated = field(default_factory=lambda: Negotiated())


class Negotiated:
    """The answers already given to proposals, by proposal: a sender proposes the same contexts on every
    association (DCMTK storescu about 120), and negotiating them again with pynetdicom costs tens of milliseconds of
    CPU each time, where parallel associations contend for the cores that receive the data. Bounded (LRU)."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._answers: OrderedDict[Hashable, tuple[bytes, dict[int, PresentationContext]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> tuple[bytes, dict[int, PresentationContext]] | None:
        with self._lock:
            answer = self._answers.get(key)
            if answer is not None:
                self._answers.move_to_end(key)
            return answer

    def put(self, key: Hashable, answer: tuple[bytes, dict[int, PresentationContext]]) -> None:
        with self._lock:
            self._answers[key] = answer
            self._answers.move_to_end(key)
            while len(self._answers) > self._size:
                self._answers.popitem(last=False)


class _Discard:
    """The sink of a dataset that is read only to stay in step with the peer (refused, oversized, C-ECHO's)."""

    def write(self, fragment: memoryview) -> None:
        pass

    def discard(self) -> None:
        pass


@dataclass
class _Message:
    """The DIMSE message being received: its command (once complete) and where its dataset goes."""

    context_id: int
    fields: dict[int, bytes]
    sink: DatasetSink
    store: StoreCommand | None = None
    refusal: tuple[int, str] | None = None  # the failure status to answer once the dataset has been read
    size: int = 0


class IncomingAssociation:
    """One accepted TCP connection, from A-ASSOCIATE-RQ to release, abort or close."""

    def __init__(self, sock: socket.socket, peer: tuple[str, int], settings: AcceptorSettings,
                 handler: AssociationHandler, settled: Callable[[], None] = lambda: None) -> None:
        self.sock = sock
        self.peer = peer
        self.settings = settings
        self.handler = handler
        self.key = id(self)
        self.reader = PduReader(sock, settings.timeout_seconds, settings.min_rate_bytes)
        self._settled = settled
        self._contexts: dict[int, PresentationContext] = {}
        self._request: AssociationRequest | None = None
        self._command = bytearray()
        self._message: _Message | None = None
        self._fragments = 0  # of the message being received, and the bytes they carried
        self._fragment_bytes = 0

    def run(self) -> None:
        """Serve the connection; never raises. ``settled`` is called once the request is answered (or failed)."""
        try:
            self.reader.begin(_REQUEST)  # the ARTIM timer: from the connection to the whole request
            try:
                accepted = self._negotiate()
            finally:
                self._settled()
            if accepted:
                self._serve()
        except PeerClosed as exc:
            log.info("association with %s:%s ended: %s", *self.peer, exc)
        except ProtocolError as exc:
            log.warning("aborting association with %s:%s: %s", *self.peer, exc)
            self._send_quietly(abort_pdu(exc.reason))
        except (OSError, ssl.SSLError) as exc:
            log.info("connection with %s:%s failed: %s", *self.peer, exc)
        except Exception:
            log.exception("association with %s:%s failed unexpectedly", *self.peer)
            self._send_quietly(abort_pdu(AbortReason.NOT_SPECIFIED))
        finally:
            if self._message is not None:
                self._message.sink.discard()
            if self._request is not None:
                self.handler.closed(self.key)
            close_socket(self.sock)

    def abort(self) -> None:
        """Break the association from another thread (shutdown): the blocked read fails and the thread ends."""
        self._send_quietly(abort_pdu(AbortReason.NOT_SPECIFIED))
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _negotiate(self) -> bool:
        pdu_type, length = self.reader.pdu_header()
        if pdu_type != ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        if length > _MAX_ASSOCIATE_RQ:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes", AbortReason.INVALID_PARAMETER)
        request = parse_associate_rq(self.reader.read(length))
        self.reader.end(_REQUEST)
        self.reader.end("a PDU")
        self._request = AssociationRequest(request.calling_ae_title, request.called_ae_title, *self.peer)
        rejection = self.handler.requested(self.key, self._request, self._refusal(request))
        if rejection is not None:
            self._send(reject_pdu(rejection.result, rejection.source, rejection.diagnostic))
            return False
        self._send(self._accept(request))
        return True

    def _refusal(self, request: AssociateRequest) -> Rejection | None:
        """The A-ASSOCIATE-RJ a request gets whoever sent it (PS3.8 9.3.4), in DCMTK's order of checks."""
        if not request.protocol_version & 0x0001:
            return Rejection(f"protocol version 0x{request.protocol_version:04X} not supported", 0x01, 0x02, 0x02)
        if request.application_context != APPLICATION_CONTEXT:
            return Rejection(f"application context {request.application_context!r} not supported", 0x01, 0x01, 0x02)
        if request.called_ae_title != self.settings.ae_title:
            return Rejection(f"called AE title {request.called_ae_title!r} is not {self.settings.ae_title!r}",
                             0x01, 0x01, 0x07)
        if not request.calling_ae_title:
            return Rejection("empty calling AE title", 0x01, 0x01, 0x03)
        if not request.contexts:
            return Rejection("no presentation context proposed", 0x01, 0x01, 0x01)
        return None

    def _accept(self, request: AssociateRequest) -> bytes:
        """The A-ASSOCIATE-AC: every proposed context with its result, in the order proposed (an identical proposal
        gets the answer it got before)."""
        key = (request.contexts, tuple(sorted(request.roles.items())))
        answer = self.settings.negotiated.get(key)
        if answer is None:
            answer = self._negotiate_contexts(request)
            self.settings.negotiated.put(key, answer)
        encoded, self._contexts = answer
        # The AE title fields go back exactly as they came (PS3.8 9.3.3: "not tested"), whatever their bytes.
        return encoded[:10] + request.titles + encoded[42:]

    def _negotiate_contexts(self, request: AssociateRequest) -> tuple[bytes, dict[int, PresentationContext]]:
        """The A-ASSOCIATE-AC (with stand-in AE titles, replaced per association) and the accepted contexts by ID,
        from pynetdicom."""
        proposed = [_pynetdicom_context(cx) for cx in request.contexts if cx.abstract_syntax and cx.transfer_syntaxes]
        roles: dict[UID, tuple[bool | None, bool | None]] = {UID(uid): role for uid, role in request.roles.items()}
        results, role_replies = negotiate_as_acceptor(proposed, list(self.settings.contexts), roles)
        _prefer_requestor_order(results, request.contexts, self.settings.contexts)
        by_id = {cx.context_id: cx for cx in results}
        answered = [by_id.get(cx.context_id) or _refused_context(cx) for cx in request.contexts]
        accepted = {cx.context_id: cx for cx in answered if cx.result == 0x00 and cx.context_id is not None}
        accept = A_ASSOCIATE()
        accept.application_context_name = UID(APPLICATION_CONTEXT)
        accept.calling_ae_title = accept.called_ae_title = _STAND_IN_AE
        accept.result = 0x00
        accept.result_source = 0x01
        accept.presentation_context_definition_results_list = answered
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.settings.max_pdu_bytes
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        accept.user_information = [max_length, class_uid, version, *role_replies]
        ac = ul_pdu.A_ASSOCIATE_AC()
        ac.from_primitive(accept)
        return ac.encode(), accepted

    def _serve(self) -> None:
        """Read PDUs until release: assemble each command, stream its dataset, answer each message."""
        while True:
            pdu_type, length = self.reader.pdu_header()
            if pdu_type == P_DATA:
                limit = self.settings.max_pdu_bytes + 6 if self.settings.max_pdu_bytes else 1 << 32
                if length > limit:
                    raise ProtocolError(f"PDU of {length} bytes exceeds the negotiated maximum",
                                        AbortReason.INVALID_PARAMETER)
                for context_id, control, size in pdv_headers(self.reader, length):
                    self._fragment(context_id, control, size)
                self.reader.end("a PDU")
            elif pdu_type == RELEASE_RQ:
                if length != 4:
                    raise ProtocolError(f"A-RELEASE-RQ of {length} bytes", AbortReason.INVALID_PARAMETER)
                self.reader.read(4)
                self._send(release_rp_pdu())
                return
            elif pdu_type == ABORT:
                raise PeerClosed("aborted by the peer")
            else:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} during the association")

    def _fragment(self, context_id: int, control: int, size: int) -> None:
        if context_id not in self._contexts:
            raise ProtocolError(f"P-DATA on presentation context {context_id}, which was not accepted",
                                AbortReason.INVALID_PARAMETER)
        if not self._command and self._message is None:
            self.reader.begin(_MESSAGE)
            self._fragments = self._fragment_bytes = 0
        self._fragments += 1
        self._fragment_bytes += size
        if self._fragments > _FREE_FRAGMENTS + self._fragment_bytes // _MIN_AVERAGE_FRAGMENT:
            raise ProtocolError(f"{self._fragments} fragments of {self._fragment_bytes} bytes in all: a message's "
                                f"fragments must average {_MIN_AVERAGE_FRAGMENT} bytes", AbortReason.INVALID_PARAMETER)
        last = bool(control & 0x02)
        if control & 0x01:
            self._command_fragment(context_id, size, last)
            return
        message = self._message
        if message is None or context_id != message.context_id:
            raise ProtocolError("a dataset fragment arrived without its command")
        message.size += size
        if message.size > self.settings.max_dataset_bytes and message.refusal is None:
            message.sink.discard()
            message.sink = _Discard()
            limit_mb = self.settings.max_dataset_bytes / 2**20
            message.refusal = (0xA700, f"dataset larger than {limit_mb:.0f} MB (node.max_dataset_mb)")
        self.reader.stream(size, message.sink.write)
        if last:
            self._message = None
            self.reader.end(_MESSAGE)
            try:
                self._answer(message)
            finally:
                message.sink.discard()
            self.reader.begin("a PDU")  # the time the node spent storing is not the peer's

    def _command_fragment(self, context_id: int, size: int, last: bool) -> None:
        if self._message is not None:
            raise ProtocolError("a command fragment arrived while a dataset was expected")
        if len(self._command) + size > self.settings.max_command_bytes:
            raise ProtocolError(f"command set longer than {self.settings.max_command_bytes} bytes "
                                "(node.max_command_kb)", AbortReason.INVALID_PARAMETER)
        self._command += self.reader.read(size)
        if not last:
            return
        fields = parse_command(bytes(self._command))
        self._command.clear()
        message = self._expect(context_id, fields)
        if command_us(fields, 0x0800) != NO_DATASET:
            self._message = message
            return
        self.reader.end(_MESSAGE)
        if message.store is not None:
            message.sink.discard()
            message.refusal = (0xC000, "C-STORE-RQ without a dataset")
        self._answer(message)

    def _expect(self, context_id: int, fields: dict[int, bytes]) -> _Message:
        """The message a complete command starts, with the sink its dataset will go to."""
        assert self._request is not None
        command_field = command_us(fields, 0x0100)
        if command_field == _C_ECHO_RQ:
            return _Message(context_id, fields, _Discard())
        if command_field != _C_STORE_RQ:
            raise ProtocolError(f"unsupported DIMSE command 0x{command_field:04X}", AbortReason.INVALID_PARAMETER)
        context = self._contexts[context_id]
        sop_class, sop_instance = command_uid(fields, 0x0002), command_uid(fields, 0x1000)
        if sop_class is None or sop_class != str(context.abstract_syntax):
            return _Message(context_id, fields, _Discard(), refusal=(
                0x0122, f"SOP Class {shown(fields.get(0x0002, b''))} not negotiated on this presentation context"))
        if sop_instance is None:
            log.warning("C-STORE from %s:%s with an invalid Affected SOP Instance UID %s", *self.peer,
                        shown(fields.get(0x1000, b"")))
            return _Message(context_id, fields, _Discard(),
                            refusal=(0xC001, "Affected SOP Instance UID is not a valid UID"))
        store = StoreCommand(command_us(fields, 0x0110), sop_class, sop_instance, str(context.transfer_syntax[0]))
        return _Message(context_id, fields, self.handler.dataset(self.key, self._request, store), store=store)

    def _answer(self, message: _Message) -> None:
        assert self._request is not None
        fields = message.fields
        message_id = command_us(fields, 0x0110)
        if command_us(fields, 0x0100) == _C_ECHO_RQ:
            self._send(response_pdu(message.context_id, _C_ECHO_RSP, message_id, VERIFICATION, None, 0x0000, None))
            return
        sop_class, sop_instance = command_uid(fields, 0x0002), command_uid(fields, 0x1000)
        comment: str | None
        if message.refusal is not None:
            status, comment = message.refusal
            if status == 0xA700:
                log.warning("refused a dataset of %d bytes from %s:%s: %s", message.size, *self.peer, comment)
        else:
            assert message.store is not None
            status, comment = self.handler.store(self.key, self._request, message.store, message.sink)
        self._send(response_pdu(message.context_id, _C_STORE_RSP, message_id, sop_class, sop_instance, status,
                                comment))

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass


def _pynetdicom_context(proposed: ProposedContext) -> PresentationContext:
    assert proposed.abstract_syntax is not None
    context = PresentationContext()
    context.context_id = proposed.context_id
    context.abstract_syntax = UID(proposed.abstract_syntax)
    context.transfer_syntax = [UID(ts) for ts in proposed.transfer_syntaxes]
    return context


def _refused_context(proposed: ProposedContext) -> PresentationContext:
    """The result for a context negotiation never saw: no valid abstract syntax (0x03), or no valid transfer
    syntax (0x04); the transfer syntax an A-ASSOCIATE-AC carries for a refused context is not significant."""
    context = PresentationContext()
    context.context_id = proposed.context_id
    context.transfer_syntax = [ImplicitVRLittleEndian]
    context.result = 0x03 if proposed.abstract_syntax is None else 0x04
    return context


def _prefer_requestor_order(results: list[PresentationContext], proposed: Sequence[ProposedContext],
                            supported: Sequence[PresentationContext]) -> None:
    """Accept, of the transfer syntaxes we support, the one the requestor listed first.

    pynetdicom picks the first in the acceptor's list; a requestor lists its preferred syntax (usually the
    file's own) first, and taking it spares it a conversion, so the data arrive as they were stored there.
    """
    ours = {str(cx.abstract_syntax): {str(ts) for ts in cx.transfer_syntax} for cx in supported}
    requested = {cx.context_id: cx for cx in proposed}
    for result in results:
        if result.result != 0x00 or result.context_id is None:
            continue
        offer = requested[result.context_id]
        accepted = ours.get(str(result.abstract_syntax), set())
        first = next((ts for ts in offer.transfer_syntaxes if ts in accepted), None)
        if first is not None:
            result.transfer_syntax = [UID(first)]


def close_socket(sock: socket.socket) -> None:
    """Shut a socket down both ways (waking any thread blocked on it) and close it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
