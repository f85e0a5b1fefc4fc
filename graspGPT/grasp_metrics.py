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

import functools
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
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 3) + 1
    near = np.zeros(tuple(int(d) + 2 for d in dims), dtype=bool)  # the grid with a margin of one cell
    for offset in NEIGHBOURHOOD:  # marked on a grid, not sorted: 27 scatters cost less than a unique of 27k rows
        near[tuple((cells + offset).T)] = True
    return np.argwhere(near[1:-1, 1:-1, 1:-1])  # C order: sorted


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

# Largest error, in voxels, of a distance between two points each rounded to its cell centre.
ROUNDING = float(np.sqrt(3))


class SceneVoxels:
    """A scene's cells labelled by block: judges grasps (`valid`) and lists the cells a grasp may use
    next (`left_cells`, `right_cells`, `base_cells`), with one set of rules for both.

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
    Distances are between cell centres; segments are sampled every quarter voxel and points off the
    grid read as free. Scenes of one block (amodal, unseg) have no "other" object.
    """

    def __init__(self, scene: Sequence[tuple[int, np.ndarray]], dims: Sequence[int], voxel_size: float):
        self.dims = tuple(int(d) for d in dims)
        self.voxel_size = float(voxel_size)
        self.grid = np.zeros(self.dims, np.int32)  # 0 free, k + 1 the scene's k-th block
        self.label_of: dict[int, int] = {}  # tag -> label of its first block
        self._cells: dict[int, np.ndarray] = {}
        for k, (tag, cells) in enumerate(scene):
            cells = np.asarray(cells, dtype=np.int64).reshape(-1, 3)
            self.grid[cells[:, 0], cells[:, 1], cells[:, 2]] = k + 1
            if int(tag) not in self.label_of:
                self.label_of[int(tag)] = k + 1
                self._cells[k + 1] = cells
        self._padded = np.pad(self.grid, 1)
        # Segments are read from a copy of the grid with a free margin wide enough for any segment the
        # rules sample (a swept finger ends at most FINGER_LENGTH + rounding off the grid): no bounds
        # checks per point. Farther points, which the rules never reach, are clipped onto the margin.
        margin = int(np.ceil(FINGER_LENGTH / self.voxel_size + 2 * ROUNDING)) + 2
        wide = np.pad(self.grid, margin)
        self._margin, self._wide_max, self._wide = margin, np.asarray(wide.shape) - 1, wide.ravel()
        self._strides = np.array([wide.shape[1] * wide.shape[2], wide.shape[2], 1], np.float64)  # exact: < 2**53
        self._left: dict[int, np.ndarray] = {}
        self._others: dict[int, np.ndarray] = {}  # label -> summed-volume table of the other objects (_others_in)

    # -- rules on arrays of candidates: each takes the object's label and (n, 3) cells

    def _labels_along(self, a: np.ndarray, b: np.ndarray, every: int = 1, middle: bool = False) -> np.ndarray:
        """(n, m) labels along the segments a[i] -> b[i] ((n, 3) each, float cell coordinates); every
        segment has its own samples (a quarter voxel apart), padded with its end point. every = k > 1:
        only every k-th of those samples and the end point; middle: only each segment's middle sample
        ((n, 1)). Both read a subset of the same points, for first passes that settle most segments cheaply."""
        a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
        if len(a) == 0:
            return np.zeros((0, 1), np.int32)
        d = b - a
        steps = np.maximum(2, np.ceil(4 * np.abs(d).max(axis=1)).astype(np.int64) + 1)  # per segment
        if middle:
            k = ((steps - 1) // 2)[:, None]
        else:
            k = np.arange(0, int(steps.max()), every)
            if every > 1:
                k = np.append(k, int(steps.max()) - 1)
            k = k[None, :]
        t = np.minimum(k / (steps[:, None] - 1), 1.0)
        pts = a[:, None, :] + t[..., None] * d[:, None, :]
        np.rint(pts, out=pts)
        pts += self._margin
        np.clip(pts, 0, self._wide_max, out=pts)
        return self._wide[(pts @ self._strides).astype(np.int64)]

    def _through(self, own: int | np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(n,) bool: segment a[i] -> b[i] meets the object (a sample labelled `own`, or own[i]). The objects are
        solid, so the middle sample alone finds most crossings (87% of the segments a real-grid decoding asks
        about), every fourth sample most of the rest; only the others are sampled in full."""
        a, b = np.broadcast_arrays(a, b)
        own = np.broadcast_to(np.asarray(own), (len(a),))
        hit = self._labels_along(a, b, middle=True)[:, 0] == own
        for every in (4, 1):
            rest = np.flatnonzero(~hit)
            hit[rest] = (self._labels_along(a[rest], b[rest], every=every) == own[rest, None]).any(1)
        return hit

    def _clear(self, own: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(n,) bool: segment a[i] -> b[i] meets no other object than own[i] (every sample free or its own).
        One pass: most of these segments are clear, so a sparse first pass would settle few of them."""
        labels = self._labels_along(a, b)
        return ((labels == 0) | (labels == own[:, None])).all(1)

    def _fingers_ok(self, own: int, fingers: np.ndarray) -> np.ndarray:
        touching = (self._padded[tuple((fingers[:, None, :] + 1 + NEIGHBOURHOOD).transpose(2, 0, 1))] == own).any(1)
        label = self.grid[tuple(fingers.T)]
        return touching & ((label == 0) | (label == own))

    def _closing_ok(self, own: int | np.ndarray, left: np.ndarray, rights: np.ndarray) -> np.ndarray:
        """(n,) bool: the fingers left ((3,) or (n, 3)) and rights[i] within the gripper's opening, and the closing
        segment between them through object `own` (or own[i])."""
        left = np.broadcast_to(left, rights.shape)
        own = np.broadcast_to(np.asarray(own), (len(rights),))
        opening = np.linalg.norm(rights - left, axis=1) * self.voxel_size
        ok = opening <= GRIPPER_MAX_OPENING + ROUNDING * self.voxel_size
        ok[ok] = self._through(own[ok], left[ok], rights[ok])
        return ok

    def _base_ok(self, own: int | np.ndarray, left: np.ndarray, right: np.ndarray, bases: np.ndarray,
                 rounding: float = ROUNDING) -> np.ndarray:
        """(n,) bool: the gripper's shape and clearance for each candidate base bases[i] of the grasp with
        fingers left, right ((3,) or (n, 3), one pair per candidate) on object `own` (or own[i])."""
        left, right = np.broadcast_arrays(left.astype(np.float64), right.astype(np.float64), bases)[:2]
        own = np.broadcast_to(np.asarray(own), (len(bases),))
        out = bases - (left + right) / 2
        close = right - left
        reach = np.linalg.norm(out, axis=1)
        # The gripper's shape, up to the rounding of its points to cells: `rounding` bounds how far that moves
        # the base from the fingers' midpoint (and the closing direction), so a dot product of two vectors each
        # off by at most `rounding` is off by at most rounding * (both lengths) + rounding^2. (Cells and
        # midpoints are whole or half voxels: these sums are exact, whatever their order.)
        ok = ((np.abs(reach - FINGER_LENGTH / self.voxel_size) <= rounding)
              & (np.abs((out * close).sum(1)) <= rounding * (reach + np.linalg.norm(close, axis=1)) + rounding ** 2)
              & (self.grid[tuple(bases.T)] == 0))
        out, left, right, own = out[ok], left[ok], right[ok], own[ok]
        # The contacts and the fingers' ends, per candidate. Only where another object lies in the box around
        # them can the fingers or the palm hit it: each point is sampled within that box (rounding to a cell
        # moves it half a voxel).
        corners = np.stack([left, right, left + out, right + out])
        near = np.flatnonzero(self._others_in(own, corners.min(0) - 1, corners.max(0) + 1))
        corners, own = corners[:, near], own[near]
        clear = np.ones(len(near), dtype=bool)
        for a, b in ((0, 2), (1, 3), (2, 3)):  # each finger swept to the base's level, then the palm
            clear[clear] = self._clear(own[clear], corners[a][clear], corners[b][clear])
        ok[np.flatnonzero(ok)[near[~clear]]] = False
        return ok

    def _others_in(self, own: int | np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """(n,) bool: whether a cell of an object other than `own` (or own[i]) lies in the box [lo[i], hi[i]]
        (cell coordinates, the bounds rounded outwards; the grid's outside holds nothing)."""
        own = np.broadcast_to(np.asarray(own), (len(lo),))
        found = np.zeros(len(lo), dtype=bool)
        for label in np.unique(own).tolist():
            mine = own == label
            found[mine] = self._others_in_box(label, lo[mine], hi[mine])
        return found

    def _others_in_box(self, own: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """_others_in for one object: counted in a summed-volume table of the other objects' cells, built once
        per object, eight lookups a box."""
        if own not in self._others:
            # table[i, j, k]: cells in [0,i)x[0,j)x[0,k); int32 holds any grid's count and sums faster than int64
            table = np.zeros(tuple(d + 1 for d in self.dims), np.int32)
            others = (self.grid != 0) & (self.grid != own)
            table[1:, 1:, 1:] = others.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32).cumsum(2, dtype=np.int32)
            self._others[own] = table
        table, dims = self._others[own], np.asarray(self.dims)
        hi = np.clip(np.ceil(hi).astype(np.int64) + 1, 0, dims)
        lo = np.minimum(np.clip(np.floor(lo).astype(np.int64), 0, dims), hi)
        (x0, y0, z0), (x1, y1, z1) = lo.T, hi.T
        count = (table[x1, y1, z1] - table[x0, y1, z1] - table[x1, y0, z1] - table[x1, y1, z0]
                 + table[x0, y0, z1] + table[x0, y1, z0] + table[x1, y0, z0] - table[x0, y0, z0])
        return count > 0

    # -- judging

    def valid(self, predicted: Sequence[Grasp]) -> np.ndarray:
        """(P,) bool: which grasps a parallel-jaw gripper could execute here (the rules above)."""
        out = np.zeros(len(predicted), dtype=bool)
        for i, (tag, cells) in enumerate(predicted):
            cells = np.asarray(cells, dtype=np.int64).reshape(-1, 3)
            own = self.label_of.get(int(tag))
            if own is None or len(cells) != 3 or not self._inside(cells).all():
                continue
            left, right, base = cells
            out[i] = bool(self._fingers_ok(own, cells[:2]).all() and self._closing_ok(own, left, right[None])[0]
                          and self._base_ok(own, left, right, base[None])[0])
        return out

    def _inside(self, cells: np.ndarray) -> np.ndarray:
        return np.all((cells >= 0) & (cells < self.dims), axis=-1)

    # -- the cells a grasp of object `tag` may use next (sorted (n, 3); empty when none)

    def left_cells(self, tag: int) -> np.ndarray:
        """Where a first finger may be: touching the object, not inside another."""
        own = self.label_of.get(int(tag))
        if own is None:
            return np.zeros((0, 3), np.int64)
        if own not in self._left:
            around = touching_cells(self._cells[own], self.dims)
            self._left[own] = around[self._fingers_ok(own, around)]
        return self._left[own]

    def right_cells(self, tag: int, left: np.ndarray) -> np.ndarray:
        """Where the second finger may be, given the first: a finger cell within the gripper's opening
        whose closing segment passes through the object."""
        return self.right_cells_many([(tag, left)])[0]

    def right_cells_many(self, asks: Sequence[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        """right_cells of each (tag, left finger), all candidates tested in one pass (decoding asks for a step's
        rows at once)."""
        fingers = [self.left_cells(tag) for tag, _ in asks]
        counts = [len(f) for f in fingers]
        if not sum(counts):
            return fingers
        lefts = np.repeat(np.array([left for _, left in asks], dtype=np.int64).reshape(-1, 3), counts, axis=0)
        owns = np.repeat([self.label_of.get(int(tag), 0) for tag, _ in asks], counts)
        rights = np.concatenate(fingers)
        return _per_ask(rights, self._closing_ok(owns, lefts, rights), counts)

    def base_cells(self, tag: int, left: np.ndarray, right: np.ndarray, rounding: float = ROUNDING) -> np.ndarray:
        """Where the base may be, given both fingers: FINGER_LENGTH behind their midpoint, along an
        approach perpendicular to the closing direction, with fingers and palm clear of other objects.
        `rounding` (voxels): how far the rounding of the points to cells may bend that shape; the default is
        its worst case, which valid_grasps allows (every valid base); less keeps to the snugger shell where
        nearly all true grasps lie."""
        return self.base_cells_many([(tag, left, right)], rounding)[0]

    def base_cells_many(self, asks: Sequence[tuple[int, np.ndarray, np.ndarray]],
                        rounding: float = ROUNDING) -> list[np.ndarray]:
        """base_cells of each (tag, left finger, right finger), all candidates tested in one pass."""
        parts = []
        for tag, left, right in asks:
            own = self.label_of.get(int(tag))
            left, right = np.asarray(left, np.int64), np.asarray(right, np.int64)
            twice_mid = left + right
            bases = twice_mid // 2 + shell_offsets(tuple(twice_mid % 2), FINGER_LENGTH / self.voxel_size, rounding)
            bases = bases[self._inside(bases)] if own is not None else np.zeros((0, 3), np.int64)
            parts.append((own or 0, left, right, bases))
        counts = [len(p[3]) for p in parts]
        if not sum(counts):
            return [p[3] for p in parts]
        bases = np.concatenate([p[3] for p in parts])
        pick = np.repeat(np.arange(len(parts)), counts)
        own, lefts, rights = (np.array([p[k] for p in parts])[pick] for k in range(3))
        return _per_ask(bases, self._base_ok(own, lefts, rights, bases, rounding), counts)


def _per_ask(candidates: np.ndarray, ok: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """The candidates that passed, split back into each ask's own (`counts` candidates an ask, in order)."""
    cuts = np.cumsum(counts)[:-1]
    return [c[k] for c, k in zip(np.split(candidates, cuts), np.split(ok, cuts))]


@functools.lru_cache(maxsize=64)
def shell_offsets(odd: tuple[int, ...], radius: float, rounding: float) -> np.ndarray:
    """(n, 3) integer offsets o, in lexicographic order, of the cells floor(mid) + o whose centres lie within
    `rounding` of `radius` from mid = floor(mid) + odd / 2 (odd: which of the midpoint's coordinates are
    halves): the only cells where a base may lie, a twentieth of the box around that sphere on the real grid."""
    r = int(np.ceil(radius + rounding)) + 1
    axis = np.arange(-r, r + 1)
    o = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    reach = np.linalg.norm(o - np.asarray(odd) / 2, axis=1)
    o = o[np.abs(reach - radius) <= rounding + 1e-9]  # a margin: SceneVoxels._base_ok decides exactly
    o.flags.writeable = False
    return o


def valid_grasps(predicted: Sequence[Grasp], scene: Sequence[tuple[int, np.ndarray]], dims: Sequence[int],
                 voxel_size: float) -> np.ndarray:
    """(P,) bool: which grasps a parallel-jaw gripper could execute in the scene (SceneVoxels' rules)."""
    return SceneVoxels(scene, dims, voxel_size).valid(predicted)
