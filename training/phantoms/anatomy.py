"""A parametric 3D chest for the CTPA phantoms, evaluated one axial slice at a time in Hounsfield units.

A chest is drawn once per study from a few dozen measurements (body size, lung height, heart position and chamber
widths, contrast levels) and a set of tubes: the great vessels, the airways and the pulmonary artery and vein trees,
grown by branching from the hila into the lungs. Rendering a slice evaluates every shape on that slice's pixel grid
with numpy, so a 512 x 512 slice costs milliseconds and nothing is stored per voxel.

Coordinates are millimetres in the DICOM patient frame (LPS: x towards the patient's left, y posterior, z towards the
head), with z = 0 at the lowest point of the lungs (the posterior costophrenic recesses) and the body axis on x = y = 0.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from scipy import ndimage

AIR_HU = -1000.0
# Lungs keep this far (mm) from the pericardium.
HEART_MARGIN = 3.0
# Vessel trees per lung grown from each hilum, like the ten bronchopulmonary segments: drawn per chest from these.
SEGMENTAL_ROOTS = (7, 11)
# Vessels thinner than this (mm radius) are not grown: at 0.6-0.9 mm pixels they would be a single grey pixel.
MIN_VESSEL_RADIUS = 0.7


@dataclass(frozen=True)
class Grid:
    """The pixels of one axial slice: ``size`` x ``size`` squares of ``spacing`` mm, pixel (0, 0) centred on
    (``x0``, ``y0``); columns run along +x and rows along +y (ImageOrientationPatient 1\\0\\0\\0\\1\\0)."""

    size: int
    spacing: float
    x0: float
    y0: float

    @cached_property
    def xs(self) -> np.ndarray:
        """The x of every column's centre."""
        return (self.x0 + self.spacing * np.arange(self.size)).astype(np.float32)

    @cached_property
    def ys(self) -> np.ndarray:
        """The y of every row's centre."""
        return (self.y0 + self.spacing * np.arange(self.size)).astype(np.float32)

    def box(self, xmin: float, xmax: float, ymin: float, ymax: float) -> tuple[slice, slice] | None:
        """The rows and columns whose centres may fall in the rectangle, or None when it misses the image."""
        c0 = max(0, math.floor((xmin - self.x0) / self.spacing))
        c1 = min(self.size, math.ceil((xmax - self.x0) / self.spacing) + 1)
        r0 = max(0, math.floor((ymin - self.y0) / self.spacing))
        r1 = min(self.size, math.ceil((ymax - self.y0) / self.spacing) + 1)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)


