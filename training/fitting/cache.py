"""The preprocessed cache: every study of an RSPECT-layout folder as the network sees it, so epochs decode no DICOM.

``prepare`` reads ``train.csv`` with ``training.rspect``, loads each study's series with
``pe_node.pipeline.series.load_series`` (so slices are in the serving order, sorted along the slice normal) and runs
``pe_node.model.preprocess`` on it exactly as the Predictor does (same crop planning, same windows and resize). The
three windowed channels, each in [0, 1] before normalisation, are stored as uint8 (step 1/255): a window of at
least 400 HU then moves by under 0.8 HU, and ``inputs`` returns the normalised float input within
``QUANTISATION_TOLERANCE`` of the serving path's.

Layout under the cache folder::

    index.json                    format, preprocessing, source folder, split settings, split of every study
    studies/<Study>.npy           uint8 [slices, 3, size, size], memory-mapped when read
    studies/<Study>.json          labels: the 13 study labels, image labels and SOP UIDs in slice order, crop box

A study counts as cached once its ``.json`` exists (written after its ``.npy``, both by rename), so an interrupted
``prepare`` picks up where it stopped. Splits are by study (no study is in two splits), stratified by exam class
(negative, positive, indeterminate) so that every split with studies gets positives, and fixed by the split seed.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pe_node import __version__, storage
from pe_node.findings import EXAM_LABELS, IMAGE_LABEL
from pe_node.model import PreprocessConfig, plan_crop, preprocess_slices
from pe_node.pipeline.series import SeriesError, load_series
from training.config import SPLITS, DataConfig
from training.fitting.state import write_json
from training.rspect import STUDY_COLUMNS, RSPECTStudy, read_rspect

logger = logging.getLogger(__name__)

CACHE_FORMAT = "pe-train-cache"
CACHE_VERSION = 1
QUANTISATION_TOLERANCE = 0.5 / 255 / min(PreprocessConfig().std) + 1e-5
"""Largest difference between ``inputs`` and ``preprocess_slices`` for the default normalisation: half a uint8
step of a window, divided by the smallest channel std."""
_CHUNK = 32
_CLASSES = ("negative", "positive", "indeterminate")


class CacheError(ValueError):
    """A cache folder that is missing, incomplete or made with other settings; the message names what differs."""


@dataclass(frozen=True)
class CachedStudy:
    """One cached study: identity, split, labels (image labels in slice order) and where its crop box lay."""

    study_instance_uid: str
    series_instance_uid: str
    split: str
    labels: dict[str, int]
    image: np.ndarray
    sop_instance_uids: tuple[str, ...]
    crop: tuple[int, int, int] | None

    @property
    def slices(self) -> int:
        return len(self.image)

    @property
    def exam(self) -> np.ndarray:
        """The nine exam labels as float32 [9], in ``EXAM_LABELS`` order."""
        return np.array([self.labels[label] for label in EXAM_LABELS], dtype=np.float32)

    @property
    def exam_class(self) -> str:
        """negative, positive (PE on some slice) or indeterminate: the strata of the split."""
        if self.image.any():
            return "positive"
        return "indeterminate" if self.labels["indeterminate"] else "negative"

    def to_json(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "labels": self.labels,
            IMAGE_LABEL: [int(v) for v in self.image],
            "sop_instance_uids": list(self.sop_instance_uids),
            "crop": list(self.crop) if self.crop else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], split: str) -> CachedStudy:
        return cls(
            study_instance_uid=data["study_instance_uid"],
            series_instance_uid=data["series_instance_uid"],
            split=split,
            labels={key: int(value) for key, value in data["labels"].items()},
            image=np.asarray(data[IMAGE_LABEL], dtype=np.int8),
            sop_instance_uids=tuple(data["sop_instance_uids"]),
            crop=tuple(data["crop"]) if data["crop"] else None,
        )


class Cache:
    """An opened cache folder: its preprocessing, its source and its studies by split."""

    def __init__(self, root: Path, index: dict[str, Any], studies: list[CachedStudy]):
        self.root = root
        self.index = index
        self.preprocess = PreprocessConfig.from_dict(index["preprocess"])
        self.source = Path(index["source"])
        self.studies = studies

    @classmethod
    def open(cls, root: Path) -> Cache:
        """Read ``root/index.json`` and every cached study's labels; refuses a cache that ``prepare`` has not
        finished."""
        root = Path(root)
        index = _read_index(root)
        studies, missing = [], []
        for uid, split in index["splits"].items():
            sidecar = _study_paths(root, uid)[1]
            if sidecar.is_file():
                studies.append(CachedStudy.from_json(json.loads(sidecar.read_text()), split))
            elif uid not in index.get("failed", {}):
                missing.append(uid)
        if missing:
            raise CacheError(
                f"cache {root}: {len(missing)} of {len(index['splits'])} studies are not prepared yet "
                f"(e.g. {missing[0]}); run pe-train prepare again to finish it"
            )
        return cls(root, index, studies)

    def split(self, name: str) -> list[CachedStudy]:
        """The studies of split ``name`` (train, val or test), in data set order."""
        if name not in SPLITS:
            raise ValueError(f"split {name!r}: must be one of {', '.join(SPLITS)}")
        return [study for study in self.studies if study.split == name]

    def images(self, study: CachedStudy) -> np.ndarray:
        """The study's windowed slices, uint8 [slices, 3, size, size], memory-mapped read-only."""
        return np.load(_study_paths(self.root, study.study_instance_uid)[0], mmap_mode="r")

    def inputs(self, study: CachedStudy, indices: Sequence[int] | slice = slice(None)) -> torch.Tensor:
        """Slices ``indices`` of a study as the network input, float32 [k, 3, size, size]."""
        return to_input(torch.from_numpy(np.array(self.images(study)[indices])), self.preprocess)

    def describe(self) -> dict[str, Any]:
        """Counts by split and class, for logs, metrics and model cards."""
        counts: dict[str, Any] = {}
        for split in SPLITS:
            studies = self.split(split)
            if studies:
                counts[split] = {
                    "studies": len(studies),
                    **{name: sum(s.exam_class == name for s in studies) for name in _CLASSES},
                    "slices": sum(s.slices for s in studies),
                    "positive_slices": int(sum(s.image.sum() for s in studies)),
                }
        return {"cache": str(self.root), "source": str(self.source), "splits": counts,
                "failed": len(self.index.get("failed", {}))}


