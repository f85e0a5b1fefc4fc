"""Grasp, completion and segmentation metrics: pure functions on cell coordinates.

A grasp is `(tag, cells)`: a tag id and an (k, 3) integer array of grid cells, in the order
of the sequence: left finger inner point, right finger inner point, gripper base (k = 3;
data may hold fewer when a point fell outside the box).

Matching rule. A predicted grasp is correct when some ground-truth grasp of the scene has
  * the same tag (a tag that no ground-truth grasp carries, e.g. an object the scene does not
    hold, is always wrong),
  * the same number of cells, and
  * every cell within `tol` voxels of the ground-truth cell at the same position, in Chebyshev
    distance (max |dx|, |dy|, |dz| <= tol; tol = 1: the 27-cell neighbourhood),
  * or the same with the two finger cells swapped: left and right are symmetric (the
    synthetic generator simply puts the finger with the lower voxel id first).

precision = correct predicted grasps / predicted grasps (0 when nothing was predicted)
coverage  = objects (ground-truth tags with grasps) with at least one correct predicted grasp
            / objects with ground-truth grasps
In amodal and unseg samples every grasp carries the scene's one tag (incomplete / unlabel), so
such a scene counts as one object.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from .data.synth import FINGER_LENGTH, GRIPPER_MAX_OPENING  # the gripper of the built-in grasps

Grasp = tuple[int, np.ndarray]  # (tag id, (k, 3) cells)

# The 27 offsets of a cell's Chebyshev-1 neighbourhood (itself included).
NEIGHBOURHOOD = np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3)


def _grouped(grasps: Sequence[Grasp]) -> dict[tuple[int, int], np.ndarray]:
    """{(tag, k): (n, k, 3) cells} of the grasps."""
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for tag, cells in grasps:
        cells = np.asarray(cells, dtype=np.int64).reshape(-1, 3)
        groups.setdefault((int(tag), len(cells)), []).append(cells)
    return {key: np.stack(v) for key, v in groups.items()}


def correct_grasps(predicted: Sequence[Grasp], truth: Sequence[Grasp], tol: int = 1) -> np.ndarray:
    """(P,) bool: which predicted grasps match a ground-truth grasp (see the module docstring)."""
    truth_groups = _grouped(truth)
    out = np.zeros(len(predicted), dtype=bool)
    for i, (tag, cells) in enumerate(predicted):
        cells = np.asarray(cells, dtype=np.int64).reshape(-1, 3)
        t = truth_groups.get((int(tag), len(cells)))
        if t is None or len(cells) == 0:
            continue
        hit = np.abs(t - cells).max(axis=(1, 2)) <= tol
        if not hit.any() and len(cells) >= 2:
            swapped = cells.copy()
            swapped[[0, 1]] = cells[[1, 0]]
            hit = np.abs(t - swapped).max(axis=(1, 2)) <= tol
        out[i] = bool(hit.any())
    return out


def untagged(grasps: Sequence[Grasp]) -> list[Grasp]:
    """The grasps with one common tag: scored so, a grasp counts when its cells match a ground-truth
    grasp of any object. Beside the tagged precision this tells geometry errors from wrong tags."""
    return [(-1, cells) for _, cells in grasps]


@dataclass
class GraspScore:
    """Counts that add up over sequences (and ranks); the rates are derived from the sums."""

    predicted: int = 0
    correct: int = 0
    objects: int = 0  # ground-truth tags that have grasps
    covered: int = 0  # of those, tags with at least one correct predicted grasp

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def coverage(self) -> float:
        return self.covered / self.objects if self.objects else 0.0

    def __add__(self, other: "GraspScore") -> "GraspScore":
        return GraspScore(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def score_grasps(predicted: Sequence[Grasp], truth: Sequence[Grasp], tol: int = 1) -> GraspScore:
    """Counts for one predicted grasp list against one scene's ground truth."""
    ok = correct_grasps(predicted, truth, tol)
    objects = {int(tag) for tag, _ in truth}
    covered = {int(predicted[i][0]) for i in np.flatnonzero(ok)}
    return GraspScore(len(predicted), int(ok.sum()), len(objects), len(covered & objects))


