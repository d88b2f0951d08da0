"""The listener in this process: its accept loop outlives every failure, /healthz tells whether it runs, and the gate
counts connections and associations per address."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pe_node.config import NodeConfig, StorageConfig, WebConfig
from pe_node.db import Database
from pe_node.dicom import scp
from pe_node.dicom.archive import Archive
from pe_node.dicom.association import AssociationRequest
from pe_node.dicom.audit import AssociationAudit
from pe_node.dicom.scp import Gate, Receiver
from pe_node.metrics import Metrics
from pe_node.web import WebServer
from tests.peers import free_port, wait_until
from tests.raw_peer import RawPeer, associate_rq, echo_rq, p_data, pdv


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'pe-node.db'}")
    yield db
    db.dispose()


@pytest.fixture
def receiver(tmp_path: Path, database: Database) -> Iterator[Receiver]:
    archive = Archive(StorageConfig(path=tmp_path / "dicom", min_free_mb=0), database)
    node = NodeConfig(host="127.0.0.1", port=free_port(), network_timeout_seconds=5)
    started = Receiver(node, archive, AssociationAudit(database), Metrics())
    started.start()
    yield started
    started.stop()


def echo(port: int) -> int:
    with RawPeer(port) as peer:
        peer.associate()
        peer.send(p_data(pdv(1, 0x03, echo_rq())))
        status = peer.read_pdu().status()
        peer.release()
        return status


class ThreadThatCannotStart(threading.Thread):
    """The first association thread fails to start, as when the process has run out of threads or memory."""

    failures_left = 1

    def start(self) -> None:
        if self.name.startswith("assoc-") and ThreadThatCannotStart.failures_left:
            ThreadThatCannotStart.failures_left -= 1
            raise RuntimeError("can't start new thread")
        super().start()


def test_a_thread_that_cannot_start_costs_one_connection_not_the_listener(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(scp.threading, "Thread", ThreadThatCannotStart)
    caplog.set_level(logging.ERROR, logger="pe_node.dicom.scp")
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as refused:
        assert refused.recv(16) == b"", "that connection is closed"
    # the connection is closed before the accept loop logs why: wait for the line rather than race it
    assert wait_until(lambda: "can't start new thread; still listening" in caplog.text, timeout=5, interval=0.01)
    assert receiver.listening
    assert echo(receiver.port) == 0x0000
    assert not receiver.gate._pending, "no connection left counted as negotiating"


def test_health_says_stopped_once_the_accept_loop_has_ended(receiver: Receiver, database: Database) -> None:
    web = WebServer(WebConfig(port=0), database, Metrics(), {}, receiving=lambda: receiver.listening)
    healthy, body = web.health()
    assert healthy and body["receiver"] == "listening"
    receiver.stop()
    healthy, body = web.health()
    assert not healthy and body["receiver"] == "stopped"


def test_health_says_stopped_when_the_loop_thread_is_gone_though_the_socket_is_open(receiver: Receiver) -> None:
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    live, receiver._thread = receiver._thread, dead
    try:
        assert not receiver.listening
    finally:
        receiver._thread = live


def request(host: str, calling: str = "SCU") -> AssociationRequest:
    return AssociationRequest(calling, "PE_NODE", host, 104)


def test_the_gate_caps_associations_per_address_and_in_all() -> None:
    gate = Gate([], max_associations=3, max_per_host=2, max_pending=10)
    assert gate.admit(request("10.0.0.1")) is None and gate.admit(request("10.0.0.1")) is None
    refused = gate.admit(request("10.0.0.1"))
    assert refused is not None and (refused.result, refused.source, refused.diagnostic) == (2, 3, 2)
    assert "node.max_associations_per_host" in refused.reason
    assert gate.admit(request("::ffff:10.0.0.2")) is None, "another address still gets in"
    assert gate.admit(request("10.0.0.3")) is not None, "the total cap"
    gate.release("10.0.0.1")
    assert gate.admit(request("10.0.0.3")) is None


def test_the_gate_caps_connections_still_negotiating() -> None:
    gate = Gate([], max_associations=10, max_per_host=2, max_pending=3)
    assert gate.arrive("10.0.0.1") is None and gate.arrive("10.0.0.1") is None
    assert "from 10.0.0.1" in (gate.arrive("10.0.0.1") or "")
    assert gate.arrive("10.0.0.2") is None
    assert "node.max_pending_connections" in (gate.arrive("10.0.0.3") or "")
    gate.settle("10.0.0.1")
    assert gate.arrive("10.0.0.3") is None


def test_the_same_proposal_is_negotiated_once_and_answered_alike(receiver: Receiver,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from pe_node.dicom import association

    calls = []
    negotiate = association.negotiate_as_acceptor

    def counted(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        calls.append(1)
        return negotiate(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(association, "negotiate_as_acceptor", counted)
    answers = []
    for calling in (b"FIRST", b"SECOND"):
        with RawPeer(receiver.port) as peer:
            peer.send(associate_rq(calling=calling))
            answers.append(peer.read_pdu())
            peer.send(p_data(pdv(1, 0x03, echo_rq())))
            assert peer.read_pdu().status() == 0x0000, "the remembered answer's contexts are used"
            peer.release()
    assert len(calls) == 1
    assert answers[0].context_results() == answers[1].context_results()
    assert b"SECOND" in answers[1].body[:40] and b"FIRST" not in answers[1].body, "each gets its own AE titles back"
