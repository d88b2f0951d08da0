"""End to end: a CTPA series sent to pe-node comes back into PACS as SR and secondary captures.

Real peers throughout: DCMTK storescu sends, Orthanc (the PACS, checked through its REST API) and DCMTK storescp
receive, and the worker runs a tiny random-weight model from a real checkpoint file.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.dicom_factory import make_ct_dataset, phantom_slice, write_ct_series
from tests.integration.conftest import needs_dcmtk, needs_dicom3tools, needs_orthanc
from tests.peers import (
    NodeProcess,
    Orthanc,
    StoreSCP,
    free_port,
    kill_mid_job,
    node_config,
    run_dcmtk,
    wait_until,
)

pytestmark = needs_dcmtk

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


def working_node(start_node, checkpoint: Path, destinations: list[dict[str, Any]], **sections: Any) -> NodeProcess:
    settings: dict[str, Any] = {
        "series": {"quiet_seconds": 1.0, "min_instances": 30, "sweep_seconds": 0.2},
        "model": {"checkpoint": str(checkpoint), "device": "cpu", "batch_size": 16},
        "worker": {"enabled": True, "lease_seconds": 30, "max_attempts": 2, "poll_seconds": 0.2},
        "destinations": destinations,
        "outputs": {"secondary_capture": {"enabled": True, "max_images": 2, "for_negative": True},
                    "key_object_selection": True},
        "delivery": {"initial_backoff_seconds": 1, "max_backoff_seconds": 2},
    }
    for name, values in sections.items():
        settings[name] = {**settings.get(name, {}), **values} if isinstance(values, dict) else values
    return start_node(**settings)


def send(node: NodeProcess, files: list[Path]) -> None:
    result = run_dcmtk("storescu", "-aec", "PE_NODE", "127.0.0.1", str(node.port), *map(str, files))
    assert result.returncode == 0, result.stderr


def finished_jobs(node: NodeProcess, count: int = 1, timeout: float = 90) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status = node.status()
        ended = [j for j in status["jobs"] if j["state"] in ("done", "failed")]
        return status if len(ended) >= count else None

    return wait_until(done, timeout=timeout, interval=0.3, what=f"{count} finished jobs")


def delivered(node: NodeProcess, timeout: float = 60) -> dict[str, Any]:
    def all_done() -> dict[str, Any] | None:
        status = node.status()
        return status if status["deliveries"] and all(d["state"] == "done" for d in status["deliveries"]) else None

    return wait_until(all_done, timeout=timeout, interval=0.3, what="every delivery done")


def orthanc_series(pacs: Orthanc, study_uid: str) -> dict[str, str]:
    """SOP Class UID of each instance Orthanc holds in the study, keyed by SOP Instance UID."""
    found = {}
    for study in pacs.get("/studies?expand"):
        if study["MainDicomTags"]["StudyInstanceUID"] != study_uid:
            continue
        for instance in pacs.get(f"/studies/{study['ID']}/instances?expand"):
            tags = pacs.get(f"/instances/{instance['ID']}/simplified-tags")
            found[tags["SOPInstanceUID"]] = tags["SOPClassUID"]
    return found


@pytest.fixture
def ctpa(tmp_path: Path) -> list[Path]:
    return write_ct_series(tmp_path / "ctpa", n_slices=40, size=128, seed=21)


@needs_orthanc
def test_series_ends_up_in_orthanc_storescp_and_folder(start_node, tiny_checkpoint: Path, ctpa: list[Path],
                                                       tmp_path: Path) -> None:
    with Orthanc(tmp_path / "orthanc") as pacs, StoreSCP(tmp_path / "storescp") as scp:
        node = working_node(start_node, tiny_checkpoint, [
            {"type": "dicom", "name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port},
            {"type": "dicom", "name": "scp", "ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port},
            {"type": "folder", "name": "outbox", "path": str(tmp_path / "outbox")},
        ])
        send(node, ctpa)
        status = finished_jobs(node)
        [job] = status["jobs"]
        assert job["state"] == "done", job["error"]
        result = job["result"]
        assert result["outcome"] in ("positive", "negative", "indeterminate")
        highest = max(image["pe_present_on_image"] for image in result["images"])
        head = (1 - result["exam"]["negative_exam_for_pe"]) * (1 - result["exam"]["indeterminate"])
        assert result["pe_probability"] == pytest.approx(highest if highest > 0.5 else min(highest, head), abs=1e-5)
        assert (result["pe_probability"] > 0.5) == (result["outcome"] == "positive")
        assert len(result["images"]) == 40 and abs(sum(result["attention"]) - 1) < 1e-3
        assert set(result["exam"]) >= {"negative_exam_for_pe", "rv_lv_ratio_gte_1"}
        assert {"load", "inference", "report", "total"} <= set(job["timings"])
        status = delivered(node)
        objects = {o["sop_instance_uid"]: o["sop_class_uid"] for o in result["objects"]}
        assert 1 <= list(objects.values()).count(SC_CLASS) <= 2 and SR_CLASS in objects.values()
        assert KOS_CLASS in objects.values()
        assert {(d["destination"], d["sop_instance_uid"]) for d in status["deliveries"]} == {
            (name, uid) for name in ("pacs", "scp", "outbox") for uid in objects}
        study_uid = pydicom.dcmread(ctpa[0], stop_before_pixels=True).StudyInstanceUID
        in_pacs = orthanc_series(pacs, study_uid)
        assert {uid: cls for uid, cls in in_pacs.items() if uid in objects} == objects
    scp_files = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (tmp_path / "storescp").iterdir()}
    assert scp_files == set(objects)
    folder = {p.stem for p in (tmp_path / "outbox").rglob("*.dcm")}
    assert folder == set(objects)


@needs_orthanc
def test_orthanc_down_at_first_gets_everything_once_it_is_up(start_node, tiny_checkpoint: Path, ctpa: list[Path],
                                                             tmp_path: Path) -> None:
    port = free_port()
    node = working_node(start_node, tiny_checkpoint, [
        {"type": "dicom", "name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": port}])
    send(node, ctpa)
    finished_jobs(node)
    pending = wait_until(lambda: [d for d in node.status()["deliveries"] if d["attempts"] >= 2], timeout=30,
                         what="failed attempts while the PACS is down")
    assert all(d["state"] == "pending" and "no association" in d["error"] for d in pending)
    with Orthanc(tmp_path / "orthanc", dicom_port=port) as pacs:
        status = delivered(node)
        objects = {d["sop_instance_uid"] for d in status["deliveries"]}
        study_uid = pydicom.dcmread(ctpa[0], stop_before_pixels=True).StudyInstanceUID
        assert objects <= set(orthanc_series(pacs, study_uid))
        assert pacs.get("/statistics")["CountInstances"] == len(objects)


@needs_dicom3tools
def test_delivered_objects_pass_dciodvfy_and_dsrdump(start_node, tiny_checkpoint: Path, ctpa: list[Path],
                                                     tmp_path: Path) -> None:
    node = working_node(start_node, tiny_checkpoint, [
        {"type": "folder", "name": "outbox", "path": str(tmp_path / "outbox")}])
    send(node, ctpa)
    finished_jobs(node)
    delivered(node)
    files = list((tmp_path / "outbox").rglob("*.dcm"))
    assert files
    for path in files:
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"
        if pydicom.dcmread(path, stop_before_pixels=True).Modality == "SR":
            dump = run_dcmtk("dsrdump", str(path))
            assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr


def unsuitable_series(kind: str, folder: Path) -> list[Path]:
    if kind == "missing slices":
        files = write_ct_series(folder, n_slices=45, size=64, seed=3)
        for path in files[20:25]:
            path.unlink()
        return files[:20] + files[25:]
    if kind == "not axial":
        return write_ct_series(folder, n_slices=40, size=64, seed=3, orientation=(1, 0, 0, 0, 0, -1))
    if kind == "mixed sizes":
        files = write_ct_series(folder, n_slices=40, size=64, seed=3)
        ds = pydicom.dcmread(files[7])
        other = make_ct_dataset(phantom_slice(7, 40, 32), position=ds.ImagePositionPatient,
                                study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                                sop_uid=ds.SOPInstanceUID)
        other.save_as(files[7], enforce_file_format=True)
        return files
    if kind == "corrupt pixel data":
        files = write_ct_series(folder, n_slices=40, size=64, seed=3)
        ds = pydicom.dcmread(files[3])
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        ds.save_as(files[3], enforce_file_format=True)
        return files
    raise ValueError(kind)


@pytest.mark.parametrize(
    ("kind", "reason", "detail"),
    [
        ("missing slices", "inconsistent_spacing", "missing slices?"),
        ("not axial", "not_axial", "not an axial series"),
        ("mixed sizes", "no_usable_series", "32x32"),
        ("corrupt pixel data", "unreadable", ""),
    ],
)
def test_bad_series_get_a_not_analysed_report_and_the_worker_lives_on(
        start_node, tiny_checkpoint: Path, tmp_path: Path, ctpa: list[Path], kind: str, reason: str,
        detail: str) -> None:
    node = working_node(start_node, tiny_checkpoint, [
        {"type": "folder", "name": "outbox", "path": str(tmp_path / "outbox")}])
    send(node, unsuitable_series(kind, tmp_path / "bad"))
    [job] = finished_jobs(node)["jobs"]
    assert job["state"] == "done", job["error"]
    assert (job["result"]["outcome"], job["result"]["reason"]) == ("not_analysed", reason)
    assert detail in job["result"]["detail"]
    sr = pydicom.dcmread(job["result"]["sr_path"])
    assert sr.Modality == "SR" and "Not Evaluated" in str(sr.ContentSequence)
    send(node, ctpa)
    jobs = finished_jobs(node, count=2)["jobs"]
    assert jobs[0]["state"] == "done" and jobs[0]["result"]["outcome"] != "not_analysed", "the worker lived on"


def test_late_instance_gives_a_new_report_that_supersedes_the_first(start_node, tiny_checkpoint: Path,
                                                                    ctpa: list[Path], tmp_path: Path) -> None:
    node = working_node(start_node, tiny_checkpoint, [
        {"type": "folder", "name": "outbox", "path": str(tmp_path / "outbox")}])
    send(node, ctpa[:-1])
    [first] = finished_jobs(node)["jobs"]
    send(node, ctpa[-1:])
    jobs = finished_jobs(node, count=2)["jobs"]
    second = jobs[0]
    assert second["id"] != first["id"] and len(second["result"]["images"]) == 40
    old_sr = pydicom.dcmread(first["result"]["sr_path"])
    new_sr = pydicom.dcmread(second["result"]["sr_path"])
    [predecessor] = new_sr.PredecessorDocumentsSequence
    assert predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        old_sr.SOPInstanceUID
    assert second["result"]["supersedes"] == [old_sr.SOPInstanceUID]


def test_worker_killed_mid_job_is_replaced_and_the_job_runs_again(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """serve --no-worker receives; a worker dies mid-job (kill -9); after the lease runs out another finishes it."""
    root = tmp_path / "node"
    config = node_config(root, free_port(),
                         series={"quiet_seconds": 0.5, "min_instances": 30, "sweep_seconds": 0.2},
                         model={"checkpoint": str(tiny_checkpoint), "device": "cpu", "batch_size": 1},
                         worker={"enabled": True, "lease_seconds": 6, "max_attempts": 3, "poll_seconds": 0.1})
    receiver = NodeProcess(root, config, args=("serve", "--no-worker")).start()
    first = NodeProcess(root, config, args=("worker",))
    second = NodeProcess(root, config, args=("worker",))
    try:
        series = write_ct_series(tmp_path / "big", n_slices=300, size=256, seed=8)
        send(receiver, series)
        first.start()
        assert kill_mid_job([first], config["database"]["url"], timeout=60)[2] == 1, "the first attempt was not killed"
        second.start()
        status = finished_jobs(receiver, timeout=120)
        [job] = status["jobs"]
        assert job["state"] == "done" and job["attempts"] == 2
    finally:
        for process in (first, second, receiver):
            process.stop()


def test_job_failing_every_attempt_ends_failed_with_its_error(start_node, tiny_checkpoint: Path, ctpa: list[Path],
                                                              tmp_path: Path) -> None:
    results = tmp_path / "results-blocker"
    results.write_text("a file where the results folder should be")
    node = working_node(start_node, tiny_checkpoint, [
        {"type": "folder", "name": "outbox", "path": str(tmp_path / "outbox")}], worker={"max_attempts": 2})
    (node.root / "dicom").mkdir(parents=True, exist_ok=True)
    shutil.copy(results, node.root / "dicom" / "results")
    send(node, ctpa)
    status = wait_until(lambda: (s := node.status())["jobs"] and s["jobs"][0]["state"] == "failed" and s,
                        timeout=60, what="the job failed")
    [job] = status["jobs"]
    assert job["attempts"] == 2
    assert "FileExistsError" in job["error"] or "NotADirectoryError" in job["error"]
    assert "failed" in node.cli("status").stdout


def test_resend_queues_a_jobs_objects_again_and_status_shows_them(start_node, tiny_checkpoint: Path,
                                                                   ctpa: list[Path], tmp_path: Path) -> None:
    node = working_node(start_node, tiny_checkpoint, [
        {"type": "folder", "name": "outbox", "path": str(tmp_path / "outbox")}])
    send(node, ctpa)
    [job] = finished_jobs(node)["jobs"]
    first = delivered(node)["deliveries"]
    shutil.rmtree(tmp_path / "outbox")
    result = node.cli("resend", str(job["id"]))
    assert result.returncode == 0 and f"job {job['id']}: {len(first)} deliveries queued again" in result.stdout
    again = delivered(node)["deliveries"]
    assert len(again) == len(first) and all(d["attempts"] == 1 for d in again)
    assert len(list((tmp_path / "outbox").rglob("*.dcm"))) == len(first)
    missing = node.cli("resend", "999")
    assert missing.returncode == 1 and "job 999 has no result objects" in missing.stderr
