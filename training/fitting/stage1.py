"""Stage 1: the slice encoder trained on cached slices, per slice and multi-label (paper sections 2.2 and 3.2).

Each slice's targets are its own ``pe_present_on_image`` and the nine exam labels of its study, scored with
``pe_node.model.slice_loss``. The encoder is the ``SliceEncoder`` of the configured ``pe_node`` model, so the weights
load straight into the served model. Validation reads every slice of the validation studies, or their positives and a
fixed subset of negatives: its loss selects ``best.pt`` (or, with ``select``, the image-level AUC or the study-level
AUC of the CNN alone, a study's highest image probability and the paper's baseline 1); all three are logged.
With ``stage1.init`` the encoder starts from a trained stage 1 (fine-tuning, on new data or with other sampling),
and those weights are validated first, as epoch 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from pe_node.model import (
    PEModel,
    PreprocessConfig,
    SliceEncoder,
    create_model,
    slice_loss,
)
from pe_node.model.checkpoint import file_sha256
from training.config import Stage1Config, TrainConfig, TrainConfigError
from training.evaluation.metrics import auc
from training.fitting.augment import augment
from training.fitting.backbone import load_backbone_weights
from training.fitting.cache import Cache, CachedStudy, to_input, training_share
from training.fitting.data import SliceBatches, epoch_batches
from training.fitting.distributed import Processes, shard
from training.fitting.export import source_code, stage1_record
from training.fitting.loop import Optimization, fit
from training.fitting.state import StateError, TrainState, load_state

logger = logging.getLogger(__name__)

_VAL_STEP = 64
"""Validation slices per forward pass."""


def check_preprocess(config: TrainConfig, cache: Cache) -> None:
    """The config's preprocessing must be the one the cache was made with (else the model card would lie)."""
    wanted = config.preprocess.to_preprocess()
    if wanted != cache.preprocess:
        raise TrainConfigError(
            f"preprocess: the config asks for size {wanted.size}, crop {wanted.crop.value}, but cache {cache.root} "
            f"was prepared with size {cache.preprocess.size}, crop {cache.preprocess.crop.value}"
        )


def train_stage1(
    config: TrainConfig,
    cache: Cache,
    run: Path,
    processes: Processes,
    resume: bool = False,
    command: list[str] | None = None,
    progress: bool = True,
) -> TrainState:
    """Train stage 1 on the cache's train split, select on its val split; write ``run/{best,last}.pt``."""
    check_preprocess(config, cache)
    train, val = cache.split("train"), cache.split("val")
    if not train or not val:
        raise TrainConfigError(
            f"stage 1 needs train and val studies; cache {cache.root} has {len(train)} and {len(val)} "
            "(prepare it with data.val_fraction > 0)"
        )
    split_studies = len(train)
    train = training_share(train, config.data.train_fraction, config.data.split_seed)
    torch.manual_seed(config.seed)
    model = create_model(config.model.name, **config.model.architecture())
    encoder = model.encoder
    weights, start = None, None  # resumed: both in last.pt
    if not resume and config.stage1.init is not None:
        start = start_from(Path(config.stage1.init), model, cache, config)
        weights = {"source": f"stage1.init {start['path']} (SHA-256 {start['sha256'][:12]})"}
    elif not resume:
        weights = load_backbone_weights(encoder, config.model.pretrained)
    device = processes.device
    encoder.to(device, memory_format=torch.channels_last)
    network = encoder
    if processes.distributed:
        network = DistributedDataParallel(encoder, device_ids=[device] if device.type == "cuda" else None)
    optimization = Optimization(network.parameters(), config.stage1, device, cpu_bf16=True)
    logger.info("stage 1 trains on %s in %s, on %d of the train split's %d studies", device, optimization.precision,
                len(train), split_studies)
    state = TrainState(
        stage="stage1",
        model_name=model.name,
        model_config=model.config.to_dict(),
        preprocess=cache.preprocess.to_dict(),
        weights={},
        config=config.model_dump(mode="json"),
        inputs={"cache": str(cache.root.resolve()), "command": command or [], "world_size": processes.world_size},
        extra={"data": {**cache.describe(), "train_studies": len(train)}, "code": source_code(),
               "precision": optimization.precision, **({"backbone_weights": weights} if weights else {}),
               **({"init": start} if start else {})},
    )

    def train_epoch(epoch: int) -> tuple[float, dict[str, Any]]:
        hard, mined = None, {}
        if config.stage1.hard_negatives:
            hard, mined = mine_hard_negatives(encoder, cache, train, config.stage1, epoch, processes, optimization)
            logger.info("stage1 epoch %d: mined %d slices of %d studies without emboli in %.0f s; their highest "
                        "probability, median over studies %.3f", epoch, mined["mined_slices"], mined["mined_studies"],
                        mined["mining_seconds"], mined["hard_negative_median_max"])
        network.train()
        batches = shard(epoch_batches(train, config.stage1, config.seed, epoch, hard), processes)
        loader = DataLoader(SliceBatches(cache, train, batches), batch_size=None, shuffle=False,
                            num_workers=config.stage1.loader_workers, pin_memory=device.type == "cuda")
        total = count = 0.0
        bar = tqdm(loader, desc=f"stage1 epoch {epoch}", unit="batch", disable=not (progress and processes.is_main))
        for images, image_labels, exam_labels in bar:
            loss = train_step(network, optimization, images, image_labels, exam_labels, cache.preprocess,
                              config.stage1, device)
            total += float(loss.detach()) * len(images)
            count += len(images)
            bar.set_postfix(loss=f"{total / count:.4f}")
        total, count = processes.sum([total, count])
        per_process = processes.gather(len(batches))
        logger.info("stage1 epoch %d: rank %d trained %d batches of up to %d slices, one of %d processes", epoch,
                    processes.rank, len(batches), config.stage1.batch_size, processes.world_size)
        return total / max(count, 1.0), {"batches_per_process": per_process, **({"epoch": mined} if mined else {})}

    def validate() -> dict[str, float | None]:
        return validate_encoder(encoder, cache, shard(val, processes, equal=False), processes, optimization,
                                config.stage1.image_weight, config.stage1.val_negatives_per_study)

    return fit(run, state, encoder, optimization, train_epoch, validate, config, processes, resume,
               validate_first=start is not None)


