"""Class-activation maps (Zhou et al. 2016) from the encoder's last convolutional feature map (paper section 4).

A CAM weighs the channels of the feature map by the stage-1 image head (the paper's wording, "averaging the feature
maps", is the special case of equal weights), scales it to [0, 1] per slice, and maps it back through the resize and
the crop box to the slice's own Rows x Columns, so that the secondary captures can lay it over the original pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pe_node.model.preprocess import CropBox


def activation_maps(features: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """CAMs [B, h, w] in [0, 1] from feature maps [B, C, h, w]; ``weights`` [C] (None: the channel mean).

    Each map is shifted and scaled so that its minimum is 0 and its maximum 1; a flat map becomes all zeros.
    """
    if features.ndim != 4:
        raise ValueError(f"activation_maps expects feature maps [B, C, h, w], got shape {tuple(features.shape)}")
    features = features.float()
    if weights is None:
        maps = features.mean(dim=1)
    else:
        if weights.shape != (features.shape[1],):
            raise ValueError(f"CAM weights of shape {tuple(weights.shape)} for {features.shape[1]} channels")
        maps = torch.einsum("bchw,c->bhw", features, weights.float().to(features.device))
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))


def to_slice(cam: torch.Tensor, rows: int, cols: int, box: CropBox | None) -> np.ndarray:
    """One CAM [h, w] mapped back to its slice: float32 [rows, cols] in [0, 1], zero outside the crop box.

    Without a box the network saw the whole slice resized, so the map is resized to the slice. With a box it saw
    the box resized, so the map is resized to the box and pasted where the box lies on the slice.
    """
    if cam.ndim != 2:
        raise ValueError(f"to_slice expects one CAM [h, w], got shape {tuple(cam.shape)}")
    grid = cam.float()[None, None]
    if box is None:
        return _resize(grid, rows, cols)
    full = _resize(grid, box.side, box.side)
    out = np.zeros((rows, cols), dtype=np.float32)
    top, left = max(box.top, 0), max(box.left, 0)
    bottom, right = min(box.top + box.side, rows), min(box.left + box.side, cols)
    if bottom > top and right > left:
        out[top:bottom, left:right] = full[top - box.top : bottom - box.top, left - box.left : right - box.left]
    return out


def _resize(grid: torch.Tensor, height: int, width: int) -> np.ndarray:
    resized = F.interpolate(grid.cpu(), size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].clamp_(0.0, 1.0).numpy().astype(np.float32, copy=False)
