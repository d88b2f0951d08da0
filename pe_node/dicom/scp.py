"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class in the common transfer syntaxes.

The listener accepts connections and runs each association in its own thread (``association.py``). This module
decides what happens in them: the gate (allow-list of calling AE titles, optionally ``AET@host``, and the caps on
connections still negotiating, on concurrent associations and on those from one address), the audit row of every
request, and the C-STORE itself, which only checks, writes and records through ``Archive`` and always answers with a
DICOM status; nothing heavy and nothing that raises escapes it.

The accept loop never ends but by ``stop``: a failed ``accept`` (descriptors or memory exhausted) or a thread that
cannot start is logged, backed off and retried, and ``Receiver.listening`` (``/healthz``) is true only while the
loop runs. A connection over the caps is closed at once, before it costs a thread.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
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
    DatasetSink,
    IncomingAssociation,
    Rejection,
    StoreCommand,
    close_socket,
)
from pe_node.dicom.audit import AssociationAudit
from pe_node.dicom.header import DEFAULT_MAX_INFLATED_BYTES
from pe_node.dicom.incoming import IncomingDataset
from pe_node.dicom.part10 import file_header
from pe_node.metrics import Metrics

log = logging.getLogger(__name__)

_BACKOFF_SECONDS = (0.05, 2.0)  # the first and the longest wait after accept() fails

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
    """Who may associate and how many at once (in all, and per address), how many connections may still be
    negotiating, and the C-STOREs in flight (so a stop answers them first)."""

    def __init__(self, callers: list[Caller], max_associations: int, max_per_host: int | None = None,
                 max_pending: int | None = None) -> None:
        self.callers = callers
        self.max_associations = max_associations
        self.max_per_host = max_per_host or max_associations
        self.max_pending = max_pending or max_associations
        self.draining = False
        self._active: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._in_flight = 0
        self._lock = threading.Condition()

    def arrive(self, host: str) -> str | None:
        """Count a new connection in, until it has negotiated; or say why it must be closed right away."""
        with self._lock:
            if self._pending.total() >= self.max_pending:
                return f"{self.max_pending} connections are already negotiating (node.max_pending_connections)"
            if self._pending[host] >= self.max_per_host:
                return f"{self.max_per_host} connections from {host} are already negotiating " \
                       "(node.max_associations_per_host)"
            self._pending[host] += 1
        return None

    def settle(self, host: str) -> None:
        """A connection counted in by ``arrive`` has negotiated (or failed to)."""
        with self._lock:
            self._pending[host] -= 1
            if self._pending[host] <= 0:
                del self._pending[host]

    def admit(self, request: AssociationRequest) -> Rejection | None:
        """Count the association in, or say why it is refused (with its A-ASSOCIATE-RJ parameters)."""
        if self.callers and not any(c.admits(request.calling_ae_title, request.host) for c in self.callers):
            return Rejection(
                f"calling AE title {request.calling_ae_title!r} from {request.host} is not on the allow-list",
                0x01, 0x01, 0x03,
            )
        host = _normal(request.host)
        with self._lock:
            if self.draining:
                return Rejection("node shutting down", 0x02, 0x03, 0x01)
            if self._active.total() >= self.max_associations:
                return Rejection(f"association limit of {self.max_associations} reached", 0x02, 0x03, 0x02)
            if self._active[host] >= self.max_per_host:
                return Rejection(f"association limit of {self.max_per_host} from {host} reached "
                                 "(node.max_associations_per_host)", 0x02, 0x03, 0x02)
            self._active[host] += 1
        return None

    def release(self, host: str) -> None:
        with self._lock:
            host = _normal(host)
            self._active[host] -= 1
            if self._active[host] <= 0:
                del self._active[host]

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

    def __init__(self, gate: Gate, archive: Archive, audit: AssociationAudit, metrics: Metrics, *,
                 spool_above_bytes: int = 8 * 2**20,
                 max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> None:
        self.gate = gate
        self.archive = archive
        self.audit = audit
        self.metrics = metrics
        self.spool_above_bytes = spool_above_bytes
        self.max_inflated_bytes = max_inflated_bytes
        self._admitted: dict[int, str] = {}

    def requested(self, key: int, request: AssociationRequest, refusal: Rejection | None) -> Rejection | None:
        rejection = refusal if refusal is not None else self.gate.admit(request)
        try:
            self.audit.requested(
                key, calling=request.calling_ae_title, called=request.called_ae_title, host=request.host,
                port=request.port, accepted=rejection is None, reason=rejection.reason if rejection else None,
            )
        except Exception:  # the audit database is unavailable: refuse rather than accept unrecorded
            log.exception("cannot audit the association request from %r@%s", request.calling_ae_title, request.host)
            if rejection is None:
                self.gate.release(request.host)
            rejection = Rejection("audit unavailable", 0x02, 0x03, 0x01)
        self.metrics.associations.labels(result="rejected" if rejection else "accepted").inc()
        if rejection is not None:
            log.warning("rejected association from %r@%s:%s: %s", request.calling_ae_title, request.host,
                        request.port, rejection.reason)
        else:
            self._admitted[key] = request.host
            log.info("association from %s@%s:%s", request.calling_ae_title, request.host, request.port)
        return rejection

    def dataset(self, key: int, request: AssociationRequest, command: StoreCommand) -> IncomingDataset:
        """In memory up to node.spool_above_mb, then in the archive's spool folder behind its Part 10 header."""
        prefix = file_header(command.sop_class_uid, command.sop_instance_uid, command.transfer_syntax_uid,
                             request.calling_ae_title)
        return IncomingDataset(self.archive.spool_folder, self.spool_above_bytes, prefix)

    def store(self, key: int, request: AssociationRequest, command: StoreCommand,
              dataset: DatasetSink) -> tuple[int, str | None]:
        assert isinstance(dataset, IncomingDataset), "datasets come from StorageService.dataset"
        if not self.gate.enter():
            return StoreStatus.OUT_OF_RESOURCES, "the node is shutting down; send again shortly"
        try:
            outcome = self.archive.store(
                Received(
                    dataset=dataset,
                    transfer_syntax_uid=command.transfer_syntax_uid,
                    affected_sop_class_uid=command.sop_class_uid,
                    affected_sop_instance_uid=command.sop_instance_uid,
                    calling_ae_title=request.calling_ae_title,
                    association_id=self.audit.record_id(key),
                    max_inflated_bytes=self.max_inflated_bytes,
                )
            )
        except Exception as exc:
            log.exception("C-STORE of %s failed unexpectedly", command.sop_instance_uid)
            self.audit.count(key, stored=False)
            self.metrics.instances.labels(outcome="refused").inc()
            return StoreStatus.OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}"
        finally:
            self.gate.leave()
        stored = outcome.status == StoreStatus.SUCCESS
        self.audit.count(key, stored=stored)
        self.metrics.instances.labels(outcome="stored" if stored else "refused").inc()
        if not stored:
            log.warning("refused C-STORE from %r: 0x%04X %s", request.calling_ae_title, outcome.status,
                        outcome.comment)
        return outcome.status, outcome.comment

    def closed(self, key: int) -> None:
        host = self._admitted.pop(key, None)
        if host is not None:
            self.gate.release(host)
        try:
            self.audit.closed(key)
        except Exception:
            log.exception("cannot close the audit row of an association")


