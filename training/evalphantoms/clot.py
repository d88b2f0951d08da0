"""An embolus of the evaluation phantoms: a filling defect defined in its artery's own frame.

The clot lies along a stretch of an artery's centreline (``training.evalphantoms.patient.Path``), sampled every half
millimetre with a frame carried along it by parallel transport (tangent, normal, binormal). At each sample its cross
section is an ellipse in the normal plane whose larger semi-axis is a share of the artery's radius there (45-80
%), set off from the centre towards a direction that turns slowly along the clot (a central defect or
an eccentric one against the wall), kept inside the lumen. Along the clot the section swells from a blunt head to a
tapering tail. A pixel's share of the clot is the share of its twelve sample points (``shapes.IN_PLANE`` x
``shapes.THROUGH_SLICE``) whose nearest centreline sample has them inside that section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from training.evalphantoms.patient import Path, Patient
from training.evalphantoms.shapes import IN_PLANE, THROUGH_SLICE, Grid

STEP = 0.5
"""mm between the clot's centreline samples."""
LOCATIONS = ("central", "left", "right")
"""Where a clot lodges: the pulmonary trunk and main pulmonary arteries, or a lobar artery of either lung."""
_LOBES = {"left": ("left_upper", "left_lower"), "right": ("right_upper", "right_middle", "right_lower")}


@dataclass(frozen=True)
class Clot:
    """A clot: centreline samples [m, 3], their frames (normal and binormal [m, 3]), the section's semi-axes [m]
    along the normal and the binormal, its offset from the centreline [m, 2] in that frame, and its HU."""

    location: str
    artery: str
    centre: np.ndarray
    normal: np.ndarray
    binormal: np.ndarray
    semi_normal: np.ndarray
    semi_binormal: np.ndarray
    offset: np.ndarray
    hu: float
    length: float
    fraction: float

    def share(self, grid: Grid, z: float, thickness: float) -> np.ndarray:
        """Each pixel's share of the clot over the slab of ``thickness`` mm centred on ``z``."""
        out = np.zeros((grid.size, grid.size), dtype=np.float32)
        reach = float(self.semi_normal.max() + np.abs(self.offset).max()) + STEP
        near = np.abs(self.centre[:, 2] - z) <= thickness / 2 + reach
        if not near.any():
            return out
        low = self.centre[near, :2].min(axis=0) - reach
        high = self.centre[near, :2].max(axis=0) + reach
        c0, r0 = (max(0, math.floor((low[k] - origin) / grid.spacing)) for k, origin in ((0, grid.x0), (1, grid.y0)))
        c1 = min(grid.size, math.ceil((high[0] - grid.x0) / grid.spacing) + 1)
        r1 = min(grid.size, math.ceil((high[1] - grid.y0) / grid.spacing) + 1)
        if c0 >= c1 or r0 >= r1:
            return out
        cols, rows = np.arange(c0, c1), np.arange(r0, r1)
        x = grid.x0 + grid.spacing * (cols[None, :, None, None] + IN_PLANE[None, None, :, 1, None])
        y = grid.y0 + grid.spacing * (rows[:, None, None, None] + IN_PLANE[None, None, :, 0, None])
        zs = z + thickness * THROUGH_SLICE[None, None, None, :]
        points = np.stack(np.broadcast_arrays(x, y, zs), axis=-1).reshape(-1, 3)
        distance, nearest = cKDTree(self.centre).query(points, distance_upper_bound=reach)
        found = np.isfinite(distance)
        inside = np.zeros(len(points), dtype=bool)
        k = nearest[found]
        rel = points[found] - self.centre[k]
        u = (rel * self.normal[k]).sum(axis=1) - self.offset[k, 0]
        v = (rel * self.binormal[k]).sum(axis=1) - self.offset[k, 1]
        ends = (k == 0) | (k == len(self.centre) - 1)
        inside[found] = ((u / self.semi_normal[k]) ** 2 + (v / self.semi_binormal[k]) ** 2 <= 1.0) & ~ends
        shape = (len(rows), len(cols), len(IN_PLANE) * len(THROUGH_SLICE))
        out[r0:r1, c0:c1] = inside.reshape(shape).mean(axis=2)
        return out


def place_clot(rng: np.random.Generator, patient: Patient, location: str) -> Clot:
    """A clot of 12-40 mm at ``location``: in the pulmonary trunk (running on into a main artery if long), or in a
    lobar artery of the left or right lung."""
    if location == "central":
        side = str(rng.choice(["left", "right"]))
        artery = f"trunk+{side}"
        path = patient.central["trunk"].then(patient.central[side])
        start = rng.uniform(0.1, 0.55) * patient.central["trunk"].length
    elif location in _LOBES:
        artery = str(rng.choice(_LOBES[location]))
        path = patient.lobar[artery]
        start = rng.uniform(0.0, 0.3) * path.length
    else:
        raise ValueError(f"clot location {location!r}: must be one of {', '.join(LOCATIONS)}")
    length = min(rng.uniform(12.0, 40.0), path.length - start - 1.0)
    return _clot_along(rng, path, start, length, location, artery)


def _clot_along(rng: np.random.Generator, path: Path, start: float, length: float, location: str,
                artery: str) -> Clot:
    points, radii = _resample(path, start, length)
    tangent = np.gradient(points, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.empty_like(points)
    first = np.cross(tangent[0], rng.standard_normal(3))
    normal[0] = first / np.linalg.norm(first)
    for k in range(1, len(points)):
        carried = normal[k - 1] - np.dot(normal[k - 1], tangent[k]) * tangent[k]
        normal[k] = carried / np.linalg.norm(carried)
    binormal = np.cross(tangent, normal)
    s = np.linspace(0.0, length, len(points))
    head, tail = rng.uniform(1.5, 4.0), rng.uniform(0.2, 0.5) * length
    profile = np.clip(s / head, 0.0, 1.0) ** 0.5 * np.clip((length - s) / tail, 0.0, 1.0) ** 0.7
    fraction = rng.uniform(0.45, 0.8)
    semi = np.maximum(fraction * radii * profile, 0.05)
    flat = rng.uniform(0.75, 1.0)
    eccentric = rng.uniform(0.0, 1.0)
    turn = rng.uniform(0.0, 2 * math.pi) + rng.uniform(-0.05, 0.05) * s
    reach = 0.9 * eccentric * (radii - semi)
    offset = np.column_stack([reach * np.cos(turn), reach * np.sin(turn)])
    return Clot(location=location, artery=artery, centre=points, normal=normal, binormal=binormal, semi_normal=semi,
                semi_binormal=flat * semi, offset=offset, hu=float(rng.uniform(25.0, 75.0)), length=float(length),
                fraction=float(fraction))


def _resample(path: Path, start: float, length: float) -> tuple[np.ndarray, np.ndarray]:
    """Centreline points and radii every ``STEP`` mm from ``start`` to ``start + length`` along the path."""
    steps = np.linalg.norm(np.diff(path.points, axis=0), axis=1)
    along = np.concatenate([[0.0], np.cumsum(steps)])
    wanted = np.linspace(start, start + length, max(3, int(round(length / STEP)) + 1))
    points = np.column_stack([np.interp(wanted, along, path.points[:, k]) for k in range(3)])
    return points, np.interp(wanted, along, path.radii)
