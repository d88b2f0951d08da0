"""Shapes of the evaluation phantoms: superellipse cross-sections and tapered tubes, as signed distances.

A body outline, a lung or a heart chamber is a superellipse, ``|x/a|^n + |y/b|^n = 1`` (``n`` 2 is an ellipse, larger
``n`` squarer), cut by each slice; its signed distance is taken along the ray from its centre, ``|p| (1 - 1/rho)`` for
the superellipse norm ``rho`` of ``p``, and a pixel's share of the shape is a linear ramp of that distance over one
pixel. Vessels, airways and ribs are chains of tapered tubes (a segment whose radius runs linearly from one end to the
other); a pixel's share of a tube is the share of twelve sample points inside it, four across the pixel and three
through the slice's thickness, so thin and oblique tubes take the partial volume of a real slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

IN_PLANE = np.array([(-0.25, -0.25), (-0.25, 0.25), (0.25, -0.25), (0.25, 0.25)], dtype=np.float32)
"""Sample offsets across a pixel, in pixels."""
THROUGH_SLICE = np.array([-1.0 / 3.0, 0.0, 1.0 / 3.0], dtype=np.float32)
"""Sample offsets through a slice, in slice thicknesses."""
_BOX_SIZES = (4, 8, 16, 32, 64, 128)
"""Tubes are rendered in batches whose boxes are padded to one of these sizes (pixels)."""


@dataclass(frozen=True)
class Grid:
    """The pixels of one axial slice: ``size`` x ``size`` squares of ``spacing`` mm, pixel (0, 0) centred on
    (``x0``, ``y0``); columns along +x (the patient's left), rows along +y (posterior)."""

    size: int
    spacing: float
    x0: float
    y0: float

    @cached_property
    def x(self) -> np.ndarray:
        """x of every pixel centre, [1, size]."""
        return (self.x0 + self.spacing * np.arange(self.size, dtype=np.float32))[None, :]

    @cached_property
    def y(self) -> np.ndarray:
        """y of every pixel centre, [size, 1]."""
        return (self.y0 + self.spacing * np.arange(self.size, dtype=np.float32))[:, None]


@dataclass(frozen=True)
class Superellipse:
    """A superellipse in the axial plane: centre, semi-axes ``a`` (along the turned x axis) and ``b``, exponent
    ``n``, turned by ``angle`` radians."""

    cx: float
    cy: float
    a: float
    b: float
    n: float = 2.0
    angle: float = 0.0

    def distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance (mm, negative inside) along the ray from the centre."""
        dx, dy = x - np.float32(self.cx), y - np.float32(self.cy)
        if self.angle:
            c, s = np.float32(math.cos(self.angle)), np.float32(math.sin(self.angle))
            dx, dy = c * dx + s * dy, c * dy - s * dx
        rho = (np.abs(dx / np.float32(self.a)) ** self.n + np.abs(dy / np.float32(self.b)) ** self.n) ** (1 / self.n)
        radius = np.sqrt(dx * dx + dy * dy)
        return radius * (1.0 - 1.0 / np.maximum(rho, 1e-6))

    def share(self, grid: Grid) -> np.ndarray:
        """Each pixel's share of the shape, [size, size] in [0, 1] (computed in the box around it)."""
        out = np.zeros((grid.size, grid.size), dtype=np.float32)
        reach = 1.25 * max(self.a, self.b) + 2.0 * grid.spacing  # a turned superellipse of n <= 3 fits
        c0 = max(0, math.floor((self.cx - reach - grid.x0) / grid.spacing))
        c1 = min(grid.size, math.ceil((self.cx + reach - grid.x0) / grid.spacing) + 1)
        r0 = max(0, math.floor((self.cy - reach - grid.y0) / grid.spacing))
        r1 = min(grid.size, math.ceil((self.cy + reach - grid.y0) / grid.spacing) + 1)
        if c0 < c1 and r0 < r1:
            out[r0:r1, c0:c1] = ramp(self.distance(grid.x[:, c0:c1], grid.y[r0:r1]), grid.spacing)
        return out

    def shrunk(self, by: float) -> Superellipse:
        """The same shape ``by`` mm smaller on every semi-axis."""
        return Superellipse(self.cx, self.cy, max(self.a - by, 0.5), max(self.b - by, 0.5), self.n, self.angle)


def ramp(distance: np.ndarray, spacing: float) -> np.ndarray:
    """A pixel's share of a shape from its signed distance: 1 well inside, 0 well outside, linear over one pixel."""
    return np.clip(0.5 - distance / np.float32(spacing), 0.0, 1.0).astype(np.float32)


def blend(image: np.ndarray, share: np.ndarray, hu: float | np.ndarray) -> None:
    """Paint ``hu`` over ``image`` in place, each pixel by its share."""
    image += (np.asarray(hu, dtype=np.float32) - image) * share


@dataclass
class TubeSet:
    """Tapered tubes: a segment from ``a`` to ``b`` (mm, [n, 3]) whose radius runs from ``ra`` to ``rb``."""

    a: np.ndarray
    b: np.ndarray
    ra: np.ndarray
    rb: np.ndarray

    def __post_init__(self) -> None:
        self.a = np.asarray(self.a, dtype=np.float64).reshape(-1, 3)
        self.b = np.asarray(self.b, dtype=np.float64).reshape(-1, 3)
        count = (len(self.a),)
        self.ra = np.broadcast_to(np.asarray(self.ra, dtype=np.float64).reshape(-1), count).copy()
        self.rb = np.broadcast_to(np.asarray(self.rb, dtype=np.float64).reshape(-1), count).copy()

    def __len__(self) -> int:
        return len(self.ra)

    @staticmethod
    def empty() -> TubeSet:
        return TubeSet(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0))

    @staticmethod
    def joined(parts: list[TubeSet]) -> TubeSet:
        if not parts:
            return TubeSet.empty()
        return TubeSet(np.concatenate([p.a for p in parts]), np.concatenate([p.b for p in parts]),
                       np.concatenate([p.ra for p in parts]), np.concatenate([p.rb for p in parts]))

    def grown(self, by: float) -> TubeSet:
        """The same tubes ``by`` mm thicker (an airway's wall around its lumen)."""
        return TubeSet(self.a, self.b, self.ra + by, self.rb + by)

    def share(self, grid: Grid, z: float, thickness: float) -> np.ndarray:
        """Each pixel's share of the union of the tubes over the slab of ``thickness`` mm centred on ``z``."""
        out = np.zeros((grid.size, grid.size), dtype=np.float32)
        reach = np.maximum(self.ra, self.rb)
        low = np.minimum(self.a[:, 2], self.b[:, 2]) - reach
        high = np.maximum(self.a[:, 2], self.b[:, 2]) + reach
        crossing = np.flatnonzero((low <= z + thickness / 2) & (high >= z - thickness / 2))
        if not len(crossing):
            return out
        boxes = self._boxes(crossing, grid, z, thickness)
        spans = np.maximum(boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2])
        done = spans <= 0
        for size in _BOX_SIZES:
            chosen = ~done & (spans <= size)
            if chosen.any():
                self._paint(out, grid, z, thickness, crossing[chosen], boxes[chosen], size)
            done |= chosen
        for index, box in zip(crossing[~done], boxes[~done], strict=True):
            size = int(max(box[1] - box[0], box[3] - box[2]))
            self._paint(out, grid, z, thickness, np.array([index]), box[None], size)
        return out

    def _boxes(self, indices: np.ndarray, grid: Grid, z: float, thickness: float) -> np.ndarray:
        """[r0, r1, c0, c1) of the pixels each tube may reach on the slab (the part of its axis within reach)."""
        a, b = self.a[indices], self.b[indices]
        reach = np.maximum(self.ra[indices], self.rb[indices])
        dz = b[:, 2] - a[:, 2]
        slanted = np.abs(dz) > 1e-6
        safe = np.where(slanted, dz, 1.0)
        t0 = (z - thickness / 2 - reach - a[:, 2]) / safe
        t1 = (z + thickness / 2 + reach - a[:, 2]) / safe
        lo = np.where(slanted, np.clip(np.minimum(t0, t1), 0.0, 1.0), 0.0)
        hi = np.where(slanted, np.clip(np.maximum(t0, t1), 0.0, 1.0), 1.0)
        p, q = a + lo[:, None] * (b - a), a + hi[:, None] * (b - a)
        xmin = np.minimum(p[:, 0], q[:, 0]) - reach
        xmax = np.maximum(p[:, 0], q[:, 0]) + reach
        ymin = np.minimum(p[:, 1], q[:, 1]) - reach
        ymax = np.maximum(p[:, 1], q[:, 1]) + reach
        c0 = np.clip(np.floor((xmin - grid.x0) / grid.spacing), 0, grid.size)
        c1 = np.clip(np.ceil((xmax - grid.x0) / grid.spacing) + 1, 0, grid.size)
        r0 = np.clip(np.floor((ymin - grid.y0) / grid.spacing), 0, grid.size)
        r1 = np.clip(np.ceil((ymax - grid.y0) / grid.spacing) + 1, 0, grid.size)
        boxes = np.stack([r0, r1, c0, c1], axis=1).astype(np.int64)
        boxes[(r1 <= r0) | (c1 <= c0)] = 0
        return boxes

    def _paint(self, out: np.ndarray, grid: Grid, z: float, thickness: float, indices: np.ndarray, boxes: np.ndarray,
               size: int) -> None:
        """The sampled share of tubes ``indices`` in their boxes padded to ``size``, max-combined into ``out``."""
        steps = np.arange(size)
        rows = boxes[:, 0:1] + steps  # [n, size]
        cols = boxes[:, 2:3] + steps
        valid = (rows < boxes[:, 1:2])[:, :, None] & (cols < boxes[:, 3:4])[:, None, :]
        rows, cols = np.minimum(rows, grid.size - 1), np.minimum(cols, grid.size - 1)
        sx = (grid.x0 + grid.spacing * (cols[:, None, :, None] + IN_PLANE[None, None, None, :, 1])).astype(np.float32)
        sy = (grid.y0 + grid.spacing * (rows[:, :, None, None] + IN_PLANE[None, None, None, :, 0])).astype(np.float32)
        a = self.a[indices].astype(np.float32)
        d = (self.b[indices] - self.a[indices]).astype(np.float32)
        length2 = np.maximum((d * d).sum(axis=1), 1e-9)
        ra, rb = self.ra[indices].astype(np.float32), self.rb[indices].astype(np.float32)
        inside = np.zeros((len(indices), size, size), dtype=np.float32)

        def column(v: np.ndarray) -> np.ndarray:
            return v[:, None, None, None]

        for dz in THROUGH_SLICE:
            wx, wy = sx - column(a[:, 0]), sy - column(a[:, 1])
            wz = np.float32(z + dz * thickness) - column(a[:, 2])
            t = np.clip((wx * column(d[:, 0]) + wy * column(d[:, 1]) + wz * column(d[:, 2])) / column(length2),
                        0.0, 1.0)
            ex, ey, ez = wx - t * column(d[:, 0]), wy - t * column(d[:, 1]), wz - t * column(d[:, 2])
            radius = column(ra) + t * column(rb - ra)
            inside += ((ex * ex + ey * ey + ez * ez) <= radius * radius).mean(axis=3, dtype=np.float32)
        inside /= len(THROUGH_SLICE)
        flat = (rows[:, :, None] * grid.size + cols[:, None, :])[valid]
        np.maximum.at(out.reshape(-1), flat, inside[valid])
