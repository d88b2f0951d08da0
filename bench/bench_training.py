"""Benchmark of stage-1 training: slices/s of a training step in bf16 autocast against plain float32, same run.

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
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18d")
    parser.add_argument("--input-size", type=int, default=192, help="network input size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each precision (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
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


if __name__ == "__main__":
    main()
