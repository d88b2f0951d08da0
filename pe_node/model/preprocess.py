"""Turning CT slices in HU into the network's input (paper section 2.1), the same code for serving and training.

Each slice becomes a 3-channel image whose channels are the lung (WL -600 / WW 1500), PE (WL 100 / WW 700) and
mediastinal (WL 40 / WW 400) windows, resized to ``size`` x ``size`` and normalised with a per-channel mean and std.
The work is done in torch on a batch of int16 slices, so a series streams through in batches and no float copy of the
whole volume ever exists.

With ``crop="body"`` every slice of a series is first cut to one square box around the patient's body (found once per
series on a few slices), so that small structures such as clots keep more pixels after resizing. The box may reach
past the slice edges; that part is filled with air. ``pe_node.model.cam`` maps activation maps back through the same
box so nothing downstream needs to know about the crop.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Window = tuple[float, float]

LUNG_WINDOW: Window = (-600.0, 1500.0)
PE_WINDOW: Window = (100.0, 700.0)
MEDIASTINAL_WINDOW: Window = (40.0, 400.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AIR_HU = -1024
"""The value given to the parts of a crop box that lie outside the slice."""

_MIN_SIZE = 32
_MAX_SIZE = 1024
_BODY_GRID = 128
"""Body finding works on a grid of at most this many cells per side."""
_BODY_SLICES = 16
"""Body finding looks at this many slices spread over the series."""
_BODY_MARGIN = 0.02
"""Margin around the body box, as a share of the larger slice dimension."""


class CropMode(str, enum.Enum):
    """How a slice is cut before resizing."""

    NONE = "none"
    BODY = "body"


@dataclass(frozen=True)
class PreprocessConfig:
    """The preprocessing that travels with the weights in a checkpoint.

    ``windows`` are (level, width) in HU, one per output channel; ``mean`` and ``std`` normalise the windowed values,
    which lie in [0, 1]; ``body_threshold_hu`` is the HU above which a pixel counts as body for ``crop="body"``.
    """

    windows: tuple[Window, ...] = (LUNG_WINDOW, PE_WINDOW, MEDIASTINAL_WINDOW)
    size: int = 256
    crop: CropMode = CropMode.NONE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    body_threshold_hu: float = -500.0

    def __post_init__(self) -> None:
        windows = tuple((float(level), float(width)) for level, width in self.windows)
        if len(windows) != 3:
            raise ValueError(f"preprocess windows: expected 3 (level, width) pairs, got {len(windows)}")
        for level, width in windows:
            if not width > 0:
                raise ValueError(f"preprocess window ({level}, {width}): width must be > 0")
        if not isinstance(self.size, int) or not _MIN_SIZE <= self.size <= _MAX_SIZE:
            raise ValueError(f"preprocess size {self.size!r}: must be an integer in [{_MIN_SIZE}, {_MAX_SIZE}]")
        try:
            crop = CropMode(self.crop)
        except ValueError:
            choices = ", ".join(mode.value for mode in CropMode)
            raise ValueError(f"preprocess crop {self.crop!r}: must be one of {choices}") from None
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"preprocess mean {self.mean!r} / std {self.std!r}: need 3 values each")
        if not all(s > 0 for s in std):
            raise ValueError(f"preprocess std {self.std!r}: every value must be > 0")
        object.__setattr__(self, "windows", windows)
        object.__setattr__(self, "crop", crop)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "body_threshold_hu", float(self.body_threshold_hu))

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so that a checkpoint can be loaded with ``weights_only=True``."""
        data = asdict(self)
        data["windows"] = [list(w) for w in self.windows]
        data["crop"] = self.crop.value
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """The inverse of ``to_dict``; an unknown key is an error, a missing key takes its default."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"preprocess config: unknown key(s) {', '.join(unknown)}")
        values = dict(data)
        if "windows" in values:
            values["windows"] = tuple(tuple(w) for w in values["windows"])
        return cls(**values)


@dataclass(frozen=True)
class CropBox:
    """A square region of every slice of a series, in pixels of the slice; it may reach past the slice edges."""

    top: int
    left: int
    side: int

    def __post_init__(self) -> None:
        if self.side < 1:
            raise ValueError(f"crop box side {self.side}: must be >= 1")


def plan_crop(hu: np.ndarray, config: PreprocessConfig) -> CropBox | None:
    """The crop box the series gets under ``config``: ``None`` (whole slice) unless ``crop="body"``."""
    if config.crop is CropMode.NONE:
        return None
    return body_box(hu, config.body_threshold_hu)


def body_box(hu: np.ndarray, threshold_hu: float = -500.0) -> CropBox | None:
    """One square box around the body over the whole series, or ``None`` when no body is found.

    Looks at up to 16 slices spread over the series on a coarse grid: pixels above ``threshold_hu`` on any of them
    form the body mask; a 3x3 opening drops thin structures, and the connected part of the mask nearest the slice
    centre is kept, which leaves out the table and loose objects beside the patient.
    """
    _check_volume(hu)
    rows, cols = hu.shape[1:]
    picks = np.unique(np.linspace(0, len(hu) - 1, min(len(hu), _BODY_SLICES)).round().astype(np.int64))
    step = max(1, math.ceil(max(rows, cols) / _BODY_GRID))
    sample = torch.from_numpy(np.ascontiguousarray(hu[picks]))
    above = (sample > threshold_hu).any(dim=0)[None, None].float()
    mask = F.max_pool2d(above, kernel_size=step, stride=step, ceil_mode=True)
    component = _central_component(mask)
    if component is None:
        return None
    ys = torch.nonzero(component.any(dim=1)).flatten()
    xs = torch.nonzero(component.any(dim=0)).flatten()
    top, bottom = int(ys[0]) * step, min(rows, (int(ys[-1]) + 1) * step)
    left, right = int(xs[0]) * step, min(cols, (int(xs[-1]) + 1) * step)
    margin = max(1, round(_BODY_MARGIN * max(rows, cols)))
    side = max(bottom - top, right - left) + 2 * margin
    return CropBox(
        top=_place(top + bottom, side, rows),
        left=_place(left + right, side, cols),
        side=side,
    )


def _central_component(mask: torch.Tensor) -> torch.Tensor | None:
    """The connected part of a [1, 1, h, w] mask nearest its centre, as a bool [h, w]; ``None`` if empty."""
    opened = F.max_pool2d(-F.max_pool2d(-mask, 3, 1, 1), 3, 1, 1)  # erode then dilate: drops one-cell lines
    if not bool(opened.any()):
        opened = mask
    if not bool(opened.any()):
        return None
    h, w = opened.shape[-2:]
    cells = torch.nonzero(opened[0, 0])
    centre = torch.tensor([(h - 1) / 2, (w - 1) / 2])
    seed_y, seed_x = cells[torch.argmin(((cells.float() - centre) ** 2).sum(dim=1))].tolist()
    region = torch.zeros_like(opened)
    region[0, 0, seed_y, seed_x] = 1.0
    while True:
        grown = F.max_pool2d(region, 3, 1, 1) * opened
        if torch.equal(grown, region):
            return region[0, 0] > 0
        region = grown


def _place(twice_centre: int, side: int, extent: int) -> int:
    """The start of a window of ``side`` pixels centred on ``twice_centre / 2``, kept inside ``extent`` if it fits."""
    start = (twice_centre - side) // 2
    if side <= extent:
        return min(max(start, 0), extent - side)
    return start


def preprocess_slices(
    hu: np.ndarray | torch.Tensor,
    config: PreprocessConfig,
    box: CropBox | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A batch of slices in HU ([B, rows, cols], int16 or float) as the network input, float32 [B, 3, size, size].

    The slices are cropped to ``box`` (see ``plan_crop``), resized (area averaging when shrinking, bilinear when
    enlarging) in HU, then windowed into three channels and normalised. Resizing before windowing does the
    interpolation once instead of three times; training and serving both go through here, so they agree.
    """
    batch = torch.as_tensor(hu)
    if batch.ndim != 3:
        raise ValueError(f"preprocess_slices: expected slices [B, rows, cols], got shape {tuple(batch.shape)}")
    if box is not None:
        batch = _crop(batch, box)
    batch = batch.to(device=device, dtype=torch.float32, non_blocking=True)[:, None]
    batch = _resize(batch, config.size)
    return _window(batch, config)