def mine_hard_negatives(encoder: SliceEncoder, cache: Cache, studies: Sequence[CachedStudy], stage1: Stage1Config,
                        epoch: int, processes: Processes,
                        optimization: Optimization) -> tuple[dict[int, np.ndarray], dict[str, float]]:
    """The hard negatives of an epoch (``stage1.hard_negatives``): every ``hard_negatives_stride``-th slice of each
    study without a positive slice, from an offset that moves with the epoch, scored by ``encoder`` as it is; for
    each such study (by position in ``studies``) the scored slices hardest first, at most ``hard_negatives`` of
    them. Each process scores its share; all get every study's. Also returns what was mined, for the history: the
    slices and studies scored, the seconds it took, and the median over studies of their highest probability (the
    false-alarm level a study-level maximum meets)."""
    began = time.monotonic()
    encoder.eval()
    stride = stage1.hard_negatives_stride
    candidates = [position for position, study in enumerate(studies) if not study.image.any()]
    found: dict[int, tuple[np.ndarray, float]] = {}
    scored = 0
    with torch.no_grad():
        for position in shard(candidates, processes, equal=False):
            study = studies[position]
            chosen = np.arange(epoch % stride if stride < study.slices else 0, study.slices, stride)
            scores = torch.sigmoid(slice_logits(encoder, cache, study, chosen, processes.device, optimization)[0])
            scores = scores.cpu().numpy()
            order = np.argsort(-scores, kind="stable")[: stage1.hard_negatives]
            found[position] = (chosen[order], float(scores.max()))
            scored += len(chosen)
    merged = {position: item for part in processes.gather(found) for position, item in part.items()}
    (scored,) = processes.sum([scored])
    highest = [top for _, top in merged.values()]
    return {position: slices for position, (slices, _) in merged.items()}, {
        "mined_studies": len(merged),
        "mined_slices": int(scored),
        "mining_seconds": round(time.monotonic() - began, 1),
        "hard_negative_median_max": float(np.median(highest)) if highest else 0.0,
    }


def train_step(network: torch.nn.Module, optimization: Optimization, images: torch.Tensor, image_labels: torch.Tensor,
               exam_labels: torch.Tensor, preprocess: PreprocessConfig, stage1: Stage1Config,
               device: torch.device) -> torch.Tensor:
    """One optimisation step of stage 1 on a batch of cached uint8 windows: to the normalised input, augmentation
    (``stage1.augment``), the forward pass in channels_last under the optimization's autocast, the slice loss, and
    backward, clipping and Adam (``Optimization.step``). Returns the batch's loss."""
    inputs = to_input(images.to(device, non_blocking=True), preprocess)
    if stage1.augment:
        inputs = augment(inputs)
    with optimization.autocast():
        output = network(inputs.contiguous(memory_format=torch.channels_last))
    loss = slice_loss(output.image.float(), output.exam.float(), image_labels.to(device), exam_labels.to(device),
                      image_weight=stage1.image_weight)
    optimization.step(loss)
    return loss


