"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class in the common transfer syntaxes.

The listener accepts connections and runs each association in its own thread (``association.py``). This module
decides what happens in them: the gate (allow-list of calling AE titles, optionally ``AET@host``, and the cap on
concurrent associations), the audit row of every request, and the C-STORE itself, which only checks, writes and
records through ``Archive`` and always answers with a DICOM status; nothing heavy and nothing that raises
escapes it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AllStoragePresentationContexts, build_context
from pynetdicom.presentation import PresentationContext

from pe_node.config import NodeConfig
from pe_node.dicom.archive import Archive, Received, StoreStatus
from pe_node.dicom.association import (
    VERIFICATION,
    AcceptorSettings,
    AssociationRequest,
    IncomingAssociation,
    Rejection,
    StoreRequest,
    close_socket,
)
from pe_node.dicom.audit import AssociationAudit
from pe_node.metrics import Metrics

log = logging.getLogger(__name__)

#: Transfer syntaxes accepted for storage: uncompressed, deflated, and every compression pydicom can decode
#: with pylibjpeg or GDCM (so the worker can read what the receiver accepted).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
)


def supported_contexts() -> list[PresentationContext]:
    """Verification, and every storage SOP class pynetdicom knows in every transfer syntax above."""
    contexts = [build_context(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    contexts += [
        build_context(cx.abstract_syntax, list(TRANSFER_SYNTAXES))
        for cx in AllStoragePresentationContexts
        if cx.abstract_syntax is not None
    ]
    return contexts


@dataclass(frozen=True)
class Caller:
    """One allow-list entry: an AE title, and optionally the addresses it must come from."""

    ae_title: str
    addresses: frozenset[str] | None

    def admits(self, ae_title: str, host: str) -> bool:
        return ae_title == self.ae_title and (self.addresses is None or _normal(host) in self.addresses)


def parse_callers(entries: Iterable[str]) -> list[Caller]:
    """``AET`` or ``AET@host``; a host name is resolved once, here, to the addresses it may connect from."""
    callers = []
    for entry in entries:
        aet, _, host = entry.partition("@")
        addresses = None
        if host:
            try:
                infos = socket.getaddrinfo(host, None)
            except socket.gaierror as exc:
                raise ValueError(f"node.allowed_callers: cannot resolve host {host!r} of {entry!r}: {exc}") from None
            addresses = frozenset(_normal(str(info[4][0])) for info in infos)
        callers.append(Caller(aet, addresses))
    return callers


def _normal(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


class Gate:
    """Who may associate, how many at once, and the C-STOREs in flight (so a stop answers them first)."""

    def __init__(self, callers: list[Caller], max_associations: int) -> None:
        self.callers = callers
        self.max_associations = max_associations
        self.draining = False
        self._active = 0
        self._in_flight = 0
        self._lock = threading.Condition()

    def admit(self, request: AssociationRequest) -> Rejection | None:
        """Count the association in, or say why it is refused (with its A-ASSOCIATE-RJ parameters)."""
        if self.callers and not any(c.admits(request.calling_ae_title, request.host) for c in self.callers):
            return Rejection(
                f"calling AE title {request.calling_ae_title!r} from {request.host} is not on the allow-list",
                0x01, 0x01, 0x03,
            )
        with self._lock:
            if self.draining:
                return Rejection("node shutting down", 0x02, 0x03, 0x01)
            if self._active >= self.max_associations:
                return Rejection(f"association limit of {self.max_associations} reached", 0x02, 0x03, 0x02)
            self._active += 1
        return None

    def release(self) -> None:
        with self._lock:
            self._active -= 1

    def enter(self) -> bool:
        with self._lock:
            if self.draining:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._lock.notify_all()

    def drain(self, timeout: float) -> bool:
        """Refuse new associations and C-STOREs, wait for those in flight; False if the wait timed out."""
        with self._lock:
            self.draining = True
            return self._lock.wait_for(lambda: self._in_flight == 0, timeout)


class StorageService:
    """The node's answers inside an association: admission, C-STORE, and the audit of both."""

    def __init__(self, gate: Gate, archive: Archive, audit: AssociationAudit, metrics: Metrics) -> None:
        self.gate = gate
        self.archive = archive
        self.audit = audit
        self.metrics = metrics
        self._admitted: set[int] = set()

    def requested(self, key: int, request: AssociationRequest) -> Rejection | None:
        rejection = self.gate.admit(request)
        try:
            self.audit.requested(
                key, calling=request.calling_ae_title, called=request.called_ae_title, host=request.host,
                port=request.port, accepted=rejection is None, reason=rejection.reason if rejection else None,
            )
        except Exception:  # the audit database is unavailable: refuse rather than accept unrecorded
            log.exception("cannot audit the association request from %s@%s", request.calling_ae_title, request.host)
            if rejection is None:
                self.gate.release()
            rejection = Rejection("audit unavailable", 0x02, 0x03, 0x01)
        self.metrics.associations.labels(result="rejected" if rejection else "accepted").inc()
        if rejection is not None:
            log.warning("rejected association from %s@%s:%s: %s", request.calling_ae_title, request.host,
                        request.port, rejection.reason)
        else:
            self._admitted.add(key)
            log.info("association from %s@%s:%s", request.calling_ae_title, request.host, request.port)
        return rejection

    def store(self, key: int, request: AssociationRequest, message: StoreRequest) -> tuple[int, str | None]:
        if not self.gate.enter():
            return StoreStatus.OUT_OF_RESOURCES, "the node is shutting down; send again shortly"
        try:
            outcome = self.archive.store(
                Received(
                    dataset=message.dataset,
                    transfer_syntax_uid=message.transfer_syntax_uid,
                    affected_sop_class_uid=message.sop_class_uid,
                    affected_sop_instance_uid=message.sop_instance_uid,
                    calling_ae_title=request.calling_ae_title,
                    association_id=self.audit.record_id(key),
                )
            )
        except Exception as exc:
            log.exception("C-STORE of %s failed unexpectedly", message.sop_instance_uid)
            self.audit.count(key, stored=False)
            self.metrics.instances.labels(outcome="refused").inc()
            return StoreStatus.OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}"
        finally:
            self.gate.leave()
        stored = outcome.status == StoreStatus.SUCCESS
        self.audit.count(key, stored=stored)
        self.metrics.instances.labels(outcome="stored" if stored else "refused").inc()
        if not stored:
            log.warning("refused C-STORE from %s: 0x%04X %s", request.calling_ae_title, outcome.status,
                        outcome.comment)
        return outcome.status, outcome.comment

    def closed(self, key: int) -> None:
        if key in self._admitted:
            self._admitted.discard(key)
            self.gate.release()
        try:
            self.audit.closed(key)
        except Exception:
            log.exception("cannot close the audit row of an association")


class Receiver:
    """The listening AE: start it, and stop it gracefully (in-flight C-STOREs are answered first)."""

    def __init__(self, node: NodeConfig, archive: Archive, audit: AssociationAudit, metrics: Metrics) -> None:
        self.node = node
        self.gate = Gate(parse_callers(node.allowed_callers), node.max_associations)
        self.service = StorageService(self.gate, archive, audit, metrics)
        self.settings = AcceptorSettings(
            ae_title=node.ae_title,
            contexts=supported_contexts(),
            max_pdu_bytes=node.max_pdu_bytes,
            timeout_seconds=node.network_timeout_seconds,
            max_dataset_bytes=int(node.max_dataset_mb * 2**20),
        )
        self._tls = tls_context(node)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._associations: dict[int, tuple[IncomingAssociation, threading.Thread]] = {}
        self._lock = threading.Lock()
        if not node.allowed_callers:
            log.warning("node.allowed_callers is empty: accepting associations from any AE title")

    @property
    def listening(self) -> bool:
        return self._listener is not None

    @property
    def port(self) -> int:
        assert self._listener is not None, "receiver not started"
        return int(self._listener.getsockname()[1])

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.node.host else socket.AF_INET
        self._listener = socket.create_server((self.node.host, self.node.port), family=family, backlog=64)
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-listener", daemon=True)
        self._thread.start()
        log.info("listening as %s on %s:%d%s", self.node.ae_title, self.node.host, self.port,
                 " (TLS)" if self._tls else "")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight C-STOREs finish and be answered, then close every association."""
        if self._listener is None:
            return
        listener, self._listener = self._listener, None
        self.gate.draining = True
        close_socket(listener)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.gate.drain(timeout):
            log.warning("C-STOREs still in flight after %.0f s; closing anyway", timeout)
        with self._lock:
            running = list(self._associations.values())
        for association, _ in running:
            association.abort()
        for _, thread in running:
            thread.join(timeout=5)
        log.info("receiver stopped")

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            try:
                sock, peer = listener.accept()
            except OSError:
                return  # the listener was closed by stop()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._run, args=(sock, peer[:2]), name=f"assoc-{peer[0]}:{peer[1]}",
                                      daemon=True)
            thread.start()

    def _run(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        if self._tls is not None:
            try:
                sock.settimeout(self.node.network_timeout_seconds)
                sock = self._tls.wrap_socket(sock, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                log.warning("TLS handshake with %s:%s failed: %s", *peer, exc)
                sock.close()
                return
        association = IncomingAssociation(sock, peer, self.settings, self.service)
        with self._lock:
            self._associations[association.key] = (association, threading.current_thread())
        try:
            association.run()
        finally:
            with self._lock:
                self._associations.pop(association.key, None)


def tls_context(node: NodeConfig) -> ssl.SSLContext | None:
    """The server-side TLS context of ``node.tls`` (TLS 1.2 or newer), or None without TLS."""
    if node.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=node.tls.certificate, keyfile=node.tls.private_key)
    if node.tls.ca_certificates is not None:
        context.load_verify_locations(cafile=node.tls.ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED if node.tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
