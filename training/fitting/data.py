"""What the training loops read: stage-1 batches of cached slices, stage-2 batches of whole studies' embeddings.

Stage 1 (paper section 3.2) learns from slices. Each epoch takes from every training study its positive slices and
a fresh random draw of its negative slices (PE shows on a few percent of slices, so taking every slice would spend
the epoch on negatives); ``sampling="study"`` cuts each study's draw into batches of its own, as the paper does,
``"mixed"`` shuffles all draws together. Emboli lie in the hilar part of the scan, so with negatives drawn
uniformly a network can score slices by where they are instead of by what they show; ``negatives="matched"``
draws the negatives from the positions where the training set's positives lie (``position_profile``).
``negatives="within"`` draws them so from the studies with positive slices only: then a slice's patient (an enlarged
heart that comes with emboli, say) says nothing about its label, and only what shows on it does.
``background_negatives`` adds a few negatives drawn uniformly from every study, those without emboli too, so that
the rest of the scan (where a study-level maximum finds its false positives) is not unseen. ``chronic_repeats``
takes the positive slices of chronic-labelled studies that many times (each draw augmented on its own).
``hard_negatives`` adds the slices of studies without emboli that the current weights score highest, mined by stage 1
before the epoch (``training.fitting.stage1.mine_hard_negatives``) and passed in as ``hard``. The plan of an epoch
depends only on (seed, epoch) and those mined slices, which the weights the epoch starts from fix, so a resumed run and
a run on several processes see the same batches.

Stage 2 reads whole studies: embeddings [T, D] of different lengths, padded at the end into [B, T, D] with a mask
that is True on real slices, the layout ``pe_node.model.SequenceModel`` and ``rsna_loss`` take.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from pe_node.findings import EXAM_LABELS
from training.config import Stage1Config
from training.fitting.cache import Cache, CachedStudy
from training.fitting.features import FeatureSet

_EPOCH_STREAM = 11
_PROFILE_BINS = 20
_PROFILE_FLOOR = 0.05
"""Every position keeps at least this share of a uniform draw's weight in the ``matched`` negative profile."""


@dataclass(frozen=True)
class SliceBatch:
    """One stage-1 batch: position ``k`` is slice ``slices[k]`` of study ``studies[k]`` (indices into a list)."""

    studies: np.ndarray
    slices: np.ndarray

    def __len__(self) -> int:
        return len(self.slices)


def epoch_batches(studies: Sequence[CachedStudy], config: Stage1Config, seed: int, epoch: int,
                  hard: Mapping[int, np.ndarray] | None = None) -> list[SliceBatch]:
    """The stage-1 batches of ``epoch`` over ``studies``, in training order. ``hard``: for some studies (by position
    in ``studies``), negative slices hardest first, of which each study's draw adds ``config.hard_negatives``."""
    rng = np.random.default_rng([seed, _EPOCH_STREAM, epoch])
    profile = position_profile(studies) if config.negatives in ("matched", "within") else None
    hard = hard or {}
    draws = [_draw(study, config, rng, profile, hard.get(position)) for position, study in enumerate(studies)]
    if config.sampling == "study":
        batches = []
        for position, chosen in enumerate(draws):
            if len(chosen):
                for part in np.array_split(rng.permutation(chosen), math.ceil(len(chosen) / config.batch_size)):
                    batches.append(SliceBatch(np.full(len(part), position), part))
        return [batches[i] for i in rng.permutation(len(batches))]
    owners = np.concatenate([np.full(len(chosen), position) for position, chosen in enumerate(draws)])
    slices = np.concatenate(draws)
    order = rng.permutation(len(slices))
    return [
        SliceBatch(owners[part], slices[part])
        for part in np.array_split(order, max(1, math.ceil(len(order) / config.batch_size)))
        if len(part)
    ]


def position_profile(studies: Sequence[CachedStudy], bins: int = _PROFILE_BINS) -> np.ndarray:
    """Where along the scan positive slices lie: a histogram over the relative slice position (0 the first slice in
    serving order, 1 the last) of every positive slice of ``studies``, with a floor so that no position is left out,
    summing to 1."""
    counts = np.zeros(bins)
    for study in studies:
        positives = np.flatnonzero(study.image)
        if len(positives):
            np.add.at(counts, _bin(positives, study.slices, bins), 1.0)
    counts = counts / counts.sum() if counts.sum() else np.full(bins, 1.0 / bins)
    counts = np.maximum(counts, _PROFILE_FLOOR / bins)
    return counts / counts.sum()


def _bin(indices: np.ndarray, slices: int, bins: int) -> np.ndarray:
    return np.minimum((indices / max(slices - 1, 1) * bins).astype(np.int64), bins - 1)