def quantise(inputs: torch.Tensor, preprocess: PreprocessConfig) -> torch.Tensor:
    """Normalised network input [B, 3, S, S] back to its windows in [0, 1], stored as uint8 (0..255)."""
    mean = torch.tensor(preprocess.mean, device=inputs.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=inputs.device).view(1, 3, 1, 1)
    return (inputs * std + mean).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


def to_input(stored: torch.Tensor, preprocess: PreprocessConfig) -> torch.Tensor:
    """uint8 windows [B, 3, S, S] (on any device) to the normalised float32 network input: ``quantise`` undone."""
    mean = torch.tensor(preprocess.mean, device=stored.device).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(preprocess.std, device=stored.device).view(1, 3, 1, 1)
    return stored.float().mul_(1.0 / 255.0).sub_(mean).mul_(inv_std)


def assign_splits(classes: dict[str, str], data: DataConfig, split_all: str | None = None) -> dict[str, str]:
    """The split of every study (``classes``: study UID to exam class), stratified by class and fixed by the seed.

    Within each class ``val_fraction`` and ``test_fraction`` of the studies (rounded, at least one while a study
    of the class is left for training) go to val and test, the rest to train. ``split_all`` puts every study in
    one split instead (a held-out test set).
    """
    if split_all is not None:
        if split_all not in SPLITS:
            raise ValueError(f"split_all {split_all!r}: must be one of {', '.join(SPLITS)}")
        return {uid: split_all for uid in classes}
    splits: dict[str, str] = {}
    for position, name in enumerate(_CLASSES):
        members = [uid for uid, cls in classes.items() if cls == name]
        order = np.random.default_rng([data.split_seed, position]).permutation(len(members))
        shuffled = [members[i] for i in order]
        start = 0
        for split, fraction in (("val", data.val_fraction), ("test", data.test_fraction)):
            count = round(fraction * len(shuffled))
            if fraction > 0 and count == 0 and len(shuffled) - start > 1:
                count = 1
            count = min(count, max(len(shuffled) - start - 1, 0))
            splits.update((uid, split) for uid in shuffled[start : start + count])
            start += count
        splits.update((uid, "train") for uid in shuffled[start:])
    return {uid: splits[uid] for uid in classes}


def training_share(studies: list[CachedStudy], fraction: float, seed: int) -> list[CachedStudy]:
    """``fraction`` of ``studies`` within each exam class (rounded, at least one of a class present), in their order.

    Drawn with ``seed``: the same studies every time, and those of a smaller fraction among those of a larger one, so
    that the points of a learning curve add studies rather than draw new ones (``data.train_fraction``).
    """
    if fraction >= 1.0:
        return list(studies)
    kept: set[str] = set()
    for position, name in enumerate(_CLASSES):
        members = [study.study_instance_uid for study in studies if study.exam_class == name]
        if members:
            order = np.random.default_rng([seed, position, 1]).permutation(len(members))
            kept.update(members[i] for i in order[: max(1, round(fraction * len(members)))])
    return [study for study in studies if study.study_instance_uid in kept]