def ellipse_mask(
    grid: Grid, cx: float, cy: float, a: float, b: float, angle: float = 0.0
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The pixels inside an ellipse with semi-axes ``a`` along (cos angle, sin angle) and ``b`` across it, as a box of
    the image and a boolean mask of that box; None when the ellipse misses the image."""
    reach = max(a, b)
    box = grid.box(cx - reach, cx + reach, cy - reach, cy + reach)
    if box is None:
        return None
    dx = grid.xs[box[1]][None, :] - cx
    dy = grid.ys[box[0]][:, None] - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, c * dy - s * dx
    return box, (dx / a) ** 2 + (dy / b) ** 2 <= 1.0


def paint_ellipse(image: np.ndarray, grid: Grid, cx: float, cy: float, a: float, b: float, hu: float,
                  angle: float = 0.0) -> None:
    """Set the pixels inside an ellipse (see ``ellipse_mask``) to ``hu``."""
    found = ellipse_mask(grid, cx, cy, a, b, angle)
    if found is not None:
        box, inside = found
        image[box][inside] = hu


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid with one axis along z, turned by ``angle`` radians about z, filled with ``hu``.

    ``axes`` are the semi-axes along (cos angle, sin angle, 0), (-sin angle, cos angle, 0) and z.
    """

    centre: tuple[float, float, float]
    axes: tuple[float, float, float]
    angle: float
    hu: float

    def section(self, z: float) -> tuple[float, float] | None:
        """The semi-axes of the ellipse where the plane at ``z`` cuts the ellipsoid, or None when it misses."""
        k = 1.0 - ((z - self.centre[2]) / self.axes[2]) ** 2
        if k <= 0.0:
            return None
        root = math.sqrt(k)
        return self.axes[0] * root, self.axes[1] * root

    def mask(self, grid: Grid, z: float) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """The pixels of slice ``z`` inside the ellipsoid (see ``ellipse_mask``)."""
        cut = self.section(z)
        if cut is None:
            return None
        return ellipse_mask(grid, self.centre[0], self.centre[1], cut[0], cut[1], self.angle)

    def paint(self, image: np.ndarray, grid: Grid, z: float) -> None:
        """Fill the ellipsoid's cut through slice ``z`` with its HU."""
        found = self.mask(grid, z)
        if found is not None:
            box, inside = found
            image[box][inside] = self.hu

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Whether points lie inside the ellipsoid (elementwise over broadcastable arrays)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.centre[0], y - self.centre[1]
        u, v = c * dx + s * dy, c * dy - s * dx
        a, b, h = self.axes
        return (u / a) ** 2 + (v / b) ** 2 + ((z - self.centre[2]) / h) ** 2 <= 1.0

    def grown(self, margin: float) -> Ellipsoid:
        """The same ellipsoid with ``margin`` mm added to every semi-axis."""
        a, b, h = self.axes
        return Ellipsoid(self.centre, (a + margin, b + margin, h + margin), self.angle, self.hu)


class TubeKind(enum.IntEnum):
    """What a tube carries. Tubes are painted in this order, so pulmonary arteries, where emboli lie, come last."""

    AIRWAY = 0
    SYSTEMIC = 1
    VEIN = 2
    ARTERY = 3


class Side(enum.IntEnum):
    """Which lung a vessel belongs to; the pulmonary trunk and the mediastinal vessels are MIDLINE."""

    RIGHT = -1
    MIDLINE = 0
    LEFT = 1


@dataclass
class Tubes:
    """Straight round tubes with a wall (capsules: the ends are rounded, so chained tubes join smoothly).

    Every field is an array over the tubes. ``order`` counts branchings from the main vessel (0: pulmonary trunk and
    main pulmonary arteries, 1: lobar, 2 and more: segmental and beyond); ``parent`` is the tube this one branches
    from (-1 for none). ``radius`` is the lumen's; the wall adds ``wall_mm`` outside it.
    """

    start: np.ndarray
    end: np.ndarray
    radius: np.ndarray
    lumen_hu: np.ndarray
    wall_mm: np.ndarray
    wall_hu: np.ndarray
    kind: np.ndarray
    side: np.ndarray
    order: np.ndarray
    parent: np.ndarray

    def __len__(self) -> int:
        return len(self.radius)

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.linalg.norm(self.end - self.start, axis=1)

    @cached_property
    def axes(self) -> np.ndarray:
        """Unit vectors from start to end."""
        return (self.end - self.start) / np.maximum(self.lengths, 1e-6)[:, None]

    def children(self, index: int) -> np.ndarray:
        """The tubes that branch from tube ``index``, widest first."""
        found = np.flatnonzero(self.parent == index)
        return found[np.argsort(-self.radius[found], kind="stable")]

    def subtree(self, index: int) -> np.ndarray:
        """Tube ``index`` and every tube that branches from it, directly or further down."""
        found, frontier = [index], [index]
        while frontier:
            frontier = list(np.flatnonzero(np.isin(self.parent, frontier)))
            found.extend(frontier)
        return np.array(found, dtype=np.int64)

    def crossing(self, z: float, margin: float = 0.0) -> np.ndarray:
        """The tubes whose outer surface (wall included, grown by ``margin``) reaches the plane at ``z``."""
        reach = self.radius + self.wall_mm + margin
        low = np.minimum(self.start[:, 2], self.end[:, 2]) - reach
        high = np.maximum(self.start[:, 2], self.end[:, 2]) + reach
        return np.flatnonzero((low <= z) & (z <= high))


class _TubeList:
    """Collects tubes while a chest is drawn, then freezes them into ``Tubes``."""

    def __init__(self) -> None:
        self.columns: dict[str, list[np.ndarray]] = {
            name: [] for name in ("start", "end", "radius", "lumen_hu", "wall_mm", "wall_hu", "kind", "side",
                                  "order", "parent")
        }
        self.count = 0

    def add(self, start: np.ndarray, end: np.ndarray, radius: np.ndarray | float, *, lumen_hu: float,
            kind: TubeKind, side: np.ndarray | int, order: np.ndarray | int, parent: np.ndarray | int,
            wall_mm: np.ndarray | float = 0.0, wall_hu: float = 40.0) -> np.ndarray:
        """Add tubes (arrays of equal length, or one tube) and return their indices."""
        start = np.atleast_2d(np.asarray(start, dtype=np.float64))
        n = len(start)
        values = {
            "start": start, "end": np.atleast_2d(np.asarray(end, dtype=np.float64)),
            "radius": np.broadcast_to(np.asarray(radius, dtype=np.float64), (n,)),
            "lumen_hu": np.full(n, lumen_hu), "wall_mm": np.broadcast_to(np.asarray(wall_mm, dtype=np.float64), (n,)),
            "wall_hu": np.full(n, wall_hu), "kind": np.full(n, int(kind)),
            "side": np.broadcast_to(np.asarray(side), (n,)), "order": np.broadcast_to(np.asarray(order), (n,)),
            "parent": np.broadcast_to(np.asarray(parent), (n,)),
        }
        for name, value in values.items():
            self.columns[name].append(np.array(value))
        indices = np.arange(self.count, self.count + n)
        self.count += n
        return indices

    def chain(self, points: list[tuple[float, float, float]], radius: float, *, lumen_hu: float, kind: TubeKind,
              side: int = Side.MIDLINE, order: int = 0, parent: int = -1, wall_mm: float = 0.0,
              wall_hu: float = 40.0) -> np.ndarray:
        """Add a polyline of tubes, each the parent of the next; returns their indices."""
        indices = []
        for a, b in zip(points[:-1], points[1:]):
            parent = int(self.add(np.array(a), np.array(b), radius, lumen_hu=lumen_hu, kind=kind, side=side,
                                  order=order, parent=parent, wall_mm=wall_mm, wall_hu=wall_hu)[0])
            indices.append(parent)
        return np.array(indices)

    def freeze(self) -> Tubes:
        arrays = {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in self.columns.items()}
        arrays["start"] = arrays["start"].reshape(-1, 3)
        arrays["end"] = arrays["end"].reshape(-1, 3)
        return Tubes(
            start=arrays["start"], end=arrays["end"], radius=arrays["radius"].astype(np.float64),
            lumen_hu=arrays["lumen_hu"].astype(np.float32), wall_mm=arrays["wall_mm"].astype(np.float64),
            wall_hu=arrays["wall_hu"].astype(np.float32), kind=arrays["kind"].astype(np.int8),
            side=arrays["side"].astype(np.int8), order=arrays["order"].astype(np.int16),
            parent=arrays["parent"].astype(np.int64),
        )


@dataclass
class LumenFrame:
    """The pixels of one box of a slice in the coordinates of one tube.

    ``t`` is the distance along the axis from the tube's start (not clipped to the tube), ``rx, ry, rz`` the vector
    from the nearest point of the axis segment to the pixel, ``distance`` its length.
    """

    rows: slice
    cols: slice
    t: np.ndarray
    rx: np.ndarray
    ry: np.ndarray
    rz: np.ndarray
    distance: np.ndarray
    radius: float
    axis: np.ndarray
    length: float


def lumen_frame(tubes: Tubes, index: int, grid: Grid, z: float, reach: float) -> LumenFrame | None:
    """Where the pixels of slice ``z`` within ``reach`` mm of tube ``index``'s axis lie relative to it."""
    a = tubes.start[index]
    u = tubes.axes[index]
    length = float(tubes.lengths[index])
    lo, hi = 0.0, length
    if abs(u[2]) > 1e-6:
        ta, tb = (z - reach - a[2]) / u[2], (z + reach - a[2]) / u[2]
        lo, hi = max(min(ta, tb), 0.0), min(max(ta, tb), length)
        if lo > hi:
            return None
    elif abs(a[2] - z) > reach:
        return None
    p, q = a + lo * u, a + hi * u
    box = grid.box(min(p[0], q[0]) - reach, max(p[0], q[0]) + reach, min(p[1], q[1]) - reach,
                   max(p[1], q[1]) + reach)
    if box is None:
        return None
    return _frame_in_box(tubes, index, grid, z, box)


def paint_tubes(image: np.ndarray, grid: Grid, z: float, tubes: Tubes) -> None:
    """Paint every tube that crosses slice ``z``, wall then lumen, with partial-volume edges, in TubeKind order.

    Tubes whose cut fits in a small box (most of the vessel trees) are painted together, a batch of boxes per
    array operation, each pixel taking the largest coverage of any tube of its batch; the rest one by one.
    """
    crossing = tubes.crossing(z)
    for kind in TubeKind:
        of_kind = crossing[tubes.kind[crossing] == kind]
        if not len(of_kind):
            continue
        boxes = _boxes(tubes, of_kind, grid, z)
        span = np.maximum(boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2])
        alone = np.ones(len(of_kind), dtype=bool)
        for batch in (6, 12, 24):
            chosen = (span <= batch) & alone & (span > 0)
            alone &= ~chosen
            for hu in np.unique(np.stack([tubes.lumen_hu[of_kind], tubes.wall_hu[of_kind]], axis=1)[chosen], axis=0):
                group = chosen & (tubes.lumen_hu[of_kind] == hu[0]) & (tubes.wall_hu[of_kind] == hu[1])
                _paint_batch(image, grid, z, tubes, of_kind[group], boxes[group], batch)
        for index, box in zip(of_kind[alone & (span > 0)], boxes[alone & (span > 0)]):
            _paint_one(image, grid, z, tubes, int(index), (slice(box[0], box[1]), slice(box[2], box[3])))


