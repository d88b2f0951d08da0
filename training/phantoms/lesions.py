"""Pulmonary emboli and their mimics: placed in a phantom chest's vessels and airways, drawn into its slices.

An embolus is a low-attenuation filling defect (20-90 HU) inside a contrast-filled pulmonary artery, lodged at a point
of the arterial tree and running downstream (along the widest branch at each split) for its length:

- acute: a defect of 35-90 % of the lumen's radius, in the middle of the lumen with contrast all round it (the
  polo-mint sign) or set off against the wall (eccentric), or filling the lumen (occlusive); its ends blunt (a few
  mm) or tapering over a third to a half of its length; a saddle embolus across the bifurcation into both main
  arteries;
- chronic: an eccentric crescent adherent to the wall, in an artery that is narrowed with all its branches; or a web,
  a thin band across the lumen.

Mimics are drawn the same way but are no embolus: a flow (mixing) artefact, an ill-defined stretch of lower
attenuation in an artery; and true filling defects that are not PE: a mucus plug (a bronchus filled with soft tissue
beside its artery), a lymph node beside a hilar artery, a lung mass.

A lesion's ``cover`` on a slice is computed from the slice's own pixels, and the labels of a study come from what is
covered: ``pe_present_on_image`` marks exactly the slices on which an embolus shows, that is covers at least
``EMBOLUS_VISIBLE_MM2`` of the slice (a defect about 2.5 mm across, what a reader calls with confidence). The tapered
ends of a clot, where it is thinner than that, are drawn but not labelled, as a reader would not mark them either.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from training.phantoms.anatomy import (
    Chest,
    Ellipsoid,
    Grid,
    LumenFrame,
    TubeKind,
    Tubes,
    lumen_frame,
)

# A mimic counts as visible on a slice where it changes some pixel by this share of the way to its own HU.
MIMIC_VISIBLE_WEIGHT = 0.35
# An embolus shows on a slice where its defect covers at least this area (mm^2): a disc about 2.5 mm across.
EMBOLUS_VISIBLE_MM2 = 5.0


class LesionKind(str, enum.Enum):
    """What a lesion is; the first three are emboli."""

    ACUTE = "acute"
    CHRONIC = "chronic"
    WEB = "web"
    FLOW_ARTIFACT = "flow_artifact"
    MUCUS_PLUG = "mucus_plug"
    LYMPH_NODE = "lymph_node"
    MASS = "mass"

    @property
    def is_embolus(self) -> bool:
        return self in (LesionKind.ACUTE, LesionKind.CHRONIC, LesionKind.WEB)

    @property
    def is_chronic(self) -> bool:
        return self in (LesionKind.CHRONIC, LesionKind.WEB)

    @property
    def is_filling_defect_not_pe(self) -> bool:
        """The RSPECT true_filling_defect_not_pe finding."""
        return self in (LesionKind.MUCUS_PLUG, LesionKind.LYMPH_NODE, LesionKind.MASS)


class EmbolusSite(str, enum.Enum):
    """How deep in the arterial tree an embolus lodges: the trunk and main arteries, or lobar, segmental and
    subsegmental branches (by the tree's branching order and the artery's radius)."""

    CENTRAL = "central"
    LOBAR = "lobar"
    SEGMENTAL = "segmental"
    SUBSEGMENTAL = "subsegmental"


@dataclass(frozen=True)
class Piece:
    """The part of a lesion inside one tube: from ``t0`` to ``t1`` mm along the tube, starting ``s0`` mm along the
    lesion."""

    tube: int
    t0: float
    t1: float
    s0: float


@dataclass(frozen=True)
class Cover:
    """What a lesion covers on one slice inside one tube (``tube`` -1 for a lymph node or mass): a box of the image
    and the weight, in (0, 1], with which each of its pixels takes the lesion's HU."""

    rows: slice
    cols: slice
    weight: np.ndarray
    tube: int