class _Throttled:
    """Log a recurring condition at most once per ``interval`` seconds, with how often it happened meanwhile (so a
    flood of refused connections or failing accepts cannot flood the log)."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def log(self, kind: str, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval) < self.interval:
            self._suppressed[kind] += 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        log.log(level, message + (f" ({suppressed} more since the last such message)" if suppressed else ""), *args)


class Receiver:
    """The listening AE: start it, and stop it gracefully (in-flight C-STOREs are answered first)."""

    def __init__(self, node: NodeConfig, archive: Archive, audit: AssociationAudit, metrics: Metrics) -> None:
        self.node = node
        self.gate = Gate(parse_callers(node.allowed_callers), node.max_associations, node.max_associations_per_host,
                         node.max_pending_connections)
        self.service = StorageService(self.gate, archive, audit, metrics,
                                      spool_above_bytes=int(node.spool_above_mb * 2**20),
                                      max_inflated_bytes=int(node.max_dataset_mb * 2**20))
        self.settings = AcceptorSettings(
            ae_title=node.ae_title,
            contexts=supported_contexts(),
            max_pdu_bytes=node.max_pdu_bytes,
            timeout_seconds=node.network_timeout_seconds,
            max_dataset_bytes=int(node.max_dataset_mb * 2**20),
            max_command_bytes=node.max_command_kb * 1024,
            min_rate_bytes=node.min_receive_kb_per_second * 1024,
        )
        self._tls = tls_context(node)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._throttled = _Throttled()
        self._associations: dict[int, tuple[IncomingAssociation, threading.Thread]] = {}
        self._lock = threading.Lock()
        if not node.allowed_callers:
            log.warning("node.allowed_callers is empty: accepting associations from any AE title")

    @property
    def listening(self) -> bool:
        """Whether the accept loop is running on an open listener (what /healthz reports)."""
        return self._listener is not None and self._thread is not None and self._thread.is_alive()

    @property
    def port(self) -> int:
        assert self._listener is not None, "receiver not started"
        return int(self._listener.getsockname()[1])

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.node.host else socket.AF_INET
        self._listener = socket.create_server((self.node.host, self.node.port), family=family, backlog=64)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, args=(self._listener,), name="dicom-listener",
                                        daemon=True)
        self._thread.start()
        log.info("listening as %s on %s:%d%s", self.node.ae_title, self.node.host, self.port,
                 " (TLS)" if self._tls else "")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight C-STOREs finish and be answered, then close every association."""
        if self._listener is None:
            return
        listener, self._listener = self._listener, None
        self._stopping.set()
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

    def _accept_loop(self, listener: socket.socket) -> None:
        """Accept until ``stop``; a failure is logged and backed off (each one doubling the wait), never fatal."""
        failures = 0
        while not self._stopping.is_set():
            try:
                sock, peer = listener.accept()
                failures = 0
                self._start_association(sock, peer[:2])
                continue
            except Exception as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM, a thread that cannot start, ...
                if self._stopping.is_set():
                    return  # the listener was closed by stop()
                failures += 1
                delay = min(_BACKOFF_SECONDS[1], _BACKOFF_SECONDS[0] * 2 ** min(failures - 1, 16))
                self._throttled.log("accept", logging.ERROR, "accepting a connection failed: %s; still listening, "
                                    "retrying in %.2f s", exc, delay)
            self._stopping.wait(delay)

    def _start_association(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        host = _normal(peer[0])
        refusal = self.gate.arrive(host)
        if refusal is not None:
            close_socket(sock)
            self._throttled.log(f"refused {host}", logging.WARNING, "closed a connection from %s: %s", host, refusal)
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._run, args=(sock, peer, host),
                                      name=f"assoc-{peer[0]}:{peer[1]}", daemon=True)
            thread.start()
        except BaseException:
            self.gate.settle(host)
            close_socket(sock)
            raise

    def _run(self, sock: socket.socket, peer: tuple[str, int], host: str) -> None:
        settled = _once(lambda: self.gate.settle(host))
        try:
            if self._tls is not None:
                try:
                    sock = tls_handshake(sock, self._tls, self.node.network_timeout_seconds)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("TLS handshake with %s:%s failed: %s", *peer, exc)
                    sock.close()
                    return
            association = IncomingAssociation(sock, peer, self.settings, self.service, settled)
            with self._lock:
                self._associations[association.key] = (association, threading.current_thread())
            try:
                association.run()
            finally:
                with self._lock:
                    self._associations.pop(association.key, None)
        finally:
            settled()


def _once(action: Callable[[], None]) -> Callable[[], None]:
    """``action``, to be run at most once however often the result is called."""
    lock = threading.Lock()
    done = False

    def run() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        action()

    return run


def tls_handshake(sock: socket.socket, context: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    """The server side of a TLS handshake that must finish within ``timeout`` seconds in all (a peer that trickles
    the handshake holds a slot no longer than one that trickles its A-ASSOCIATE-RQ)."""
    deadline = time.monotonic() + timeout
    sock.setblocking(False)
    tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as want:
                left = deadline - time.monotonic()
                waits = ([tls], []) if isinstance(want, ssl.SSLWantReadError) else ([], [tls])
                if left <= 0 or select.select(*waits, [], left) == ([], [], []):
                    raise TimeoutError(f"no TLS handshake within {timeout:.0f} s") from None
    except BaseException:
        tls.close()
        raise
    tls.setblocking(True)
    return tls


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
