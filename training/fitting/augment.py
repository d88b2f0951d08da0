"""Random geometric augmentation of stage-1 batches: a small rotation, scaling and shift per slice.

With a few hundred studies a network can learn a slice's exam labels by recognising the patient; moving every slice
a little each time it is seen makes that harder and what shows on the slice (an embolus) the better cue. No flips:
a left-right flip would swap the leftsided and rightsided labels, an up-down flip makes an impossible chest. The
transform runs on the normalised batch on its device; the border pixels (air, after the body crop) fill what comes in
from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_ROTATION_DEGREES = 10.0
MAX_SCALE_CHANGE = 0.1
MAX_SHIFT = 0.06
"""Largest shift, as a share of the image side."""


def augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``images`` [B, C, S, S], each rotated by up to 10 degrees, scaled by 0.9-1.1 and shifted by up to 6 %."""
    if images.ndim != 4:
        raise ValueError(f"augment expects images [B, C, S, S], got shape {tuple(images.shape)}")
    batch = images.shape[0]

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(batch, generator=generator) * 2.0 - 1.0) * limit

    angle = uniform(math.radians(MAX_ROTATION_DEGREES))
    scale = 1.0 + uniform(MAX_SCALE_CHANGE)
    shift = torch.stack([uniform(2.0 * MAX_SHIFT), uniform(2.0 * MAX_SHIFT)], dim=1)  # grid units span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], dim=1), torch.stack([sin, cos, shift[:, 1]], dim=1)],
                        dim=1).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
