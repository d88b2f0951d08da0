"""The pixels of a key-slice capture: the slice in the PE window, the attention map as a colour overlay, a banner.

Everything here is plain numpy and Pillow on one slice; the DICOM wrapping is in :mod:`pe_node.reporting.capture`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pe_node.model.preprocess import PE_WINDOW

MAX_OPACITY = 0.5
"""Opacity of the overlay where the attention map is 1; it falls linearly to 0 where the map is 0."""

BANNER = "NOT FOR DIAGNOSTIC USE"

# A jet-like colour ramp: dark blue, blue, cyan, yellow, red, dark red at evenly spaced map values.
_RAMP = np.array(
    [[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], dtype=np.float64
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_RAMP)), _RAMP[:, c]) for c in range(3)], axis=1
).astype(np.uint8)


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Grey values 0..255 of ``hu`` shown in the window ``level`` / ``width`` (HU)."""
    low = level - width / 2.0
    scaled = (hu.astype(np.float32) - low) * (255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def heat_map(cam: np.ndarray) -> np.ndarray:
    """The RGB colour of each attention value in [0, 1]."""
    return _LUT[np.rint(np.clip(cam, 0.0, 1.0) * 255).astype(np.intp)]


def blend(grey: np.ndarray, cam: np.ndarray | None) -> np.ndarray:
    """RGB of the grey slice with the attention map laid over it; opacity follows the map's value."""
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if cam is None:
        return rgb
    if cam.shape != grey.shape:
        raise ValueError(f"attention map is {cam.shape}, the slice is {grey.shape}: they must match")
    alpha = (MAX_OPACITY * np.clip(cam, 0.0, 1.0))[..., None].astype(np.float32)
    mixed = rgb.astype(np.float32) * (1.0 - alpha) + heat_map(cam).astype(np.float32) * alpha
    return np.rint(mixed).astype(np.uint8)


def burn_in(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``rgb`` with a black band across the top carrying the banner (yellow) and ``lines`` (white)."""
    image = Image.fromarray(np.ascontiguousarray(rgb))
    size = max(8, min(image.size) // 28)
    font = ImageFont.load_default(size=size)
    line_height = size + max(2, size // 4)
    texts = [BANNER, *lines]
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, image.width - 1, line_height * len(texts) + 3], fill=(0, 0, 0))
    for row, text in enumerate(texts):
        colour = (255, 255, 0) if row == 0 else (255, 255, 255)
        draw.text((3, 2 + row * line_height), text, fill=colour, font=font)
    return np.asarray(image, dtype=np.uint8)


def render(hu: np.ndarray, cam: np.ndarray | None, lines: Sequence[str]) -> np.ndarray:
    """The capture of one slice: PE window, attention overlay (when there is a map), banner and ``lines``."""
    return burn_in(blend(window(hu, *PE_WINDOW), cam), lines)