@dataclass(frozen=True)
class Lesion:
    """One embolus or mimic.

    ``fraction`` is, for an acute embolus, the defect's radius over the lumen's (1 and more: occlusive); for a chronic
    one, the crescent's thickness over the lumen's diameter; for a web, the band's half-width over the lumen's radius;
    for a flow artefact, how far the lumen goes towards ``hu`` at its centre. ``direction`` is the side of the lumen
    the defect leans to (acute), adheres to (chronic) or the band's normal (web). ``blob`` is a lymph node or mass.
    ``taper`` is how far (mm) from each end the defect reaches its full size.
    """

    kind: LesionKind
    hu: float
    pieces: tuple[Piece, ...] = ()
    length: float = 0.0
    fraction: float = 1.0
    direction: tuple[float, float, float] = (1.0, 0.0, 0.0)
    offset: float = 0.0
    blob: Ellipsoid | None = None
    taper: float = 4.0

    def cover(self, tubes: Tubes, grid: Grid, z: float) -> list[Cover]:
        """The pixels this lesion covers on the slice at height ``z``."""
        if self.blob is not None:
            found = self.blob.mask(grid, z)
            if found is None or not found[1].any():
                return []
            (rows, cols), inside = found
            return [Cover(rows, cols, inside.astype(np.float32), -1)]
        covers = []
        for piece in self.pieces:
            frame = lumen_frame(tubes, piece.tube, grid, z, float(tubes.radius[piece.tube]))
            if frame is None:
                continue
            along = (frame.t >= piece.t0) & (frame.t <= piece.t1) & (frame.distance < frame.radius)
            if not along.any():
                continue
            weight = np.where(along, self._weight(frame, piece.s0 + frame.t - piece.t0), 0.0).astype(np.float32)
            if weight.any():
                covers.append(Cover(frame.rows, frame.cols, weight, piece.tube))
        return covers

    def _weight(self, frame: LumenFrame, s: np.ndarray) -> np.ndarray:
        """The weight of each pixel of a lumen frame, ``s`` mm along the lesion (inside-lumen test done already)."""
        r = frame.radius
        n = np.asarray(self.direction) - np.dot(self.direction, frame.axis) * frame.axis
        n = n / max(float(np.linalg.norm(n)), 1e-9)
        across = frame.rx * n[0] + frame.ry * n[1] + frame.rz * n[2]
        ends = np.clip(np.minimum(s, self.length - s) / min(self.taper, self.length / 2), 0.0, 1.0) ** 0.5
        if self.kind is LesionKind.ACUTE:
            cx, cy, cz = n * self.offset * r
            off = np.sqrt((frame.rx - cx) ** 2 + (frame.ry - cy) ** 2 + (frame.rz - cz) ** 2)
            return (off < self.fraction * r * ends).astype(np.float32)
        if self.kind is LesionKind.CHRONIC:
            return (across > r * (1.0 - 2.0 * self.fraction * ends)).astype(np.float32)
        if self.kind is LesionKind.WEB:
            return (np.abs(across) < max(0.4, self.fraction * r)).astype(np.float32)
        if self.kind is LesionKind.FLOW_ARTIFACT:
            middle = np.exp(-(((s - self.length / 2) / (0.35 * self.length)) ** 2))
            return self.fraction * middle * np.sqrt(np.clip(1.0 - (frame.distance / r) ** 2, 0.0, 1.0))
        return np.ones_like(s)  # a mucus plug fills its bronchus

    def paint(self, image: np.ndarray, tubes: Tubes, grid: Grid, z: float) -> list[Cover]:
        """Draw the lesion into slice ``z`` (HU) and return what it covered."""
        covers = self.cover(tubes, grid, z)
        for c in covers:
            region = image[c.rows, c.cols]
            region += (np.float32(self.hu) - region) * c.weight
        return covers


def follow(tubes: Tubes, tube: int, t: float, length: float) -> tuple[Piece, ...]:
    """The pieces of a lesion that starts ``t`` mm along ``tube`` and runs ``length`` mm downstream, taking the widest
    branch at each split, until its length is used or the tree ends."""
    pieces = []
    done = 0.0
    while done < length and tube >= 0:
        available = float(tubes.lengths[tube]) - t
        step = min(available, length - done)
        if step > 0:
            pieces.append(Piece(tube, t, t + step, done))
            done += step
        children = tubes.children(tube)
        tube, t = (int(children[0]), 0.0) if len(children) else (-1, 0.0)
    return tuple(pieces)


