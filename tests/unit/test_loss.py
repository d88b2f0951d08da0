"""The RSNA weighted log loss against a direct plain-Python implementation of the paper's formula."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pe_node.findings import EXAM_WEIGHTS, IMAGE_WEIGHT
from pe_node.model.loss import rsna_loss, slice_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def reference_study_loss(
    exam_logits: list[float], exam_targets: list[int], image_logits: list[float], image_targets: list[int]
) -> float:
    """L_i of paper section 2.3, term by term with loops and math.log."""
    n = len(image_logits)
    share = sum(image_targets) / n
    exam_sum = 0.0
    for w_j, x, y in zip(EXAM_WEIGHTS, exam_logits, exam_targets, strict=True):
        p = sigmoid(x)
        exam_sum += -w_j * (y * math.log(p) + (1 - y) * math.log(1 - p))
    image_sum = 0.0
    for x, y in zip(image_logits, image_targets, strict=True):
        p = sigmoid(x)
        image_sum += -(IMAGE_WEIGHT * share) * (y * math.log(p) + (1 - y) * math.log(1 - p))
    return (image_sum + exam_sum) / (sum(EXAM_WEIGHTS) + IMAGE_WEIGHT * sum(image_targets))


def random_batch(rng: random.Random, lengths: list[int]) -> dict:
    steps = max(lengths)
    batch = {"exam_logits": [], "exam_targets": [], "image_logits": [], "image_targets": [], "lengths": lengths}
    for n in lengths:
        batch["exam_logits"].append([rng.uniform(-4, 4) for _ in range(9)])
        batch["exam_targets"].append([rng.randint(0, 1) for _ in range(9)])
        positive_rate = rng.choice([0.0, 0.1, 0.5, 1.0])
        batch["image_logits"].append([rng.uniform(-4, 4) for _ in range(n)] + [0.0] * (steps - n))
        batch["image_targets"].append([int(rng.random() < positive_rate) for _ in range(n)] + [0] * (steps - n))
    return batch


@pytest.mark.parametrize("seed", range(5))
def test_rsna_loss_matches_the_plain_python_formula(seed: int) -> None:
    rng = random.Random(seed)
    batch = random_batch(rng, [rng.randint(1, 40) for _ in range(4)])
    steps = max(batch["lengths"])
    mask = torch.tensor([[k < n for k in range(steps)] for n in batch["lengths"]])
    per_study = rsna_loss(
        torch.tensor(batch["exam_logits"], dtype=torch.float64),
        torch.tensor(batch["exam_targets"], dtype=torch.float64),
        torch.tensor(batch["image_logits"], dtype=torch.float64),
        torch.tensor(batch["image_targets"], dtype=torch.float64),
        mask,
        reduction="none",
    )
    expected = [
        reference_study_loss(ex, ey, il[:n], it[:n])
        for ex, ey, il, it, n in zip(
            batch["exam_logits"],
            batch["exam_targets"],
            batch["image_logits"],
            batch["image_targets"],
            batch["lengths"],
            strict=True,
        )
    ]
    assert per_study.tolist() == pytest.approx(expected, abs=1e-6)


def test_rsna_loss_mean_is_the_mean_over_studies_in_float32() -> None:
    rng = random.Random(11)
    batch = random_batch(rng, [30, 30, 30])
    keys = ("exam_logits", "exam_targets", "image_logits", "image_targets")
    args = [torch.tensor(batch[key], dtype=torch.float32) for key in keys]
    expected = sum(reference_study_loss(*(batch[key][i] for key in keys)) for i in range(3)) / 3
    assert float(rsna_loss(*args)) == pytest.approx(expected, abs=1e-6)


def test_padding_content_does_not_change_the_loss() -> None:
    exam_logits, exam_targets = torch.randn(1, 9), torch.ones(1, 9)
    image_logits = torch.randn(1, 8)
    image_targets = torch.tensor([[1.0, 0, 1, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[True] * 5 + [False] * 3])
    garbage_logits = image_logits.clone()
    garbage_logits[0, 5:] = float("nan")
    garbage_targets = image_targets.clone()
    garbage_targets[0, 5:] = 1.0
    clean = rsna_loss(exam_logits, exam_targets, image_logits[:, :5], image_targets[:, :5])
    padded = rsna_loss(exam_logits, exam_targets, garbage_logits, garbage_targets, mask)
    assert torch.allclose(clean, padded)


def test_a_negative_study_ignores_its_image_predictions() -> None:
    """With no positive image, q_i = 0: the RSNA metric scores such a study on its exam labels only."""
    exam_logits, exam_targets = torch.randn(1, 9), torch.zeros(1, 9)
    low, high = torch.full((1, 6), -5.0), torch.full((1, 6), 5.0)
    targets = torch.zeros(1, 6)
    with_low = rsna_loss(exam_logits, exam_targets, low, targets)
    assert torch.allclose(with_low, rsna_loss(exam_logits, exam_targets, high, targets))


def test_extreme_logits_give_finite_loss_and_gradients() -> None:
    exam_logits = torch.tensor([[80.0, -80.0] * 4 + [80.0]], requires_grad=True)
    image_logits = torch.tensor([[-90.0, 90.0, 0.0]], requires_grad=True)
    loss = rsna_loss(exam_logits, torch.zeros(1, 9), image_logits, torch.tensor([[1.0, 0.0, 1.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(exam_logits.grad).all() and torch.isfinite(image_logits.grad).all()


def test_slice_loss_matches_the_plain_python_formula() -> None:
    rng = random.Random(5)
    image_logits = [rng.uniform(-3, 3) for _ in range(6)]
    image_targets = [rng.randint(0, 1) for _ in range(6)]
    exam_logits = [[rng.uniform(-3, 3) for _ in range(9)] for _ in range(6)]
    exam_targets = [[rng.randint(0, 1) for _ in range(9)] for _ in range(6)]

    def bce(x: float, y: int) -> float:
        p = sigmoid(x)
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    expected = [
        (IMAGE_WEIGHT * bce(il, it) + sum(w * bce(x, y) for w, x, y in zip(EXAM_WEIGHTS, el, et, strict=True)))
        / (IMAGE_WEIGHT + sum(EXAM_WEIGHTS))
        for il, it, el, et in zip(image_logits, image_targets, exam_logits, exam_targets, strict=True)
    ]
    got = slice_loss(
        torch.tensor(image_logits, dtype=torch.float64),
        torch.tensor(exam_logits, dtype=torch.float64),
        torch.tensor(image_targets, dtype=torch.float64),
        torch.tensor(exam_targets, dtype=torch.float64),
        reduction="none",
    )
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_slice_loss_image_weight_shifts_the_balance_towards_the_image_label() -> None:
    image_logits, image_targets = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0])
    exam_logits, exam_targets = torch.zeros(2, 9), torch.zeros(2, 9)
    image_bce = torch.nn.functional.binary_cross_entropy_with_logits(image_logits, image_targets, reduction="none")
    exam_bce = math.log(2.0)  # every exam logit is 0
    for weight in (IMAGE_WEIGHT, 1.0, 5.0):
        expected = (weight * image_bce + sum(EXAM_WEIGHTS) * exam_bce) / (weight + sum(EXAM_WEIGHTS))
        got = slice_loss(image_logits, exam_logits, image_targets, exam_targets, reduction="none", image_weight=weight)
        assert torch.allclose(got, expected)
    default = slice_loss(image_logits, exam_logits, image_targets, exam_targets)
    assert torch.equal(default, slice_loss(image_logits, exam_logits, image_targets, exam_targets,
                                           image_weight=IMAGE_WEIGHT))
    with pytest.raises(ValueError, match="image_weight 0.0 must be > 0"):
        slice_loss(image_logits, exam_logits, image_targets, exam_targets, image_weight=0.0)


def test_mismatched_shapes_are_refused_with_the_shapes_named() -> None:
    with pytest.raises(ValueError, match=r"image targets \(1, 4\) do not match logits \(1, 5\)"):
        rsna_loss(torch.zeros(1, 9), torch.zeros(1, 9), torch.zeros(1, 5), torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"exam logits \(1, 8\)"):
        rsna_loss(torch.zeros(1, 8), torch.zeros(1, 8), torch.zeros(1, 5), torch.zeros(1, 5))
