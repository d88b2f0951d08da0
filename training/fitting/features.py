"""Stage-1 embeddings of every cached study: the input stage 2 trains on (paper Fig. 1 and section 3.2).

The trained stage-1 encoder runs through ``pe_node.model.Predictor.embed_inputs``: the same folded, channels-last,
autocast code path as serving, on the cached preprocessed slices, so stage 2 learns from the embeddings it will be
given at inference. Layout under the features folder::

    index.json          format, the stage-1 checkpoint and its SHA-256, the cache folder, embedding size
    <Study>.npy         float32 [slices, embedding size], in slice order

Extraction resumes (studies with a file are skipped) and, under torchrun, shares the studies out among processes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pe_node import storage
from pe_node.model import Predictor
from pe_node.model.checkpoint import file_sha256
from training.fitting.cache import Cache, CachedStudy
from training.fitting.distributed import Processes, shard
from training.fitting.state import build_model, load_state, write_json

logger = logging.getLogger(__name__)

FEATURES_FORMAT = "pe-train-features"
_STEP = 256
"""Slices read from the cache at a time."""


class FeaturesError(ValueError):
    """A features folder that is missing, incomplete or made from another stage 1; the message says which."""


class FeatureSet:
    """An opened features folder: the embeddings of the studies of one cache, by one stage-1 checkpoint."""

    def __init__(self, root: Path, index: dict[str, Any], cache: Cache):
        self.root = root
        self.index = index
        self.cache = cache
        self.embedding_dim = int(index["embedding_dim"])
        self.stage1_sha256 = str(index["stage1_sha256"])

    @classmethod
    def open(cls, root: Path) -> FeatureSet:
        root = Path(root)
        try:
            index = json.loads((root / "index.json").read_text())
        except FileNotFoundError:
            raise FeaturesError(f"features {root}: no index.json; extract them with pe-train features") from None
        if index.get("format") != FEATURES_FORMAT:
            raise FeaturesError(f"features {root}: format {index.get('format')!r}, expected {FEATURES_FORMAT!r}")
        cache = Cache.open(Path(index["cache"]))
        missing = [s.study_instance_uid for s in cache.studies if not _path(root, s).is_file()]
        if missing:
            raise FeaturesError(
                f"features {root}: {len(missing)} of {len(cache.studies)} studies have no embeddings yet "
                f"(e.g. {missing[0]}); run pe-train features again to finish"
            )
        return cls(root, index, cache)

    def split(self, name: str) -> list[CachedStudy]:
        return self.cache.split(name)

    def embeddings(self, study: CachedStudy) -> np.ndarray:
        """float32 [slices, embedding size], memory-mapped read-only."""
        return np.load(_path(self.root, study), mmap_mode="r")

    def check_stage1(self, sha256: str, what: str) -> None:
        """Refuse to combine these embeddings with a model trained on another stage 1's."""
        if sha256 != self.stage1_sha256:
            raise FeaturesError(
                f"features {self.root} were made by stage-1 checkpoint {self.index['stage1']} "
                f"(SHA-256 {self.stage1_sha256[:12]}), but {what} belongs to stage 1 {sha256[:12]}"
            )


def extract_features(
    stage1: Path,
    cache: Cache,
    out: Path,
    processes: Processes,
    batch_size: int = 32,
    progress: bool = True,
) -> FeatureSet:
    """Embed every study of ``cache`` with the stage-1 checkpoint ``stage1``; write them under ``out``."""
    state = load_state(stage1, "stage1")
    if state.preprocess != cache.preprocess.to_dict():
        raise FeaturesError(
            f"stage 1 {stage1} was trained on preprocessing {state.preprocess}, the cache {cache.root} holds "
            f"{cache.preprocess.to_dict()}"
        )
    sha = file_sha256(Path(stage1))
    index = {
        "format": FEATURES_FORMAT,
        "stage1": str(Path(stage1).resolve()),
        "stage1_sha256": sha,
        "cache": str(cache.root.resolve()),
        "embedding_dim": 0,
    }
    previous = _previous_index(out)
    if previous is not None and previous.get("stage1_sha256") != sha:
        raise FeaturesError(f"features {out} were made by another stage 1 ({previous.get('stage1')}); "
                            "use a new folder for this one")
    model = build_model(state)
    index["embedding_dim"] = model.embedding_dim
    predictor = Predictor(model, cache.preprocess, device=processes.device, batch_size=batch_size)
    out.mkdir(parents=True, exist_ok=True)
    if processes.is_main:
        write_json(out / "index.json", index)
    todo = [study for study in cache.studies if not _path(out, study).is_file()]
    mine = shard(todo, processes, equal=False)
    for study in tqdm(mine, desc="features", unit="study", disable=not progress or not processes.is_main):
        _embed_study(predictor, cache, study, out)
    processes.barrier()
    logger.info("features of %d studies in %s (%d extracted here)", len(cache.studies), out, len(mine))
    return FeatureSet.open(out)


def _embed_study(predictor: Predictor, cache: Cache, study: CachedStudy, out: Path) -> None:
    embeddings = np.empty((study.slices, predictor.model.embedding_dim), dtype=np.float32)
    for start in range(0, study.slices, _STEP):
        stop = min(start + _STEP, study.slices)
        embeddings[start:stop] = predictor.embed_inputs(cache.inputs(study, slice(start, stop))).cpu().numpy()
    path = _path(out, study)
    storage.atomic_write(path, lambda stream: np.save(stream, embeddings))


def _previous_index(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "index.json").read_text())
    except FileNotFoundError:
        return None


def _path(root: Path, study: CachedStudy) -> Path:
    return root / f"{study.study_instance_uid}.npy"