def _pick_artery(rng: np.random.Generator, tubes: Tubes, site: EmbolusSite) -> int:
    """An artery of the given depth, or the nearest deeper-to-central class that exists in this tree."""
    artery = tubes.kind == TubeKind.ARTERY
    choices = {
        EmbolusSite.CENTRAL: artery & (tubes.order == 0),
        EmbolusSite.LOBAR: artery & (tubes.order == 1),
        EmbolusSite.SEGMENTAL: artery & (tubes.order >= 2) & (tubes.radius >= 1.8),
        EmbolusSite.SUBSEGMENTAL: artery & (tubes.order >= 3) & (tubes.radius >= 1.0) & (tubes.radius < 1.8),
    }
    for candidate in (site, EmbolusSite.SEGMENTAL, EmbolusSite.LOBAR, EmbolusSite.CENTRAL):
        found = np.flatnonzero(choices[candidate])
        if len(found):
            return int(rng.choice(found))
    raise ValueError("the chest has no pulmonary arteries")


def _across(rng: np.random.Generator) -> tuple[float, float, float]:
    v = rng.standard_normal(3)
    v /= np.linalg.norm(v)
    return float(v[0]), float(v[1]), float(v[2])


_LENGTHS = {
    EmbolusSite.CENTRAL: (20.0, 60.0), EmbolusSite.LOBAR: (15.0, 55.0),
    EmbolusSite.SEGMENTAL: (8.0, 40.0), EmbolusSite.SUBSEGMENTAL: (5.0, 18.0),
}


def place_embolus(rng: np.random.Generator, chest: Chest, site: EmbolusSite, kind: LesionKind) -> Lesion:
    """Lodge one embolus of ``kind`` at ``site``. A chronic embolus also narrows its artery and every branch of it
    (this changes ``chest.tubes`` in place)."""
    tubes = chest.tubes
    tube = _pick_artery(rng, tubes, site)
    low, high = _LENGTHS[site]
    if kind is LesionKind.WEB:
        length = rng.uniform(1.5, 4.0)
    else:
        length = rng.uniform(low, high)
    start = rng.uniform(0.0, 0.8) * float(tubes.lengths[tube])
    pieces = follow(tubes, tube, start, length)
    if kind is LesionKind.ACUTE:
        occlusive = rng.random() < (0.1 if site is EmbolusSite.CENTRAL else 0.3)
        fraction = rng.uniform(1.05, 1.4) if occlusive else rng.uniform(0.35, 0.9)
        taper = rng.uniform(0.3, 0.5) * length if rng.random() < 0.35 else rng.uniform(2.0, 5.0)
        return Lesion(kind, rng.uniform(20.0, 90.0), pieces, length, fraction, _across(rng),
                      offset=0.0 if occlusive else rng.uniform(0.0, 1.0 - fraction), taper=taper)
    tubes.radius[tubes.subtree(tube)] *= rng.uniform(0.65, 0.85)
    fraction = rng.uniform(0.15, 0.25) if kind is LesionKind.WEB else rng.uniform(0.2, 0.45)
    return Lesion(kind, rng.uniform(35.0, 90.0), pieces, length, fraction, _across(rng))


def place_saddle_embolus(rng: np.random.Generator, chest: Chest) -> Lesion:
    """A saddle embolus: an acute defect of 60-140 % of the lumen's radius (occlusive above 100 %) through the
    pulmonary trunk and both main pulmonary arteries, the largest there is, visible on any slice through the main
    arteries at any resolution."""
    tubes = chest.tubes
    central = (tubes.kind == TubeKind.ARTERY) & (tubes.order == 0)
    trunk = np.flatnonzero(central & (tubes.side == 0))
    pieces, done = [], 0.0
    for tube in trunk:
        pieces.append(Piece(int(tube), 0.0, float(tubes.lengths[tube]), done))
        done += float(tubes.lengths[tube])
    longest = 0.0
    for side in (-1, 1):
        along = done
        for tube in np.flatnonzero(central & (tubes.side == side)):
            pieces.append(Piece(int(tube), 0.0, float(tubes.lengths[tube]), along))
            along += float(tubes.lengths[tube])
        longest = max(longest, along)
    return Lesion(LesionKind.ACUTE, rng.uniform(20.0, 90.0), tuple(pieces), longest, rng.uniform(0.6, 1.4),
                  _across(rng))


