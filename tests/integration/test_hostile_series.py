"""Series built to make the worker allocate what it cannot: refused as "not analysed: image too large" before any
pixel is allocated, with the node's memory and time bounded.

A slice's header can claim any Rows x Columns while its pixel data is tiny, and deflate or RLE turn a few bytes into
a 4096 x 4096 slice. The worker reads only headers to decide (``series.max_matrix``, ``series.max_megavoxels``), so
such a series costs it a few megabytes and a fraction of a second.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless, generate_uid

from tests.dicom_factory import make_ct_dataset
from tests.integration.conftest import needs_dcmtk
from tests.peers import NodeProcess, run_dcmtk, wait_until
from tests.raw_peer import reset_peak, usage

pytestmark = needs_dcmtk

SLICES = 10


def working_node(start_node, checkpoint: Path, **series: object) -> NodeProcess:
    return start_node(
        series={"quiet_seconds": 0.5, "min_instances": SLICES, "sweep_seconds": 0.2, **series},
        study={"quiet_seconds": 1.0},
        model={"checkpoint": str(checkpoint), "device": "cpu"},
        worker={"enabled": True, "poll_seconds": 0.2, "lease_seconds": 30, "max_attempts": 1},
    )


def write(folder: Path, rows: int, *, pixels: np.ndarray | None = None, syntax: str | None = None) -> list[Path]:
    """A series whose headers say ``rows`` x ``rows``; its pixels are ``pixels`` (tiny) or real zeros, encoded in
    ``syntax``."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    files = []
    for k in range(SLICES):
        hu = pixels if pixels is not None else np.full((rows, rows), -1000, dtype=np.int16)
        ds = make_ct_dataset(hu, position=(0.0, 0.0, 1.25 * k), study_uid=study, series_uid=series,
                             instance_number=k + 1, **({"transfer_syntax": syntax} if syntax == RLELossless else {}))
        ds.Rows = ds.Columns = rows
        path = folder / f"{k}.dcm"
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def analysed(node: NodeProcess, files: list[Path]) -> tuple[dict, float, float]:
    """Send, wait for the job; its result, the node's peak RSS growth (MB) and the job's time (s)."""
    pid = node.process.pid
    before = usage(pid)
    reset_peak(pid)
    started = time.monotonic()
    # dcmsend -dn: each file in its own transfer syntax (deflated, RLE), as a PACS forwards what it holds
    result = run_dcmtk("dcmsend", "-dn", "-aec", "PE_NODE", "127.0.0.1", str(node.port), *map(str, files))
    assert result.returncode == 0, result.stderr
    status = wait_until(lambda: (s := node.status())["jobs"] and s["jobs"][0]["state"] in ("done", "failed") and s,
                        timeout=120, interval=0.2, what="the job's end")
    [job] = status["jobs"]
    return job, usage(pid).peak_mb - before.rss_mb, time.monotonic() - started


@pytest.mark.parametrize("kind", ["65535 x 65535 claimed by tiny pixel data", "4096 x 4096 deflated",
                                  "4096 x 4096 RLE"])
def test_a_huge_matrix_is_not_analysed_and_nothing_is_allocated(start_node, tiny_checkpoint: Path, tmp_path: Path,
                                                               kind: str) -> None:
    if kind.startswith("65535"):
        files = write(tmp_path / "series", 65535, pixels=np.zeros((2, 2), dtype=np.int16))
    elif "deflated" in kind:
        files = write(tmp_path / "series", 4096, syntax=DeflatedExplicitVRLittleEndian)
    else:
        files = write(tmp_path / "series", 4096, syntax=RLELossless)
    node = working_node(start_node, tiny_checkpoint)
    job, grown_mb, seconds = analysed(node, files)
    assert job["state"] == "done", job["error"]
    report = job["result"]["reports"][0]
    assert (report["outcome"], report["reason"]) == ("not_analysed", "image_too_large")
    assert "series.max_matrix 2048" in report["detail"]
    assert grown_mb < 150, f"the node grew by {grown_mb:.0f} MB"
    assert seconds < 60
    print(f"\n{kind}: not analysed (image too large), node RSS +{grown_mb:.0f} MB, {seconds:.1f} s")


def test_more_voxels_than_series_max_megavoxels_are_not_analysed(start_node, tiny_checkpoint: Path,
                                                                 tmp_path: Path) -> None:
    files = write(tmp_path / "series", 512)
    node = working_node(start_node, tiny_checkpoint, max_megavoxels=2)
    job, grown_mb, seconds = analysed(node, files)
    report = job["result"]["reports"][0]
    assert (report["outcome"], report["reason"]) == ("not_analysed", "image_too_large")
    assert "3 megavoxels (series.max_megavoxels 2)" in report["detail"]
    assert grown_mb < 150 and seconds < 60
