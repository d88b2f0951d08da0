"""One patient of the evaluation phantoms: body, bones, heart, mediastinum, lungs and their trees, in HU.

Millimetres in the DICOM patient frame (x towards the patient's left, y posterior, z towards the head), z = 0 at the
lowest point of the lungs. Built once per study from drawn measurements:

- the torso is a superellipse (skin and subcutaneous fat, chest-wall muscle and the thoracic cavity inside it, each
  the one before shrunk), on a curved table; the shoulders widen it towards the top;
- the bones are a vertebra per level (body, arch, spinous and transverse processes, a disc between levels), twelve
  pairs of ribs as tubes that run round the cavity and fall towards the front (cartilage at their front ends), the
  sternum and the scapulae;
- the heart is superellipsoids: pericardial fat, then the myocardium and cavities of both ventricles across the septum
  (their widths set the RV/LV ratio) and both atria;
- the great vessels are tube chains: aorta, superior and inferior vena cava, the pulmonary trunk from the right
  ventricle to its bifurcation and the main pulmonary arteries to the hila;
- each lung is a superellipse whose section narrows to the apex and sits on a diaphragmatic dome, with parenchyma
  whose texture is a sum of plane waves in 3D (so it changes smoothly from slice to slice);
- five lobar arteries (right upper, middle and lower, left upper and lower) leave the hila as tube chains, and the
  arterial, venous and bronchial trees grow from them into the lungs by space colonisation
  (``training.evalphantoms.tree``); veins drain to the left atrium and enhance less than arteries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from training.evalphantoms.shapes import Grid, Superellipse, TubeSet, blend, ramp
from training.evalphantoms.tree import Growth, chain, grow

LOBES = ("right_upper", "right_middle", "right_lower", "left_upper", "left_lower")
"""The lobar arteries, each with its tree."""


@dataclass(frozen=True)
class Blob:
    """A superellipsoid: a superellipse section (exponent ``n``, turned by ``angle``) whose semi-axes shrink as an
    ellipse's do along z."""

    centre: tuple[float, float, float]
    axes: tuple[float, float, float]
    n: float = 2.2
    angle: float = 0.0

    def section(self, z: float) -> Superellipse | None:
        k = 1.0 - ((z - self.centre[2]) / self.axes[2]) ** 2
        if k <= 0.0:
            return None
        root = math.sqrt(k)
        return Superellipse(self.centre[0], self.centre[1], self.axes[0] * root, self.axes[1] * root, self.n,
                            self.angle)

    def grown(self, by: float) -> Blob:
        a, b, c = self.axes
        return Blob(self.centre, (a + by, b + by, c + by), self.n, self.angle)


@dataclass(frozen=True)
class Path:
    """A vessel's centreline: points [m, 3] (mm, downstream order) and the lumen radius at each."""

    points: np.ndarray
    radii: np.ndarray

    @property
    def length(self) -> float:
        return float(np.linalg.norm(np.diff(self.points, axis=0), axis=1).sum())

    def then(self, other: Path) -> Path:
        """This path followed by ``other`` (which starts where this one ends)."""
        return Path(np.concatenate([self.points, other.points[1:]]), np.concatenate([self.radii, other.radii[1:]]))