def place_flow_artifact(rng: np.random.Generator, chest: Chest) -> Lesion:
    """A mixing artefact: unopacified blood streaming into a lower-lobe or central artery, an ill-defined stretch of
    lower attenuation that fades into the contrast around it."""
    tubes = chest.tubes
    wide = (tubes.kind == TubeKind.ARTERY) & (tubes.radius >= 2.5) & (tubes.order <= 2)
    low = wide & (tubes.start[:, 2] < 0.5 * chest.lung_height)
    tube = int(rng.choice(np.flatnonzero(low if low.any() else wide)))
    length = rng.uniform(12.0, 35.0)
    pieces = follow(tubes, tube, rng.uniform(0.0, 0.5) * float(tubes.lengths[tube]), length)
    return Lesion(LesionKind.FLOW_ARTIFACT, rng.uniform(60.0, 110.0), pieces, length, rng.uniform(0.5, 0.8))


def place_filling_defect(rng: np.random.Generator, chest: Chest) -> Lesion:
    """A true filling defect that is not PE: a mucus plug, a hilar lymph node or a lung mass."""
    tubes = chest.tubes
    kind = LesionKind(rng.choice([LesionKind.MUCUS_PLUG.value, LesionKind.LYMPH_NODE.value, LesionKind.MASS.value]))
    if kind is LesionKind.MUCUS_PLUG:
        bronchi = np.flatnonzero((tubes.kind == TubeKind.AIRWAY) & (tubes.order >= 1) & (tubes.radius >= 1.5))
        tube = int(rng.choice(bronchi))
        length = rng.uniform(10.0, 30.0)
        return Lesion(kind, rng.uniform(10.0, 35.0), follow(tubes, tube, 0.0, length), length)
    if kind is LesionKind.LYMPH_NODE:
        arteries = np.flatnonzero((tubes.kind == TubeKind.ARTERY) & (tubes.order <= 1))
        tube = int(rng.choice(arteries))
        axis = tubes.axes[tube]
        point = tubes.start[tube] + rng.uniform(0.2, 0.8) * tubes.lengths[tube] * axis
        side = np.array(_across(rng))
        side = side - np.dot(side, axis) * axis
        side /= max(float(np.linalg.norm(side)), 1e-9)
        radius = rng.uniform(5.0, 11.0)
        centre = point + side * (tubes.radius[tube] + tubes.wall_mm[tube] + radius + 1.0)
        blob = Ellipsoid(tuple(float(c) for c in centre), (radius, 0.75 * radius, 0.9 * radius),
                         rng.uniform(0.0, math.pi), rng.uniform(30.0, 60.0))
        return Lesion(kind, blob.hu, blob=blob)
    for _ in range(200):
        point = np.array([rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.9) * chest.cavity_a,
                          rng.uniform(-0.8, 0.8) * chest.cavity_b, rng.uniform(0.15, 0.85) * chest.lung_height])
        if chest.lung_mask(point[0], point[1], point[2]):
            break
    radius = rng.uniform(8.0, 20.0)
    blob = Ellipsoid(tuple(float(c) for c in point), (radius, rng.uniform(0.7, 1.0) * radius, 0.9 * radius),
                     rng.uniform(0.0, math.pi), rng.uniform(25.0, 50.0))
    return Lesion(kind, blob.hu, blob=blob)


def covered_pixels(covers: list[Cover], kind: LesionKind) -> int:
    """How many pixels of a slice the lesion covers: any covered pixel for an embolus, pixels moved at least
    MIMIC_VISIBLE_WEIGHT of the way to the lesion's HU for a mimic."""
    threshold = 0.0 if kind.is_embolus else MIMIC_VISIBLE_WEIGHT
    return sum(int(np.count_nonzero(c.weight > threshold)) for c in covers)


def shows(covers: list[Cover], kind: LesionKind, spacing: float) -> bool:
    """Whether a lesion shows on a slice of ``spacing`` mm pixels: an embolus covering at least
    EMBOLUS_VISIBLE_MM2, a mimic with any pixel moved MIMIC_VISIBLE_WEIGHT of the way (see covered_pixels)."""
    pixels = covered_pixels(covers, kind)
    if kind.is_embolus:
        return pixels * spacing**2 >= EMBOLUS_VISIBLE_MM2
    return pixels > 0
