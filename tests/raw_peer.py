"""A DICOM peer on raw sockets, for tests that must send what no well-behaved library would: malformed or slow
PDUs, odd fragmentations, floods. Also the node process's resource use, read from /proc, to bound it.

The PDUs are built by hand (PS3.8 9.3); only what the tests need is here.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def item(item_type: int, value: bytes) -> bytes:
    """An A-ASSOCIATE item or sub-item: type, reserved byte, 2-byte length, value."""
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def context_item(context_id: int, abstract_syntax: str, transfer_syntaxes: Sequence[str]) -> bytes:
    value = struct.pack(">BBBB", context_id, 0, 0, 0) + item(0x30, abstract_syntax.encode())
    return item(0x20, value + b"".join(item(0x40, ts.encode()) for ts in transfer_syntaxes))


def user_information(max_pdu: int = 1 << 20, extra: bytes = b"") -> bytes:
    return item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.826.0.1.3680043.9.7777") + extra)


Context = tuple[int, str, Sequence[str]]
DEFAULT_CONTEXTS: tuple[Context, ...] = ((1, VERIFICATION, ["1.2.840.10008.1.2"]),
                                         (3, CT_IMAGE_STORAGE, [ExplicitVRLittleEndian]))


def associate_rq(called: bytes = b"PE_NODE", calling: bytes = b"HOSTILE", *, version: int = 1,
                 items: Sequence[bytes] | None = None, contexts: Sequence[Context] = DEFAULT_CONTEXTS) -> bytes:
    """An A-ASSOCIATE-RQ PDU; ``items`` replaces the variable items (application context, contexts, user info)."""
    if items is None:
        items = [item(0x10, APPLICATION_CONTEXT.encode()), *(context_item(*cx) for cx in contexts),
                 user_information()]
    body = struct.pack(">HH", version, 0) + called.ljust(16) + calling.ljust(16) + bytes(32) + b"".join(items)
    return struct.pack(">BBI", 1, 0, len(body)) + body


def pdv(context_id: int, control: int, fragment: bytes) -> bytes:
    """One presentation data value item: control bit 0 command, bit 1 last fragment."""
    return struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment


def p_data(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 4, 0, len(body)) + body


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def _uid(uid: bytes) -> bytes:
    return uid + b"\x00" if len(uid) % 2 else uid


def command_set(command_field: int, message_id: int = 1, *, sop_class: bytes | None = None,
                sop_instance: bytes | None = None, has_dataset: bool = False) -> bytes:
    """A DIMSE request command set (Implicit VR Little Endian, group length first)."""
    body = b""
    if sop_class is not None:
        body += _element(0x0002, _uid(sop_class))
    body += _element(0x0100, struct.pack("<H", command_field)) + _element(0x0110, struct.pack("<H", message_id))
    if command_field == 0x0001:
        body += _element(0x0700, struct.pack("<H", 0))
    body += _element(0x0800, struct.pack("<H", 0x0001 if has_dataset else 0x0101))
    if sop_instance is not None:
        body += _element(0x1000, _uid(sop_instance))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def echo_rq(message_id: int = 1) -> bytes:
    return command_set(0x0030, message_id, sop_class=VERIFICATION.encode())


def store_rq(sop_instance: bytes, sop_class: bytes = CT_IMAGE_STORAGE.encode(), message_id: int = 1) -> bytes:
    return command_set(0x0001, message_id, sop_class=sop_class, sop_instance=sop_instance, has_dataset=True)


@dataclass(frozen=True)
class Pdu:
    type: int
    body: bytes

    @property
    def rejection(self) -> tuple[int, int, int]:
        """(result, source, reason) of an A-ASSOCIATE-RJ."""
        assert self.type == 3, f"expected A-ASSOCIATE-RJ, got PDU type {self.type}"
        return self.body[1], self.body[2], self.body[3]

    def context_results(self) -> dict[int, int]:
        """Context ID -> result of an A-ASSOCIATE-AC."""
        assert self.type == 2, f"expected A-ASSOCIATE-AC, got PDU type {self.type}"
        results, offset = {}, 68
        while offset < len(self.body):
            item_type, _, length = struct.unpack_from(">BBH", self.body, offset)
            if item_type == 0x21:
                results[self.body[offset + 4]] = self.body[offset + 6]
            offset += 4 + length
        return results

    def status(self) -> int:
        """The Status (0000,0900) of a DIMSE response in a P-DATA-TF."""
        return int(struct.unpack("<H", self.element(0x0900))[0])

    def element(self, element: int) -> bytes:
        assert self.type == 4, f"expected P-DATA-TF, got PDU type {self.type}"
        command = self.body[6:]
        offset = 0
        while offset < len(command):
            _, number, length = struct.unpack_from("<HHI", command, offset)
            if number == element:
                return command[offset + 8 : offset + 8 + length]
            offset += 8 + length
        raise KeyError(f"(0000,{element:04X}) not in the response")


class RawPeer:
    """One TCP connection to the node, from ``source`` (any 127.x.y.z address reaches a loopback listener)."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_pdu(self) -> Pdu:
        header = self._exact(6)
        pdu_type, _, length = struct.unpack(">BBI", header)
        return Pdu(pdu_type, self._exact(length))

    def _exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {size} bytes")
            data += chunk
        return data

    def associate(self, **options: object) -> dict[int, int]:
        """Send an A-ASSOCIATE-RQ (``associate_rq`` options) and expect an A-ASSOCIATE-AC; its context results."""
        self.send(associate_rq(**options))  # type: ignore[arg-type]
        return self.read_pdu().context_results()

    def store(self, sop_instance: bytes, dataset: Iterable[bytes], context_id: int = 3,
              max_pdu: int = 1 << 20) -> int:
        """C-STORE a dataset given in pieces (each sent as it comes, in PDUs of at most ``max_pdu``); its status."""
        self.send(p_data(pdv(context_id, 0x03, store_rq(sop_instance))))
        pending = b""
        for piece in dataset:
            pending += piece
            while len(pending) > max_pdu - 6:
                self.send(p_data(pdv(context_id, 0x00, pending[: max_pdu - 6])))
                pending = pending[max_pdu - 6 :]
        self.send(p_data(pdv(context_id, 0x02, pending)))
        return self.read_pdu().status()

    def release(self) -> None:
        self.send(struct.pack(">BBII", 5, 0, 4, 0))
        assert self.read_pdu().type == 6

    def closed_by_peer(self, timeout: float) -> bool:
        """Whether the node closes (or aborts) the connection within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data or data[:1] == b"\x07":
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Usage:
    """A process's resident memory now and at its peak (MB), its threads and CPU seconds so far."""

    rss_mb: float
    peak_mb: float
    threads: int
    cpu_seconds: float


def usage(pid: int) -> Usage:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return Usage(int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024,
                 int(fields["Threads"]), (int(stat[11]) + int(stat[12])) / ticks)


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux 4.0+: write 5 to clear_refs), so a peak is this test's own."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def wait_for(predicate: object, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False
