"""Stage 2: the sequence model trained on stage-1 embeddings of whole studies with the RSNA loss (section 2.3).

The BiLSTM + dense + pooling of ``pe_node.model.SequenceModel`` reads each study's embeddings in slice order and is
scored with ``pe_node.model.rsna_loss`` on padded, masked batches. ``pooling`` picks the paper's attention MIL
pooling or plain mean pooling (its baseline 2, the CNN-LSTM without attention): the same code trains both. The
validation loss (the mean of the studies' RSNA losses) selects ``best.pt``, or with ``select`` one of the numbers
logged beside it: the competition's weighted log loss and the study PE AUC of the study head. The training split's
label prevalence is kept in the checkpoint: the constant-prediction baseline of the evaluation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from pe_node.findings import pe_score
from pe_node.model import SequenceModel, create_model, rsna_loss
from pe_node.model.checkpoint import file_sha256
from training.config import TrainConfig, TrainConfigError
from training.evaluation.metrics import auc, rsna_log_loss
from training.fitting.cache import CachedStudy, training_share
from training.fitting.data import StudyEmbeddings, pad_studies
from training.fitting.distributed import Processes, shard
from training.fitting.export import source_code
from training.fitting.features import FeatureSet
from training.fitting.loop import Optimization, fit
from training.fitting.state import TrainState, load_state

logger = logging.getLogger(__name__)


def label_prior(studies: list[CachedStudy]) -> dict[str, list[float] | float]:
    """Prevalence of each exam label over ``studies`` and their share of positive images."""
    exam = np.mean([study.exam for study in studies], axis=0)
    image = sum(float(study.image.sum()) for study in studies) / max(sum(study.slices for study in studies), 1)
    return {"exam": [float(v) for v in exam], "image": image}


def train_stage2(
    config: TrainConfig,
    features: FeatureSet,
    run: Path,
    processes: Processes,
    resume: bool = False,
    command: list[str] | None = None,
    progress: bool = True,
) -> TrainState:
    """Train stage 2 on the train split's embeddings, select on the val split; write ``run/{best,last}.pt``."""
    stage1_path = Path(features.index["stage1"])
    stage1 = load_state(stage1_path, "stage1")
    features.check_stage1(file_sha256(stage1_path), f"the stage-1 checkpoint now at {stage1_path}")
    train, val = features.split("train"), features.split("val")
    if not train or not val:
        raise TrainConfigError(f"stage 2 needs train and val studies; the features have {len(train)} and {len(val)}")
    split_studies = len(train)
    train = training_share(train, config.data.train_fraction, config.data.split_seed)
    logger.info("stage 2 trains on %d of the train split's %d studies", len(train), split_studies)
    if config.model.backbone != stage1.model_config["backbone"]:
        raise TrainConfigError(
            f"model.backbone: {config.model.backbone!r}, but the features come from a stage 1 with "
            f"{stage1.model_config['backbone']!r}"
        )
    torch.manual_seed(config.seed)
    model = create_model(config.model.name, **config.model.architecture(pooling=config.stage2.pooling))
    if model.embedding_dim != features.embedding_dim:
        raise TrainConfigError(f"embedding size {features.embedding_dim} of the features differs from the "
                               f"backbone's {model.embedding_dim}")
    device = processes.device
    sequence = model.sequence.to(device)
    network: torch.nn.Module = sequence
    if processes.distributed:
        network = DistributedDataParallel(sequence, device_ids=[device] if device.type == "cuda" else None)
    optimization = Optimization(network.parameters(), config.stage2, device)
    state = TrainState(
        stage="stage2",
        model_name=model.name,
        model_config=model.config.to_dict(),
        preprocess=stage1.preprocess,
        weights={},
        config=config.model_dump(mode="json"),
        inputs={"features": str(features.root.resolve()), "stage1": features.index["stage1"],
                "stage1_sha256": features.stage1_sha256, "command": command or [],
                "world_size": processes.world_size},
        extra={"label_prior": label_prior(train), "pooling": config.stage2.pooling, "code": source_code(),
               "data": {**features.cache.describe(), "train_studies": len(train)}},
    )
    dataset = StudyEmbeddings(features, train)
    sampler = DistributedSampler(dataset, num_replicas=processes.world_size, rank=processes.rank, shuffle=True,
                                 seed=config.seed)
    loader = DataLoader(dataset, batch_size=config.stage2.batch_size, sampler=sampler, collate_fn=pad_studies)

    def train_epoch(epoch: int) -> tuple[float, dict[str, list[int]]]:
        network.train()
        sampler.set_epoch(epoch)
        total = count = 0.0
        bar = tqdm(loader, desc=f"stage2 epoch {epoch}", unit="batch", disable=not (progress and processes.is_main))
        for batch in bar:
            batch = batch.to(device)
            with optimization.autocast():
                output = network(batch.features, batch.mask)
            loss = rsna_loss(output.exam.float(), batch.exam, output.image.float(), batch.image, batch.mask)
            optimization.step(loss)
            total += float(loss.detach()) * len(batch.exam)
            count += len(batch.exam)
        total, count = processes.sum([total, count])
        per_process = processes.gather(len(loader))
        return total / max(count, 1.0), {"batches_per_process": per_process}

    def validate() -> dict[str, float | None]:
        return validate_sequence(sequence, features, shard(val, processes, equal=False), processes, optimization)

    return fit(run, state, sequence, optimization, train_epoch, validate, config, processes, resume)


def validate_sequence(sequence: SequenceModel, features: FeatureSet, studies: list[CachedStudy],
                      processes: Processes, optimization: Optimization) -> dict[str, float | None]:
    """Mean RSNA loss per study over ``studies`` (this process's share), the competition loss and the PE AUC."""
    sequence.eval()
    dataset = StudyEmbeddings(features, studies)
    loss_sum = 0.0
    records = []
    with torch.no_grad():
        for index, study in enumerate(studies):
            batch = pad_studies([dataset[index]]).to(processes.device)
            with optimization.autocast():
                output = sequence(batch.features, batch.mask)
            loss_sum += float(rsna_loss(output.exam.float(), batch.exam, output.image.float(), batch.image,
                                        batch.mask))
            records.append((torch.sigmoid(output.exam[0].float()).cpu().numpy(),
                            torch.sigmoid(output.image[0].float()).cpu().numpy(), study.exam, study.image,
                            study.exam_class == "positive"))
    loss_sum, count = processes.sum([loss_sum, len(studies)])
    gathered = [record for part in processes.gather(records) for record in part]
    exam_p = np.stack([r[0] for r in gathered])
    return {
        "val_loss": loss_sum / max(count, 1.0),
        "val_rsna_log_loss": rsna_log_loss(exam_p, np.stack([r[2] for r in gathered]), [r[1] for r in gathered],
                                           [r[3] for r in gathered]),
        "val_study_auc": auc([r[4] for r in gathered], pe_score(exam_p)),
    }
