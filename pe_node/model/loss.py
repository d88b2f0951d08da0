"""The RSNA weighted log loss of the paper (section 2.3), for batches of series padded to one length.

For study i with exam labels j (weights w_j, ``EXAM_WEIGHTS``) and images k = 1..n_i (image weight w,
``IMAGE_WEIGHT``, scaled by the study's share of positive images q_i = sum_k y_ik / n_i):

    L_ij = -w_j [y_ij log p_ij + (1 - y_ij) log(1 - p_ij)]
    L_ik = -w q_i [y_ik log p_ik + (1 - y_ik) log(1 - p_ik)]
    L_i  = (sum_k L_ik + sum_j L_ij) / (sum_j w_j + w sum_k y_ik)

and the loss of a batch is the mean of L_i over its studies. Everything is computed from logits with
``binary_cross_entropy_with_logits`` for numerical stability.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from pe_node.findings import EXAM_LABELS, EXAM_WEIGHTS, IMAGE_WEIGHT

Reduction = Literal["mean", "none"]


def rsna_loss(
    exam_logits: torch.Tensor,
    exam_targets: torch.Tensor,
    image_logits: torch.Tensor,
    image_targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """The loss of a batch of studies: exam [B, 9], images [B, T]; ``mask`` [B, T] is True on real slices.

    ``reduction="none"`` gives L_i per study [B]; ``"mean"`` their mean.
    """
    batch, steps = image_logits.shape
    if exam_logits.shape != (batch, len(EXAM_LABELS)) or exam_targets.shape != exam_logits.shape:
        raise ValueError(
            f"rsna_loss: exam logits {tuple(exam_logits.shape)} and targets {tuple(exam_targets.shape)} "
            f"must both be [{batch}, {len(EXAM_LABELS)}]"
        )
    if image_targets.shape != image_logits.shape:
        raise ValueError(
            f"rsna_loss: image targets {tuple(image_targets.shape)} do not match logits {tuple(image_logits.shape)}"
        )
    real = _real(mask, image_logits)
    exam_weights = exam_logits.new_tensor(EXAM_WEIGHTS)
    exam_targets = exam_targets.to(exam_logits.dtype)
    image_targets = image_targets.to(image_logits.dtype) * real
    exam_term = (F.binary_cross_entropy_with_logits(exam_logits, exam_targets, reduction="none") * exam_weights).sum(1)
    positives = image_targets.sum(dim=1)
    share = positives / real.sum(dim=1)
    image_bce = F.binary_cross_entropy_with_logits(image_logits, image_targets, reduction="none")
    image_bce = torch.where(real > 0, image_bce, 0.0)  # padding may hold anything, even NaN
    image_term = IMAGE_WEIGHT * share * image_bce.sum(dim=1)
    per_study = (exam_term + image_term) / (exam_weights.sum() + IMAGE_WEIGHT * positives)
    return _reduce(per_study, reduction)


def slice_loss(
    image_logits: torch.Tensor,
    exam_logits: torch.Tensor,
    image_targets: torch.Tensor,
    exam_targets: torch.Tensor,
    reduction: Reduction = "mean",
    image_weight: float = IMAGE_WEIGHT,
) -> torch.Tensor:
    """The stage-1 multi-label loss of a batch of slices (paper section 3.2): image [N], exam [N, 9].

    Each slice is scored on its own image label and on the exam labels of its study, with the RSNA weights:
    (w * BCE_image + sum_j w_j * BCE_j) / (w + sum_j w_j), per slice. ``image_weight`` is w, the RSNA image weight
    unless training asks for more: on a few hundred studies the exam labels of a slice can be learnt by recognising
    the patient, and a larger w makes stage 1 learn what shows on the slice itself.
    """
    if not image_weight > 0:
        raise ValueError(f"slice_loss: image_weight {image_weight!r} must be > 0")
    if exam_logits.shape != (image_logits.shape[0], len(EXAM_LABELS)) or exam_targets.shape != exam_logits.shape:
        raise ValueError(
            f"slice_loss: exam logits {tuple(exam_logits.shape)} and targets {tuple(exam_targets.shape)} must "
            f"both be [{image_logits.shape[0]}, {len(EXAM_LABELS)}]"
        )
    if image_targets.shape != image_logits.shape or image_logits.ndim != 1:
        raise ValueError(
            f"slice_loss: image logits {tuple(image_logits.shape)} and targets {tuple(image_targets.shape)} "
            "must both be [N]"
        )
    exam_weights = exam_logits.new_tensor(EXAM_WEIGHTS)
    exam_term = F.binary_cross_entropy_with_logits(exam_logits, exam_targets.to(exam_logits.dtype), reduction="none")
    image_term = F.binary_cross_entropy_with_logits(
        image_logits, image_targets.to(image_logits.dtype), reduction="none"
    )
    per_slice = (image_weight * image_term + (exam_term * exam_weights).sum(1)) / (image_weight + exam_weights.sum())
    return _reduce(per_slice, reduction)


def _real(mask: torch.Tensor | None, image_logits: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(image_logits)
    if mask.shape != image_logits.shape:
        raise ValueError(f"rsna_loss: mask {tuple(mask.shape)} does not match images {tuple(image_logits.shape)}")
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("rsna_loss: every study needs at least one real image in the mask")
    return mask.to(image_logits.dtype)


def _reduce(values: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    raise ValueError(f"reduction {reduction!r}: must be 'mean' or 'none'")
