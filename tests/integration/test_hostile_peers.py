"""Hostile peers and hostile data against a real ``pe-node serve`` on loopback: one regression test per attack.

Each test measures the node process from /proc (resident memory, its peak, threads, CPU seconds) and bounds it with
wide margins: the bound says "did not blow up" (the attacks grew the node by hundreds of MB to GBs, or held it for as
long as the attacker liked), not how fast a shared machine happens to be. Peers are raw sockets (``tests.raw_peer``)
from several 127.x addresses, which reach the loopback listener as different hosts.
"""

from __future__ import annotations

import json
import os
import resource
import ssl
import struct
import subprocess
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from tests.dicom_factory import make_ct_dataset, phantom_slice
from tests.integration.conftest import needs_dcmtk
from tests.peers import NodeProcess, free_port, node_config, run_dcmtk
from tests.raw_peer import (
    APPLICATION_CONTEXT,
    CT_IMAGE_STORAGE,
    VERIFICATION,
    RawPeer,
    associate_rq,
    context_item,
    echo_rq,
    item,
    p_data,
    pdv,
    reset_peak,
    store_rq,
    usage,
    user_information,
    wait_for,
)

MB = 2**20


def report(row: int, text: str) -> None:
    """A measured figure, shown with ``pytest -s``, labelled with the number of the attack it measures."""
    print(f"\n[row {row}] {text}")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node with the default limits, for the attacks that need nothing else (each leaves it as it was)."""
    root = tmp_path_factory.mktemp("hostile")
    with NodeProcess(root, node_config(root, free_port(), series={"quiet_seconds": 3600})) as process:
        yield process


def pid(node: NodeProcess) -> int:
    assert node.process is not None
    return node.process.pid


def echo_works(node: NodeProcess, source: str = "127.0.0.1") -> bool:
    try:
        with RawPeer(node.port, source) as peer:
            peer.associate()
            peer.send(p_data(pdv(1, 0x03, echo_rq())))
            ok = peer.read_pdu().status() == 0
            peer.release()
            return ok
    except OSError:
        return False


def ct_dataset_bytes(sop_uid: str, rows: int = 16) -> bytes:
    ds = make_ct_dataset(phantom_slice(0, 10, rows), position=(0.0, 0.0, 0.0), study_uid=generate_uid(),
                         series_uid=generate_uid(), instance_number=1)
    ds.SOPInstanceUID = sop_uid
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def routing_prefix(sop_uid: str) -> bytes:
    """Explicit VR Little Endian routing attributes of a CT image, to put in front of a large Pixel Data."""
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", generate_uid(), generate_uid()
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def zero_pixel_dataset(sop_uid: str, size: int) -> Iterator[bytes]:
    """A dataset whose Pixel Data is ``size`` zero bytes, produced 1 MiB at a time (never held whole)."""
    yield routing_prefix(sop_uid) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, size)
    chunk = bytes(MB)
    for start in range(0, size, MB):
        yield chunk[: min(MB, size - start)]


# The accept loop ------------------------------------------------------------------------------------------------------

def test_accept_failures_are_logged_backed_off_and_the_listener_recovers(start_node) -> None:
    node = start_node()
    health = node.web_url() + "healthz"
    process = pid(node)
    limits = resource.prlimit(process, resource.RLIMIT_NOFILE)
    open_now = len(os.listdir(f"/proc/{process}/fd"))
    resource.prlimit(process, resource.RLIMIT_NOFILE, (open_now + 6, limits[1]))
    peers = []
    try:
        for host in range(2, 6):  # 12 idle connections from 4 addresses: more than the 6 descriptors left
            peers += [RawPeer(node.port, f"127.0.0.{host}") for _ in range(3)]
        assert wait_for(lambda: "accepting a connection failed" in node.log(), timeout=15), "no log line"
        started = time.monotonic()
        for peer in peers:
            peer.close()
        assert wait_for(lambda: echo_works(node), timeout=20), "C-ECHO fails after the idle sockets closed"
        recovered = time.monotonic() - started
    finally:
        for peer in peers:
            peer.close()
        resource.prlimit(process, resource.RLIMIT_NOFILE, limits)
    failures = node.log().count("accepting a connection failed")
    report(1, f"EMFILE with 12 idle sockets on 6 spare descriptors: {failures} throttled log line(s); C-ECHO "
              f"{recovered:.1f} s after the sockets closed; /healthz 'listening'")
    assert failures <= 5, "the failing accept() is throttled in the log"
    with urllib.request.urlopen(health, timeout=10) as response:
        assert json.loads(response.read())["receiver"] == "listening"


# Deflate bombs --------------------------------------------------------------------------------------------------------

def deflate_bomb(sop_uid: str, inflated: int) -> bytes:
    """A deflated dataset whose Pixel Data inflates to ``inflated`` zero bytes, built without compressing them all:
    after a full flush the compressor starts afresh, so every 1 MiB of zeros deflates to the same block."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = routing_prefix(sop_uid) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated)
    stream = compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(MB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert compressor.compress(bytes(MB)) + compressor.flush(zlib.Z_FULL_FLUSH) == block
    stream += block * (inflated // MB) + compressor.flush()
    return stream + b"\x00" * (len(stream) % 2)


def test_deflate_bomb_is_inflated_in_bounded_chunks_and_capped(start_node) -> None:
    node = start_node(node={"max_dataset_mb": 256})
    bomb = deflate_bomb(generate_uid(), 1024 * MB)
    fair = deflate_bomb(uid := generate_uid(), 128 * MB)
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(bomb[:4096], 64)  # a real deflate stream
    process = pid(node)
    before = usage(process)
    reset_peak(process)
    with RawPeer(node.port) as peer:
        assert peer.associate(contexts=[(1, CT_IMAGE_STORAGE, [DeflatedExplicitVRLittleEndian])]) == {1: 0}
        started = time.monotonic()
        refused = peer.store(generate_uid().encode(), [bomb], context_id=1)
        took = time.monotonic() - started
        stored = peer.store(uid.encode(), [fair], context_id=1)
    after = usage(process)
    growth = after.peak_mb - before.rss_mb
    report(2, f"{len(bomb) / MB:.1f} MiB inflating to 1 GiB: 0x{refused:04X} after {took:.1f} s (cap 256 MB); "
              f"{len(fair) / 1024:.0f} KiB inflating to 128 MiB: 0x{stored:04X}; peak RSS +{growth:.0f} MB")
    assert refused == 0xA700 and "inflates to more than 256 MB" in node.log()
    assert stored == 0x0000
    [copy] = (node.root / "dicom").rglob(f"{uid}.dcm")
    assert copy.stat().st_size < 2 * len(fair), "the file holds the dataset as sent (deflated)"
    assert growth < 100, f"inflating grew the node by {growth:.0f} MB"
    assert took < 60


# Command sets ---------------------------------------------------------------------------------------------------------

def test_endless_command_fragments_are_cut_at_the_command_cap(node: NodeProcess) -> None:
    process = pid(node)
    before = usage(process)
    reset_peak(process)
    sent = 0
    started = time.monotonic()
    with RawPeer(node.port) as peer:
        peer.associate()
        fragment = p_data(pdv(1, 0x01, b"\x00" * 1024))  # command, never the last fragment
        with pytest.raises(OSError):
            while sent < 64 * MB:
                peer.send(fragment)
                sent += len(fragment)
        took = time.monotonic() - started
    after = usage(process)
    report(3, f"command fragments: aborted after {sent / 1024:.0f} KiB sent, {took:.2f} s; "
              f"peak RSS +{after.peak_mb - before.rss_mb:.0f} MB")
    assert sent < 16 * MB and took < 10
    assert after.peak_mb - before.rss_mb < 20
    assert echo_works(node)


# Slow peers -----------------------------------------------------------------------------------------------------------

def trickle(peer: RawPeer, pieces: Callable[[], Iterator[bytes]], interval: float) -> Callable[[], float | None]:
    """Send ``pieces`` one per ``interval`` in a thread until the node cuts the connection; the returned function
    gives how long that took (None while still connected)."""
    outcome: list[float] = []
    started = time.monotonic()

    def run() -> None:
        try:
            for piece in pieces():
                peer.send(piece)
                time.sleep(interval)
        except OSError:
            outcome.append(time.monotonic() - started)

    threading.Thread(target=run, daemon=True).start()
    return lambda: outcome[0] if outcome else None


def partial_pdu() -> Iterator[bytes]:
    """A P-DATA-TF header claiming 1 MiB, then its bytes one at a time, forever."""
    yield struct.pack(">BBI", 4, 0, MB)
    while True:
        yield b"\x00"


def tiny_pdus() -> Iterator[bytes]:
    """A C-STORE whose dataset comes in complete 300-byte PDUs, each on time, forever: only the message is slow."""
    yield p_data(pdv(3, 0x03, store_rq(b"1.2.3.4")))
    while True:
        yield p_data(pdv(3, 0x00, b"\x00" * 300))


@needs_dcmtk
def test_trickling_peers_are_cut_off_and_cannot_take_every_slot(start_node) -> None:
    node = start_node(node={"network_timeout_seconds": 2, "max_associations": 10})
    peers, verdicts = [], []
    for _ in range(8):  # one after the other: at most 5 connections from one host may be negotiating at once
        peers.append(peer := RawPeer(node.port, "127.0.0.2"))
        peer.send(associate_rq())
        verdicts.append(peer.read_pdu())
    admitted = [peer for peer, pdu in zip(peers, verdicts) if pdu.type == 2]
    assert [pdu.rejection for pdu in verdicts if pdu.type == 3] == [(2, 3, 2)] * 3, "local limit per host"
    cut = [trickle(peer, partial_pdu if k % 2 else tiny_pdus, 0.25) for k, peer in enumerate(admitted)]
    echo = run_dcmtk("echoscu", "-aec", "PE_NODE", "127.0.0.1", str(node.port), timeout=30)
    assert echo.returncode == 0, f"a caller from another host is turned away: {echo.stderr}"
    assert wait_for(lambda: all(c() is not None for c in cut), timeout=20), "a trickling peer is still connected"
    times = sorted(c() or 0.0 for c in cut)
    for peer in peers:
        peer.close()
    report(4, f"5 of 8 trickling peers from one host admitted (3 rejected 2/3/2), echoscu from another host "
              f"succeeded meanwhile; each cut off after {times[0]:.1f}-{times[-1]:.1f} s (network timeout 2 s)")
    assert times[-1] < 15
    assert "took longer than 2 s" in node.log()


def client_hello() -> bytes:
    """The first flight of a real TLS client, taken from an in-memory handshake."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="pe-node")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


@pytest.mark.peer("openssl")
def test_a_trickled_tls_handshake_is_cut_off(start_node, tmp_path: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=pe-node",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True)
    node = start_node(node={"network_timeout_seconds": 2, "tls": {"certificate": str(tmp_path / "cert.pem"),
                                                                  "private_key": str(tmp_path / "key.pem")}})
    hello = client_hello()
    with RawPeer(node.port, "127.0.0.2") as peer:
        cut = trickle(peer, lambda: (hello[k : k + 1] for k in range(len(hello))), 0.2)
        assert wait_for(lambda: cut() is not None, timeout=15), "the handshake is still going"
    report(4, f"a {len(hello)}-byte ClientHello trickled at 5 bytes/s over TLS: cut off after {cut():.1f} s "
              f"(it would have taken {len(hello) / 5:.0f} s)")
    assert "no TLS handshake within 2 s" in node.log()


# Connection floods ----------------------------------------------------------------------------------------------------

def test_a_flood_of_connections_costs_neither_threads_nor_claimed_buffers(node: NodeProcess) -> None:
    process = pid(node)
    before = usage(process)
    reset_peak(process)
    peers: list[RawPeer] = []
    most_threads = 0
    header = struct.pack(">BBI", 1, 0, MB)  # an A-ASSOCIATE-RQ header claiming 1 MiB, and nothing more
    try:
        for k in range(1000):
            try:
                peer = RawPeer(node.port, f"127.0.1.{k % 8 + 1}")
                peers.append(peer)
                peer.send(header)
            except OSError:
                pass  # the node closed it at once: over the cap of connections negotiating
            if k % 100 == 0:
                most_threads = max(most_threads, usage(process).threads)
        time.sleep(0.5)
        during = usage(process)
        most_threads = max(most_threads, during.threads)
    finally:
        for peer in peers:
            peer.close()
    report(5, f"1000 connections each claiming a 1 MiB PDU: threads {before.threads} -> at most {most_threads}, "
              f"peak RSS +{during.peak_mb - before.rss_mb:.0f} MB")
    assert most_threads <= before.threads + 16 + 2, "one thread per connection beyond the pending cap"
    assert during.peak_mb - before.rss_mb < 50
    assert wait_for(lambda: echo_works(node), timeout=15)


# Large datasets -------------------------------------------------------------------------------------------------------

def test_large_datasets_in_parallel_are_spooled_not_held(start_node) -> None:
    node = start_node(series={"quiet_seconds": 3600})
    process = pid(node)
    before = usage(process)
    reset_peak(process)
    size = 100 * MB
    uids = [generate_uid() for _ in range(4)]
    statuses: dict[str, int] = {}

    def send(uid: str) -> None:
        with RawPeer(node.port, timeout=120) as peer:
            peer.associate()
            statuses[uid] = peer.store(uid.encode(), zero_pixel_dataset(uid, size))
            peer.release()

    started = time.monotonic()
    threads = [threading.Thread(target=send, args=(uid,)) for uid in uids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    took = time.monotonic() - started
    after = usage(process)
    growth = after.peak_mb - before.rss_mb
    report(6, f"4 parallel 100 MiB datasets: all 0x{max(statuses.values(), default=-1):04X} in {took:.1f} s; "
              f"peak RSS +{growth:.0f} MB (held twice in memory this would be ~800 MB)")
    assert statuses == {uid: 0 for uid in uids}
    for uid in uids:
        [stored] = (node.root / "dicom").rglob(f"{uid}.dcm")
        assert stored.stat().st_size > size
    assert growth < 150
    assert not list((node.root / "dicom").rglob("*.tmp")), "no spool file left behind"


# Fragmentation --------------------------------------------------------------------------------------------------------

def test_degenerate_fragmentation_is_refused_at_once(node: NodeProcess) -> None:
    process = pid(node)
    before = usage(process)
    reset_peak(process)
    cut_after = []
    for size in (0, 1):  # 4 MiB P-DATA-TFs of empty, then of 1-byte, dataset fragments; four peers of each
        fragments = p_data(*[pdv(3, 0x00, b"\x00" * size)] * ((4 * MB) // (6 + size)))
        for _ in range(4):
            with RawPeer(node.port) as peer:
                peer.associate()
                peer.send(p_data(pdv(3, 0x03, store_rq(b"1.2.3.4"))))
                started = time.monotonic()
                try:
                    peer.send(fragments)
                except OSError:
                    pass
                assert peer.closed_by_peer(10), "the node still reads the fragments"
                cut_after.append(time.monotonic() - started)
    after = usage(process)
    cpu = after.cpu_seconds - before.cpu_seconds
    report(7, f"8 x 4 MiB PDUs of empty or 1-byte PDVs: each aborted within {max(cut_after):.2f} s; node CPU "
              f"{cpu:.2f} s in all, peak RSS +{after.peak_mb - before.rss_mb:.0f} MB")
    assert cpu < 5 and after.peak_mb - before.rss_mb < 30
    assert "empty presentation data value" in node.log() and "must average 256 bytes" in node.log()
    assert echo_works(node)


# Bad command UIDs, contexts without a transfer syntax -----------------------------------------------------------------

def test_bad_affected_uids_get_a_failure_status_and_a_short_log_line(node: NodeProcess) -> None:
    long_uid = b"1." + b"2" * 3000
    with RawPeer(node.port) as peer:
        peer.associate()
        for uid in ("1.2.3.\u00e9".encode("latin-1"), long_uid):
            dataset = ct_dataset_bytes(generate_uid())
            peer.send(p_data(pdv(3, 0x03, store_rq(uid)), pdv(3, 0x02, dataset)))
            response = peer.read_pdu()
            assert response.status() == 0xC001
            assert b"Affected SOP Instance UID" in response.element(0x0902)
        peer.send(p_data(pdv(1, 0x03, echo_rq(7))))
        assert peer.read_pdu().status() == 0, "the association goes on"
        peer.release()
    with RawPeer(node.port) as peer:  # a 60 KB UID is over the command cap: the association is aborted
        peer.associate()
        peer.send(p_data(pdv(3, 0x03, store_rq(b"1." + b"2" * 60_000))))
        assert peer.closed_by_peer(10)
    log = node.log()
    assert "Traceback" not in log
    assert "2" * 100 not in log, "a long UID is logged in full"
    report(9, "non-ASCII and 3000-byte Affected SOP Instance UIDs: 0xC001, association continues; 60 KB UID: "
              "A-ABORT at the command cap; no traceback, no UID longer than 64 characters in the log")


def test_a_context_without_transfer_syntax_is_refused_alone(node: NodeProcess) -> None:
    with RawPeer(node.port) as peer:
        results = peer.associate(contexts=[(1, VERIFICATION, []), (3, VERIFICATION, ["1.2.840.10008.1.2"]),
                                           (5, "1.2.3.4.99", ["1.2.840.10008.1.2"])])
        assert results == {1: 0x04, 3: 0x00, 5: 0x03}
        peer.send(p_data(pdv(3, 0x03, echo_rq())))
        assert peer.read_pdu().status() == 0
        peer.release()


# File Meta elements in the dataset ------------------------------------------------------------------------------------

def test_file_meta_elements_inside_the_dataset_are_refused(node: NodeProcess) -> None:
    sop = generate_uid()
    meta = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", 20) + b"1.2.840.10008.1.2.2\x00"  # Big Endian
    with RawPeer(node.port) as peer:
        peer.associate()
        status = peer.store(sop.encode(), [meta + ct_dataset_bytes(sop)])
        peer.send(p_data(pdv(3, 0x03, store_rq(sop.encode())), pdv(3, 0x02, ct_dataset_bytes(sop))))
        clean = peer.read_pdu().status()
        peer.release()
    report(10, f"dataset with (0002,0010) in front: 0x{status:04X}; the same without it: 0x{clean:04X}")
    assert status == 0xC000 and "File Meta Information" in node.log()
    assert clean == 0
    [stored] = (node.root / "dicom").rglob(f"{sop}.dcm")
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


# Association requests -------------------------------------------------------------------------------------------------

APP = item(0x10, APPLICATION_CONTEXT.encode())
ECHO_CONTEXT = context_item(1, VERIFICATION, ["1.2.840.10008.1.2"])


@pytest.mark.parametrize(("request_pdu", "expected"), [
    (associate_rq(items=[APP, user_information()]), (1, 1, 1)),
    (associate_rq(items=[item(0x10, b"1.2.3.4"), ECHO_CONTEXT, user_information()]), (1, 1, 2)),
    (associate_rq(version=0), (1, 2, 2)),
    (associate_rq(version=2), (1, 2, 2)),
    (associate_rq(called=b"SOMEONE_ELSE"), (1, 1, 7)),
    (associate_rq(called=b" " * 16), (1, 1, 7)),
    (associate_rq(calling=b" " * 16), (1, 1, 3)),
], ids=["no contexts", "application context", "version 0", "version 2", "called AE", "blank called", "blank calling"])
def test_unacceptable_requests_get_the_standard_rejection(node: NodeProcess, request_pdu: bytes,
                                                          expected: tuple[int, int, int]) -> None:
    with RawPeer(node.port) as peer:
        peer.send(request_pdu)
        assert peer.read_pdu().rejection == expected


def test_unknown_items_are_ignored(node: NodeProcess) -> None:
    unknown_sub_item = user_information(extra=item(0x5F, b"from the future"))
    with RawPeer(node.port) as peer:
        peer.send(associate_rq(items=[APP, item(0x33, b"?"), ECHO_CONTEXT, unknown_sub_item]))
        assert peer.read_pdu().context_results() == {1: 0}
        peer.release()


@needs_dcmtk
def test_dcmtk_calling_another_ae_title_is_rejected(node: NodeProcess) -> None:
    result = run_dcmtk("echoscu", "-aec", "NOT_PE_NODE", "127.0.0.1", str(node.port))
    assert result.returncode != 0 and "Called AE Title Not Recognized" in result.stderr
    report(11, "no contexts 1/1/1, application context 1/1/2, protocol version 1/2/2, called AE 1/1/7, blank "
               "calling 1/1/3, unknown (sub-)items ignored; echoscu -aec NOT_PE_NODE: "
               + result.stderr.strip().splitlines()[-1])


def test_the_node_survived_every_attack(node: NodeProcess) -> None:
    assert node.process is not None and node.process.poll() is None
    assert echo_works(node)