def _crop(batch: torch.Tensor, box: CropBox) -> torch.Tensor:
    rows, cols = batch.shape[1:]
    top, left, bottom, right = box.top, box.left, box.top + box.side, box.left + box.side
    inside = batch[:, max(top, 0) : min(bottom, rows), max(left, 0) : min(right, cols)]
    pads = (max(-left, 0), max(right - cols, 0), max(-top, 0), max(bottom - rows, 0))
    if not any(pads):
        return inside
    return F.pad(inside.float(), pads, value=float(AIR_HU))


def _resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    height, width = batch.shape[-2:]
    if (height, width) == (size, size):
        return batch
    if min(height, width) >= size:
        return F.interpolate(batch, size=(size, size), mode="area")
    return F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def _window(batch: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """[B, 1, S, S] HU to [B, 3, S, S]: clamp((HU - low) / width, 0, 1), then (value - mean) / std."""
    levels = torch.tensor([w[0] for w in config.windows])
    widths = torch.tensor([w[1] for w in config.windows])
    scale = (1.0 / widths).view(1, 3, 1, 1).to(batch.device)
    shift = (-(levels - widths / 2) / widths).view(1, 3, 1, 1).to(batch.device)
    out = torch.addcmul(shift, batch, scale).clamp_(0.0, 1.0)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1).to(batch.device)
    inv_std = (1.0 / torch.tensor(config.std)).view(1, 3, 1, 1).to(batch.device)
    return out.sub_(mean).mul_(inv_std)


def _check_volume(hu: np.ndarray) -> None:
    if hu.ndim != 3 or 0 in hu.shape:
        raise ValueError(f"expected a volume [slices, rows, cols], got shape {hu.shape}")
