"""Benchmark of the Predictor: slices/s of the fast path against the plain fp32 path, and peak memory of predict.

Run from a checkout: ``.venv/bin/python bench/bench_predictor.py`` (``--help`` for options). It builds the default
model (EfficientNet-B0, random weights) at 256 px, runs the full Predictor (preprocess + stage 1 + stage 2) on a
synthetic 300-slice 512x512 series with the fast path and with the plain fp32 path in the same process (after a
warm-up of each), then writes a 1,100-slice 512x512 DICOM series and runs ``pe-node predict``'s code on it in a
subprocess to report its peak resident memory. It prints figures and asserts nothing: the targets of issue 3
(>= 80 slices/s, >= 2.5x the plain path, < 2.5 GB) are printed next to them for reading. ``--device cuda`` runs the
speed series on a GPU (the fast path there is bf16 autocast, channels_last).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing pe-node
# OpenMP threads that spin while waiting burn the CPU another process needs, and stall when it takes a core: on a
# shared 2-core host stage 1 ran up to 10x slower. PASSIVE makes them sleep; it must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402

from pe_node.model import (  # noqa: E402
    Predictor,
    PreprocessConfig,
    cpu_has_fast_bf16,
    create_model,
    save_checkpoint,
)
from pe_node.pipeline.series import CTSeries, SliceRef  # noqa: E402
from tests.dicom_factory import phantom_slice, write_ct_series  # noqa: E402

TARGET_SLICES_PER_S = 80.0
TARGET_SPEEDUP = 2.5
TARGET_RSS_GB = 2.5


def synthetic_series(n_slices: int, size: int) -> CTSeries:
    """An in-memory series of the test phantom (int16 HU), without DICOM files."""
    hu = np.empty((n_slices, size, size), dtype=np.int16)
    for k in range(n_slices):
        hu[k] = phantom_slice(k, n_slices, size)
    slices = [
        SliceRef(f"1.2.826.0.1.3680043.8.498.{k + 1}", "1.2.840.10008.5.1.4.1.1.2", Path(f"{k}.dcm"), float(k), k + 1)
        for k in range(n_slices)
    ]
    return CTSeries("1.2.3", "1.2.3.4", slices, hu, (0.7, 0.7), 1.0, (1, 0, 0, 0, 1, 0), pydicom.Dataset())


def time_predictor(predictor: Predictor, series: CTSeries, warmup: CTSeries, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` timings of ``predictor.predict`` on ``series``, after one warm-up call.

    Adds ``cpu``: the process's CPU seconds (user + system) during that run, which other load on the host
    disturbs less than the wall-clock phases.
    """
    predictor.predict(warmup)
    best: dict[str, float] | None = None
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF)
        timings = dict(predictor.predict(series).timings)
        after = resource.getrusage(resource.RUSAGE_SELF)
        timings["cpu"] = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        if best is None or timings["total"] < best["total"]:
            best = timings
    return best


def report_speed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = create_model("pe_cnn_lstm", backbone=args.backbone).eval()
    preprocess = PreprocessConfig(size=args.input_size)
    series = synthetic_series(args.slices, args.size)
    warmup = synthetic_series(args.batch_size, args.size)
    fast = Predictor(model, preprocess, device=args.device, batch_size=args.batch_size, fast=True)
    plain = Predictor(model, preprocess, device=args.device, batch_size=args.batch_size, fast=False)
    results = {}
    for name, predictor in (("fast", fast), ("plain fp32", plain)):
        results[name] = time_predictor(predictor, series, warmup, args.repeats)
    print(
        f"\nFull Predictor on {args.slices} slices {args.size}x{args.size} -> {args.input_size} px, "
        f"{args.backbone}, batch {args.batch_size}, on {fast.device}"
    )
    print(
        f"  fast path: {fast.precision} (native CPU bf16: {cpu_has_fast_bf16()}), stage 1 in {fast.engine}"
        f"{'' if fast.engine == 'onnxruntime' else ' (channels_last, batch norm folded)'}, steps of {fast.step}; "
        f"plain path: fp32 PyTorch, contiguous, steps of {plain.step}"
    )
    for name, timings in results.items():
        phases = ", ".join(f"{k} {v:.2f}" for k, v in timings.items() if k not in ("total", "cpu"))
        print(
            f"  {name:<11} {args.slices / timings['total']:6.1f} slices/s  total {timings['total']:6.2f} s "
            f"({phases}; process CPU {timings['cpu']:.2f} s)"
        )
    ratio = results["plain fp32"]["total"] / results["fast"]["total"]
    fast_rate = args.slices / results["fast"]["total"]
    print(f"  speed-up of the fast path over plain fp32: {ratio:.2f}x (target >= {TARGET_SPEEDUP}x)")
    print(
        f"  fast path: {fast_rate:.1f} slices/s (target >= {TARGET_SLICES_PER_S}); a 300-slice series in "
        f"{300 / fast_rate:.1f} s (target < 5 s)"
    )


def report_memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="pe-bench-") as tmp:
        folder = Path(tmp) / "series"
        start = time.perf_counter()
        write_ct_series(folder, n_slices=args.rss_slices, size=args.size, seed=1)
        print(f"\nWrote {args.rss_slices} DICOM slices {args.size}x{args.size} in {time.perf_counter() - start:.1f} s")
        torch.manual_seed(0)
        checkpoint = save_checkpoint(
            Path(tmp) / "bench.pt",
            create_model("pe_cnn_lstm", backbone=args.backbone),
            PreprocessConfig(size=args.input_size),
            provenance={"data": "random weights", "purpose": "benchmark"},
            half=True,
        )
        code = textwrap.dedent(
            f"""
            import logging, os, sys, torch
            logging.basicConfig(level=logging.INFO, format="  predict: %(message)s")
            torch.set_num_threads({args.threads})
            from pathlib import Path
            from pe_node.predict import run_predict
            with open(os.devnull, "w") as sink:
                sys.exit(run_predict(Path({str(folder)!r}), Path({str(checkpoint)!r}), device="cpu",
                                     batch_size={args.batch_size}, as_json=True, out=sink))
            """
        )
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
        wall = time.perf_counter() - start
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
        print(
            f"pe-node predict (load + predict + JSON) on {args.rss_slices} slices {args.size}x{args.size}: "
            f"{wall:.1f} s wall, peak RSS {peak_gb:.2f} GB (target < {TARGET_RSS_GB} GB)"
        )
        print(f"  (the int16 volume alone is {args.rss_slices * args.size * args.size * 2 / 1e9:.2f} GB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="slices of the speed series")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of each slice")
    parser.add_argument("--input-size", type=int, default=256, help="network input size")
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per path (the best is kept)")
    parser.add_argument("--rss-slices", type=int, default=1100,
                        help="slices of the memory series, run on the CPU (0: skip)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the speed series runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, CPU {platform.processor() or platform.machine()}, "
        f"capability {torch.backends.cpu.get_cpu_capability()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"load average {os.getloadavg()[0]:.2f} (other processes on the host skew wall-clock figures)"
    )
    if args.device.startswith("cuda"):
        print(f"GPU {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    report_speed(args)
    if args.rss_slices:
        report_memory(args)


if __name__ == "__main__":
    main()
