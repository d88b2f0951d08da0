"""``pe-train``: synthetic phantoms, the preprocessed cache, both training stages, evaluation and export.

    pe-train phantoms --out DIR --studies N [--seed S] [--size PX] [--slices A-B] [--family training|independent]
    pe-train prepare  --data DIR --cache DIR [--split-all test] [--size PX] [--crop body|none]
    pe-train stage1   --cache DIR --out RUN [--resume] [--epochs N] [--batch-size N] [--lr X] [--pretrained ...]
                      [--init CKPT]  (fine-tune a trained stage 1: a best.pt or a pe-node checkpoint)
    pe-train average  --out RUN/best.pt CKPT CKPT ... [--cache DIR [--split val]]
                      (the mean of several stage 1s of one lineage, validated side by side on a cache)
    pe-train features --stage1 RUN/best.pt --cache DIR --out DIR
    pe-train stage2   --features DIR --out RUN [--pooling attention|mean] [--resume] [--epochs N] ...
    pe-train evaluate --features DIR --stage1 CKPT --stage2 CKPT [--baseline CKPT] [--independent DIR] --out DIR
    pe-train export   --stage1 CKPT --stage2 CKPT --out models/pe-demo.pt [--evaluation DIR/metrics.json]

Every command but ``phantoms`` and ``export`` reads the training config (``--config FILE``, YAML) with overrides
from ``--set KEY=VALUE`` and the named options. ``stage1``, ``features`` and ``stage2`` run on several GPUs (or CPU
processes) under ``torchrun --nproc_per_node=N -m training.cli ...``. Exit status: 0 done, 1 failed, 2 bad
arguments or config.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import pe_node  # noqa: F401  (sets passive OpenMP waiting before torch loads)
from pe_node.model import resolve_device
from training.config import (
    SPLITS,
    TrainConfig,
    TrainConfigError,
    load_train_config,
    parse_override,
)
from training.evalphantoms import study as independent
from training.evaluation.evaluate import INDEPENDENT_FAMILY, evaluate
from training.fitting.average import average_path, average_stage1, validation_table
from training.fitting.cache import Cache, prepare
from training.fitting.distributed import start, stop
from training.fitting.export import export
from training.fitting.features import FeatureSet, extract_features
from training.fitting.loop import best_summary
from training.fitting.stage1 import train_stage1
from training.fitting.stage2 import train_stage2
from training.phantoms import generator as phantoms

logger = logging.getLogger("pe-train")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
Handler = Callable[[argparse.Namespace, TrainConfig, list[str]], None]


def _common(parser: argparse.ArgumentParser, training: bool = True) -> None:
    parser.add_argument("--config", type=Path, help="training config (YAML); defaults apply without one")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set stage1.negatives_per_study=8 (repeatable)")
    parser.add_argument("--seed", type=int, help="config seed")
    parser.add_argument("--device", help="config device: auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, help="config threads: torch CPU threads per process")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    if training:
        parser.add_argument("--resume", action="store_true", help="go on from OUT/last.pt")
        parser.add_argument("--epochs", type=int, help="epochs of this stage")
        parser.add_argument("--batch-size", type=int, help="batch size of this stage")
        parser.add_argument("--lr", type=float, help="Adam learning rate of this stage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pe-train", description=__doc__.splitlines()[0].replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    phantom_parser = commands.add_parser("phantoms", help="write synthetic CTPA phantoms (RSPECT layout)")
    phantoms.add_arguments(phantom_parser)
    phantom_parser.add_argument(
        "--family", choices=("training", "independent"), default="training",
        help="training: the randomised phantoms the model trains on (default); independent: the evaluation-only "
        "family of another construction (training/evalphantoms: 512 px, 1-2 mm slices, trunk and lobar clots; "
        "--slices A-B overrides its slice spacing for small sets)")

    prepare = commands.add_parser("prepare", help="preprocess an RSPECT-layout folder into a cache")
    prepare.add_argument("--data", type=Path, required=True, help="folder with train.csv and train/")
    prepare.add_argument("--cache", type=Path, required=True, help="cache folder to write (resumes a partial one)")
    prepare.add_argument("--split-all", choices=SPLITS, help="put every study in this split (a held-out set)")
    prepare.add_argument("--size", type=int, help="config preprocess.size")
    prepare.add_argument("--crop", choices=("none", "body"), help="config preprocess.crop")
    prepare.add_argument("--val-fraction", type=float, help="config data.val_fraction")
    prepare.add_argument("--test-fraction", type=float, help="config data.test_fraction")
    prepare.add_argument("--workers", type=int, help="config data.workers")
    _common(prepare, training=False)

    stage1 = commands.add_parser("stage1", help="train the slice encoder (stage 1)")
    stage1.add_argument("--cache", type=Path, required=True, help="a prepared cache with train and val studies")
    stage1.add_argument("--out", type=Path, required=True, help="run folder: best.pt, last.pt, metrics, config")
    stage1.add_argument("--pretrained", help="config model.pretrained: false, true (timm hub) or a weights file")
    stage1.add_argument("--init", help="config stage1.init: fine-tune the stage 1 of a best.pt or pe-node checkpoint")
    _common(stage1)

    average = commands.add_parser("average", help="average the weights of several stage 1s of one lineage")
    average.add_argument("checkpoints", type=Path, nargs="+", metavar="CKPT",
                         help="stage-1 checkpoints (best.pt, last.pt or pe-node checkpoints), two or more")
    average.add_argument("--out", type=Path, required=True, help="file (or folder for best.pt) to write")
    average.add_argument("--cache", type=Path,
                         help="validate each checkpoint and the average on this cache first (studies none trained on)")
    average.add_argument("--split", choices=SPLITS, default="val", help="the split to validate on (default val)")
    _common(average, training=False)

    features = commands.add_parser("features", help="extract stage-1 embeddings of every cached study")
    features.add_argument("--stage1", type=Path, required=True,
                          help="stage-1 checkpoint (RUN/best.pt, or a pe-node checkpoint)")
    features.add_argument("--cache", type=Path, required=True, help="the cache to embed")
    features.add_argument("--out", type=Path, required=True, help="features folder")
    features.add_argument("--batch-size", type=int, default=32, help="slices per forward pass on a GPU")
    _common(features, training=False)

    stage2 = commands.add_parser("stage2", help="train the sequence model on embeddings (stage 2)")
    stage2.add_argument("--features", type=Path, required=True, help="features of a cache with train and val")
    stage2.add_argument("--out", type=Path, required=True, help="run folder: best.pt, last.pt, metrics, config")
    stage2.add_argument("--pooling", choices=("attention", "mean", "max"),
                        help="config stage2.pooling (mean: the paper's CNN-LSTM without attention)")
    _common(stage2)

    evaluate = commands.add_parser("evaluate", help="score the model and the baselines, write the report")
    evaluate.add_argument("--features", type=Path, required=True, help="features of the evaluated cache")
    evaluate.add_argument("--stage1", type=Path, required=True,
                          help="stage-1 checkpoint (baseline 1, CAMs; or a pe-node checkpoint)")
    evaluate.add_argument("--stage2", type=Path, required=True, help="stage-2 checkpoint with attention")
    evaluate.add_argument("--baseline", type=Path, help="stage-2 checkpoint trained with --pooling mean")
    evaluate.add_argument("--independent", type=Path, metavar="FEATURES",
                          help="features, by the same stage 1, of a cache of the evaluation-only phantom family "
                          "(pe-train phantoms --family independent; every study): scored and reported beside the first")
    evaluate.add_argument("--out", type=Path, required=True, help="report folder")
    evaluate.add_argument("--split", choices=SPLITS, default="test", help="split to evaluate (default test)")
    evaluate.add_argument("--cam-examples", type=int, help="config evaluate.cam_examples")
    _common(evaluate, training=False)

    export = commands.add_parser("export", help="write the pe-node checkpoint of both stages")
    export.add_argument("--stage1", type=Path, required=True,
                        help="stage-1 checkpoint (RUN/best.pt, or a pe-node checkpoint)")
    export.add_argument("--stage2", type=Path, required=True, help="stage-2 checkpoint (RUN/best.pt)")
    export.add_argument("--out", type=Path, required=True, help="checkpoint file to write, e.g. models/pe-demo.pt")
    export.add_argument("--evaluation", type=Path, help="an evaluation's metrics.json, kept in the provenance")
    export.add_argument("--description", help="what the weights are, kept in the provenance")
    export.add_argument("--fp32", action="store_true", help="store float32 weights (default float16)")
    return parser


def _overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The config overrides the command line asks for: ``--set`` first, then the named options."""
    pairs = [parse_override(text) for text in getattr(args, "overrides", [])]
    stage = args.command if args.command in ("stage1", "stage2") else None
    named = {
        "seed": "seed", "device": "device", "threads": "threads", "size": "preprocess.size",
        "crop": "preprocess.crop", "val_fraction": "data.val_fraction", "test_fraction": "data.test_fraction",
        "workers": "data.workers", "pooling": "stage2.pooling", "cam_examples": "evaluate.cam_examples",
        "pretrained": "model.pretrained", "init": "stage1.init",
    }
    if stage:
        named.update({"epochs": f"{stage}.epochs", "batch_size": f"{stage}.batch_size", "lr": f"{stage}.lr"})
    for attribute, key in named.items():
        value = getattr(args, attribute, None)
        if value is not None:
            pairs.append((key, parse_override(f"{key}={value}")[1] if attribute == "pretrained" else value))
    return pairs


