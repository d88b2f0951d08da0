"""Receive speed: the same 300-slice 512x512 CT series sent with DCMTK storescu to pe-node, DCMTK storescp and
Orthanc, in one run, over one association and over 4 and 8 parallel associations (a scanner and PACS pushing at once).

pe-node runs as ``pe-node serve`` with its durable path (every file fsynced, renamed and its directory fsynced, its
row committed to SQLite with synchronous=FULL, before each success response; instances that arrive together share
the directory fsync and the commit). storescp writes files without fsync; Orthanc writes files and its SQLite index.
Each repetition sends a fresh copy of the series (new UIDs) to every receiver, in a rotating order; the medians are
printed with pe-node's time over each receiver's.

    .venv/bin/python bench/bench_ingest.py [--slices 300] [--repeats 3] [--associations 1 4 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.dicom_factory import write_ct_series  # noqa: E402
from tests.peers import (  # noqa: E402
    NodeProcess,
    Orthanc,
    StoreSCP,
    dcmtk_env,
    free_port,
    node_config,
)


def send(files: list[Path], ae_title: str, port: int, associations: int = 1) -> float:
    """Wall time of storescu sending ``files`` over ``associations`` parallel associations."""
    groups = [files[k::associations] for k in range(associations)]

    def one(group: list[Path]) -> None:
        result = subprocess.run(["storescu", "-aec", ae_title, "127.0.0.1", str(port), *map(str, group)],
                                env=dcmtk_env(), capture_output=True, text=True)
        if result.returncode != 0 or "E:" in result.stderr:
            raise RuntimeError(f"storescu to {ae_title} failed: {result.stderr[-500:]}")

    start = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        list(pool.map(one, groups))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pe-node-bench-ingest-"))
    try:
        run(work, args.slices, args.repeats, args.associations)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, slices: int, repeats: int, parallel: list[int]) -> None:
    copies = len(parallel) * repeats
    print(f"writing {copies} copies of a {slices}-slice 512x512 CT series ...", flush=True)
    series = []
    for k in range(copies):
        folder = work / f"series{k}"
        write_ct_series(folder, n_slices=slices, size=512, seed=k)
        series.append(sorted(folder.glob("*.dcm")))
    megabytes = sum(p.stat().st_size for p in series[0]) / 1e6
    node_root = work / "pe-node"
    config = node_config(node_root, free_port(), storage={"min_free_mb": 100}, series={"quiet_seconds": 3600},
                         node={"max_associations_per_host": max(parallel)})
    node = NodeProcess(node_root, config)
    with node, StoreSCP(work / "storescp-out") as scp, Orthanc(work / "orthanc") as orthanc:
        receivers = {
            "pe-node": ("PE_NODE", node.port),
            "storescp": (scp.ae_title, scp.port),
            "Orthanc": (orthanc.ae_title, orthanc.dicom_port),
        }
        names = list(receivers)
        times: dict[tuple[str, int], list[float]] = {(n, a): [] for n in names for a in parallel}
        copy = iter(series)
        for rep in range(repeats):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for associations in parallel:
                files = next(copy)
                for name in order:
                    aet, port = receivers[name]
                    times[(name, associations)].append(send(files, aet, port, associations))
    print(f"\n{slices} slices, {megabytes:.0f} MB, storescu with TCP_NODELAY=1, median of {repeats}, "
          f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    median = {key: statistics.median(values) for key, values in times.items()}
    columns = [f"{n} assoc (s)" for n in parallel] + [f"pe-node/x {n}" for n in parallel]
    print(f"{'receiver':<10} " + " ".join(f"{c:>14}" for c in columns))
    for name in names:
        cells = [median[(name, n)] for n in parallel] + [median[("pe-node", n)] / median[(name, n)] for n in parallel]
        print(f"{name:<10} " + " ".join(f"{c:>14.2f}" for c in cells))
    for n in parallel:
        orthanc = median[("pe-node", n)] / median[("Orthanc", n)]
        storescp = median[("pe-node", n)] / median[("storescp", n)]
        print(f"{n} association{'s' if n > 1 else ''}: pe-node / Orthanc {orthanc:.2f} (target <= 1.0), "
              f"pe-node / storescp {storescp:.2f} (storescp does not fsync; target <= 2.0)")

if __name__ == "__main__":
    main()