def _draw(study: CachedStudy, config: Stage1Config, rng: np.random.Generator,
          profile: np.ndarray | None, hard: np.ndarray | None = None) -> np.ndarray:
    """The slices of one study for one epoch: its positives (all, or a random few; ``chronic_repeats`` times each in
    a chronic-labelled study) and random negatives, drawn uniformly or, with a position ``profile``, where positives
    usually lie; none of a study without positives when negatives are drawn ``within``; then
    ``background_negatives`` more of the rest, uniformly; then the first ``hard_negatives`` of ``hard`` (negative
    slices, hardest first) not drawn yet. The random draws do not depend on ``hard``."""
    positives = np.flatnonzero(study.image)
    candidates = np.flatnonzero(study.image == 0)
    negatives = candidates if config.negatives != "within" or len(positives) else candidates[:0]
    if config.positives_per_study is not None and len(positives) > config.positives_per_study:
        positives = rng.choice(positives, config.positives_per_study, replace=False)
    if config.negatives_per_study is not None and len(negatives) > config.negatives_per_study:
        weights = None
        if profile is not None:
            weights = profile[_bin(negatives, study.slices, len(profile))]
            weights = weights / weights.sum()
        negatives = rng.choice(negatives, config.negatives_per_study, replace=False, p=weights)
    if config.background_negatives:
        rest = np.setdiff1d(candidates, negatives)
        extra = rng.choice(rest, min(config.background_negatives, len(rest)), replace=False)
        negatives = np.concatenate([negatives, extra])
    if config.hard_negatives and hard is not None:
        hard = hard[(study.image[hard] == 0) & ~np.isin(hard, negatives)]
        negatives = np.concatenate([negatives, hard[: config.hard_negatives]])
    if config.chronic_repeats > 1 and (study.labels["chronic_pe"] or study.labels["acute_and_chronic_pe"]):
        positives = np.repeat(positives, config.chronic_repeats)
    return np.sort(np.concatenate([positives, negatives])).astype(np.int64)


class SliceBatches(Dataset):
    """Stage-1 batches read from the cache: (uint8 windows [B, 3, S, S], image labels [B], exam labels [B, 9]).

    Items are whole batches (use a DataLoader with ``batch_size=None``); slices of one study are read from its
    memory map in one sorted sweep.
    """

    def __init__(self, cache: Cache, studies: Sequence[CachedStudy], batches: Sequence[SliceBatch]):
        self.cache = cache
        self.studies = list(studies)
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = self.batches[index]
        size = self.cache.preprocess.size
        images = np.empty((len(batch), 3, size, size), dtype=np.uint8)
        image_labels = np.empty(len(batch), dtype=np.float32)
        exam_labels = np.empty((len(batch), len(EXAM_LABELS)), dtype=np.float32)
        for position in np.unique(batch.studies):
            study = self.studies[position]
            where = np.flatnonzero(batch.studies == position)
            order = np.argsort(batch.slices[where], kind="stable")
            where, wanted = where[order], batch.slices[where][order]
            images[where] = self.cache.images(study)[wanted]
            image_labels[where] = study.image[wanted]
            exam_labels[where] = study.exam
        return torch.from_numpy(images), torch.from_numpy(image_labels), torch.from_numpy(exam_labels)


@dataclass(frozen=True)
class StudyBatch:
    """Stage-2 batch: embeddings [B, T, D], mask [B, T], exam labels [B, 9], image labels [B, T] (0 on padding)."""

    features: torch.Tensor
    mask: torch.Tensor
    exam: torch.Tensor
    image: torch.Tensor

    def to(self, device: torch.device) -> StudyBatch:
        return StudyBatch(*(t.to(device, non_blocking=True) for t in (self.features, self.mask, self.exam, self.image)))


class StudyEmbeddings(Dataset):
    """Stage-2 items, one per study: (embeddings [T, D] float32, image labels [T], exam labels [9])."""

    def __init__(self, features: FeatureSet, studies: Sequence[CachedStudy]):
        self.features = features
        self.studies = list(studies)

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        study = self.studies[index]
        embeddings = torch.from_numpy(np.array(self.features.embeddings(study), dtype=np.float32))
        return embeddings, torch.from_numpy(study.image.astype(np.float32)), torch.from_numpy(study.exam)


def pad_studies(items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> StudyBatch:
    """Collate studies of different lengths, padding at the end (the DataLoader ``collate_fn`` of stage 2)."""
    longest = max(len(embeddings) for embeddings, _, _ in items)
    dim = items[0][0].shape[1]
    features = torch.zeros(len(items), longest, dim)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    image = torch.zeros(len(items), longest)
    for row, (embeddings, labels, _) in enumerate(items):
        features[row, : len(embeddings)] = embeddings
        mask[row, : len(embeddings)] = True
        image[row, : len(labels)] = labels
    exam = torch.stack([exam for _, _, exam in items])
    return StudyBatch(features=features, mask=mask, exam=exam, image=image)