def _prepare(args: argparse.Namespace, config: TrainConfig, command: list[str]) -> None:
    cache = prepare(args.data, args.cache, config.preprocess.to_preprocess(), config.data, args.split_all,
                    progress=not args.quiet)
    for split, counts in cache.describe()["splits"].items():
        print(f"{split}: {counts}")


def _stage(args: argparse.Namespace, config: TrainConfig, command: list[str]) -> None:
    processes = start(config.device, config.threads)
    try:
        if args.command == "stage1":
            state = train_stage1(config, Cache.open(args.cache), args.out, processes, args.resume, command,
                                 not args.quiet)
        elif args.command == "stage2":
            state = train_stage2(config, FeatureSet.open(args.features), args.out, processes, args.resume,
                                 command, not args.quiet)
        else:
            extract_features(args.stage1, Cache.open(args.cache), args.out, processes, args.batch_size,
                             not args.quiet)
            return
        if processes.is_main:
            select = getattr(config, args.command).select
            print(f"{args.command}: {best_summary(state, select)}; {args.out / 'best.pt'}")
    finally:
        stop(processes)


def _average(args: argparse.Namespace, config: TrainConfig, command: list[str]) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
    cache = Cache.open(args.cache) if args.cache is not None else None
    state = average_stage1(args.checkpoints, args.out, config, cache, args.split, command, not args.quiet)
    if "validation" in state.extra:
        print("\n".join(validation_table(state)))
    print(f"average of {len(state.extra['average'])} stage-1 checkpoints: {average_path(args.out)}")


