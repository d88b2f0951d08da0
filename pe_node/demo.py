"""``make demo``: the whole loop in a minute, against the node that ``make run`` started.

Generates one synthetic CTPA with a pulmonary embolism (a phantom from ``training.phantoms.generator``), sends it to the
node over DICOM, waits for the analysis and its delivery, and prints the findings: PE yes or no with its
probability, location, chronicity, RV/LV, the key slices, and where the SR and the secondary captures were
written (the folder destination), saving each secondary capture as a PNG beside it for a quick look. Each run
makes a new study (the seed comes from the clock unless given), so the node analyses it afresh.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select

from pe_node import storage
from pe_node.config import Config, FolderDestination, load_config
from pe_node.db import Database, Delivery, DeliveryState, Job, JobState, Series, Study
from pe_node.dicom.scu import Peer, send_files
from pe_node.findings import THRESHOLD, ExamResult, clinical_course
from pe_node.jobs.result import JobResult

SLICES = (100, 120)
SIZE = 512


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pe-node-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--seed", type=int, default=None, help="phantom seed (default: from the clock)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the results")
    args = parser.parse_args(argv)
    config = load_config(args.config if args.config.is_file() else None)
    seed = args.seed if args.seed is not None else int(time.time())
    work = Path(config.storage.path).parent / "demo"
    files, truth = make_phantom(work / f"phantom-{seed}", seed)
    peer = Peer(config.node.ae_title, "127.0.0.1" if config.node.host in ("0.0.0.0", "::") else config.node.host,
                config.node.port)
    print(f"sending a {len(files)}-slice synthetic CTPA with a pulmonary embolism ({truth}) to {peer} ...")
    started = time.monotonic()
    sent = send_files(files, peer, calling_ae_title="PE_DEMO")
    refused = [s for s in sent if not s.ok]
    if refused:
        print(f"the node refused {len(refused)} of {len(sent)} instances: {refused[0].error}; is `make run` "
              "running?", file=sys.stderr)
        return 1
    series_uid = _series_uid(files[0])
    db = Database(config.database.url, migrate=False)
    try:
        job = wait_for_results(db, series_uid, args.timeout)
    finally:
        db.dispose()
    if job is None:
        print(f"no result after {args.timeout:.0f} s: see `pe-node status`", file=sys.stderr)
        return 1
    print(f"results in {time.monotonic() - started:.1f} s after the first image was sent\n")
    print(describe(job, config, work / f"phantom-{seed}"))
    return 0 if job["state"] == "done" else 1


def make_phantom(folder: Path, seed: int) -> tuple[list[Path], str]:
    """One positive phantom study at 512 px written under ``folder``; its files and a note of what it holds."""
    from training.phantoms.generator import (
        ExamClass,
        exam_class,
        plan_study,
        write_study,
    )

    index = next(i for i in range(40) if exam_class(seed, i) is ExamClass.POSITIVE)
    plan = plan_study(seed, index, slices=SLICES, size=SIZE)
    write_study(plan, folder)
    sides = [name for name, label in (("central", "central_pe"), ("left", "leftsided_pe"),
                                      ("right", "rightsided_pe")) if plan.labels[label]]
    truth = f"truth: {'+'.join(sides)}, {int(plan.pe_present.sum())} slices with clot"
    return sorted(folder.rglob("*.dcm")), truth


def _series_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def wait_for_results(db: Database, series_uid: str, timeout: float) -> dict[str, Any] | None:
    """The newest finished job of the series' study once its deliveries are done (or failed), else None after
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.session() as session:
            job = session.scalars(
                select(Job).join(Study, Study.id == Job.study_id)
                .join(Series, Series.study_instance_uid == Study.study_instance_uid)
                .where(Series.series_instance_uid == series_uid).order_by(Job.id.desc())
            ).first()
            if job is not None and job.state in (JobState.DONE, JobState.FAILED):
                pending = session.scalar(
                    select(Delivery.id).where(Delivery.job_id == job.id, Delivery.state == DeliveryState.PENDING)
                )
                if pending is None:
                    return {"id": job.id, "state": job.state.value, "error": job.error, "result": job.result or {},
                            "timings": job.timings or {}}
        time.sleep(0.5)
    return None


def describe(job: dict[str, Any], config: Config, work: Path) -> str:
    """The findings and the files, as a reader would want them."""
    if job["state"] != "done":
        return f"job {job['id']} failed: {job['error']}"
    result = JobResult.from_json(job["result"])
    report = result.primary
    if report is None:
        return "nothing new: the study's earlier report stands"
    if report.outcome is ExamResult.NOT_ANALYSED:
        return f"not analysed: {report.detail}"
    exam = report.exam
    lines = [
        f"PE: {'YES' if report.positive else 'no'} (probability {report.pe_probability or 0.0:.2f}, "
        f"{report.outcome.value})  [demonstration weights: not for clinical use]",
        "location: " + ", ".join(f"{name} {exam[label]:.2f}" for name, label in
                                 (("central", "central_pe"), ("left", "leftsided_pe"), ("right", "rightsided_pe"))),
        f"chronicity: {clinical_course(exam).value.replace('_', '-')} (chronic {exam['chronic_pe']:.2f}, "
        f"acute-on-chronic "
        f"{exam['acute_and_chronic_pe']:.2f})",
        f"RV/LV >= 1: {'yes' if exam['rv_lv_ratio_gte_1'] > THRESHOLD else 'no'} ({exam['rv_lv_ratio_gte_1']:.2f})",
    ]
    images = {image.sop_instance_uid: (k, image.pe_present_on_image) for k, image in enumerate(report.images)}
    keys = [f"slice {images[uid][0] + 1} (p {images[uid][1]:.2f})" for uid in report.key_slices]
    lines.append("key slices: " + (", ".join(keys) if keys else "none"))
    timings = job["timings"]
    lines.append("timings: " + ", ".join(f"{phase} {timings[phase]:.2f} s" for phase in
                                         ("load", "inference", "report", "total") if phase in timings))
    lines.append("")
    lines.extend(_written(result, config, work))
    return "\n".join(lines)


def _written(result: JobResult, config: Config, work: Path) -> list[str]:
    import pydicom

    folders = [d for d in config.destinations if isinstance(d, FolderDestination)]
    lines = []
    for item in result.objects:
        ds = pydicom.dcmread(item.path)
        kind = {"SR": "structured report", "KO": "key object selection", "PR": "presentation state"}.get(
            ds.Modality, "secondary capture")
        where = [storage.instance_path(d.path, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
                 for d in folders]
        lines.append(f"{kind}: {where[0] if where else item.path}")
        if "PixelData" in ds and ds.get("SamplesPerPixel") == 3:
            png = work / f"capture-{ds.InstanceNumber}.png"
            Image.fromarray(np.asarray(ds.pixel_array, dtype=np.uint8)).save(png)
            lines.append(f"  as PNG: {png}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
