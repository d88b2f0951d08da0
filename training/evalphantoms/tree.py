"""Vessel and airway trees grown by space colonisation, with radii from the pipe model.

A tree starts from a few given nodes (a lobar artery's centreline, say) and grows towards attraction points spread
through the tissue it supplies (Runions et al., 2007): each point pulls the node nearest to it within an influence
distance, each pulled node grows one step towards the mean direction of its pulls, and a point is removed once a
node comes within the kill distance. Branches arise where one node is pulled two ways. Once grown, each node's
radius follows the pipe model from the leaves up: a parent's radius^g is the sum of its children's radius^g (g about
2.7), so a tree tapers from its stem to leaves of a set radius; each subtree that leaves a given stem is then scaled
so that it is narrower than the stem where it leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from training.evalphantoms.shapes import TubeSet


@dataclass(frozen=True)
class Growth:
    """How a tree grows: step (mm), influence and kill distances (mm), the pipe exponent, the leaves' radius (mm),
    and the most steps."""

    step: float
    influence: float
    kill: float
    exponent: float
    leaf_radius: float
    iterations: int = 80
    most_nodes: int = 4000


@dataclass
class Tree:
    """Nodes of a tree: ``position`` [n, 3] mm, ``parent`` [n] (-1 for a root), ``radius`` [n] mm."""

    position: np.ndarray
    parent: np.ndarray
    radius: np.ndarray

    def tubes(self, min_radius: float = 0.0) -> TubeSet:
        """Each node joined to its parent by a tapered tube (nodes thinner than ``min_radius`` left out)."""
        child = np.flatnonzero((self.parent >= 0) & (self.radius >= min_radius))
        parent = self.parent[child]
        return TubeSet(self.position[parent], self.position[child], self.radius[parent], self.radius[child])


def grow(rng: np.random.Generator, seeds: np.ndarray, seed_radius: np.ndarray, seed_parent: np.ndarray,
         attractors: np.ndarray, growth: Growth) -> Tree:
    """Grow a tree from ``seeds`` (fixed nodes with their radii and parents, indices into ``seeds``) towards the
    ``attractors``; returns every node, the seeds first with their radii kept."""
    positions = [p for p in np.asarray(seeds, dtype=np.float64)]
    parents = [int(p) for p in seed_parent]
    fixed = len(positions)
    points = np.asarray(attractors, dtype=np.float64)
    for _ in range(growth.iterations):
        if not len(points) or len(positions) >= growth.most_nodes:
            break
        nodes = np.array(positions)
        distance, nearest = cKDTree(nodes).query(points, distance_upper_bound=growth.influence)
        pulled = np.isfinite(distance)
        if not pulled.any():
            break
        direction = points[pulled] - nodes[nearest[pulled]]
        direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-9)
        totals = np.zeros_like(nodes)
        np.add.at(totals, nearest[pulled], direction)
        growing = np.flatnonzero(np.linalg.norm(totals, axis=1) > 1e-6)
        steps = totals[growing] / np.linalg.norm(totals[growing], axis=1, keepdims=True)
        steps += rng.normal(0.0, 0.15, steps.shape)
        steps /= np.linalg.norm(steps, axis=1, keepdims=True)
        new = nodes[growing] + growth.step * steps
        positions.extend(new)
        parents.extend(int(g) for g in growing)
        reached = cKDTree(np.array(positions)).query(points, distance_upper_bound=growth.kill)[0]
        points = points[~np.isfinite(reached)]
    parent = np.array(parents, dtype=np.int64)
    radius = _pipe_radii(parent, fixed, np.asarray(seed_radius, dtype=np.float64), growth)
    return Tree(np.array(positions), parent, radius)


def _pipe_radii(parent: np.ndarray, fixed: int, seed_radius: np.ndarray, growth: Growth) -> np.ndarray:
    """Pipe-model radii of the grown nodes (children are always added after their parents), each subtree that
    leaves a seed scaled to at most 0.8 of that seed's radius; the seeds keep theirs."""
    n = len(parent)
    power = np.zeros(n)
    has_child = np.zeros(n, dtype=bool)
    has_child[parent[parent >= 0]] = True
    power[~has_child] = growth.leaf_radius ** growth.exponent
    for node in range(n - 1, fixed - 1, -1):
        if parent[node] >= fixed:
            power[parent[node]] += power[node]
    radius = power ** (1.0 / growth.exponent)
    radius[:fixed] = seed_radius
    scale = np.ones(n)
    for node in range(fixed, n):
        if parent[node] < fixed:
            scale[node] = min(1.0, 0.8 * seed_radius[parent[node]] / radius[node])
        else:
            scale[node] = scale[parent[node]]
    radius[fixed:] *= scale[fixed:]
    return radius


def chain(points: np.ndarray, radii: np.ndarray, most: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """A centreline through ``points`` with ``radii`` at them, resampled so that no piece is longer than ``most``
    mm: positions [m, 3] and radii [m]."""
    points = np.asarray(points, dtype=np.float64)
    radii = np.asarray(radii, dtype=np.float64)
    out_points, out_radii = [points[0]], [radii[0]]
    for k in range(1, len(points)):
        pieces = max(1, int(np.ceil(np.linalg.norm(points[k] - points[k - 1]) / most)))
        for j in range(1, pieces + 1):
            f = j / pieces
            out_points.append(points[k - 1] + f * (points[k] - points[k - 1]))
            out_radii.append(radii[k - 1] + f * (radii[k] - radii[k - 1]))
    return np.array(out_points), np.array(out_radii)
