"""Label consistency: the RSNA checker's rules, and the smallest change that satisfies them (property tests)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pe_node.findings import EXAM_LABELS
from pe_node.model.consistency import (
    ACUTE_AND_CHRONIC,
    CENTRAL,
    CHRONIC,
    INDETERMINATE,
    LEFT,
    MARGIN,
    NEGATIVE,
    RIGHT,
    RV_LV_GTE_1,
    RV_LV_LT_1,
    check,
    make_consistent,
)

# Probabilities with extra weight on the threshold and its neighbours, where rules are easiest to get wrong.
probability = st.one_of(
    st.floats(0.0, 1.0, allow_nan=False),
    st.sampled_from([0.0, 0.5, np.nextafter(0.5, 1.0), 0.5 + MARGIN, 1.0]),
)
exams = st.lists(probability, min_size=9, max_size=9)
images = st.lists(probability, min_size=0, max_size=40)


def consistent_positive() -> st.SearchStrategy:
    low, high = st.floats(0.0, 0.5), st.floats(0.5001, 1.0)

    @st.composite
    def build(draw: st.DrawFn) -> tuple[list[float], list[float]]:
        exam = [draw(st.floats(0.0, 1.0)) for _ in EXAM_LABELS]
        exam[NEGATIVE], exam[INDETERMINATE] = draw(low), draw(low)
        gte = draw(st.booleans())
        exam[RV_LV_GTE_1], exam[RV_LV_LT_1] = (draw(high), draw(low)) if gte else (draw(low), draw(high))
        exam[draw(st.sampled_from([CENTRAL, LEFT, RIGHT]))] = draw(high)
        if exam[CHRONIC] > 0.5 and exam[ACUTE_AND_CHRONIC] > 0.5:
            exam[CHRONIC] = draw(low)
        image = draw(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30))
        image[draw(st.integers(0, len(image) - 1))] = draw(high)
        return exam, image

    return build()


def consistent_negative() -> st.SearchStrategy:
    low, high = st.floats(0.0, 0.5), st.floats(0.5001, 1.0)

    @st.composite
    def build(draw: st.DrawFn) -> tuple[list[float], list[float]]:
        exam = [draw(low) for _ in EXAM_LABELS]
        exam[draw(st.sampled_from([NEGATIVE, INDETERMINATE]))] = draw(high)
        image = draw(st.lists(low, min_size=0, max_size=30))
        return exam, image

    return build()


@settings(max_examples=400, deadline=None)
@given(exams, images)
def test_checker_always_passes_after_make_consistent(exam: list[float], image: list[float]) -> None:
    result = make_consistent(exam, image)
    assert check(result.exam, result.image) == []


@settings(max_examples=200, deadline=None)
@given(st.one_of(consistent_positive(), consistent_negative()))
def test_consistent_outputs_come_back_unchanged(case: tuple[list[float], list[float]]) -> None:
    exam, image = case
    assert check(exam, image) == []
    result = make_consistent(exam, image)
    assert not result.changed
    assert result.exam.tolist() == exam and result.image.tolist() == image


@settings(max_examples=300, deadline=None)
@given(exams, images)
def test_changes_only_move_probabilities_just_across_the_threshold(exam: list[float], image: list[float]) -> None:
    result = make_consistent(exam, image)
    for before, after in zip(exam + image, result.exam.tolist() + result.image.tolist(), strict=True):
        if before != after:
            assert after in (0.5, 0.5 + MARGIN)
            assert (before > 0.5) != (after > 0.5)


@settings(max_examples=200, deadline=None)
@given(exams, images)
def test_outputs_already_consistent_are_recognised_by_the_checker(exam: list[float], image: list[float]) -> None:
    result = make_consistent(exam, image)
    assert result.changed == bool(check(exam, image))


def test_positive_exam_without_location_gets_the_cheapest_location_raised() -> None:
    exam = dict.fromkeys(EXAM_LABELS, 0.1)
    exam.update(rv_lv_ratio_lt_1=0.9, central_pe=0.2, leftsided_pe=0.45, rightsided_pe=0.3)
    image = [0.2, 0.95, 0.3]
    result = make_consistent(exam, image)
    assert result.exam[LEFT] == 0.5 + MARGIN  # nearest to the threshold: the smallest change
    assert result.exam[CENTRAL] == 0.2 and result.exam[RIGHT] == 0.3
    assert result.image.tolist() == image


def test_weak_positive_image_against_a_confident_negative_exam_turns_the_exam_negative() -> None:
    exam = dict.fromkeys(EXAM_LABELS, 0.02)
    exam["negative_exam_for_pe"] = 0.98
    image = [0.1, 0.51, 0.2]
    result = make_consistent(exam, image)
    assert result.image.tolist() == [0.1, 0.5, 0.2]
    assert result.exam.tolist() == [exam[label] for label in EXAM_LABELS]


def test_checker_names_each_broken_rule() -> None:
    exam = dict.fromkeys(EXAM_LABELS, 0.9)
    problems = check(exam, [0.1])
    assert len(problems) == 8  # both of negative/indeterminate high, plus all seven PE labels
    assert any("exactly one of negative_exam_for_pe (0.900), indeterminate (0.900)" in p for p in problems)
    positive_problems = check(exam, [0.9])
    assert any("cannot have both chronic_pe" in p for p in positive_problems)
    assert any("exactly one of rv_lv_ratio_gte_1" in p for p in positive_problems)


def test_probabilities_outside_zero_one_are_refused_by_label() -> None:
    exam = dict.fromkeys(EXAM_LABELS, 0.1)
    exam["central_pe"] = 1.5
    with pytest.raises(ValueError, match="central_pe is 1.5"):
        check(exam, [0.1])
    with pytest.raises(ValueError, match="image 1 is nan"):
        make_consistent([0.1] * 9, [0.2, float("nan")])


def test_exam_mapping_with_a_missing_label_is_refused() -> None:
    exam = dict.fromkeys(EXAM_LABELS[:-1], 0.1)
    with pytest.raises(ValueError, match="missing labels \\['rv_lv_ratio_lt_1'\\]"):
        check(exam, [])