def voxel_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """|P ∩ T| / |P ∪ T| of two sets of voxel ids (or any hashable integers); 1.0 if both are empty."""
    p, t = np.unique(np.asarray(predicted).reshape(-1)), np.unique(np.asarray(truth).reshape(-1))
    union = len(np.union1d(p, t))
    return len(np.intersect1d(p, t)) / union if union else 1.0


def segmentation_counts(predicted: Sequence[tuple[int, np.ndarray]],
                        truth: Sequence[tuple[int, np.ndarray]]) -> tuple[int, int]:
    """(correct, total) over the ground-truth cells of a segmentation.

    Both sides are lists of (tag, voxel ids) blocks. total is the number of distinct cells in the
    ground-truth blocks; a cell is correct when the predicted blocks give it exactly its true tag:
    some predicted block with that tag lists it and no predicted block with another tag does.
    Cells the prediction leaves out are wrong. Tags are compared directly, with no search over
    permutations: in GraspGPT a segment tag is the GraspNet id of the object (objectNN), which
    the scene's grasps use too, so a model that renames objects is wrong.
    """
    if not truth:
        return 0, 0
    t_ids = np.concatenate([np.asarray(c, dtype=np.int64).reshape(-1) for _, c in truth])
    t_tags = np.concatenate([np.full(len(np.asarray(c).reshape(-1)), tag, np.int64) for tag, c in truth])
    t_ids, first = np.unique(t_ids, return_index=True)
    t_tags = t_tags[first]
    if not predicted:
        return 0, len(t_ids)
    p_ids = np.concatenate([np.asarray(c, dtype=np.int64).reshape(-1) for _, c in predicted])
    p_tags = np.concatenate([np.full(len(np.asarray(c).reshape(-1)), tag, np.int64) for tag, c in predicted])
    pairs = np.unique(np.stack([p_ids, p_tags], 1), axis=0)  # each (cell, tag) once, sorted by cell
    cells, start, count = np.unique(pairs[:, 0], return_index=True, return_counts=True)
    sole = count == 1  # cells given exactly one tag
    tag_of = dict(zip(cells[sole].tolist(), pairs[start[sole], 1].tolist()))
    correct = sum(tag_of.get(c) == t for c, t in zip(t_ids.tolist(), t_tags.tolist()))
    return int(correct), len(t_ids)