def _boxes(tubes: Tubes, indices: np.ndarray, grid: Grid, z: float) -> np.ndarray:
    """For each tube, the rows and columns [r0, r1, c0, c1) of slice ``z`` that its outer surface may reach
    (empty ranges where it misses the slice)."""
    reach = tubes.radius[indices] + tubes.wall_mm[indices]
    a, u, length = tubes.start[indices], tubes.axes[indices], tubes.lengths[indices]
    slanted = np.abs(u[:, 2]) > 1e-6
    uz = np.where(slanted, u[:, 2], 1.0)
    ta, tb = (z - reach - a[:, 2]) / uz, (z + reach - a[:, 2]) / uz
    lo = np.where(slanted, np.maximum(np.minimum(ta, tb), 0.0), 0.0)
    hi = np.where(slanted, np.minimum(np.maximum(ta, tb), length), length)
    hit = (lo <= hi) & (slanted | (np.abs(a[:, 2] - z) <= reach))
    p, q = a + lo[:, None] * u, a + hi[:, None] * u
    low = np.minimum(p, q)[:, :2] - reach[:, None]
    high = np.maximum(p, q)[:, :2] + reach[:, None]
    c0 = np.clip(np.floor((low[:, 0] - grid.x0) / grid.spacing), 0, grid.size)
    c1 = np.clip(np.ceil((high[:, 0] - grid.x0) / grid.spacing) + 1, 0, grid.size)
    r0 = np.clip(np.floor((low[:, 1] - grid.y0) / grid.spacing), 0, grid.size)
    r1 = np.clip(np.ceil((high[:, 1] - grid.y0) / grid.spacing) + 1, 0, grid.size)
    boxes = np.stack([r0, r1, c0, c1], axis=1).astype(np.int64)
    boxes[~hit | (r0 >= r1) | (c0 >= c1)] = 0
    return boxes


def _cover(radius: np.ndarray | float, distance: np.ndarray, spacing: float) -> np.ndarray:
    """Partial-volume coverage of pixels ``distance`` mm from an axis by a tube of ``radius``."""
    return np.clip((np.float32(radius) - distance) * np.float32(1.0 / spacing) + 0.5, 0.0, 1.0)


def _paint_one(image: np.ndarray, grid: Grid, z: float, tubes: Tubes, index: int, box: tuple[slice, slice]) -> None:
    """Paint one tube's wall and lumen into its box of the slice."""
    frame = _frame_in_box(tubes, index, grid, z, box)
    region = image[box]
    wall = float(tubes.wall_mm[index])
    if wall > 0.0:
        region += (tubes.wall_hu[index] - region) * _cover(frame.radius + wall, frame.distance, grid.spacing)
    region += (tubes.lumen_hu[index] - region) * _cover(frame.radius, frame.distance, grid.spacing)


def _paint_batch(image: np.ndarray, grid: Grid, z: float, tubes: Tubes, indices: np.ndarray, boxes: np.ndarray,
                 size: int) -> None:
    """Paint tubes of one lumen and wall HU whose boxes fit in ``size`` x ``size`` pixels, all at once."""
    steps = np.arange(size)
    rows = np.minimum(boxes[:, 0:1] + steps, grid.size - 1)[:, :, None]
    cols = np.minimum(boxes[:, 2:3] + steps, grid.size - 1)[:, None, :]
    valid_rows = (boxes[:, 0:1] + steps) < boxes[:, 1:2]
    valid_cols = (boxes[:, 2:3] + steps) < boxes[:, 3:4]
    valid = valid_rows[:, :, None] & valid_cols[:, None, :]
    a = tubes.start[indices].astype(np.float32)
    u = tubes.axes[indices].astype(np.float32)
    length = tubes.lengths[indices].astype(np.float32)[:, None, None]
    wx = grid.xs[cols] - a[:, 0, None, None]
    wy = grid.ys[rows] - a[:, 1, None, None]
    wz = (np.float32(z) - a[:, 2])[:, None, None]
    ux, uy, uz = (u[:, k, None, None] for k in range(3))
    t = np.clip(wx * ux + wy * uy + wz * uz, 0.0, length)
    distance = np.sqrt((wx - t * ux) ** 2 + (wy - t * uy) ** 2 + (wz - t * uz) ** 2)
    radius = tubes.radius[indices].astype(np.float32)[:, None, None]
    flat = (rows * grid.size + cols)[np.broadcast_to(valid, distance.shape)]
    wall = tubes.wall_mm[indices].astype(np.float32)[:, None, None]
    layers = [(tubes.wall_hu[indices[0]], radius + wall)] if wall.any() else []
    mask = np.broadcast_to(valid, distance.shape)
    pixels = image.reshape(-1)
    for hu, outer in [*layers, (tubes.lumen_hu[indices[0]], radius)]:
        cover = np.zeros(image.size, dtype=np.float32)
        np.maximum.at(cover, flat, _cover(outer, distance, grid.spacing)[mask])
        # Repeated indices all compute the same value from the same old pixel, so none is painted twice.
        pixels[flat] += (hu - pixels[flat]) * cover[flat]


def _frame_in_box(tubes: Tubes, index: int, grid: Grid, z: float, box: tuple[slice, slice]) -> LumenFrame:
    """The lumen frame of tube ``index`` over a given box of slice ``z``."""
    a = tubes.start[index]
    u = tubes.axes[index]
    length = float(tubes.lengths[index])
    wx = grid.xs[box[1]][None, :] - np.float32(a[0])
    wy = grid.ys[box[0]][:, None] - np.float32(a[1])
    wz = np.float32(z - a[2])
    ux, uy, uz = (np.float32(c) for c in u)
    t = wx * ux + wy * uy + wz * uz
    clipped = np.clip(t, 0.0, np.float32(length))
    rx, ry, rz = wx - clipped * ux, wy - clipped * uy, wz - clipped * uz
    distance = np.sqrt(rx * rx + ry * ry + rz * rz)
    return LumenFrame(box[0], box[1], t, rx, ry, rz, distance, float(tubes.radius[index]), u, length)


@dataclass(frozen=True)
class Enhancement:
    """The attenuation (HU) of blood and enhancing tissue when the scan was taken: the contrast bolus."""

    pulmonary_artery: float
    right_heart: float
    left_heart: float
    pulmonary_vein: float
    superior_vena_cava: float
    inferior_vena_cava: float
    myocardium: float
    liver: float
    spleen: float


