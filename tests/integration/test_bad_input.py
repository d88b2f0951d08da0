"""Bad input gets a clear DICOM status or error, never takes the node down, never loses what was acknowledged."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from pe_node.dicom.scu import Peer, SentFile, send_files
from tests.dicom_factory import write_ct_series
from tests.integration.conftest import needs_dcmtk
from tests.peers import PE_NODE, REPO, NodeProcess, run_dcmtk


def associate(node: NodeProcess, calling: str = "TESTSCU", contexts: tuple[str, ...] = (CTImageStorage,)):
    ae = AE(ae_title=calling)
    for context in contexts:
        ae.add_requested_context(context)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.port, ae_title="PE_NODE")


def store_file(node: NodeProcess, path: Path) -> SentFile:
    """C-STORE the file's bytes exactly as they are (no re-encoding by the sender); status and comment."""
    [sent] = send_files([path], Peer("PE_NODE", "127.0.0.1", node.port), calling_ae_title="TESTSCU")
    return sent


def node_is_alive(node: NodeProcess) -> bool:
    assoc = associate(node)
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


def stored(node: NodeProcess) -> list[Path]:
    return [p for p in (node.root / "dicom").rglob("*") if p.is_file()]


@pytest.fixture
def ct_file(tmp_path: Path) -> Path:
    return write_ct_series(tmp_path / "ct", n_slices=1, size=64, seed=1)[0]


def test_non_dicom_bytes_are_aborted_and_the_node_lives_on(start_node) -> None:
    node = start_node()
    for junk in (b"GET / HTTP/1.1\r\nHost: pe-node\r\n\r\n", os.urandom(2048)):
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            sock.sendall(junk)
            reply = sock.recv(64)
        assert reply[:1] in (b"\x07", b""), "an A-ABORT PDU or a closed connection"
        if reply:
            assert reply[0] == 0x07 and reply[8] == 2, "A-ABORT from the service provider"
    assert node_is_alive(node)


def test_connection_dropped_mid_pdu_is_cleaned_up(start_node, ct_file: Path) -> None:
    node = start_node()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(b"\x01\x00\x00\x00\x10\x00" + b"\x00" * 20)  # A-ASSOCIATE-RQ header promising 4 kB
    assert node_is_alive(node)
    assert stored(node) == []


def test_truncated_dataset_gets_cannot_understand(start_node, ct_file: Path, tmp_path: Path) -> None:
    node = start_node()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(ct_file.read_bytes()[:-1000])
    response = store_file(node, truncated)
    assert response.status == 0xC000
    assert "bytes but only" in response.error
    assert stored(node) == [] and node_is_alive(node)


def test_dataset_without_sop_instance_uid_is_refused(start_node, ct_file: Path, tmp_path: Path) -> None:
    node = start_node()
    ds = pydicom.dcmread(ct_file)
    del ds.SOPInstanceUID
    path = tmp_path / "no-uid.dcm"
    ds.save_as(path)
    response = store_file(node, path)
    assert response.status == 0xC001
    assert response.error == "SOP Instance UID is missing"
    assert stored(node) == []


@pytest.mark.parametrize("uid", ["../../x", "1.2.3/../../../../tmp/x"])
def test_path_like_uid_is_refused_and_nothing_is_written(start_node, ct_file: Path, tmp_path: Path,
                                                         uid: str) -> None:
    node = start_node()
    ds = pydicom.dcmread(ct_file)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = tmp_path / "evil.dcm"
    ds.save_as(path)
    response = store_file(node, path)
    assert response.status == 0xC001
    assert "not a valid UID" in response.error
    assert stored(node) == []
    assert not (node.root / "x").exists() and not (node.root.parent / "x").exists()


def test_unknown_sop_class_is_rejected_in_negotiation(start_node, ct_file: Path, tmp_path: Path) -> None:
    node = start_node()
    unknown = "1.2.826.0.1.3680043.9.9999.1"
    assoc = associate(node, contexts=(unknown,))
    try:
        assert assoc.is_established
        [refused] = [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == unknown]
        assert refused.result == 0x03, "abstract syntax not supported"
    finally:
        assoc.release()
    ds = pydicom.dcmread(ct_file)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = unknown
    path = tmp_path / "unknown.dcm"
    ds.save_as(path)
    result = node.cli_send(path)
    assert result.returncode == 1
    assert "failed" in result.stderr and "0 of 1 files" in result.stdout
    assert stored(node) == []


