"""Turnaround: from the last C-STORE response of a 300-slice 512x512 CTPA to the last result object stored at a
DCMTK storescp destination, with the time of each phase (quiet period, queue, load, inference, report, delivery).

The baseline, measured in the same run: the same series sent to Orthanc, which only considers a series complete
after its StableAge (60 s by default, as mercure); the MONAI Deploy Informatics Gateway waits 5 s. Those peers
have not started processing when pe-node has already delivered.

    .venv/bin/python bench/bench_turnaround.py [--checkpoint models/pe-demo.pt] [--random-size 256]

``--random-size N`` times a random-weight EfficientNet-B0 model at N px instead of a checkpoint (the speed of the
model does not depend on its weights).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.peers import (  # noqa: E402
    NodeProcess,
    Orthanc,
    StoreSCP,
    dcmtk_env,
    free_port,
    node_config,
    wait_until,
)

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO / "models" / "pe-demo.pt")
    parser.add_argument("--random-size", type=int, default=None, help="time a random-weight model at this size")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--quiet-seconds", type=float, default=5.0)
    parser.add_argument("--skip-orthanc", action="store_true", help="skip the 60 s Orthanc baseline")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pe-node-bench-turnaround-"))
    try:
        checkpoint = random_checkpoint(work, args.random_size) if args.random_size else args.checkpoint.resolve()
        run(work, checkpoint, args.slices, args.quiet_seconds, args.skip_orthanc)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def random_checkpoint(work: Path, size: int) -> Path:
    from pe_node.model import PreprocessConfig, create_model, save_checkpoint

    path = work / f"random-{size}.pt"
    save_checkpoint(path, create_model("pe_cnn_lstm").eval(), PreprocessConfig(size=size, crop="body"),
                    provenance={"data": "random weights for timing"}, half=True)
    return path


def phantom(folder: Path, seed: int, slices: int) -> list[Path]:
    from training.phantoms.generator import (
        ExamClass,
        exam_class,
        plan_study,
        write_study,
    )

    index = next(i for i in range(40) if exam_class(seed, i) is ExamClass.POSITIVE)
    write_study(plan_study(seed, index, slices=(slices, slices), size=512), folder)
    return sorted(folder.rglob("*.dcm"))


def storescu(aet: str, port: int, files: list[Path]) -> dt.datetime:
    """Send over one association; the UTC time the last response came back (storescu exits right after)."""
    result = subprocess.run(["storescu", "-aec", aet, "127.0.0.1", str(port), *map(str, files)], env=dcmtk_env(),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {aet} failed: {result.stderr[-400:]}")
    return dt.datetime.now(dt.UTC)


def run(work: Path, checkpoint: Path, slices: int, quiet: float, skip_orthanc: bool) -> None:
    print(f"writing a {slices}-slice 512x512 phantom CTPA (and a small warm-up series) ...", flush=True)
    series = phantom(work / "series", seed=2026, slices=slices)
    warmup = phantom(work / "warmup", seed=7, slices=40)
    megabytes = sum(p.stat().st_size for p in series) / 1e6
    root = work / "pe-node"
    with StoreSCP(work / "storescp") as pacs:
        config = node_config(
            root, free_port(),
            series={"quiet_seconds": quiet, "min_instances": 30, "sweep_seconds": 0.2},
            study={"quiet_seconds": quiet},  # one series a study: its study is quiet when the series is
            model={"checkpoint": str(checkpoint), "device": "auto", "batch_size": 32},
            worker={"enabled": True, "poll_seconds": 0.1},
            destinations=[{"type": "dicom", "name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                           "port": pacs.port}],
        )
        with NodeProcess(root, config) as node:
            storescu("PE_NODE", node.port, warmup)
            wait_for_job(root / "pe-node.db", 1)
            last_response = storescu("PE_NODE", node.port, series)
            job = wait_for_job(root / "pe-node.db", 2)
    print(f"\n{slices} slices, {megabytes:.0f} MB, quiet_seconds {quiet:g}, model {checkpoint.name} "
          f"({json.loads(job['result'])['model']['device']})")
    phases = phase_times(job, last_response)
    for name, seconds in phases.items():
        print(f"  {name:<26} {seconds:7.2f} s")
    total = phases["last response -> delivered"]
    print(f"pe-node: last C-STORE response to last result stored at the destination: {total:.2f} s "
          "(target < 15 s)")
    if skip_orthanc:
        return
    with Orthanc(work / "orthanc") as orthanc:
        sent = storescu(orthanc.ae_title, orthanc.dicom_port, series)
        stable = wait_until(lambda: orthanc_stable(orthanc), timeout=180, interval=0.25, what="Orthanc stable")
        waited = (stable - sent).total_seconds()
    print(f"Orthanc (StableAge default): series complete {waited:.1f} s after its last C-STORE response, "
          "before any processing starts")
    print(f"ratio pe-node turnaround / Orthanc time to stable: {total / waited:.2f}")


def wait_for_job(database: Path, count: int) -> dict:
    """The count-th job once it is done and all its deliveries are done."""

    def done() -> dict | None:
        with sqlite3.connect(database) as connection:
            connection.row_factory = sqlite3.Row
            jobs = connection.execute("SELECT * FROM jobs ORDER BY id").fetchall()
            if len(jobs) < count or jobs[count - 1]["state"] != "done":
                return None
            job = dict(jobs[count - 1])
            rows = connection.execute("SELECT state, delivered_at FROM deliveries WHERE job_id = ?",
                                      (job["id"],)).fetchall()
            if not rows or any(r["state"] != "done" for r in rows):
                return None
            job["delivered_at"] = max(r["delivered_at"] for r in rows)
            job["last_received_at"] = connection.execute(
                "SELECT last_received_at FROM series WHERE id = ?", (job["series_id"],)).fetchone()[0]
            return job

    return wait_until(done, timeout=600, interval=0.1, what=f"job {count} delivered")


def _utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def phase_times(job: dict, last_response: dt.datetime) -> dict[str, float]:
    timings = json.loads(job["timings"])
    created, started = _utc(job["created_at"]), _utc(job["started_at"])
    finished, delivered = _utc(job["finished_at"]), _utc(job["delivered_at"])
    return {
        "quiet period + sweep": (created - _utc(job["last_received_at"])).total_seconds(),
        "queue wait": (started - created).total_seconds(),
        "decide (headers, rules)": timings.get("decide", 0.0),
        "load (read + HU)": timings["load"],
        "inference": timings["inference"],
        **{f"  {name.removeprefix('inference_')}": seconds for name, seconds in timings.items()
           if name.startswith("inference_")},
        "report (SR, captures, GSPS)": timings["report"],
        "delivery (C-STORE)": (delivered - finished).total_seconds(),
        "last response -> delivered": (delivered - last_response).total_seconds(),
    }


def orthanc_stable(orthanc: Orthanc) -> dt.datetime | None:
    series = orthanc.get("/series")
    if series and orthanc.get(f"/series/{series[0]}")["IsStable"]:
        return dt.datetime.now(dt.UTC)
    time.sleep(0.05)
    return None


if __name__ == "__main__":
    main()
