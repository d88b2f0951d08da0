"""Receive speed: the same 300-slice 512x512 CT series sent with DCMTK storescu to pe-node, DCMTK storescp and
Orthanc, in one run, over one association and over four parallel associations.

pe-node runs as ``pe-node serve`` with its durable path (fsync of every file and directory entry, SQLite commit
per instance, synchronous=FULL) before each success response. storescp writes files without fsync; Orthanc writes
files and its SQLite index. Each repetition sends a fresh copy of the series (new UIDs) to every receiver, in a
rotating order; the medians are printed with the ratios against pe-node.

    .venv/bin/python bench/bench_ingest.py [--slices 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pe-node-bench-ingest-"))
    try:
        run(work, args.slices, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, slices: int, repeats: int) -> None:
    copies = 2 * repeats
    print(f"writing {copies} copies of a {slices}-slice 512x512 CT series ...", flush=True)
    series = []
    for k in range(copies):
        folder = work / f"series{k}"
        write_ct_series(folder, n_slices=slices, size=512, seed=k)
        series.append(sorted(folder.glob("*.dcm")))
    megabytes = sum(p.stat().st_size for p in series[0]) / 1e6
    node_root = work / "pe-node"
    node = NodeProcess(node_root, node_config(node_root, free_port(), storage={"min_free_mb": 100},
                                              series={"quiet_seconds": 3600}))
    with node, StoreSCP(work / "storescp-out") as scp, Orthanc(work / "orthanc") as orthanc:
        receivers = {
            "pe-node": ("PE_NODE", node.port),
            "storescp": (scp.ae_title, scp.port),
            "Orthanc": (orthanc.ae_title, orthanc.dicom_port),
        }
        names = list(receivers)
        times: dict[tuple[str, int], list[float]] = {(n, a): [] for n in names for a in (1, 4)}
        for rep in range(repeats):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for associations, files in ((1, series[2 * rep]), (4, series[2 * rep + 1])):
                for name in order:
                    aet, port = receivers[name]
                    times[(name, associations)].append(send(files, aet, port, associations))
    print(f"\n{slices} slices, {megabytes:.0f} MB, storescu with TCP_NODELAY=1, median of {repeats}")
    print(f"{'receiver':<10} {'1 assoc (s)':>12} {'4 assoc (s)':>12} {'pe-node/x 1':>12} {'pe-node/x 4':>12}")
    median = {key: statistics.median(values) for key, values in times.items()}
    for name in names:
        ratios = [median[("pe-node", n)] / median[(name, n)] for n in (1, 4)]
        print(f"{name:<10} {median[(name, 1)]:>12.2f} {median[(name, 4)]:>12.2f} {ratios[0]:>12.2f} {ratios[1]:>12.2f}")
    ratio = median[("pe-node", 1)] / median[("Orthanc", 1)]
    print(f"\npe-node / Orthanc, one association: {ratio:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