@needs_dcmtk
def test_caller_not_on_the_allow_list_is_rejected_and_audited(start_node) -> None:
    node = start_node(node={"allowed_callers": ["CT_SCANNER", "PACS@127.0.0.1"]})
    refused = run_dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "PE_NODE", "127.0.0.1", str(node.port))
    assert refused.returncode != 0 and "Association Rejected" in refused.stderr
    wrong_host = run_dcmtk("echoscu", "-aet", "PACS", "-aec", "PE_NODE", "127.0.0.1", str(node.port))
    assert wrong_host.returncode == 0, "PACS@127.0.0.1 is allowed from loopback"
    allowed = run_dcmtk("echoscu", "-aet", "CT_SCANNER", "-aec", "PE_NODE", "127.0.0.1", str(node.port))
    assert allowed.returncode == 0
    audit = json.loads(node.cli("status", "--json", "--audit").stdout)["associations"]
    verdicts = {(a["calling_ae_title"], a["accepted"]) for a in audit}
    assert verdicts == {("INTRUDER", False), ("PACS", True), ("CT_SCANNER", True)}
    [rejected] = [a for a in audit if not a["accepted"]]
    assert "'INTRUDER' from 127.0.0.1 is not on the allow-list" in rejected["reason"]


def test_allow_list_with_another_host_rejects_loopback(start_node) -> None:
    node = start_node(node={"allowed_callers": ["PACS@192.0.2.10"]})
    assoc = associate(node, calling="PACS")
    assert assoc.is_rejected


def test_association_limit_rejects_the_extra_caller(start_node) -> None:
    node = start_node(node={"max_associations": 1})
    first = associate(node, calling="FIRST")
    try:
        assert first.is_established
        second = associate(node, calling="SECOND")
        assert second.is_rejected
    finally:
        first.release()
    third = associate(node, calling="THIRD")
    assert third.is_established
    third.release()
    audit = json.loads(node.cli("status", "--json", "--audit").stdout)["associations"]
    [limited] = [a for a in audit if a["calling_ae_title"] == "SECOND"]
    assert not limited["accepted"] and "association limit of 1 reached" in limited["reason"]


def test_below_the_disk_watermark_stores_answer_out_of_resources(start_node, ct_file: Path) -> None:
    node = start_node(storage={"min_free_mb": 10**9})
    response = store_file(node, ct_file)
    assert response.status == 0xA700
    assert stored(node) == []
    assert "below" in node.log() and "refusing" in node.log()


def test_really_full_disk_answers_out_of_resources_and_keeps_what_was_acknowledged(start_node, tmp_path: Path) -> None:
    storage = tmp_path / "small-disk"
    storage.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(storage)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        node = start_node(storage={"path": str(storage), "min_free_mb": 0})
        files = write_ct_series(tmp_path / "big", n_slices=12, size=256, seed=2)  # 130 kB each, 1 MB disk
        statuses = [store_file(node, path).status for path in files]
        assert 0xA700 in statuses, statuses
        acknowledged = [p for p, status in zip(files, statuses) if status == 0]
        assert acknowledged, "some instances fit before the disk filled up"
        on_disk = {pydicom.dcmread(p).SOPInstanceUID for p in storage.rglob("*.dcm")}
        assert {pydicom.dcmread(p).SOPInstanceUID for p in acknowledged} <= on_disk
        assert not list(storage.rglob(".*.tmp")), "no partial file left after ENOSPC"
        assert node_is_alive(node)
        node.stop()
    finally:
        subprocess.run(["umount", str(storage)], capture_output=True)


def test_config_with_a_typo_is_refused_at_start(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("node:\n  prot: 104\nseries:\n  quiet_seconds: -5\n")
    for command in ("serve", "check", "status"):
        result = subprocess.run([*PE_NODE, command, "--config", str(config)], capture_output=True, text=True,
                                timeout=60, cwd=REPO)
        assert result.returncode == 2, command
        assert "node.prot: unknown key (did you mean 'port'?)" in result.stderr
        assert "series.quiet_seconds: Input should be greater than 0" in result.stderr


def test_send_to_a_node_that_is_down_reports_failure(tmp_path: Path, ct_file: Path) -> None:
    from tests.peers import free_port

    result = subprocess.run([*PE_NODE, "send", str(ct_file), "--to", f"PE_NODE@127.0.0.1:{free_port()}"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1 and "no association" in result.stderr


