"""pe-train prepare: the cache layout, splits by study, resuming, and agreement with pe-node's preprocessing."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pe_node.model import PreprocessConfig, plan_crop, preprocess_slices
from pe_node.pipeline.series import load_series
from training.config import DataConfig
from training.fitting.cache import (
    QUANTISATION_TOLERANCE,
    Cache,
    CachedStudy,
    CacheError,
    assign_splits,
    prepare,
    training_share,
)
from training.rspect import read_rspect

PREPROCESS = PreprocessConfig(size=48, crop="body")
DATA = DataConfig(val_fraction=0.34, split_seed=1)


@pytest.fixture(scope="module")
def cache(phantom_train_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return prepare(phantom_train_dir, tmp_path_factory.mktemp("cache"), PREPROCESS, DATA, progress=False)


def test_every_study_is_cached_as_uint8_windows_with_its_labels(cache: Cache, phantom_train_dir: Path) -> None:
    source = read_rspect(phantom_train_dir)
    assert {s.study_instance_uid for s in cache.studies} == set(source)
    for study in cache.studies:
        images = cache.images(study)
        assert images.dtype == np.uint8 and images.shape == (study.slices, 3, 48, 48)
        assert isinstance(images, np.memmap)
        labels = {image.sop_instance_uid: image.pe_present_on_image
                  for image in source[study.study_instance_uid].images}
        assert [labels[uid] for uid in study.sop_instance_uids] == study.image.tolist()
        assert study.labels == source[study.study_instance_uid].labels
    assert cache.preprocess == PREPROCESS
    assert json.loads((cache.root / "index.json").read_text())["source"] == str(phantom_train_dir.resolve())


def test_studies_are_split_by_study_with_positives_in_train_and_val(cache: Cache) -> None:
    train, val = cache.split("train"), cache.split("val")
    assert not cache.split("test")
    assert {s.study_instance_uid for s in train}.isdisjoint(s.study_instance_uid for s in val)
    assert len(train) + len(val) == len(cache.studies)
    assert any(s.exam_class == "positive" for s in train) and any(s.exam_class == "positive" for s in val)


def test_cached_inputs_match_pe_nodes_preprocessing_of_the_series(cache: Cache, phantom_train_dir: Path) -> None:
    source = read_rspect(phantom_train_dir)
    for study in cache.studies[:3]:
        series = load_series([image.path for image in source[study.study_instance_uid].images])
        assert series.sop_instance_uids == list(study.sop_instance_uids)  # slice order is the serving order
        box = plan_crop(series.hu, PREPROCESS)
        assert study.crop == ((box.top, box.left, box.side) if box else None)
        served = preprocess_slices(series.hu, PREPROCESS, box)
        difference = (cache.inputs(study) - served).abs().max().item()
        assert difference <= QUANTISATION_TOLERANCE
    assert QUANTISATION_TOLERANCE < 0.01  # under 1/100 of a normalised unit: well below the image noise


def test_prepare_resumes_and_redoes_only_what_is_missing(cache: Cache, phantom_train_dir: Path,
                                                         tmp_path: Path) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(cache.root, copy)
    first, second = cache.studies[0], cache.studies[1]
    (copy / "studies" / f"{first.study_instance_uid}.json").unlink()
    (copy / "studies" / f"{first.study_instance_uid}.npy").unlink()
    with pytest.raises(CacheError, match="1 of 8 studies are not prepared yet"):
        Cache.open(copy)
    untouched = copy / "studies" / f"{second.study_instance_uid}.npy"
    before = untouched.stat().st_mtime_ns
    resumed = prepare(phantom_train_dir, copy, PREPROCESS, DATA, progress=False)
    assert untouched.stat().st_mtime_ns == before
    assert np.array_equal(resumed.images(resumed.studies[0]), cache.images(cache.studies[0]))
    assert [s.split for s in resumed.studies] == [s.split for s in cache.studies]


def test_prepare_refuses_to_mix_preprocessing_in_one_cache(cache: Cache, phantom_train_dir: Path,
                                                           tmp_path: Path) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(cache.root, copy)
    with pytest.raises(CacheError, match="was made with preprocess"):
        prepare(phantom_train_dir, copy, PreprocessConfig(size=64, crop="body"), DATA, progress=False)


def test_a_study_that_cannot_be_read_is_recorded_and_skipped(phantom_train_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(phantom_train_dir, data)
    broken = next(iter(read_rspect(data).values()))
    broken.images[0].path.write_bytes(b"not a DICOM file")
    made = prepare(data, tmp_path / "cache", PREPROCESS, DATA, progress=False)
    assert broken.study_instance_uid not in {s.study_instance_uid for s in made.studies}
    assert len(made.studies) == 7
    index = json.loads((made.root / "index.json").read_text())
    assert "could be read as one series" in index["failed"][broken.study_instance_uid]


def test_split_everything_into_one_split_for_a_held_out_set() -> None:
    classes = {f"s{i}": "negative" if i % 3 else "positive" for i in range(9)}
    assert set(assign_splits(classes, DATA, split_all="test").values()) == {"test"}


def test_splits_are_stratified_deterministic_and_give_every_split_positives() -> None:
    classes = {f"n{i}": "negative" for i in range(20)}
    classes |= {f"p{i}": "positive" for i in range(8)}
    classes |= {f"i{i}": "indeterminate" for i in range(2)}
    config = DataConfig(val_fraction=0.25, test_fraction=0.25, split_seed=7)
    splits = assign_splits(classes, config)
    assert splits == assign_splits(classes, config)
    assert splits != assign_splits(classes, DataConfig(val_fraction=0.25, test_fraction=0.25, split_seed=8))
    counts = Counter((classes[uid], split) for uid, split in splits.items())
    assert counts[("positive", "val")] == 2 and counts[("positive", "test")] == 2 and counts[("positive", "train")] == 4
    assert counts[("negative", "val")] == 5 and counts[("negative", "test")] == 5
    assert counts[("indeterminate", "train")] >= 1


def _study(uid: str, exam_class: str) -> CachedStudy:
    image = np.array([0, 1 if exam_class == "positive" else 0, 0], dtype=np.int8)
    return CachedStudy(uid, f"{uid}.1", "train", {"indeterminate": int(exam_class == "indeterminate")}, image,
                       ("1", "2", "3"), None)


def test_a_training_share_keeps_each_class_in_proportion_and_grows_by_adding_studies() -> None:
    studies = [_study(f"n{i}", "negative") for i in range(40)] + [_study(f"p{i}", "positive") for i in range(20)]
    studies += [_study("i0", "indeterminate")]
    half = training_share(studies, 0.5, 3)
    counts = Counter(study.exam_class for study in half)
    assert counts == {"negative": 20, "positive": 10, "indeterminate": 1}, "at least one of a class present"
    assert half == [study for study in studies if study in half], "in the split's order"
    assert [s.study_instance_uid for s in half] == [s.study_instance_uid for s in training_share(studies, 0.5, 3)]
    assert {s.study_instance_uid for s in half} != {s.study_instance_uid for s in training_share(studies, 0.5, 4)}
    quarter = {s.study_instance_uid for s in training_share(studies, 0.25, 3)}
    assert len(quarter) == 16 and quarter < {s.study_instance_uid for s in half}, "a smaller share within a larger"
    assert training_share(studies, 1.0, 3) == studies


def test_cache_inputs_are_normalised_float32(cache: Cache) -> None:
    inputs = cache.inputs(cache.studies[0], [0, 2])
    assert inputs.dtype == torch.float32 and inputs.shape == (2, 3, 48, 48)