def touching_cells(cells: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """(m, 3) the distinct in-grid cells within one cell (Chebyshev) of `cells` (k, 3), sorted: where a
    finger touching that object can be."""
    grown = (np.asarray(cells, dtype=np.int64).reshape(-1, 3)[:, None, :] + NEIGHBOURHOOD).reshape(-1, 3)
    return np.unique(grown[np.all((grown >= 0) & (grown < np.asarray(dims)), axis=1)], axis=0)


def random_grasps(rng: np.random.Generator, scene: Sequence[tuple[int, np.ndarray]], n: int,
                  dims: Sequence[int]) -> list[Grasp]:
    """The random baseline: `n` grasps on the scene's objects, grammar-valid (3 in-grid cells).

    Each grasp takes a tag drawn uniformly from the scene's blocks (the objects the model sees),
    and 3 cells drawn independently and uniformly from that block's cells grown by one voxel
    (their 27-neighbourhoods, clipped to the grid): the fingers land on or next to the object,
    as real contacts do, but nothing about grasp geometry is known.
    """
    if n <= 0 or not scene:
        return []
    regions = [(int(tag), touching_cells(cells, dims)) for tag, cells in scene]
    out = []
    for k in rng.integers(len(regions), size=n):
        tag, region = regions[k]
        out.append((tag, region[rng.integers(len(region), size=3)]))
    return out


# -- physical validity ------------------------------------------------------------------------



def _label_grid(scene: Sequence[tuple[int, np.ndarray]], dims: Sequence[int]) -> tuple[np.ndarray, dict[int, int]]:
    """(X, Y, Z) int grid: 0 free, k + 1 the scene's k-th block; and {tag: k + 1} (first block of a tag)."""
    grid = np.zeros(tuple(dims), np.int32)
    label_of: dict[int, int] = {}
    for k, (tag, cells) in enumerate(scene):
        cells = np.asarray(cells, dtype=np.int64).reshape(-1, 3)
        grid[cells[:, 0], cells[:, 1], cells[:, 2]] = k + 1
        label_of.setdefault(int(tag), k + 1)
    return grid, label_of


def _labels_along(grid: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Labels of the cells that the segment a -> b (cell coordinates, a cell's centre at its index)
    passes, sampled every quarter voxel; points off the grid read as free."""
    n = max(2, int(np.ceil(4 * np.abs(b - a).max())) + 1)
    points = a + np.linspace(0.0, 1.0, n)[:, None] * (b - a)
    cells = np.rint(points).astype(np.int64)
    inside = np.all((cells >= 0) & (cells < grid.shape), axis=1)
    return grid[tuple(cells[inside].T)]


def valid_grasps(predicted: Sequence[Grasp], scene: Sequence[tuple[int, np.ndarray]], dims: Sequence[int],
                 voxel_size: float) -> np.ndarray:
    """(P,) bool: which grasps a parallel-jaw gripper could execute in the scene, judged from its voxels.

    A grasp (tag, [left finger, right finger, base]) is valid when
      * its tag names a block of the scene (the object it claims to grasp),
      * both finger cells touch that object (within one voxel of one of its cells) and are not
        inside another object,
      * the closing segment between the fingers passes through the object,
      * the opening (finger distance) is at most GRIPPER_MAX_OPENING, plus one voxel diagonal for
        the rounding of both points to cells, and
      * the base is where the gripper's shape puts it: FINGER_LENGTH behind the contacts' midpoint,
        along an approach perpendicular to the closing direction (within the rounding of the
        points to cells), and
      * the fingers (each contact swept to the base's level) and the palm between their ends stay
        clear of every other object; the base cell itself is free.
    Distances are between cell centres. Scenes of one block (amodal, unseg) have no "other" object.
    """
    grid, label_of = _label_grid(scene, dims)
    padded = np.pad(grid, 1)
    out = np.zeros(len(predicted), dtype=bool)
    for i, (tag, cells) in enumerate(predicted):
        cells = np.asarray(cells, dtype=np.int64).reshape(-1, 3)
        own = label_of.get(int(tag))
        if own is None or len(cells) != 3:
            continue
        left, right, base = cells.astype(np.float64)
        finger_labels = grid[tuple(cells[:2].T)]
        touching = [(padded[tuple((c + 1 + NEIGHBOURHOOD).T)] == own).any() for c in cells[:2]]
        opening = np.linalg.norm(left - right) * voxel_size
        if (not all(touching) or not np.isin(finger_labels, (0, own)).all() or grid[tuple(cells[2])] != 0
                or opening > GRIPPER_MAX_OPENING + np.sqrt(3) * voxel_size
                or not (_labels_along(grid, left, right) == own).any()):
            continue
        out_vec = base - (left + right) / 2
        close = right - left
        # The gripper's shape: the base sits FINGER_LENGTH behind the contacts' midpoint, along an
        # approach perpendicular to the closing direction (up to each point's rounding to its cell).
        slack = np.sqrt(3)  # voxels: the largest error of a distance between rounded points, per point pair
        if abs(np.linalg.norm(out_vec) - FINGER_LENGTH / voxel_size) > slack or (
                abs(out_vec @ close) > slack * (np.linalg.norm(out_vec) + np.linalg.norm(close)) + 3):
            continue
        swept = np.concatenate([_labels_along(grid, left, left + out_vec), _labels_along(grid, right, right + out_vec),
                                _labels_along(grid, left + out_vec, right + out_vec)])
        out[i] = bool(np.isin(swept, (0, own)).all())
    return out
