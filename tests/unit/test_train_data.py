"""What the training loops read: stage-1 epoch plans, their shares per process, and padded stage-2 batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pe_node.findings import EXAM_LABELS
from training.config import Stage1Config
from training.fitting.augment import augment
from training.fitting.cache import CachedStudy
from training.fitting.data import epoch_batches, pad_studies, position_profile
from training.fitting.distributed import Processes, shard
from training.fitting.stage1 import validation_slices

LABELS = {label: 0 for label in ("negative_exam_for_pe", "qa_motion", "qa_contrast", "flow_artifact",
                                 "rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1", "leftsided_pe", "chronic_pe",
                                 "true_filling_defect_not_pe", "rightsided_pe", "acute_and_chronic_pe",
                                 "central_pe", "indeterminate")}


def _study(uid: str, positives: list[int], slices: int = 40) -> CachedStudy:
    image = np.zeros(slices, dtype=np.int8)
    image[positives] = 1
    return CachedStudy(uid, uid + ".1", "train", dict(LABELS), image, tuple(f"{uid}.{k}" for k in range(slices)), None)


STUDIES = [_study("a", [10, 11, 12]), _study("b", []), _study("c", list(range(5, 25))), _study("d", [])]


def _drawn(batches: list) -> list[tuple[int, int]]:
    return [(int(s), int(k)) for batch in batches for s, k in zip(batch.studies, batch.slices, strict=True)]


def test_study_sampling_makes_batches_of_one_study_with_all_positives_and_a_few_negatives() -> None:
    config = Stage1Config(batch_size=8, negatives_per_study=6, sampling="study")
    batches = epoch_batches(STUDIES, config, seed=0, epoch=1)
    assert all(len(set(batch.studies.tolist())) == 1 and 0 < len(batch) <= 8 for batch in batches)
    drawn = _drawn(batches)
    assert len(drawn) == len(set(drawn))
    for position, study in enumerate(STUDIES):
        mine = [k for s, k in drawn if s == position]
        assert set(np.flatnonzero(study.image)) <= set(mine)
        assert sum(study.image[k] == 0 for k in mine) == 6


def test_mixed_sampling_draws_the_same_slices_across_studies() -> None:
    config = Stage1Config(batch_size=8, negatives_per_study=6, sampling="mixed")
    batches = epoch_batches(STUDIES, config, seed=0, epoch=1)
    assert any(len(set(batch.studies.tolist())) > 1 for batch in batches)
    drawn = _drawn(batches)
    assert len(drawn) == len(set(drawn)) == 3 + 6 + 6 + 20 + 6 + 6


def test_epoch_plans_depend_only_on_seed_and_epoch() -> None:
    config = Stage1Config(batch_size=8, negatives_per_study=6)
    one = _drawn(epoch_batches(STUDIES, config, seed=0, epoch=2))
    assert one == _drawn(epoch_batches(STUDIES, config, seed=0, epoch=2))
    assert one != _drawn(epoch_batches(STUDIES, config, seed=0, epoch=3))
    assert one != _drawn(epoch_batches(STUDIES, config, seed=1, epoch=2))


def test_caps_limit_positives_and_none_takes_every_slice() -> None:
    capped = Stage1Config(batch_size=8, positives_per_study=4, negatives_per_study=2)
    drawn = _drawn(epoch_batches(STUDIES, capped, seed=0, epoch=1))
    assert sum(1 for s, _ in drawn if s == 2) == 4 + 2
    everything = Stage1Config(batch_size=8, negatives_per_study=None)
    assert len(_drawn(epoch_batches(STUDIES, everything, seed=0, epoch=1))) == 4 * 40


def test_each_process_gets_an_equal_disjoint_share_of_the_batches() -> None:
    batches = list(range(11))
    shares = [shard(batches, Processes(rank, 3, rank, torch.device("cpu"))) for rank in range(3)]
    assert [len(share) for share in shares] == [3, 3, 3]
    assert len(set().union(*map(set, shares))) == 9
    validation = [shard(batches, Processes(rank, 3, rank, torch.device("cpu")), equal=False) for rank in range(3)]
    assert sorted(sum(validation, [])) == batches


def test_studies_are_padded_at_the_end_with_a_mask() -> None:
    items = [
        (torch.ones(3, 4), torch.tensor([0.0, 1.0, 0.0]), torch.zeros(len(EXAM_LABELS))),
        (torch.full((5, 4), 2.0), torch.ones(5), torch.ones(len(EXAM_LABELS))),
    ]
    batch = pad_studies(items)
    assert batch.features.shape == (2, 5, 4) and batch.exam.shape == (2, 9)
    assert batch.mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert batch.features[0, 3:].abs().sum() == 0 and batch.image[0].tolist() == [0, 1, 0, 0, 0]


def test_augmentation_moves_each_slice_a_little_and_keeps_its_shape() -> None:
    images = torch.zeros(4, 3, 32, 32)
    images[:, :, 12:20, 12:20] = 1.0
    moved = augment(images, torch.Generator().manual_seed(0))
    assert moved.shape == images.shape
    assert not torch.equal(moved, images)
    assert not torch.equal(moved[0], moved[1])  # each slice its own transform
    assert (moved.sum(dim=(1, 2, 3)) / images.sum(dim=(1, 2, 3))).sub(1).abs().max() < 0.3  # scaled by 0.9-1.1
    again = augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(moved, again)


def test_validation_reads_every_positive_and_a_fixed_spread_of_negatives() -> None:
    study = STUDIES[0]
    assert validation_slices(study, None).tolist() == list(range(40))
    chosen = validation_slices(study, 4)
    assert set(chosen) >= {10, 11, 12} and len(chosen) == 7
    assert chosen.tolist() == validation_slices(study, 4).tolist()
    assert {0, 39} <= set(chosen.tolist())  # spread from the first slice to the last


def test_position_profile_peaks_where_positives_lie_and_leaves_no_position_out() -> None:
    profile = position_profile(STUDIES, bins=10)
    assert profile.sum() == pytest.approx(1.0)
    assert int(np.argmax(profile)) in (2, 3, 4, 5)  # positives of a and c lie at slices 5-24 of 40
    assert profile.min() > 0


def test_matched_negatives_come_from_where_positives_lie() -> None:
    studies = [_study(f"n{i}", []) for i in range(30)] + [_study("p", list(range(16, 24)))]
    uniform = Stage1Config(batch_size=8, negatives_per_study=4, negatives="uniform")
    matched = Stage1Config(batch_size=8, negatives_per_study=4, negatives="matched")

    def central_share(config: Stage1Config) -> float:
        drawn = [k for s, k in _drawn(epoch_batches(studies, config, seed=0, epoch=1)) if s < 30]
        return float(np.mean([14 <= k <= 25 for k in drawn]))

    assert central_share(matched) > 0.8 > 0.5 > central_share(uniform)


def test_within_negatives_come_from_the_positive_studies_alone() -> None:
    studies = [_study(f"n{i}", []) for i in range(10)] + [_study("p", list(range(16, 24))), _study("q", [30, 31])]
    config = Stage1Config(batch_size=8, negatives_per_study=4, negatives="within", sampling="mixed")
    drawn = _drawn(epoch_batches(studies, config, seed=0, epoch=1))
    assert {s for s, _ in drawn} == {10, 11}, "no slice of a study without positives"
    for index in (10, 11):
        study = studies[index]
        taken = [k for s, k in drawn if s == index]
        assert sorted(k for k in taken if study.image[k]) == np.flatnonzero(study.image).tolist()
        assert sum(1 for k in taken if not study.image[k]) == 4


def test_background_negatives_come_from_every_study_and_span_the_scan() -> None:
    studies = [_study(f"n{i}", []) for i in range(20)] + [_study("p", list(range(16, 24)))]
    config = Stage1Config(batch_size=8, negatives_per_study=4, negatives="within", background_negatives=3,
                          sampling="mixed")
    drawn = _drawn(epoch_batches(studies, config, seed=0, epoch=1))
    assert {s for s, _ in drawn} == set(range(21)), "every study gives background negatives"
    for index in range(20):
        assert sum(1 for s, _ in drawn if s == index) == 3
    positive = [k for s, k in drawn if s == 20]
    assert len(positive) == 8 + 4 + 3 and len(set(positive)) == len(positive), "no slice drawn twice"
    background = [k for s, k in drawn if s < 20]
    assert min(background) < 10 and max(background) > 30, "drawn over the whole scan, not where emboli lie"
    without = Stage1Config(batch_size=8, negatives_per_study=4, negatives="within", sampling="mixed")
    assert {s for s, _ in _drawn(epoch_batches(studies, without, seed=0, epoch=1))} == {20}


def test_chronic_repeats_draw_the_positives_of_chronic_studies_that_many_times() -> None:
    chronic = _study("ch", [8, 9, 10])
    chronic.labels["chronic_pe"] = 1
    mixed = _study("ac", [20, 21])
    mixed.labels["acute_and_chronic_pe"] = 1
    studies = [_study("acute", [5, 6, 7]), chronic, mixed]
    once = Stage1Config(batch_size=8, negatives_per_study=4, sampling="mixed")
    thrice = Stage1Config(batch_size=8, negatives_per_study=4, sampling="mixed", chronic_repeats=3)
    plain, repeated = (_drawn(epoch_batches(studies, config, seed=0, epoch=1)) for config in (once, thrice))
    for position, study in enumerate(studies):
        times = 3 if study.study_instance_uid != "acute" else 1
        for k in np.flatnonzero(study.image):
            assert repeated.count((position, int(k))) == times and plain.count((position, int(k))) == 1
    negatives = [(s, k) for s, k in repeated if not studies[s].image[k]]
    assert sorted(negatives) == sorted((s, k) for s, k in plain if not studies[s].image[k]), "negatives as before"


def test_hard_negatives_add_the_first_mined_slices_not_drawn_yet_and_leave_the_random_draw_alone() -> None:
    studies = [_study("n0", []), _study("n1", []), _study("p", list(range(16, 24)))]
    config = Stage1Config(batch_size=8, negatives_per_study=4, negatives="within", background_negatives=3,
                          sampling="mixed", hard_negatives=2)
    plain = _drawn(epoch_batches(studies, config, seed=0, epoch=1))
    drawn = [sorted(k for s, k in plain if s == position) for position in range(3)]
    hard = {0: np.array([drawn[0][0], 33, 7, 12]), 1: np.array([5, 6, 30])}
    mined = _drawn(epoch_batches(studies, config, seed=0, epoch=1, hard=hard))
    assert 33 not in drawn[0] and 7 not in drawn[0]
    assert sorted(k for s, k in mined if s == 0) == sorted([*drawn[0], 33, 7]), "the drawn one skipped, the next two"
    added = [k for k in (5, 6, 30) if k not in drawn[1]][:2]
    assert sorted(k for s, k in mined if s == 1) == sorted([*drawn[1], *added])
    assert sorted(k for s, k in mined if s == 2) == drawn[2], "a study given no hard negatives draws as before"
    assert set(plain) <= set(mined), "the random draw does not change"
    labelled = _drawn(epoch_batches(studies, config, seed=0, epoch=1, hard={2: np.array([17, 3, 4, 5])}))
    extra = sorted(k for s, k in labelled if s == 2 and k not in drawn[2])
    assert labelled.count((2, 17)) == 1
    assert extra == sorted([k for k in (3, 4, 5) if k not in drawn[2]][:2]), "a positive slice is no hard negative"
    none = Stage1Config(**{**config.model_dump(), "hard_negatives": 0})
    assert _drawn(epoch_batches(studies, none, seed=0, epoch=1, hard=hard)) == plain