def prepare(
    data_root: Path,
    cache_root: Path,
    preprocess: PreprocessConfig,
    data: DataConfig,
    split_all: str | None = None,
    progress: bool = True,
) -> Cache:
    """Cache every study of the RSPECT-layout folder ``data_root`` under ``cache_root``; resumes a partial cache.

    A study whose series cannot be read (``SeriesError``) is logged and recorded as failed, not fatal: the real data
    set is 900 GB and one bad series should not stop the rest. Re-running with other preprocessing, source or split
    settings is refused naming what differs.
    """
    data_root, cache_root = Path(data_root).resolve(), Path(cache_root)
    studies = read_rspect(data_root)
    classes = {uid: _exam_class(study) for uid, study in studies.items()}
    index = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "pe_node_version": __version__,
        "preprocess": preprocess.to_dict(),
        "source": str(data_root),
        "storage": "uint8 windows [slices, 3, size, size]",
        "split": {"val_fraction": data.val_fraction, "test_fraction": data.test_fraction,
                  "split_seed": data.split_seed, "split_all": split_all},
        "splits": assign_splits(classes, data, split_all),
        "failed": {},
    }
    (cache_root / "studies").mkdir(parents=True, exist_ok=True)
    if (cache_root / "index.json").exists():
        _check_same(cache_root, _read_index(cache_root), index)
    write_json(cache_root / "index.json", index)
    todo = [study for uid, study in studies.items() if not _study_paths(cache_root, uid)[1].is_file()]
    logger.info("prepare %s: %d studies, %d cached already, %d to do", data_root, len(studies),
                len(studies) - len(todo), len(todo))
    failed: dict[str, str] = {}
    for uid, error in _run(todo, cache_root, preprocess, data.workers, progress):
        if error is not None:
            logger.warning("study %s not cached: %s", uid, error)
            failed[uid] = error
    index["failed"] = failed
    write_json(cache_root / "index.json", index)
    return Cache.open(cache_root)


def cache_study(study: RSPECTStudy, cache_root: Path, preprocess: PreprocessConfig) -> CachedStudy:
    """Load, preprocess and write one study; returns its record (split not yet known: empty)."""
    series = load_series([image.path for image in study.images])
    if len(series) != len(study.images):
        raise SeriesError(f"study {study.study_instance_uid}: train.csv lists {len(study.images)} slices, "
                          f"{len(series)} could be read as one series")
    by_uid = {image.sop_instance_uid: image.pe_present_on_image for image in study.images}
    image_labels = np.array([by_uid[uid] for uid in series.sop_instance_uids], dtype=np.int8)
    box = plan_crop(series.hu, preprocess)
    array_path, sidecar = _study_paths(cache_root, study.study_instance_uid)
    with storage.replacing(array_path) as partial:
        stored = np.lib.format.open_memmap(
            partial, mode="w+", dtype=np.uint8, shape=(len(series), 3, preprocess.size, preprocess.size)
        )
        with torch.inference_mode():
            for start in range(0, len(series), _CHUNK):
                chunk = torch.from_numpy(series.hu[start : start + _CHUNK])
                stored[start : start + len(chunk)] = quantise(preprocess_slices(chunk, preprocess, box),
                                                              preprocess).numpy()
        stored.flush()
        del stored
    record = CachedStudy(
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        split="",
        labels={column: study.labels[column] for column in STUDY_COLUMNS},
        image=image_labels,
        sop_instance_uids=tuple(series.sop_instance_uids),
        crop=(box.top, box.left, box.side) if box else None,
    )
    write_json(sidecar, record.to_json())
    return record


def _run(todo: list[RSPECTStudy], cache_root: Path, preprocess: PreprocessConfig, workers: int,
         progress: bool) -> Iterator[tuple[str, str | None]]:
    jobs = [(study, cache_root, preprocess) for study in todo]
    bar = tqdm(total=len(jobs), desc="prepare", unit="study", disable=not progress or not jobs)
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker) if workers > 1 and jobs else None
    try:
        results = pool.imap_unordered(_cache_job, jobs) if pool is not None else map(_cache_job, jobs)
        for result in results:
            bar.update()
            yield result
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()


def _init_worker() -> None:
    torch.set_num_threads(1)


def _cache_job(job: tuple[RSPECTStudy, Path, PreprocessConfig]) -> tuple[str, str | None]:
    study, cache_root, preprocess = job
    try:
        cache_study(study, cache_root, preprocess)
    except SeriesError as error:
        return study.study_instance_uid, str(error)
    return study.study_instance_uid, None


def _exam_class(study: RSPECTStudy) -> str:
    if study.pe_present:
        return "positive"
    return "indeterminate" if study.labels["indeterminate"] else "negative"


def _study_paths(root: Path, uid: str) -> tuple[Path, Path]:
    folder = root / "studies"
    return folder / f"{uid}.npy", folder / f"{uid}.json"


def _read_index(root: Path) -> dict[str, Any]:
    path = root / "index.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"cache {root}: no index.json; make the cache with pe-train prepare") from None
    except json.JSONDecodeError as error:
        raise CacheError(f"cache {root}: index.json is not valid JSON ({error})") from None
    if index.get("format") != CACHE_FORMAT or index.get("version") != CACHE_VERSION:
        raise CacheError(
            f"cache {root}: format {index.get('format')!r} version {index.get('version')!r}, "
            f"expected {CACHE_FORMAT!r} version {CACHE_VERSION}"
        )
    return index


def _check_same(root: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    for key in ("preprocess", "source", "split"):
        if old.get(key) != new[key]:
            raise CacheError(
                f"cache {root} was made with {key} {old.get(key)!r}, this run asks for {new[key]!r}; "
                "use another cache folder or the same settings"
            )
