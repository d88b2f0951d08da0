"""Metrics, health, JSON logs without patient identity, and the status page in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest

from tests.dicom_factory import write_ct_series
from tests.integration.conftest import needs_dcmtk
from tests.integration.test_results import delivered, finished_jobs, send, working_node

pytestmark = needs_dcmtk


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{{{wanted}}} not exposed"
    return float(match.group(1))


@pytest.fixture
def analysed(start_node, tiny_checkpoint: Path, tmp_path: Path):
    node = working_node(start_node, tiny_checkpoint, [{"type": "folder", "name": "outbox",
                                                      "path": str(tmp_path / "outbox")}],
                        logging={"level": "INFO", "json": True})
    series = write_ct_series(tmp_path / "ctpa", n_slices=40, size=96, seed=31)
    send(node, series)
    finished_jobs(node)
    delivered(node)
    return node, series


def test_metrics_count_every_stage_and_time_every_phase(analysed) -> None:
    node, series = analysed
    status, text = fetch(node.web_url() + "metrics")
    assert status == 200
    assert metric(text, "pe_node_instances_received_total", outcome="stored") == len(series)
    assert metric(text, "pe_node_associations_total", result="accepted") >= 1
    assert metric(text, "pe_node_series_completed_total", routing="deciding") == 1
    for phase in ("receive_to_complete", "queue_wait", "load", "inference", "report", "delivery"):
        assert metric(text, "pe_node_phase_seconds_count", phase=phase) >= 1, phase
    assert metric(text, "pe_node_jobs", state="done") == 1
    assert metric(text, "pe_node_deliveries_by_state", state="done") >= 1
    assert metric(text, "pe_node_deliveries_by_state", state="failed") == 0
    assert metric(text, "pe_node_storage_free_bytes") > 0


def test_health_and_status_json(analysed) -> None:
    node, series = analysed
    status, body = fetch(node.web_url() + "healthz")
    assert status == 200 and json.loads(body) | {"database": "ok", "receiver": "listening"} == json.loads(body)
    status, body = fetch(node.web_url() + "api/status")
    report = json.loads(body)
    assert report["jobs"][0]["state"] == "done"
    assert fetch(node.web_url() + "nothing-here")[0] == 404


def test_logs_are_json_and_never_name_the_patient(analysed) -> None:
    node, series = analysed
    header = pydicom.dcmread(series[0], stop_before_pixels=True)
    lines = [line for line in node.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any("job 1 for study" in r["message"] for r in records)
    log = node.log()
    assert str(header.PatientName) not in log and "Phantom" not in log
    assert f'"{header.PatientID}"' not in log and f" {header.PatientID} " not in log


chromium = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.peer("chromium")
def test_status_page_renders_in_headless_chromium(analysed, tmp_path: Path) -> None:
    node, series = analysed
    url = node.web_url()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=60)
    assert "pe-node status" in dom.stdout
    series_uid = pydicom.dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID
    assert series_uid in dom.stdout and "not for diagnostic use" in dom.stdout
    assert re.search(r'<span class="state done">done</span>', dom.stdout)
    screenshot = tmp_path / "status.png"
    subprocess.run([chromium, *flags, "--window-size=1280,900", f"--screenshot={screenshot}", url],
                   capture_output=True, text=True, timeout=60)
    assert screenshot.stat().st_size > 10_000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
