"""Whole studies as scanners and PACS send them: one result per exam, from the series the rules choose.

A CTPA exam (tests/study_factory.py: topogram, non-contrast scan, thin CTA, thick CTA reconstruction, coronal MPR,
dose report) goes to pe-node series by series with DCMTK storescu, or all at once from Orthanc; exactly one SR comes
back, made from the thin CTA, and the status says of every other series why it was not analysed. A better series
arriving after the report supersedes it; a worse one changes nothing in PACS. The same CTA sent as one Enhanced CT
instance gives the same findings as the classic series.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.dicom_factory import phantom_volume
from tests.integration.conftest import needs_dcmtk
from tests.peers import NodeProcess, Orthanc, run_dcmtk, wait_until
from tests.study_factory import Study, write_enhanced, write_study

pytestmark = needs_dcmtk

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SLICES, SIZE = 60, 64


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return phantom_volume(n_slices=SLICES, size=SIZE, seed=11)


def working_node(start_node, checkpoint: Path, destinations: list[dict[str, Any]], **sections: Any) -> NodeProcess:
    settings: dict[str, Any] = {
        "series": {"quiet_seconds": 1.0, "min_instances": 15, "sweep_seconds": 0.2},
        "study": {"quiet_seconds": 2.5},
        "model": {"checkpoint": str(checkpoint), "device": "cpu", "batch_size": 16},
        "worker": {"enabled": True, "lease_seconds": 30, "max_attempts": 2, "poll_seconds": 0.2},
        "destinations": destinations,
        "outputs": {"secondary_capture": {"enabled": True, "max_images": 1, "for_negative": True}},
        "delivery": {"initial_backoff_seconds": 1, "max_backoff_seconds": 2},
    }
    for name, values in sections.items():
        settings[name] = {**settings.get(name, {}), **values}
    return start_node(**settings)


def send(node: NodeProcess, files: list[Path]) -> None:
    result = run_dcmtk("storescu", "-aec", "PE_NODE", "127.0.0.1", str(node.port), *map(str, files))
    assert result.returncode == 0, result.stderr


def settled(node: NodeProcess, jobs: int, timeout: float = 120) -> dict[str, Any]:
    """The status once ``jobs`` jobs ended, no job waits, no series is undecided and every delivery is done."""
    def done() -> dict[str, Any] | None:
        status = node.status()
        ended = [j for j in status["jobs"] if j["state"] in ("done", "failed")]
        waiting = [j for j in status["jobs"] if j["state"] in ("queued", "running")]
        undecided = [s for s in status["series"] if s["state"] in ("receiving", "quiet", "deciding")]
        pending = [d for d in status["deliveries"] if d["state"] != "done"]
        return status if len(ended) >= jobs and not waiting and not undecided and not pending else None

    return wait_until(done, timeout=timeout, interval=0.3, what=f"{jobs} finished jobs, everything decided")


def series_states(status: dict[str, Any], study: Study) -> dict[str, tuple[str, str | None]]:
    names = {uid: name for name, uid in study.series_uids.items()}
    return {names[s["series_instance_uid"]]: (s["state"], s["reason"]) for s in status["series"]
            if s["series_instance_uid"] in names}


def outbox_srs(folder: Path) -> list[pydicom.Dataset]:
    found = [pydicom.dcmread(p) for p in folder.rglob("*.dcm")]
    return [ds for ds in found if ds.SOPClassUID == SR_CLASS]


def analysed_series(sr: pydicom.Dataset) -> set[str]:
    """The series the SR's evidence names: what it was made from."""
    return {str(series.SeriesInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence}


def test_a_whole_study_sent_series_by_series_gives_one_report_from_the_thin_cta(
        start_node, tiny_checkpoint: Path, tmp_path: Path, volume: np.ndarray) -> None:
    study = write_study(tmp_path / "study", volume)
    outbox = tmp_path / "outbox"
    node = working_node(start_node, tiny_checkpoint, [{"type": "folder", "name": "outbox", "path": str(outbox)}])
    for name in ("topogram", "precontrast", "cta", "cta_thick", "mpr", "dose"):
        send(node, study.series[name])
        time.sleep(0.3)  # a scanner sends one series after another; the study is quiet only after the last
    status = settled(node, jobs=1)
    [job] = status["jobs"]
    assert job["state"] == "done", job["error"]
    assert job["series_instance_uid"] == study.series_uids["cta"] and job["study_instance_uid"] == \
        study.study_instance_uid
    [report] = job["result"]["reports"]
    assert report["series_instance_uid"] == study.series_uids["cta"] and len(report["images"]) == SLICES
    [sr] = outbox_srs(outbox)
    assert analysed_series(sr) == {study.series_uids["cta"]}
    states = series_states(status, study)
    assert states["cta"] == ("analysed", None)
    analysed = "; series 3 (1.25 mm, 60 slices) was analysed"
    assert states["topogram"] == ("ignored", "no image to analyse: localizer")
    assert states["precontrast"] == ("not_chosen", "no contrast (no ContrastBolusAgent, where series 3 (1.25 mm, 60 "
                                                   "slices) names Omnipaque 350)" + analysed)
    assert states["cta_thick"] == ("not_chosen", "a 3.75 mm reconstruction, thicker than 3 mm" + analysed)
    assert states["mpr"] == ("not_chosen", "a reformat (DERIVED\\SECONDARY\\REFORMATTED)" + analysed)
    assert states["dose"] == ("ignored", "modality SR is not routed (series.modalities: CT)")
    with urllib.request.urlopen(node.web_url() + "api/status", timeout=10) as response:
        page = json.loads(response.read())
    assert series_states(page, study) == states
    with urllib.request.urlopen(node.web_url(), timeout=10) as response:
        assert "a 3.75 mm reconstruction, thicker than 3 mm" in response.read().decode()


@pytest.mark.peer("orthanc")
def test_orthanc_routing_a_whole_study_gets_one_report_back(start_node, tiny_checkpoint: Path, tmp_path: Path,
                                                            volume: np.ndarray) -> None:
    study = write_study(tmp_path / "study", volume)
    with Orthanc(tmp_path / "orthanc") as pacs:
        node = working_node(start_node, tiny_checkpoint, [
            {"type": "dicom", "name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
             "port": pacs.dicom_port}])
        pacs.put_modality("pe_node", ["PE_NODE", "127.0.0.1", node.port])
        for files in study.series.values():
            for path in files:
                pacs.upload(path.read_bytes())
        [orthanc_study] = [s["ID"] for s in pacs.get("/studies?expand")
                           if s["MainDicomTags"]["StudyInstanceUID"] == study.study_instance_uid]
        pacs.post("/modalities/pe_node/store", json.dumps({"Resources": [orthanc_study], "Synchronous": True}))
        status = settled(node, jobs=1)
        assert [j["state"] for j in status["jobs"]] == ["done"]
        tags = [pacs.get(f"/instances/{i['ID']}/simplified-tags")
                for i in pacs.get(f"/studies/{orthanc_study}/instances")]
        reports = [t for t in tags if t["SOPClassUID"] == SR_CLASS]
        assert len(reports) == 1, "exactly one report for the exam"
        assert reports[0]["SOPInstanceUID"] in {o["sop_instance_uid"] for o in status["jobs"][0]["result"]["objects"]}
    assert series_states(status, study)["cta"] == ("analysed", None)


def test_a_better_series_arriving_late_supersedes_a_worse_one_changes_nothing(
        start_node, tiny_checkpoint: Path, tmp_path: Path, volume: np.ndarray) -> None:
    study = write_study(tmp_path / "study", volume, series=("cta_thick", "cta", "mpr"))
    outbox = tmp_path / "outbox"
    node = working_node(start_node, tiny_checkpoint, [{"type": "folder", "name": "outbox", "path": str(outbox)}],
                        series={"min_instances": 15})
    send(node, study.series["cta_thick"])
    first = settled(node, jobs=1)["jobs"][0]
    assert first["series_instance_uid"] == study.series_uids["cta_thick"], "the thick series, the only one yet"
    send(node, study.series["cta"])
    second = settled(node, jobs=2)["jobs"][0]
    [report] = second["result"]["reports"]
    assert report["series_instance_uid"] == study.series_uids["cta"]
    old_sr = pydicom.dcmread(first["result"]["sr_path"])
    new_sr = pydicom.dcmread(report["sr_path"])
    assert report["supersedes"] == [old_sr.SOPInstanceUID]
    [predecessor] = new_sr.PredecessorDocumentsSequence
    assert predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        old_sr.SOPInstanceUID
    delivered = {d["sop_instance_uid"] for d in node.status()["deliveries"]}
    send(node, study.series["mpr"])
    status = settled(node, jobs=3)
    third = status["jobs"][0]
    assert third["state"] == "done" and third["result"]["unchanged"] and third["result"]["reports"] == []
    assert {d["sop_instance_uid"] for d in status["deliveries"]} == delivered, "nothing new goes to PACS"
    assert len(outbox_srs(outbox)) == 2
    states = series_states(status, study)
    assert states["cta"] == ("analysed", None)
    assert states["mpr"][0] == "not_chosen" and states["mpr"][1].startswith("a reformat")
    assert states["cta_thick"][0] == "not_chosen"


def test_enhanced_ct_gives_the_findings_of_the_classic_series(start_node, tiny_checkpoint: Path, tmp_path: Path,
                                                              volume: np.ndarray) -> None:
    classic = write_study(tmp_path / "classic", volume, series=("cta",))
    enhanced_study_uid = generate_uid()
    enhanced = write_enhanced(tmp_path / "enhanced" / "ct.dcm", volume, study_uid=enhanced_study_uid,
                              series_uid="1.2.826.0.1.3680043.10.543.7")
    node = working_node(start_node, tiny_checkpoint, [
        {"type": "folder", "name": "outbox", "path": str(tmp_path / "outbox")}])
    send(node, classic.series["cta"])
    send(node, [enhanced])
    jobs = settled(node, jobs=2)["jobs"]
    by_study = {j["study_instance_uid"]: j for j in jobs}
    assert all(j["state"] == "done" for j in jobs), [j["error"] for j in jobs]
    [a] = by_study[classic.study_instance_uid]["result"]["reports"]
    [b] = by_study[enhanced_study_uid]["result"]["reports"]
    assert b["series_instance_uid"] == "1.2.826.0.1.3680043.10.543.7"
    for label, p in a["exam"].items():
        assert b["exam"][label] == pytest.approx(p, abs=1e-5)
    assert [i["pe_present_on_image"] for i in b["images"]] == pytest.approx(
        [i["pe_present_on_image"] for i in a["images"]], abs=1e-5)
    assert [i["frame"] for i in b["images"]] == list(range(SLICES, 0, -1)), "frames in position order"
    assert {i["sop_instance_uid"] for i in b["images"]} == {pydicom.dcmread(enhanced).SOPInstanceUID}
    assert b["outcome"] == a["outcome"] and b["pe_probability"] == pytest.approx(a["pe_probability"], abs=1e-5)
    references = list(image_references(pydicom.dcmread(b["sr_path"])))
    assert references and all(frame is not None and 1 <= frame <= SLICES for _, frame in references), \
        "the SR names the frame of every slice it references"
    assert {uid for uid, _ in references} == {pydicom.dcmread(enhanced).SOPInstanceUID}


def image_references(item: pydicom.Dataset):
    """(SOP Instance UID, frame number or None) of every image item in an SR content tree."""
    for child in item.get("ContentSequence", []):
        if child.get("ValueType") == "IMAGE":
            ref = child.ReferencedSOPSequence[0]
            frames = ref.get("ReferencedFrameNumber")
            yield str(ref.ReferencedSOPInstanceUID), int(frames) if frames is not None else None
        yield from image_references(child)


def test_analyse_all_reports_every_stack_the_rules_leave(start_node, tiny_checkpoint: Path, tmp_path: Path,
                                                        volume: np.ndarray) -> None:
    study = write_study(tmp_path / "study", volume, series=("cta", "cta_thick", "mpr"))
    outbox = tmp_path / "outbox"
    rules = [{"rule": name} for name in ("image", "not_localizer", "not_reformat", "volume", "axial", "min_slices")]
    node = working_node(start_node, tiny_checkpoint, [{"type": "folder", "name": "outbox", "path": str(outbox)}],
                        study={"analyse": "all", "rules": rules})
    send(node, [path for files in study.series.values() for path in files])
    status = settled(node, jobs=1)
    [job] = status["jobs"]
    assert {r["series_instance_uid"] for r in job["result"]["reports"]} == {
        study.series_uids["cta"], study.series_uids["cta_thick"]}
    assert {uid for sr in outbox_srs(outbox) for uid in analysed_series(sr)} == {
        study.series_uids["cta"], study.series_uids["cta_thick"]}
    states = series_states(status, study)
    assert states["cta"][0] == states["cta_thick"][0] == "analysed" and states["mpr"][0] == "not_chosen"
