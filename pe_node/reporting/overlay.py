"""The pixels of a key-slice capture: the slice in the PE window, the attention map as a colour overlay, and a band
below the slice with a banner and what the capture shows.

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
MIN_TEXT_PX = 10
"""Smallest text height (pixels) in the band, unless a word would not fit the slice's width."""
FontType = ImageFont.FreeTypeFont | ImageFont.ImageFont
_MARGIN = 4

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


def with_band(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``rgb`` with a black band added below it carrying the banner (yellow) and ``lines`` (white), centred.

    The band lies outside the image, so no pixel of the slice is covered and its rows and columns keep their
    places (pixel spacing and orientation stay true for the image part). The text is about 1/32 of the width
    high (16 px on a 512 px slice, what a viewer shows at about its own size), at least ``MIN_TEXT_PX`` unless a
    word would not fit a narrow slice; lines that do not fit the width wrap at spaces.
    """
    width = rgb.shape[1]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size, font = _font([BANNER, *lines], width - 2 * _MARGIN, measure)
    rows = [(text, row == 0) for row, line in enumerate([BANNER, *lines])
            for text in _wrapped(line, font, width - 2 * _MARGIN, measure)]
    line_height = round(size * 1.25)
    band = Image.new("RGB", (width, line_height * len(rows) + 2 * _MARGIN), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for row, (text, banner) in enumerate(rows):
        left = max(_MARGIN, (width - draw.textlength(text, font=font)) / 2)
        draw.text((left, _MARGIN + row * line_height), text, fill=(255, 255, 0) if banner else (255, 255, 255),
                  font=font)
    return np.concatenate([np.asarray(rgb, dtype=np.uint8), np.asarray(band, dtype=np.uint8)], axis=0)


def _font(lines: Sequence[str], width: int, draw: ImageDraw.ImageDraw) -> tuple[int, FontType]:
    """The text size for a band ``width`` pixels wide, and its font."""
    size = max(MIN_TEXT_PX, round(width / 32))
    words = [word for line in lines for word in line.split(" ")]
    font = ImageFont.load_default(size=size)
    while size > 6 and max(draw.textlength(word, font=font) for word in words) > width:
        size -= 1
        font = ImageFont.load_default(size=size)
    return size, font


def _wrapped(line: str, font: FontType, width: int,
             draw: ImageDraw.ImageDraw) -> list[str]:
    """``line`` broken at spaces into pieces no wider than ``width`` (a single word wider than it stays whole)."""
    pieces: list[str] = []
    for word in line.split(" "):
        if pieces and draw.textlength(f"{pieces[-1]} {word}", font=font) <= width:
            pieces[-1] = f"{pieces[-1]} {word}"
        else:
            pieces.append(word)
    return pieces


def render(hu: np.ndarray, cam: np.ndarray | None, lines: Sequence[str]) -> np.ndarray:
    """The capture of one slice: PE window, attention overlay (when there is a map), and below it the band with
    the banner and ``lines``."""
    return with_band(blend(window(hu, *PE_WINDOW), cam), lines)
