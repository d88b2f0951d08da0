"""Benchmark of stage-1 training: slices/s of a training step in bf16 autocast against plain float32, same run, and
slices/s the training input pipeline delivers against what the step takes.

Run from a checkout: ``.venv/bin/python bench/bench_training.py`` (``--help`` for options). It builds stage 1 of the
demo recipe (ResNet-18-D, random weights) and times the trainer's own step (``training.fitting.stage1.train_step``:
uint8 cache windows to the normalised input, augmentation, the forward pass in channels_last, the slice loss, backward,
clipping and the Adam step), once with the precision the trainer picks on this machine (bf16 where the CPU computes it
natively, or on CUDA) and once in float32, alternating rounds so that other load on the host falls on both. It prints
figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing pe-node
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_predictor.py

import torch  # noqa: E402

from pe_node.model import PreprocessConfig, cpu_has_fast_bf16, create_model  # noqa: E402
from training.config import Stage1Config  # noqa: E402
from training.fitting.loop import Optimization  # noqa: E402
from training.fitting.stage1 import train_step  # noqa: E402


def time_steps(amp: bool, args: argparse.Namespace, device: torch.device) -> tuple[float, str]:
    """Seconds per training step over ``args.steps`` steps (after two warm-up steps), and the precision the trainer
    picked."""
    torch.manual_seed(0)
    encoder = create_model("pe_cnn_lstm", backbone=args.backbone).encoder.to(device, memory_format=torch.channels_last)
    encoder.train()
    stage1 = Stage1Config(amp=amp, lr=1e-4, augment=True, image_weight=1000.0)
    optimization = Optimization(encoder.parameters(), stage1, device, cpu_bf16=True)
    preprocess = PreprocessConfig(size=args.input_size)
    stored = torch.randint(0, 256, (args.batch_size, 3, args.input_size, args.input_size), dtype=torch.uint8)
    image_labels = (torch.rand(args.batch_size) < 0.3).float()
    exam_labels = (torch.rand(args.batch_size, 9) < 0.3).float()

    def step() -> None:
        train_step(encoder, optimization, stored, image_labels, exam_labels, preprocess, stage1, device)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return (time.perf_counter() - start) / args.steps, optimization.precision


RSPECT_STUDIES, RSPECT_SLICES = 7279, 1_790_000


def time_pipeline(args: argparse.Namespace, device: torch.device) -> tuple[float, int]:
    """Slices/s the stage-1 loader delivers over a small phantom cache (several epochs), and the slices it held."""
    from torch.utils.data import DataLoader

    from training.fitting.cache import Cache
    from training.fitting.data import SliceBatches, epoch_batches

    work = Path(tempfile.mkdtemp(prefix="pe-node-bench-pipeline-"))
    try:
        pe_train = [sys.executable, "-m", "training.cli"]
        subprocess.run([*pe_train, "phantoms", "--out", str(work / "phantoms"), "--studies", str(args.studies),
                        "--size", "256", "--slices", "60-100", "--seed", "5", "--quiet"], check=True, cwd=REPO)
        subprocess.run([*pe_train, "prepare", "--data", str(work / "phantoms"), "--cache", str(work / "cache"),
                        "--size", str(args.input_size), "--crop", "body", "--split-all", "train", "--quiet",
                        "--threads", str(args.threads)], check=True, cwd=REPO)
        cache = Cache.open(work / "cache")
        studies = cache.split("train")
        stage1 = Stage1Config(batch_size=args.batch_size, sampling="mixed", negatives="uniform",
                              negatives_per_study=None, positives_per_study=None)
        delivered, started = 0, time.perf_counter()
        for epoch in range(args.pipeline_epochs):
            batches = epoch_batches(studies, stage1, seed=0, epoch=epoch)
            loader = DataLoader(SliceBatches(cache, studies, batches), batch_size=None, shuffle=False,
                                num_workers=args.loader_workers, pin_memory=device.type == "cuda")
            for images, _, _ in loader:
                delivered += len(images)
        return delivered / (time.perf_counter() - started), sum(s.slices for s in studies)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18d")
    parser.add_argument("--input-size", type=int, default=192, help="network input size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each precision (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--pipeline", action="store_true", help="also time the input pipeline on a phantom cache")
    parser.add_argument("--studies", type=int, default=6, help="phantom studies of the pipeline's cache")
    parser.add_argument("--pipeline-epochs", type=int, default=5, help="epochs read through the pipeline")
    parser.add_argument("--loader-workers", type=int, default=2, help="the loader's processes (stage1.loader_workers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"stage-1 training step: {args.backbone} at {args.input_size} px, batches of {args.batch_size}, "
          f"{args.threads} threads on {platform.processor() or platform.machine()} ({args.device}; native CPU bf16: "
          f"{cpu_has_fast_bf16()}), torch {torch.__version__}")
    plain, fast = [], []
    for _ in range(args.rounds):
        plain.append(time_steps(False, args, device)[0])
        seconds, picked = time_steps(True, args, device)
        fast.append(seconds)
    fp32 = args.batch_size / min(plain)
    amp = args.batch_size / min(fast)
    print(f"  float32:                      {fp32:6.1f} slices/s")
    print(f"  the trainer's pick ({picked}):   {amp:6.1f} slices/s")
    print(f"  ratio {picked} / float32: {amp / fp32:.2f}x")
    if not args.pipeline:
        return
    delivered, slices = time_pipeline(args, device)
    busy = min(1.0, delivered / amp)
    print(f"input pipeline: {delivered:8.0f} slices/s from a {slices}-slice cache, {args.loader_workers} loader "
          f"processes; the step takes {amp:.1f} slices/s: the pipeline keeps the device {100 * busy:.0f} % busy")
    rate = min(delivered, amp)
    disk = RSPECT_SLICES * 3 * args.input_size**2 / 1e9
    print(f"one epoch over RSPECT-scale data ({RSPECT_STUDIES} studies, {RSPECT_SLICES / 1e6:.2f} M slices) at "
          f"{args.input_size} px on this {args.device}: {RSPECT_SLICES / rate / 3600:.1f} h "
          f"({'step' if amp <= delivered else 'pipeline'}-bound); its cache {disk:.0f} GB on disk")


if __name__ == "__main__":
    main()
