"""Crash and stop while a series streams in: every acknowledged instance survives, and the series completes once."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config

from tests.dicom_factory import write_ct_series
from tests.integration.conftest import needs_dcmtk
from tests.peers import NodeProcess, run_dcmtk, wait_until


class Streamer(threading.Thread):
    """Sends files one C-STORE at a time over one association, remembering which ones got success."""

    def __init__(self, port: int, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.port, self.files = port, files
        self.acknowledged: list[str] = []

    def run(self) -> None:
        _config.STORE_SEND_CHUNKED_DATASET = True
        ae = AE(ae_title="STREAMER")
        ae.add_requested_context(pydicom.uid.CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", self.port, ae_title="PE_NODE")
        if not assoc.is_established:
            return
        for path in self.files:
            try:
                response = assoc.send_c_store(path)
            except Exception:
                break
            if "Status" not in response or not assoc.is_established:
                break
            if response.Status == 0:
                self.acknowledged.append(str(read_file_meta_info(path).MediaStorageSOPInstanceUID))
        if assoc.is_established:
            assoc.release()


def dataset_part(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[144 + int.from_bytes(raw[140:144], "little"):]


def recorded_uids(node: NodeProcess) -> set[str]:
    with sqlite3.connect(node.root / "pe-node.db") as connection:
        return {row[0] for row in connection.execute("SELECT sop_instance_uid FROM instances")}


def assert_all_acknowledged_kept(node: NodeProcess, acknowledged: list[str], sources: dict[str, Path]) -> None:
    stored = {p.stem: p for p in (node.root / "dicom").rglob("*.dcm")}
    missing = [uid for uid in acknowledged if uid not in stored]
    assert not missing, f"{len(missing)} acknowledged instances lost on disk"
    for uid in acknowledged:
        assert dataset_part(stored[uid]) == dataset_part(sources[uid]), f"{uid} stored damaged"
    assert set(acknowledged) <= recorded_uids(node), "acknowledged instances lost from the database"


@pytest.fixture(scope="module")
def series_200(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("stream"), n_slices=200, size=512, seed=11)


def stream_until(node: NodeProcess, files: list[Path], acknowledged: int) -> Streamer:
    streamer = Streamer(node.port, files)
    streamer.start()
    wait_until(lambda: len(streamer.acknowledged) >= acknowledged, timeout=120, interval=0.005,
               what=f"{acknowledged} acknowledged instances")
    return streamer


@needs_dcmtk
def test_kill_9_mid_series_loses_nothing_acknowledged(start_node, series_200: list[Path]) -> None:
    sources = {str(read_file_meta_info(p).MediaStorageSOPInstanceUID): p for p in series_200}
    node = start_node(series={"quiet_seconds": 1.0, "min_instances": 30})
    streamer = stream_until(node, series_200, acknowledged=70)
    node.kill()
    streamer.join(30)
    assert 70 <= len(streamer.acknowledged) < 200, "the crash came mid-series"

    node.start()
    assert_all_acknowledged_kept(node, streamer.acknowledged, sources)
    resent = run_dcmtk("storescu", "-aec", "PE_NODE", "127.0.0.1", str(node.port), *map(str, series_200))
    assert resent.returncode == 0, resent.stderr
    status = wait_until(lambda: (s := node.status())["jobs"] and s, timeout=60, what="a queued job")
    time.sleep(2)  # a second sweep must not queue the series again
    status = node.status()
    [series] = status["series"]
    assert (series["state"], series["instances"]) == ("deciding", 200)
    assert [(job["state"], job["instances"]) for job in status["jobs"]] == [("queued", 200)]


def test_sigterm_mid_series_answers_in_flight_and_keeps_everything(start_node, series_200: list[Path]) -> None:
    sources = {str(read_file_meta_info(p).MediaStorageSOPInstanceUID): p for p in series_200}
    node = start_node(series={"quiet_seconds": 3600})
    streamer = stream_until(node, series_200, acknowledged=40)
    assert node.stop(timeout=30) == 0, node.log()
    streamer.join(30)
    assert "stopped" in node.log()
    assert_all_acknowledged_kept(node, streamer.acknowledged, sources)