@dataclass
class Chest:
    """One patient's chest: the measurements that place every structure, the tubes and the heart's ellipsoids.

    Lengths are mm. The body is an ellipse with semi-axes ``body_a`` (lateral) and ``body_b`` centred ``body_y``
    behind the thoracic cavity (y = 0), with ``fat_mm`` of subcutaneous fat over ``muscle_mm`` of chest wall. Each
    lung is an ellipse centred at (+-``lung_cx``, ``lung_cy``) with semi-axes ``lung_ax``, ``lung_ay`` that narrows
    to its apex at ``lung_height`` and sits on a diaphragm dome ``dome_right`` / ``dome_left`` high. Ribs are hoops
    ``rib_spacing`` apart from ``rib_top`` down, ``rib_drop`` lower in front. ``rv_lv_ratio`` is the ratio of the
    right to the left ventricular cavity's widest diameter across the septum, the measurement behind the RSPECT
    rv_lv_ratio labels. ``dependent_opacity`` is the share of the cavity's depth, from the back, where the lungs
    are dense (dependent atelectasis); 0 for none. ``tissue`` holds the HU of the unenhanced tissues. ``arm_mm`` is the
    radius of the arms lying beside the chest (0: raised out of the field of view, as usual for a CTPA).
    """

    body_a: float
    body_b: float
    body_y: float
    fat_mm: float
    muscle_mm: float
    lung_height: float
    lung_cx: float
    lung_cy: float
    lung_ax: float
    lung_ay: float
    dome_right: float
    dome_left: float
    mediastinum_mm: float
    spine_y: float
    vertebra_radius: float
    vertebra_period: float
    vertebra_phase: float
    rib_top: float
    rib_spacing: float
    rib_drop: float
    rv_lv_ratio: float
    heart: Ellipsoid
    heart_parts: list[Ellipsoid]
    enhancement: Enhancement
    tissue: dict[str, float]
    lung_texture_seed: int
    dependent_opacity: float
    arm_mm: float = 0.0
    # Empty until build_chest grows them: growing needs the chest's lung_mask.
    tubes: Tubes = field(default_factory=lambda: _TubeList().freeze())
    _grids: dict[Grid, _SliceBase] = field(default_factory=dict, repr=False)

    @property
    def cavity_a(self) -> float:
        """Lateral semi-axis of the thoracic cavity inside fat and chest-wall muscle."""
        return self.body_a - self.fat_mm - self.muscle_mm

    @property
    def cavity_b(self) -> float:
        """Antero-posterior semi-axis of the thoracic cavity, centred on y = 0; the body is centred ``body_y`` mm
        behind it, so the back (paraspinal muscles behind the spine) is thicker than the front."""
        return self.body_b - self.body_y - self.fat_mm - self.muscle_mm

    @property
    def body_width(self) -> float:
        return 2.0 * self.body_a

    def lung_quadratic(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """How far points lie from their lung's axis in units of the lung's semi-axes (1 on the outline)."""
        cx = np.where(x > 0, self.lung_cx, -self.lung_cx)
        ax = np.where(x > 0, 0.95 * self.lung_ax, self.lung_ax)
        return ((x - cx) / ax) ** 2 + ((y - self.lung_cy) / self.lung_ay) ** 2

    def diaphragm(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The height of the diaphragm's domes: below it lie the liver (right) and spleen and stomach (left)."""
        cx = np.where(x > 0, self.lung_cx, -self.lung_cx)
        dome = np.where(x > 0, self.dome_left, self.dome_right)
        peak_y = self.lung_cy - 0.3 * self.lung_ay  # the domes peak in front of the lungs' centre
        q = ((x - cx) / (1.1 * self.lung_ax)) ** 2 + ((y - peak_y) / (1.2 * self.lung_ay)) ** 2
        return dome * np.clip(1.0 - q, 0.0, 1.0) ** 0.6

    def apex_scale(self, z: np.ndarray | float) -> np.ndarray:
        """How much of its full cross-section a lung keeps at height ``z``: 1 below the shoulders, 0 above the apex."""
        t = (np.asarray(z, dtype=np.float64) / self.lung_height - 0.55) / 0.45
        return np.sqrt(np.clip(1.0 - np.clip(t, 0.0, None) ** 2, 0.0, 1.0))

    def outside_lungs(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Points that no lung reaches at any height: the mediastinum's central band and the spine."""
        half_width = self.mediastinum_mm + 0.35 * np.clip(-y, 0.0, None)
        spine = x**2 + (y - self.spine_y) ** 2 < (self.vertebra_radius + 6.0) ** 2
        behind_spine = (y > self.spine_y + 0.4 * self.vertebra_radius) & (np.abs(x) < 30.0)
        return (np.abs(x - 4.0) < half_width) | spine | behind_spine

    def lung_mask(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Whether points lie in lung parenchyma (elementwise over broadcastable arrays)."""
        inside = self.lung_quadratic(x, y) <= self.apex_scale(z) ** 2
        heart = np.zeros(np.broadcast(x, y, z).shape, dtype=bool)
        for part in (self.heart, *self.heart_parts):
            heart |= part.grown(HEART_MARGIN).contains(x, y, z)
        return inside & (z > self.diaphragm(x, y)) & ~self.outside_lungs(x, y) & ~heart

    def render(self, grid: Grid, z: float) -> np.ndarray:
        """The slice at height ``z`` in HU (float32, rows x columns), before blur and noise."""
        base = self._grids.get(grid)
        if base is None:
            base = self._grids[grid] = _SliceBase(self, grid)
        image = base.image.copy()
        below = base.cavity & (z < base.diaphragm)
        image[below] = base.abdomen[below]
        lung = (base.lung_q <= float(self.apex_scale(z)) ** 2) & (z > base.diaphragm) & base.lung_allowed
        for part in (self.heart, *self.heart_parts):
            heart = part.grown(HEART_MARGIN).mask(grid, z)
            if heart is not None:
                heart_box, heart_inside = heart
                lung[heart_box] &= ~heart_inside
        phase = 2.0 * math.pi * z / 23.0
        texture = math.cos(phase) * base.texture[0][lung] + math.sin(phase) * base.texture[1][lung]
        image[lung] = base.lung_hu[lung] + np.float32(self.tissue["lung_texture"]) * texture
        self._paint_ribs(image, base, z)
        self._paint_spine(image, grid, z)
        self._paint_sternum(image, grid, z)
        for part in (self.heart, *self.heart_parts):
            part.paint(image, grid, z)
        paint_tubes(image, grid, z, self.tubes)
        return image

    def _paint_ribs(self, image: np.ndarray, base: _SliceBase, z: float) -> None:
        """Ribs: oblique hoops around the cavity, lower anteriorly; costal cartilage at their front ends."""
        u = base.rib_u - z / self.rib_spacing
        k = np.rint(u)
        hit = (np.abs(u - k) * self.rib_spacing < 3.5) & (k >= 0) & (k < 12)
        flat = image.reshape(-1)
        flat[base.rib_index[hit]] = np.where(base.rib_front[hit], self.tissue["cartilage"], self.tissue["rib"])

    def _paint_spine(self, image: np.ndarray, grid: Grid, z: float) -> None:
        """A vertebra (or an intervertebral disc) with its canal, arch and processes, behind the cavity."""
        r, y = self.vertebra_radius, self.spine_y
        in_disc = (z - self.vertebra_phase) % self.vertebra_period < 6.0
        if in_disc:
            paint_ellipse(image, grid, 0.0, y, r, 0.9 * r, 90.0)
        else:
            paint_ellipse(image, grid, 0.0, y, r, 0.9 * r, self.tissue["cortex"])
            paint_ellipse(image, grid, 0.0, y, r - 2.0, 0.9 * r - 2.0, self.tissue["cancellous"])
        arch = y + r + 8.0
        for side in (-1.0, 1.0):
            paint_ellipse(image, grid, side * 17.0, arch, 11.0, 4.5, self.tissue["cortex"], angle=side * 0.35)
        paint_ellipse(image, grid, 0.0, arch, 10.0, 9.0, self.tissue["cortex"])
        paint_ellipse(image, grid, 0.0, arch, 7.0, 6.5, 15.0)
        paint_ellipse(image, grid, 0.0, arch + 17.0, 4.0, 10.0, self.tissue["cortex"])

    def _paint_sternum(self, image: np.ndarray, grid: Grid, z: float) -> None:
        """The sternum in the anterior chest wall, from the xiphoid to the manubrium."""
        bottom = self.heart.centre[2] - 0.6 * self.heart.axes[2]
        if bottom < z < 0.95 * self.lung_height:
            y = -self.cavity_b - 0.45 * self.muscle_mm
            paint_ellipse(image, grid, 0.0, y, 15.0, 5.5, self.tissue["cortex"])
            paint_ellipse(image, grid, 0.0, y, 13.0, 3.8, self.tissue["cancellous"])


class _SliceBase:
    """What every slice of one chest on one grid shares: the body wall, the organ map below the diaphragm, the lung
    footprints, the rib band and the lung texture. Built once per chest and grid."""

    def __init__(self, chest: Chest, grid: Grid) -> None:
        x = grid.xs[None, :].astype(np.float64)
        y = grid.ys[:, None].astype(np.float64)
        tissue = chest.tissue
        by = y - chest.body_y
        flat_back = chest.body_y + 0.93 * chest.body_b
        body = ((x / chest.body_a) ** 2 + (by / chest.body_b) ** 2 <= 1.0) & (y < flat_back)
        wall = ((x / (chest.body_a - chest.fat_mm)) ** 2 + (by / (chest.body_b - chest.fat_mm)) ** 2 <= 1.0)
        cavity_q = (x / chest.cavity_a) ** 2 + (y / chest.cavity_b) ** 2
        self.cavity = np.broadcast_to(cavity_q <= 1.0, (grid.size, grid.size)).copy()
        image = np.full((grid.size, grid.size), AIR_HU, dtype=np.float32)
        image[(y >= flat_back) & (y < flat_back + 4.0) & (np.abs(x) < 0.9 * chest.body_a)] = -800.0  # the mattress
        image[(y >= flat_back + 4.0) & (y < flat_back + 7.0) & (np.abs(x) < 1.1 * chest.body_a)] = 150.0  # the table
        image[body & ~wall] = tissue["fat"]
        if chest.arm_mm:
            for side in (-1.0, 1.0):
                cx, cy, r = side * (chest.body_a + chest.arm_mm + 6.0), chest.body_y, chest.arm_mm
                arm = ((x - cx) / r) ** 2 + ((y - cy) / (0.85 * r)) ** 2
                bone = (x - cx - side * 0.1 * r) ** 2 + (y - cy) ** 2
                image[arm <= 1.0] = tissue["fat"]
                image[arm <= 0.75] = tissue["muscle"]
                image[bone <= (0.26 * r) ** 2] = tissue["cortex"]
                image[bone <= (0.17 * r) ** 2] = tissue["cancellous"] - 150.0
        image[wall & ~self.cavity] = tissue["muscle"]
        image[self.cavity] = tissue["mediastinum"]
        self.image = image
        self.diaphragm = np.broadcast_to(chest.diaphragm(x, y), image.shape).copy()
        liver = x < 0.25 * chest.cavity_a - 0.3 * y
        stomach_x = (x - 0.45 * chest.cavity_a) / (0.4 * chest.cavity_a)
        stomach = stomach_x**2 + ((y + 0.35 * chest.cavity_b) / (0.5 * chest.cavity_b)) ** 2 < 1.0
        abdomen = np.where(liver, chest.enhancement.liver, np.where(stomach, 35.0, chest.enhancement.spleen))
        self.abdomen = np.broadcast_to(abdomen, image.shape).astype(np.float32)
        self.lung_q = np.broadcast_to(chest.lung_quadratic(x, y), image.shape).copy()
        self.lung_allowed = self.cavity & ~chest.outside_lungs(x, y)
        gradient = tissue["lung"] + tissue["lung_gradient"] * np.clip(y / chest.cavity_b, -1.0, 1.0)
        dependent = (y > chest.cavity_b * (1.0 - chest.dependent_opacity)) & (chest.dependent_opacity > 0)
        self.lung_hu = np.broadcast_to(np.where(dependent, -150.0, gradient), image.shape).astype(np.float32)
        band = ((x / (chest.cavity_a + 1.0)) ** 2 + (y / (chest.cavity_b + 1.0)) ** 2 > 1.0)
        band &= (x / (chest.cavity_a + 8.0)) ** 2 + (y / (chest.cavity_b + 8.0)) ** 2 <= 1.0
        band &= ~((np.abs(x) < 22.0) & (y < 0))
        self.rib_index = np.flatnonzero(band)
        angle = np.arctan2(np.broadcast_to(y, image.shape), np.broadcast_to(x, image.shape)).reshape(-1)[self.rib_index]
        front = (1.0 - np.sin(angle)) / 2.0
        self.rib_u = (chest.rib_top - chest.rib_drop * front) / chest.rib_spacing
        self.rib_front = front > 0.8
        self.texture = _lung_texture(chest.lung_texture_seed, grid)


def _lung_texture(seed: int, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Two smooth unit-variance noise fields; a slice's lung texture mixes them by its height, so it drifts with z."""
    rng = np.random.default_rng(seed)
    sigma = max(0.5, 1.6 / grid.spacing)
    fields = []
    for _ in range(2):
        noise = ndimage.gaussian_filter(rng.standard_normal((grid.size, grid.size)).astype(np.float32), sigma)
        fields.append(noise / max(float(noise.std()), 1e-6))
    return fields[0], fields[1]


def build_chest(rng: np.random.Generator, *, rv_lv_ratio: float, enhancement: Enhancement) -> Chest:
    """Draw one patient's chest: anatomy from the ranges of adult CT, the heart's right ventricle ``rv_lv_ratio``
    times as wide as the left, and blood and tissue attenuation from ``enhancement``."""
    cavity_a = rng.uniform(95.0, 160.0)
    cavity_b = cavity_a * rng.uniform(0.58, 0.78)
    body_y = rng.uniform(10.0, 20.0)
    fat_mm = rng.uniform(3.0, 45.0) * (cavity_a / 130.0)
    muscle_mm = rng.uniform(10.0, 18.0)
    body_a = cavity_a + fat_mm + muscle_mm
    body_b = cavity_b + body_y + fat_mm + muscle_mm
    lung_height = rng.uniform(205.0, 265.0)
    vertebra_radius = rng.uniform(14.0, 19.0)
    tissue = {
        "fat": rng.uniform(-110.0, -85.0), "muscle": rng.uniform(40.0, 60.0), "mediastinum": rng.uniform(-90.0, -60.0),
        "lung": rng.uniform(-880.0, -830.0), "lung_gradient": rng.uniform(20.0, 60.0),
        "lung_texture": rng.uniform(12.0, 28.0), "rib": rng.uniform(450.0, 700.0),
        "cartilage": rng.uniform(90.0, 160.0),
        "cortex": rng.uniform(700.0, 1000.0), "cancellous": rng.uniform(250.0, 400.0),
    }
    dome_right, dome_left = rng.uniform(55.0, 80.0), rng.uniform(40.0, 62.0)
    heart, heart_parts, heart_geometry = _draw_heart(rng, cavity_a, cavity_b, dome_left, rv_lv_ratio, enhancement,
                                                     tissue)
    chest = Chest(
        body_a=body_a, body_b=body_b, body_y=body_y, fat_mm=fat_mm, muscle_mm=muscle_mm, lung_height=lung_height,
        lung_cx=0.5 * cavity_a, lung_cy=0.08 * cavity_b, lung_ax=0.5 * cavity_a, lung_ay=0.9 * cavity_b,
        dome_right=dome_right, dome_left=dome_left,
        mediastinum_mm=rng.uniform(14.0, 20.0), spine_y=cavity_b - 0.55 * vertebra_radius,
        vertebra_radius=vertebra_radius, vertebra_period=rng.uniform(24.0, 28.0),
        vertebra_phase=rng.uniform(0.0, 28.0), rib_top=lung_height + rng.uniform(0.0, 15.0),
        rib_spacing=rng.uniform(21.0, 25.0), rib_drop=rng.uniform(50.0, 80.0), rv_lv_ratio=rv_lv_ratio,
        heart=heart, heart_parts=heart_parts,
        enhancement=enhancement, tissue=tissue, lung_texture_seed=int(rng.integers(2**31)),
        dependent_opacity=float(rng.choice([0.0, 0.0, 0.0, rng.uniform(0.08, 0.2)])),
        arm_mm=float(rng.uniform(35.0, 50.0)) if rng.random() < 0.2 else 0.0,
    )
    chest.tubes = _draw_tubes(rng, chest, heart_geometry)
    return chest


@dataclass(frozen=True)
class _HeartGeometry:
    """Where the great vessels leave the heart."""

    centre: np.ndarray
    rv_outflow: np.ndarray
    aortic_root: np.ndarray
    right_atrium: np.ndarray
    left_atrium: np.ndarray


def _draw_heart(rng: np.random.Generator, cavity_a: float, cavity_b: float, floor: float, rv_lv_ratio: float,
                enhancement: Enhancement, tissue: dict[str, float],
                ) -> tuple[Ellipsoid, list[Ellipsoid], _HeartGeometry]:
    """The heart: pericardial fat, myocardium, both ventricles across the septum and both atria.

    The heart rests on the diaphragm's left dome (``floor``, mm). The long axis points anterior-left and down; the
    right ventricle lies anterior-right of the septum and the left ventricle posterior-left. Their cavity widths
    across the septum are in the ratio ``rv_lv_ratio``; heart size scales with the chest.
    """
    angle = -math.radians(rng.uniform(32.0, 50.0))
    u = np.array([math.cos(angle), math.sin(angle), 0.0])
    v = np.array([-math.sin(angle), math.cos(angle), 0.0])
    scale = cavity_a / 135.0
    lv_width = rng.uniform(34.0, 44.0) * scale
    rv_width = rv_lv_ratio * lv_width
    septum = rng.uniform(8.0, 11.0) * scale
    height = rng.uniform(36.0, 44.0) * scale
    centre = np.array([rng.uniform(0.08, 0.18) * cavity_a, -0.3 * cavity_b, 0.0])
    centre[2] = floor + height + rng.uniform(0.0, 8.0)
    lv_centre = centre + v * (septum / 2 + lv_width / 2) - 6.0 * u
    rv_centre = centre - v * (septum / 2 + rv_width / 2)
    lv_length, rv_length = rng.uniform(36.0, 44.0) * scale, rng.uniform(30.0, 38.0) * scale
    half_span = (lv_width + rv_width + septum) / 2
    envelope_centre = centre + v * (lv_width - rv_width) / 4
    degrees = angle

    def ellipsoid(c: np.ndarray, a: float, b: float, h: float, hu: float) -> Ellipsoid:
        return Ellipsoid((float(c[0]), float(c[1]), float(c[2])), (a, b, h), degrees, hu)

    heart = ellipsoid(envelope_centre, max(lv_length, rv_length) + 14.0, half_span + 14.0, height + 12.0,
                      tissue["fat"])
    right_atrium = centre - v * (0.5 * half_span) + np.array([-0.05 * cavity_a, 0.2 * cavity_b, 18.0])
    left_atrium = centre + np.array([-0.05 * cavity_a, 0.55 * cavity_b, 30.0])
    parts = [
        ellipsoid(envelope_centre, max(lv_length, rv_length) + 9.0, half_span + 9.0, height + 7.0,
                  enhancement.myocardium),
        Ellipsoid(tuple(right_atrium), (24.0, 22.0, 26.0), 0.0, enhancement.myocardium),
        Ellipsoid(tuple(left_atrium), (30.0, 17.0, 18.0), 0.0, enhancement.myocardium),
        Ellipsoid(tuple(right_atrium), (21.0, 19.0, 23.0), 0.0, enhancement.right_heart),
        Ellipsoid(tuple(left_atrium), (27.0, 14.0, 15.0), 0.0, enhancement.pulmonary_vein),
        ellipsoid(lv_centre, lv_length, lv_width / 2, height, enhancement.left_heart),
        ellipsoid(rv_centre, rv_length, rv_width / 2, height - 3.0, enhancement.right_heart),
    ]
    top = centre[2] + 0.75 * height
    geometry = _HeartGeometry(
        centre=centre,
        rv_outflow=np.array([centre[0] + 5.0, centre[1] - 22.0, top]),
        aortic_root=np.array([centre[0] - 18.0, centre[1] + 8.0, top - 5.0]),
        right_atrium=right_atrium, left_atrium=left_atrium,
    )
    return heart, parts, geometry


def _draw_tubes(rng: np.random.Generator, chest: Chest, heart: _HeartGeometry) -> Tubes:
    """Great vessels, airways and the pulmonary artery and vein trees."""
    tubes = _TubeList()
    e = chest.enhancement
    ca, cb, height = chest.cavity_a, chest.cavity_b, chest.lung_height
    top = height + 40.0
    bottom = -60.0
    bifurcation_z = heart.rv_outflow[2] + rng.uniform(22.0, 45.0)
    carina_z = bifurcation_z + rng.uniform(2.0, 10.0)
    arch_z = bifurcation_z + rng.uniform(28.0, 40.0)
    wall = dict(wall_mm=1.5, wall_hu=45.0)
    # Systemic veins, oesophagus, aorta.
    svc_x, svc_y = -0.24 * ca, -0.22 * cb
    tubes.chain([(svc_x, svc_y, top), (svc_x, svc_y, heart.right_atrium[2] + 10.0),
                 tuple(heart.right_atrium)], rng.uniform(8.0, 11.0), lumen_hu=e.superior_vena_cava,
                kind=TubeKind.SYSTEMIC, **wall)
    tubes.chain([(heart.right_atrium[0] + 5.0, 0.15 * cb, bottom), tuple(heart.right_atrium)], rng.uniform(11.0, 14.0),
                lumen_hu=e.inferior_vena_cava, kind=TubeKind.SYSTEMIC, **wall)
    tubes.chain([(0.05 * ca, 0.5 * cb, top), (0.06 * ca, 0.5 * cb, bottom)], rng.uniform(6.0, 8.0), lumen_hu=35.0,
                kind=TubeKind.SYSTEMIC)
    aorta = rng.uniform(12.0, 17.0)
    descending_x, descending_y = 0.17 * ca, chest.spine_y - chest.vertebra_radius - aorta + 4.0
    tubes.chain([tuple(heart.aortic_root), (-0.06 * ca, -0.3 * cb, arch_z - 18.0),
                 (-0.03 * ca, -0.2 * cb, arch_z - 3.0),
                 (0.06 * ca, 0.05 * cb, arch_z), (0.15 * ca, 0.3 * cb, arch_z - 6.0),
                 (descending_x, descending_y, arch_z - 25.0), (descending_x + 3.0, descending_y, bottom)], aorta,
                lumen_hu=e.left_heart, kind=TubeKind.SYSTEMIC, **wall)
    # Trachea and main bronchi.
    trachea_y = 0.28 * cb
    airway = dict(lumen_hu=AIR_HU, kind=TubeKind.AIRWAY, wall_mm=1.8, wall_hu=40.0)
    carina = (0.0, trachea_y, carina_z)
    tubes.chain([(-2.0, trachea_y - 5.0, top), carina], rng.uniform(8.0, 10.0), **airway)
    tubes.chain([carina, (-0.25 * ca, trachea_y + 5.0, carina_z - 22.0)], 6.5, **airway)
    tubes.chain([carina, (0.22 * ca, trachea_y + 12.0, carina_z - 40.0)], 5.5, **airway)
    # Pulmonary trunk and main pulmonary arteries.
    trunk_r = rng.uniform(10.0, 17.0) * (1.0 + 0.25 * max(chest.rv_lv_ratio - 1.0, 0.0))
    bifurcation = (0.08 * ca, -0.05 * cb, bifurcation_z)
    artery = dict(lumen_hu=e.pulmonary_artery, kind=TubeKind.ARTERY, wall_mm=1.0, wall_hu=45.0)
    trunk = tubes.chain([tuple(heart.rv_outflow), (0.1 * ca, -0.35 * cb, bifurcation_z - 22.0), bifurcation],
                        trunk_r, **artery)
    main_r = trunk_r * rng.uniform(0.62, 0.85)
    right_hilum = np.array([-0.36 * ca, 0.02 * cb, bifurcation_z - 18.0])
    left_hilum = np.array([0.36 * ca, 0.2 * cb, bifurcation_z - 10.0])
    bend = rng.uniform(-8.0, 8.0, (2, 3))  # each main artery's course
    right_pa = tubes.chain([bifurcation, tuple(np.array([-0.12 * ca, 0.05 * cb, bifurcation_z - 6.0]) + bend[0]),
                            tuple(right_hilum)], main_r,
                           side=Side.RIGHT, parent=int(trunk[-1]), **artery)
    left_pa = tubes.chain([bifurcation, tuple(np.array([0.2 * ca, 0.1 * cb, bifurcation_z + 6.0]) + bend[1]),
                           tuple(left_hilum)],
                          main_r * 0.95, side=Side.LEFT, parent=int(trunk[-1]), **artery)
    artery_added = []
    for side, hilum, parent in ((Side.RIGHT, right_hilum, right_pa[-1]), (Side.LEFT, left_hilum, left_pa[-1])):
        roots = int(rng.integers(SEGMENTAL_ROOTS[0], SEGMENTAL_ROOTS[1] + 1))
        targets = _spread_targets(rng, chest, side, roots)
        root_r = main_r / roots ** (1.0 / 3.0)
        roots = [(hilum, target, root_r * rng.uniform(0.9, 1.1), side, int(parent)) for target in targets]
        artery_added.append(_grow_tree(rng, chest, tubes, roots, lumen_hu=e.pulmonary_artery, kind=TubeKind.ARTERY,
                                       cap=1500))
    # Pulmonary veins: from the left atrium, an upper and a lower vein on each side, then trees of their own.
    la = heart.left_atrium
    for side in (Side.RIGHT, Side.LEFT):
        targets = _spread_targets(rng, chest, side, int(rng.integers(SEGMENTAL_ROOTS[0], SEGMENTAL_ROOTS[1] + 1)))
        roots = []
        for target in targets:
            hilum = la + np.array([side * 20.0, 5.0, 10.0 if target[2] > la[2] else -8.0])
            roots.append((hilum, target, rng.uniform(3.5, 4.5), side, -1))
        _grow_tree(rng, chest, tubes, roots, lumen_hu=e.pulmonary_vein, kind=TubeKind.VEIN, cap=1200)
    frozen = tubes.freeze()
    return _with_bronchi(rng, frozen, np.concatenate(artery_added))


def _spread_targets(rng: np.random.Generator, chest: Chest, side: Side, count: int) -> np.ndarray:
    """``count`` points spread evenly through one lung (farthest-point sampling of random lung points): the regions
    that the segmental vessel trees grow towards."""
    n = 4000
    points = np.column_stack([
        side * rng.uniform(0.0, chest.cavity_a, n), rng.uniform(-chest.cavity_b, chest.cavity_b, n),
        rng.uniform(0.0, chest.lung_height, n),
    ])
    points = points[chest.lung_mask(points[:, 0], points[:, 1], points[:, 2])]
    chosen = [int(rng.integers(len(points)))]
    nearest = np.linalg.norm(points - points[chosen[0]], axis=1)
    for _ in range(count - 1):
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return points[chosen]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _grow_tree(rng: np.random.Generator, chest: Chest, tubes: _TubeList,
               roots: list[tuple[np.ndarray, np.ndarray, float, int, int]], *, lumen_hu: float, kind: TubeKind,
               cap: int) -> np.ndarray:
    """Grow vessel trees from their roots (start, target, radius, side, parent) one generation at a time.

    Each branch runs straight for some radii (drawn per tree from 3.5-5 to 6-8) and ends inside the lung (a branch
    that would leave it turns back towards its target, shorter, or ends). It splits into two children whose radii
    obey Murray's law (r^3 = r1^3 + r2^3), one near the parent's direction and one at a wider angle; each child
    inherits its parent's target scattered by a spread that shrinks with every generation and bends towards it, so
    each lobe's tree fans out over the lobe.
    Growth stops below MIN_VESSEL_RADIUS or at ``cap`` tubes.
    Returns the indices of the tubes it added.
    """
    start = np.array([r[0] for r in roots], dtype=np.float64)
    direction = _unit(np.array([r[1] for r in roots]) - start)
    radius = np.array([r[2] for r in roots])
    side = np.array([r[3] for r in roots])
    parent = np.array([r[4] for r in roots])
    hilum = start.copy()
    target = np.array([r[1] for r in roots], dtype=np.float64)
    order = np.ones(len(roots), dtype=np.int64)
    first_length = np.linalg.norm(np.array([r[1] for r in roots]) - start, axis=1) * 0.3
    reach = (rng.uniform(3.5, 5.0), rng.uniform(6.0, 8.0))
    added: list[np.ndarray] = []
    total = 0
    while len(start) and total < cap:
        n = len(start)
        length = first_length if total == 0 else np.clip(radius * rng.uniform(*reach, n), 2.5, 25.0)
        end = start + length[:, None] * direction
        keep = chest.lung_mask(end[:, 0], end[:, 1], end[:, 2]) | (total == 0)
        for _ in range(3):  # a branch that would leave the lung turns back towards its lobe, shorter, or ends
            if keep.all():
                break
            turned = _unit(_unit(target - start) + 0.6 * rng.standard_normal((n, 3)))
            direction = np.where(keep[:, None], direction, turned)
            length = np.where(keep, length, 0.7 * length)
            end = start + length[:, None] * direction
            keep = chest.lung_mask(end[:, 0], end[:, 1], end[:, 2]) | (total == 0)
        index = tubes.add(start[keep], end[keep], radius[keep], lumen_hu=lumen_hu, kind=kind, side=side[keep],
                          order=order[keep], parent=parent[keep], wall_mm=0.0)
        added.append(index)
        total += len(index)
        start, direction, radius = end[keep], direction[keep], radius[keep]
        side, hilum, order, target = side[keep], hilum[keep], order[keep], target[keep]
        k = len(start)
        big = rng.uniform(0.72, 0.92, k)
        small = np.cbrt(1.0 - big**3)
        across = _unit(rng.standard_normal((k, 3)))
        across = _unit(across - np.sum(across * direction, axis=1, keepdims=True) * direction)
        narrow, wide = np.radians(rng.uniform(5.0, 32.0, k)), np.radians(rng.uniform(30.0, 80.0, k))
        spread = 30.0 * 0.75 ** (order - 1)
        scatter = rng.normal(0.0, 1.0, (2 * k, 3)) * np.concatenate([spread, spread])[:, None]
        target = np.concatenate([target, target]) + scatter
        pull = 0.2 * _unit(start - hilum)
        d1 = np.cos(narrow)[:, None] * direction + np.sin(narrow)[:, None] * across
        d2 = np.cos(wide)[:, None] * direction - np.sin(wide)[:, None] * across
        toward = _unit(target - np.concatenate([start, start]))
        bend = rng.uniform(0.3, 0.7, 2 * k)[:, None]
        d12 = _unit(np.concatenate([d1, d2]) + bend * toward + np.concatenate([pull, pull]))
        start = np.concatenate([start, start])
        direction = d12
        radius = np.concatenate([radius * big, radius * small])
        parent = np.concatenate([index, index])
        side, hilum, order = (np.concatenate([a, a]) for a in (side, hilum, order + 1))
        alive = radius >= MIN_VESSEL_RADIUS
        if total + int(alive.sum()) > cap:
            chosen = np.sort(rng.permutation(np.flatnonzero(alive))[: max(cap - total, 0)])
            alive = np.zeros_like(alive)
            alive[chosen] = True
        start, direction, radius, parent = start[alive], direction[alive], radius[alive], parent[alive]
        side, hilum, order, target = side[alive], hilum[alive], order[alive], target[alive]
    return np.concatenate(added) if added else np.zeros(0, dtype=np.int64)


def _with_bronchi(rng: np.random.Generator, tubes: Tubes, arteries: np.ndarray) -> Tubes:
    """Add a bronchus beside every lobar and segmental artery wider than 1.3 mm (the bronchovascular bundle).

    A bronchus's parent is the bronchus beside its artery's parent, so bronchi form trees as the arteries do.
    """
    chosen = arteries[tubes.radius[arteries] >= 1.3]
    axis = tubes.axes[chosen]
    across = _unit(np.cross(axis, np.array([0.0, 0.0, 1.0])) + 0.3 * rng.standard_normal((len(chosen), 3)))
    across = _unit(across - np.sum(across * axis, axis=1, keepdims=True) * axis)
    bronchus_r = 0.8 * tubes.radius[chosen]
    wall = 0.2 * bronchus_r + 0.3
    offset = (tubes.radius[chosen] + bronchus_r + wall + 0.5)[:, None] * across
    position = {int(a): len(tubes) + i for i, a in enumerate(chosen)}
    parent = np.array([position.get(int(tubes.parent[a]), -1) for a in chosen], dtype=np.int64)
    n = len(chosen)
    return Tubes(
        start=np.concatenate([tubes.start, tubes.start[chosen] + offset]),
        end=np.concatenate([tubes.end, tubes.end[chosen] + offset]),
        radius=np.concatenate([tubes.radius, bronchus_r]),
        lumen_hu=np.concatenate([tubes.lumen_hu, np.full(n, AIR_HU, np.float32)]),
        wall_mm=np.concatenate([tubes.wall_mm, wall]),
        wall_hu=np.concatenate([tubes.wall_hu, np.full(n, 30.0, np.float32)]),
        kind=np.concatenate([tubes.kind, np.full(n, TubeKind.AIRWAY, np.int8)]),
        side=np.concatenate([tubes.side, tubes.side[chosen]]),
        order=np.concatenate([tubes.order, tubes.order[chosen]]),
        parent=np.concatenate([tubes.parent, parent]),
    )