def start_from(path: Path, model: PEModel, cache: Cache, config: TrainConfig) -> dict[str, Any]:
    """Load the encoder of the trained stage 1 at ``path`` (``stage1.init``: a stage-1 checkpoint or a pe-node
    checkpoint) into ``model``; returns where it came from, how it was trained and on what data, for the run's
    provenance."""
    if config.model.pretrained is not False:
        raise TrainConfigError(
            f"stage1.init ({path}) and model.pretrained ({config.model.pretrained}) both say where stage 1 starts; "
            "set one of them"
        )
    try:
        trained = load_state(path, "stage1")
    except StateError as error:
        raise TrainConfigError(f"stage1.init: {error}") from None
    backbone = trained.model_config.get("backbone")
    if backbone != model.config.backbone:
        raise TrainConfigError(f"stage1.init: {path} is a {backbone} stage 1; this run trains {model.config.backbone}")
    if trained.preprocess != cache.preprocess.to_dict():
        raise TrainConfigError(
            f"stage1.init: {path} was trained on inputs preprocessed as {trained.preprocess}, cache {cache.root} "
            f"holds {cache.preprocess.to_dict()}"
        )
    try:
        model.encoder.load_state_dict(trained.weights)
    except RuntimeError as error:
        raise TrainConfigError(f"stage1.init: {path} does not fit this run's encoder ({str(error)[:300]})") from None
    logger.info("stage 1 starts from %s (%s, trained %d epochs)", path, backbone, trained.epoch)
    return {"path": str(path.resolve()), "sha256": file_sha256(path), "stage1": stage1_record(trained, path),
            "data": trained.extra.get("data", {}), "backbone_weights": trained.extra.get("backbone_weights", {})}


def validation_slices(study: CachedStudy, negatives: int | None) -> np.ndarray:
    """The slices of a validation study that validation reads: all, or the positives and ``negatives`` evenly
    spaced negatives."""
    if negatives is None:
        return np.arange(study.slices)
    others = np.flatnonzero(study.image == 0)
    if len(others) > negatives:
        others = others[np.linspace(0, len(others) - 1, negatives).round().astype(np.int64)]
    return np.sort(np.concatenate([np.flatnonzero(study.image), others]))


def slice_logits(encoder: SliceEncoder, cache: Cache, study: CachedStudy, chosen: np.ndarray, device: torch.device,
                 optimization: Optimization) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's image logits [k] and exam logits [k, 9], float32 on ``device``, for slices ``chosen`` of a
    cached study, read and run ``_VAL_STEP`` at a time under the optimization's autocast (call under no_grad)."""
    image, exam = [], []
    for start in range(0, len(chosen), _VAL_STEP):
        inputs = cache.inputs(study, chosen[start : start + _VAL_STEP]).to(device)
        with optimization.autocast():
            output = encoder(inputs.contiguous(memory_format=torch.channels_last))
        image.append(output.image.float())
        exam.append(output.exam.float())
    return torch.cat(image), torch.cat(exam)


def validate_encoder(encoder: SliceEncoder, cache: Cache, studies: list[CachedStudy], processes: Processes,
                     optimization: Optimization, image_weight: float,
                     negatives: int | None = None) -> dict[str, float | None]:
    """Mean slice loss over the validation slices of ``studies`` (this process's share), image AUC and the CNN-only
    study AUC (a study's highest image probability)."""
    encoder.eval()
    device = processes.device
    loss_sum = slices = 0.0
    records: list[tuple[np.ndarray, np.ndarray, bool]] = []
    with torch.no_grad():
        for study in studies:
            chosen = validation_slices(study, negatives)
            image, exam = slice_logits(encoder, cache, study, chosen, device, optimization)
            labels = study.image[chosen]
            targets = torch.from_numpy(labels.astype(np.float32)).to(device)
            exam_targets = torch.from_numpy(study.exam).to(device).expand_as(exam)
            loss_sum += float(slice_loss(image, exam, targets, exam_targets, "none", image_weight).sum())
            slices += len(chosen)
            records.append((labels, torch.sigmoid(image).cpu().numpy(), study.exam_class == "positive"))
    loss_sum, slices = processes.sum([loss_sum, slices])
    gathered = [record for part in processes.gather(records) for record in part]
    labels = np.concatenate([r[0] for r in gathered])
    probabilities = np.concatenate([r[1] for r in gathered])
    return {
        "val_loss": loss_sum / max(slices, 1.0),
        "val_image_auc": auc(labels, probabilities),
        "val_study_auc": auc([r[2] for r in gathered], [float(r[1].max()) for r in gathered]),
    }