def _evaluate(args: argparse.Namespace, config: TrainConfig, command: list[str]) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
    independent = FeatureSet.open(args.independent) if args.independent is not None else None
    metrics = evaluate(FeatureSet.open(args.features), args.stage1, args.stage2, args.baseline, args.out,
                       config.evaluate, args.split, resolve_device(config.device), config.seed, not args.quiet,
                       independent)
    for family in (metrics, metrics.get(INDEPENDENT_FAMILY)):
        if family is not None:
            _print_family(family)
    print(f"report: {args.out / 'report.md'}")


def _print_family(metrics: dict[str, Any]) -> None:
    """The headline numbers of one evaluated set, as ``evaluate`` wrote them."""
    print(f"{metrics['family']} family: {metrics['studies']} studies")
    constant = metrics["constant_baseline"]["rsna_log_loss"]
    if constant is not None:
        print(f"  constant prediction: RSNA log loss {constant:.4f}")
    intervals = metrics.get("bootstrap", {}).get("models", {})
    for name, result in metrics["models"].items():
        pe_auc, bounds = result["study_pe_auc"], intervals.get(name, {}).get("study_pe_auc")
        print(f"  {result['title']}: study PE AUC {'n/a' if pe_auc is None else f'{pe_auc:.3f}'}"
              + (f" (95 % CI {bounds[0]:.3f}-{bounds[1]:.3f})" if bounds else "")
              + f", RSNA log loss {result['rsna_log_loss']:.4f}, study PE accuracy {result['study_pe_accuracy']:.3f}")
        reading = result["node_reading"]
        if reading["sensitivity"] is not None and reading["specificity"] is not None:
            print(f"    as pe-node would report it: positive studies read present {reading['sensitivity']:.3f}, "
                  f"negative studies read absent {reading['specificity']:.3f}; detected "
                  + ", ".join(f"{where} {found['detected']} of {found['studies']}"
                              for where, found in result["by_location"].items() if found["studies"]))
        fixed = result["sensitivity_at_specificity"]
        if fixed["sensitivity"] is not None:
            print(f"    sensitivity at specificity >= {fixed['specificity']:.2f}: {fixed['sensitivity']:.3f}")
    for name, result in metrics.get("bootstrap", {}).get("full_against", {}).items():
        difference, bounds = result["study_pe_auc_difference"], result["study_pe_auc_difference_ci"]
        if difference is not None and bounds is not None:
            print(f"  full model minus {metrics['models'][name]['title'].split(':')[0]}: study PE AUC "
                  f"{difference:+.3f} (95 % CI {bounds[0]:+.3f} to {bounds[1]:+.3f}), ahead in "
                  f"{result['share_full_ahead']:.0%} of the resamples")


def _export(args: argparse.Namespace, config: TrainConfig, command: list[str]) -> None:
    path = export(args.stage1, args.stage2, args.out, args.evaluation, args.description, half=not args.fp32)
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB)")


_HANDLERS: dict[str, Handler] = {
    "prepare": _prepare, "average": _average, "stage1": _stage, "features": _stage, "stage2": _stage,
    "evaluate": _evaluate, "export": _export,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "phantoms":
        return independent.run(args) if args.family == "independent" else phantoms.run(args)
    try:
        config = load_train_config(getattr(args, "config", None), _overrides(args))
    except TrainConfigError as error:
        print(f"pe-train {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        _HANDLERS[args.command](args, config, ["pe-train", *argv])
    except TrainConfigError as error:
        print(f"pe-train {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        print(f"pe-train {args.command}: {error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