@dataclass
class Patient:
    """Everything that places a structure, drawn once; ``render`` cuts it at any height."""

    body: Superellipse
    fat_mm: float
    muscle_mm: float
    back_mm: float
    lung_height: float
    lung_half_gap: float
    domes: tuple[float, float]
    tissue: dict[str, float]
    blood: dict[str, float]
    spine: dict[str, float]
    heart: list[tuple[Blob, str]]
    heart_envelope: Blob
    rv_lv_ratio: float
    scapulae: list[Superellipse]
    sternum: tuple[float, float]
    texture: np.ndarray
    tubes: dict[str, TubeSet]
    central: dict[str, Path]
    lobar: dict[str, Path]
    table_y: float
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def cavity(self) -> Superellipse:
        """The thoracic cavity, centred on x = y = 0; the body is centred ``back_mm`` behind it, so the back (the
        paraspinal muscles) is thicker than the front."""
        body = self.body
        return Superellipse(0.0, 0.0, body.a - self.fat_mm - self.muscle_mm,
                            body.b - self.back_mm - self.fat_mm - self.muscle_mm, body.n)

    def shoulder(self, z: float) -> float:
        """How much wider than at the base the torso is at height ``z`` (the shoulders)."""
        return 1.0 + 0.14 * float(np.clip((z - 0.7 * self.lung_height) / (0.3 * self.lung_height), 0.0, 1.2))

    def torso(self, z: float) -> Superellipse:
        s = self.shoulder(z)
        return Superellipse(self.body.cx, self.body.cy, self.body.a * s, self.body.b, self.body.n)

    def lung_distance(self, side: int, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        """Signed distance (mm, negative inside) to one lung at height ``z`` (``side`` -1 right, +1 left): the
        cavity inside the pleura, lateral to the mediastinum, above the dome, narrowing to the apex above 0.6 of
        the lung's height, outside the heart."""
        cavity = self.cavity
        medial = self.lung_half_gap * (1.0 + 0.5 * np.clip(-y / cavity.b, 0.0, 1.0))  # the mediastinum widens forwards
        distance = np.maximum(cavity.shrunk(2.0).distance(x, y), medial - side * x)
        top = 0.6 * self.lung_height
        if z > top:
            k = 1.0 - ((z - top) / (self.lung_height - top)) ** 2
            if k <= 0.0:
                return np.full(np.broadcast(x, y).shape, np.inf, dtype=np.float32)
            half = (cavity.a - self.lung_half_gap) / 2
            apex = Superellipse(side * (self.lung_half_gap + half), 0.03 * cavity.b, 1.05 * half * math.sqrt(k),
                                0.95 * cavity.b * math.sqrt(k))
            distance = np.maximum(distance, apex.distance(x, y))
        distance = np.maximum(distance, self.dome(side, x, y) - z)
        heart = self.heart_envelope.grown(3.0).section(z)
        if heart is not None:
            distance = np.maximum(distance, -heart.distance(x, y))
        return distance

    def dome(self, side: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The height of the diaphragm under one lung."""
        cavity = self.cavity
        half = (cavity.a - self.lung_half_gap) / 2
        q = ((x - side * (self.lung_half_gap + half)) / (1.05 * half)) ** 2 + ((y + 0.15 * cavity.b) / cavity.b) ** 2
        return self.domes[0 if side < 0 else 1] * np.sqrt(np.clip(1.0 - q, 0.0, 1.0))

    def inside_lungs(self, points: np.ndarray) -> np.ndarray:
        """Whether points [n, 3] lie in lung parenchyma, 2 mm or more from its surface."""
        inside = np.zeros(len(points), dtype=bool)
        levels = np.round(points[:, 2] / 2.0) * 2.0
        for level in np.unique(levels):
            at = levels == level
            x, y = points[at, 0], points[at, 1]
            for side in (-1, 1):
                inside[at] |= self.lung_distance(side, x, y, float(level)) < -2.0
        return inside

    def render(self, grid: Grid, z: float, thickness: float) -> np.ndarray:
        """The slab of ``thickness`` mm centred on ``z`` in HU (float32, rows x columns), before blur and noise."""
        image = np.full((grid.size, grid.size), -1000.0, dtype=np.float32)
        self._table(image, grid)
        torso = self.torso(z)
        on_table = ramp(grid.y - self.table_y, grid.spacing)
        blend(image, torso.share(grid) * on_table, self.tissue["fat"])
        blend(image, torso.shrunk(self.fat_mm).share(grid), self.tissue["muscle"])
        cavity = self.cavity
        cavity_share = Superellipse(0.0, 0.0, cavity.a * self.shoulder(z), cavity.b, cavity.n).share(grid)
        blend(image, cavity_share, self.tissue["mediastinum"])
        self._abdomen(image, grid, z, cavity_share)
        self._lungs(image, grid, z)
        self._heart(image, grid, z)
        self._bones(image, grid, z, thickness)
        for name, hu in (("systemic_dense", self.blood["svc"]), ("systemic", self.blood["ivc"]),
                         ("aorta", self.blood["left"]), ("veins", self.blood["vein"])):
            blend(image, self.tubes[name].share(grid, z, thickness), hu)
        blend(image, self.tubes["airway_wall"].share(grid, z, thickness), self.tissue["airway_wall"])
        blend(image, self.tubes["airways"].share(grid, z, thickness), -1000.0)
        blend(image, self.tubes["arteries"].share(grid, z, thickness), self.blood["artery"])
        return image

    def _table(self, image: np.ndarray, grid: Grid) -> None:
        curve = self.table_y + 0.0009 * grid.x**2
        width = ramp(np.abs(grid.x) - 230.0, grid.spacing)
        mattress = ramp(np.abs(grid.y - curve - 3.0) - 3.0, grid.spacing) * width
        plate = ramp(np.abs(grid.y - curve - 10.0) - 3.5, grid.spacing) * width
        blend(image, mattress, -850.0)
        blend(image, plate, self.tissue["table"])

    def _abdomen(self, image: np.ndarray, grid: Grid, z: float, cavity_share: np.ndarray) -> None:
        """Below the domes: liver, stomach (with an air cap) and spleen."""
        cavity = self.cavity
        dome = np.maximum(self.dome(-1, grid.x, grid.y), self.dome(1, grid.x, grid.y))
        below = (z < dome) * cavity_share
        if not below.any():
            return
        liver = ramp(grid.x - (0.3 * cavity.a - 0.3 * (grid.y + cavity.b)), grid.spacing)
        blend(image, below, self.tissue["abdomen"])
        blend(image, below * liver, self.tissue["liver"])
        stomach = Superellipse(0.45 * cavity.a, -0.25 * cavity.b, 0.3 * cavity.a, 0.35 * cavity.b, 2.0)
        blend(image, below * stomach.share(grid), 30.0)
        air = stomach.shrunk(4.0).share(grid) * ramp(grid.y - (-0.25 * cavity.b - 0.15 * cavity.b), grid.spacing)
        blend(image, below * air, -1000.0)
        spleen = Superellipse(0.55 * cavity.a, 0.45 * cavity.b, 0.22 * cavity.a, 0.25 * cavity.b, 2.2, 0.5)
        blend(image, below * spleen.share(grid), self.tissue["spleen"])

    def _lungs(self, image: np.ndarray, grid: Grid, z: float) -> None:
        share = np.maximum(*(ramp(self.lung_distance(side, grid.x, grid.y, z), grid.spacing) for side in (-1, 1)))
        if not share.any():
            return
        cavity = self.cavity
        texture = np.zeros_like(image)
        for kx, ky, kz, phase, amplitude in self.texture.astype(np.float32):
            # cos(kx x + ky y + c) = cos(kx x) cos(ky y + c) - sin(kx x) sin(ky y + c), as outer products
            across, down = kx * grid.x, ky * grid.y + kz * np.float32(z) + phase
            texture += amplitude * (np.cos(down) * np.cos(across) - np.sin(down) * np.sin(across))
        lung = (self.tissue["lung"] + self.tissue["lung_gradient"] * np.clip(grid.y / cavity.b, -1.0, 1.0)
                + texture).astype(np.float32)
        blend(image, share, lung)

    def _heart(self, image: np.ndarray, grid: Grid, z: float) -> None:
        for blob, kind in self.heart:
            section = blob.section(z)
            if section is not None:
                blend(image, section.share(grid), self.blood.get(kind, self.tissue.get(kind, 0.0)))

    def _bones(self, image: np.ndarray, grid: Grid, z: float, thickness: float) -> None:
        spine = self.spine
        y0, r = spine["y"], spine["radius"]
        body = Superellipse(0.0, y0, r, 0.85 * r, 2.4)
        if (z - spine["phase"]) % spine["period"] < spine["disc"]:
            blend(image, body.share(grid), 90.0)
        else:
            blend(image, body.share(grid), self.tissue["cortex"])
            blend(image, body.shrunk(2.0).share(grid), self.tissue["cancellous"])
        arch = y0 + 0.85 * r + 8.0
        for side in (-1, 1):
            blend(image, Superellipse(side * 20.0, arch - 3.0, 12.0, 4.0, 2.0, side * 0.3).share(grid),
                  self.tissue["cortex"])
        blend(image, Superellipse(0.0, arch, 13.0, 9.0, 2.2).share(grid), self.tissue["cortex"])
        blend(image, Superellipse(0.0, arch, 8.0, 6.0, 2.0).share(grid), 12.0)
        blend(image, Superellipse(0.0, arch + 18.0, 4.0, 11.0, 2.2).share(grid), self.tissue["cortex"])
        low, high = self.sternum
        if low < z < high:
            cavity = self.cavity
            sternum = Superellipse(0.0, -cavity.b - 0.5 * self.muscle_mm, 16.0, 6.0, 2.6)
            blend(image, sternum.share(grid), self.tissue["cortex"])
            blend(image, sternum.shrunk(2.0).share(grid), self.tissue["cancellous"])
        if z > 0.55 * self.lung_height:
            for scapula in self.scapulae:
                blend(image, scapula.share(grid), self.tissue["cortex"])
        blend(image, self.tubes["ribs"].share(grid, z, thickness), self.tissue["rib"])
        blend(image, self.tubes["cartilage"].share(grid, z, thickness), self.tissue["cartilage"])


def build_patient(rng: np.random.Generator, rv_lv_ratio: float) -> Patient:
    """Draw one patient whose right ventricle is ``rv_lv_ratio`` times as wide as the left."""
    cavity_a = rng.uniform(105.0, 150.0)
    cavity = Superellipse(0.0, 0.0, cavity_a, cavity_a * rng.uniform(0.62, 0.78), rng.uniform(2.2, 3.0))
    fat_mm, muscle_mm, back_mm = rng.uniform(6.0, 32.0), rng.uniform(9.0, 16.0), rng.uniform(8.0, 16.0)
    body = Superellipse(0.0, back_mm, cavity.a + fat_mm + muscle_mm, cavity.b + back_mm + fat_mm + muscle_mm,
                        cavity.n)
    height = rng.uniform(215.0, 270.0)
    domes = (rng.uniform(40.0, 62.0), rng.uniform(28.0, 48.0))
    pa = rng.uniform(260.0, 420.0)
    blood = {"artery": pa, "right": pa * rng.uniform(0.95, 1.12), "left": rng.uniform(150.0, 300.0),
             "vein": rng.uniform(120.0, 220.0), "svc": rng.uniform(250.0, 900.0), "ivc": rng.uniform(70.0, 140.0)}
    tissue = {
        "fat": rng.uniform(-115.0, -85.0), "muscle": rng.uniform(35.0, 60.0), "mediastinum": rng.uniform(-95.0, -60.0),
        "lung": rng.uniform(-880.0, -820.0), "lung_gradient": rng.uniform(20.0, 70.0),
        "liver": rng.uniform(70.0, 110.0), "spleen": rng.uniform(100.0, 140.0), "abdomen": rng.uniform(20.0, 45.0),
        "cortex": rng.uniform(550.0, 900.0), "cancellous": rng.uniform(170.0, 300.0),
        "rib": rng.uniform(300.0, 600.0), "cartilage": rng.uniform(110.0, 190.0), "table": rng.uniform(120.0, 260.0),
        "myocardium": rng.uniform(80.0, 130.0), "pericardial_fat": rng.uniform(-110.0, -80.0),
        "airway_wall": rng.uniform(20.0, 55.0),
    }
    vertebra = rng.uniform(16.0, 21.0)
    spine = {"radius": vertebra, "y": cavity.b - 0.55 * vertebra, "period": rng.uniform(24.0, 29.0),
             "phase": rng.uniform(0.0, 29.0), "disc": rng.uniform(4.0, 7.0)}
    heart, envelope, outflow, aortic_root, atria = _draw_heart(rng, cavity, domes[1], rv_lv_ratio)
    patient = Patient(
        body=body, fat_mm=fat_mm, muscle_mm=muscle_mm, back_mm=back_mm, lung_height=height,
        lung_half_gap=rng.uniform(17.0, 24.0),
        domes=domes, tissue=tissue, blood=blood, spine=spine, heart=heart, heart_envelope=envelope,
        rv_lv_ratio=rv_lv_ratio, scapulae=_draw_scapulae(rng, body), sternum=(envelope.centre[2], 0.88 * height),
        texture=_draw_texture(rng), tubes={}, central={}, lobar={}, table_y=body.cy + body.b - rng.uniform(2.0, 8.0),
    )
    _draw_vessels(rng, patient, outflow, aortic_root, atria)
    _draw_ribs(rng, patient)
    return patient


def _draw_heart(rng: np.random.Generator, cavity: Superellipse, floor: float, rv_lv_ratio: float,
                ) -> tuple[list[tuple[Blob, str]], Blob, np.ndarray, np.ndarray, dict[str, Blob]]:
    """The heart's blobs in painting order (pericardial fat, myocardium, cavities), its envelope, the right
    ventricle's outflow and the aortic root (points), and the atria."""
    theta = math.radians(rng.uniform(30.0, 48.0))
    eu = np.array([math.cos(theta), -math.sin(theta)])  # the long axis, towards the left and the front
    ev = np.array([math.sin(theta), math.cos(theta)])  # across the septum, towards the left ventricle
    scale = cavity.a / 125.0
    lv = rng.uniform(36.0, 46.0) * scale
    rv = rv_lv_ratio * lv
    septum = rng.uniform(8.0, 12.0) * scale
    tall = rng.uniform(95.0, 120.0) * scale
    centre = np.array([rng.uniform(0.1, 0.2) * cavity.a, -rng.uniform(0.22, 0.32) * cavity.b])
    base = floor - rng.uniform(0.0, 8.0)
    middle = base + 0.45 * tall
    angle = -theta
    lv_centre = centre + ev * (septum / 2 + lv / 2)
    rv_centre = centre - ev * (septum / 2 + rv / 2)
    lv_long, rv_long = rng.uniform(38.0, 48.0) * scale, rng.uniform(32.0, 42.0) * scale
    lv_wall, rv_wall = rng.uniform(8.0, 11.0), rng.uniform(3.0, 5.0)

    def blob(at: np.ndarray, z: float, a: float, b: float, c: float) -> Blob:
        return Blob((float(at[0]), float(at[1]), z), (a, b, c), 2.3, angle)

    span = (lv + rv + septum) / 2 + 12.0
    envelope = blob(centre + ev * (lv - rv) / 4, middle, max(lv_long, rv_long) + 16.0, span, 0.5 * tall + 10.0)
    ra = Blob((float(centre[0] - 0.35 * cavity.a), float(centre[1] + 0.15 * cavity.b), base + 0.6 * tall),
              (24.0 * scale, 21.0 * scale, 26.0), 2.1)
    la = Blob((0.02 * cavity.a, float(0.22 * cavity.b), base + 0.72 * tall), (30.0 * scale, 17.0 * scale, 19.0), 2.1)
    parts = [
        (envelope, "pericardial_fat"),
        (blob(lv_centre, middle, lv_long + lv_wall, lv / 2 + lv_wall, 0.36 * tall + lv_wall), "myocardium"),
        (blob(rv_centre, middle - 4.0, rv_long + rv_wall, rv / 2 + rv_wall, 0.33 * tall + rv_wall), "myocardium"),
        (ra.grown(2.5), "myocardium"), (la.grown(2.5), "myocardium"),
        (ra, "right"), (la, "left"),
        (blob(lv_centre, middle, lv_long, lv / 2, 0.36 * tall), "left"),
        (blob(rv_centre, middle - 4.0, rv_long, rv / 2, 0.33 * tall), "right"),
    ]
    top = middle + 0.3 * tall
    outflow = np.array([*(rv_centre + eu * 0.25 * rv_long), top])
    aortic_root = np.array([*(centre + ev * 5.0 - eu * 5.0), top - 8.0])
    return parts, envelope, outflow, aortic_root, {"right": ra, "left": la}


def _draw_scapulae(rng: np.random.Generator, body: Superellipse) -> list[Superellipse]:
    length, thick, turn = rng.uniform(38.0, 55.0), rng.uniform(3.0, 4.5), rng.uniform(0.9, 1.2)
    return [Superellipse(side * 0.62 * body.a, body.cy + 0.55 * body.b, length, thick, 2.0, -side * turn)
            for side in (-1, 1)]


def _draw_texture(rng: np.random.Generator, waves: int = 10) -> np.ndarray:
    """Plane waves [k, 5]: wave vector (x, y, z, rad/mm), phase and amplitude (HU); wavelengths 3-12 mm."""
    direction = rng.standard_normal((waves, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    number = 2.0 * math.pi / rng.uniform(3.0, 12.0, waves)
    amplitude = rng.uniform(4.0, 9.0, waves)
    return np.column_stack([direction * number[:, None], rng.uniform(0.0, 2 * math.pi, waves), amplitude])


def _jitter(rng: np.random.Generator, offset: tuple[float, float, float], spread: float = 0.25) -> np.ndarray:
    return np.array(offset) * rng.uniform(1.0 - spread, 1.0 + spread, 3)


def _path(points: list[np.ndarray], radii: list[float]) -> Path:
    return Path(*chain(np.array(points), np.array(radii), most=5.0))


def _draw_vessels(rng: np.random.Generator, patient: Patient, outflow: np.ndarray, aortic_root: np.ndarray,
                  atria: dict[str, Blob]) -> None:
    """The great vessels, the lobar arteries and the three trees of each lung."""
    cavity, height = patient.cavity, patient.lung_height
    ca, cb = cavity.a, cavity.b
    top = height + 40.0
    bifurcation_z = outflow[2] + rng.uniform(18.0, 32.0)
    trunk_r = rng.uniform(12.0, 15.5) * (1.0 + 0.2 * max(patient.rv_lv_ratio - 1.0, 0.0))
    bifurcation = np.array([rng.uniform(0.05, 0.12) * ca, -rng.uniform(0.05, 0.15) * cb, bifurcation_z])
    middle = np.array([0.5 * (outflow[0] + bifurcation[0]) + 4.0, -0.4 * cb, bifurcation_z - 14.0])
    central = {"trunk": _path([outflow, middle, bifurcation], [trunk_r, trunk_r, 0.95 * trunk_r])}
    right_r, left_r = trunk_r * rng.uniform(0.7, 0.82), trunk_r * rng.uniform(0.66, 0.78)
    right_hilum = np.array([-0.45 * ca, rng.uniform(0.0, 0.1) * cb, bifurcation_z - rng.uniform(10.0, 18.0)])
    left_hilum = np.array([0.45 * ca, rng.uniform(0.08, 0.18) * cb, bifurcation_z - rng.uniform(2.0, 10.0)])
    central["right"] = _path([bifurcation, np.array([-0.15 * ca, 0.0, bifurcation_z - 4.0]), right_hilum],
                             [right_r, right_r, 0.9 * right_r])
    central["left"] = _path([bifurcation, np.array([0.25 * ca, 0.05 * cb, bifurcation_z + 7.0]), left_hilum],
                            [left_r, left_r, 0.9 * left_r])
    patient.central = central
    interlobar = right_hilum + _jitter(rng, (-6.0, 8.0, -16.0))
    upper_r, lower_r, middle_r = rng.uniform(4.8, 6.2), rng.uniform(5.5, 7.0), rng.uniform(3.6, 4.6)
    lobar = {
        "right_upper": _path([right_hilum, right_hilum + _jitter(rng, (-10.0, -12.0, 28.0)),
                              right_hilum + _jitter(rng, (-16.0, -16.0, 52.0))], [upper_r, 0.85 * upper_r, 3.0]),
        "right_middle": _path([right_hilum, interlobar, interlobar + _jitter(rng, (-14.0, -26.0, -12.0))],
                              [lower_r, 0.95 * lower_r, middle_r]),
        "right_lower": _path([right_hilum, interlobar, interlobar + _jitter(rng, (-10.0, 16.0, -32.0)),
                              interlobar + _jitter(rng, (-14.0, 26.0, -58.0))], [lower_r, 0.95 * lower_r, 0.8 * lower_r,
                                                                                  3.2]),
        "left_upper": _path([left_hilum, left_hilum + _jitter(rng, (10.0, -14.0, 26.0)),
                             left_hilum + _jitter(rng, (16.0, -18.0, 48.0))], [upper_r, 0.85 * upper_r, 3.0]),
        "left_lower": _path([left_hilum, left_hilum + _jitter(rng, (10.0, 14.0, -30.0)),
                             left_hilum + _jitter(rng, (16.0, 24.0, -58.0))], [lower_r, 0.85 * lower_r, 3.2]),
    }
    patient.lobar = lobar
    arteries = [TubeSet(p.points[:-1], p.points[1:], p.radii[:-1], p.radii[1:]) for p in central.values()]
    artery_growth = Growth(step=rng.uniform(3.5, 5.0), influence=rng.uniform(24.0, 34.0), kill=rng.uniform(4.5, 6.5),
                           exponent=rng.uniform(2.5, 2.9), leaf_radius=rng.uniform(0.6, 0.8))
    territories = _territories(rng, patient, {name: path.points[-1] for name, path in lobar.items()},
                               int(rng.integers(3200, 4400)))
    for name, path in lobar.items():
        tree = grow(rng, path.points, path.radii, np.arange(-1, len(path.points) - 1), territories[name],
                    artery_growth)
        arteries.append(tree.tubes(min_radius=0.45))
    patient.tubes["arteries"] = TubeSet.joined(arteries)
    patient.tubes["veins"] = _draw_veins(rng, patient, atria["left"])
    patient.tubes["airways"], patient.tubes["airway_wall"] = _draw_airways(rng, patient, bifurcation_z, lobar)
    aorta_r = rng.uniform(12.0, 16.5)
    arch_z = bifurcation_z + rng.uniform(28.0, 42.0)
    descending = np.array([0.55 * patient.spine["radius"] + aorta_r, patient.spine["y"] - 0.6 * aorta_r, 0.0])
    aorta = [aortic_root, np.array([-0.12 * ca, -0.32 * cb, bifurcation_z + 6.0]),
             np.array([-0.05 * ca, -0.15 * cb, arch_z - 4.0]), np.array([0.08 * ca, 0.15 * cb, arch_z]),
             descending + np.array([0.0, -4.0, arch_z - 22.0]), descending + np.array([0.0, 0.0, -60.0])]
    points, radii = chain(np.array(aorta), np.full(len(aorta), aorta_r))
    patient.tubes["aorta"] = TubeSet(points[:-1], points[1:], radii[:-1], radii[1:])
    ra = atria["right"].centre
    svc = chain(np.array([[-0.22 * ca, -0.18 * cb, top], [-0.22 * ca, -0.12 * cb, ra[2] + 20.0], ra]),
                np.full(3, rng.uniform(8.0, 11.0)))
    ivc = chain(np.array([[ra[0] + 8.0, 0.2 * cb, -60.0], [ra[0] + 4.0, 0.1 * cb, ra[2] - 25.0], ra]),
                np.full(3, rng.uniform(11.0, 14.0)))
    patient.tubes["systemic_dense"] = TubeSet(svc[0][:-1], svc[0][1:], svc[1][:-1], svc[1][1:])
    patient.tubes["systemic"] = TubeSet(ivc[0][:-1], ivc[0][1:], ivc[1][:-1], ivc[1][1:])


def _territories(rng: np.random.Generator, patient: Patient, anchors: dict[str, np.ndarray],
                 count: int) -> dict[str, np.ndarray]:
    """``count`` points spread through both lungs, each given to the nearest anchor of its own lung."""
    cavity = patient.cavity
    points = np.column_stack([rng.uniform(-cavity.a, cavity.a, 4 * count), rng.uniform(-cavity.b, cavity.b, 4 * count),
                              rng.uniform(0.0, patient.lung_height, 4 * count)])
    points = points[patient.inside_lungs(points)][:count]
    names = list(anchors)
    centres = np.array([anchors[name] for name in names])
    distance = np.linalg.norm(points[:, None, :] - centres[None], axis=2)
    same_side = np.sign(points[:, 0:1]) == np.sign(centres[None, :, 0])
    distance[~same_side] = np.inf
    owner = np.argmin(distance, axis=1)
    return {name: points[owner == k] for k, name in enumerate(names)}


def _draw_veins(rng: np.random.Generator, patient: Patient, left_atrium: Blob) -> TubeSet:
    """Two pulmonary veins a side from the left atrium, each grown into a tree through its part of the lung."""
    la = np.array(left_atrium.centre)
    stems: dict[str, Path] = {}
    for side, label in ((-1, "right"), (1, "left")):
        for level, dz in (("upper", 14.0), ("lower", -12.0)):
            start = la + np.array([side * 0.8 * left_atrium.axes[0], 4.0, dz])
            end = start + _jitter(rng, (side * 28.0, -4.0, dz * 1.6))
            stems[f"{label}_{level}"] = _path([start, end], [rng.uniform(5.5, 7.0), 4.0])
    growth = Growth(step=rng.uniform(4.0, 5.5), influence=rng.uniform(26.0, 36.0), kill=rng.uniform(5.0, 7.0),
                    exponent=rng.uniform(2.5, 2.9), leaf_radius=rng.uniform(0.6, 0.8))
    territories = _territories(rng, patient, {name: path.points[-1] for name, path in stems.items()},
                               int(rng.integers(2000, 2800)))
    parts = []
    for name, path in stems.items():
        tree = grow(rng, path.points, path.radii, np.arange(-1, len(path.points) - 1), territories[name], growth)
        parts.append(tree.tubes(min_radius=0.45))
    return TubeSet.joined(parts)


def _draw_airways(rng: np.random.Generator, patient: Patient, bifurcation_z: float,
                  lobar: dict[str, Path]) -> tuple[TubeSet, TubeSet]:
    """Trachea, main and lobar bronchi, and a small airway tree per lobe: the lumens and the walls around them."""
    cavity = patient.cavity
    trachea_y = patient.spine["y"] - patient.spine["radius"] - rng.uniform(14.0, 20.0)
    carina = np.array([0.0, trachea_y, bifurcation_z + rng.uniform(2.0, 10.0)])
    trachea_r = rng.uniform(7.5, 10.0)
    main = {-1: carina + _jitter(rng, (-0.3 * cavity.a, 2.0, -20.0), 0.15),
            1: carina + _jitter(rng, (0.3 * cavity.a, 8.0, -36.0), 0.15)}
    lumens = [TubeSet(np.array([0.0, trachea_y - 6.0, patient.lung_height + 40.0]), carina, trachea_r, trachea_r)]
    for end in main.values():
        lumens.append(TubeSet(carina, end, 0.7 * trachea_r, 0.62 * trachea_r))
    growth = Growth(step=rng.uniform(5.0, 6.5), influence=rng.uniform(30.0, 40.0), kill=rng.uniform(6.0, 8.0),
                    exponent=2.8, leaf_radius=rng.uniform(1.0, 1.3), iterations=30)
    anchors = {}
    stems = {}
    for name, artery in lobar.items():
        side = -1 if name.startswith("right") else 1
        offset = np.array([0.0, 7.0, 0.0])
        tip = artery.points[-1] + offset
        stems[name] = _path([main[side], tip], [0.55 * trachea_r, 0.3 * trachea_r])
        anchors[name] = tip
    territories = _territories(rng, patient, anchors, int(rng.integers(500, 800)))
    for name, path in stems.items():
        tree = grow(rng, path.points, path.radii, np.arange(-1, len(path.points) - 1), territories[name], growth)
        lumens.append(tree.tubes(min_radius=0.9))
    lumen = TubeSet.joined(lumens)
    walls = TubeSet(lumen.a, lumen.b, lumen.ra + 0.2 * lumen.ra + 0.4, lumen.rb + 0.2 * lumen.rb + 0.4)
    return lumen, walls


def _draw_ribs(rng: np.random.Generator, patient: Patient) -> None:
    """Twelve ribs a side: tubes round the cavity wall from beside the spine to the front, falling towards the front,
    with costal cartilage on their front ends."""
    cavity = patient.cavity
    wall_a, wall_b = cavity.a + 0.4 * patient.muscle_mm, cavity.b + 0.4 * patient.muscle_mm
    top = patient.lung_height + rng.uniform(0.0, 12.0)
    gap = rng.uniform(20.0, 25.0)
    drop = rng.uniform(45.0, 75.0)
    ribs, cartilage = [], []
    angles = np.linspace(0.12 * math.pi, 0.88 * math.pi, 14)
    for k in range(12):
        z0 = top - k * gap
        radius = rng.uniform(4.0, 5.5)
        for side in (-1, 1):
            x = side * wall_a * np.sin(angles)
            y = wall_b * np.cos(angles)
            z = z0 - drop * (angles / math.pi) ** 1.4
            points = np.column_stack([x, y, z])
            front = angles > 0.75 * math.pi
            end = int(np.argmax(front))
            ribs.append(TubeSet(points[: end - 1], points[1:end], radius, radius))
            cartilage.append(TubeSet(points[end - 1 : -1], points[end:], 0.8 * radius, 0.8 * radius))
    patient.tubes["ribs"] = TubeSet.joined(ribs)
    patient.tubes["cartilage"] = TubeSet.joined(cartilage)
