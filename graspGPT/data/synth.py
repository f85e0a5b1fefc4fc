"""Built-in synthetic tabletop scenes with analytic antipodal parallel-jaw grasps.

A scene is 2-6 primitives (boxes, upright or lying cylinders, spheres) resting on the
table (z = 0) without touching each other. Each object is voxelized solid (the cells whose
centres lie inside it). Grasps are computed per primitive in closed form: the two contacts
lie on opposite surfaces with opposite normals along the closing axis, the opening is at
most GRIPPER_MAX_OPENING, and the base sits FINGER_LENGTH behind the contacts' midpoint,
outside the object, along an approach perpendicular to the closing axis from above or the
side. Candidates are then checked against the occupancy grid: fingers, palm and base must
not enter another object and the base cell must be free.

The sample is written in one of three task layouts (docs/FORMAT.md, sections 1 and 4):
"grasp" (labelled scene), "amodal" (one camera view + the complete scene) and "unseg"
(unlabelled scene + its segmentation).
"""
from __future__ import annotations

import functools
import multiprocessing
import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .grammar import Block, Sample, serialize
from .visibility import visible_mask
from .vocab import NUM_OBJECT_TAGS, Vocab, Workspace

TASKS = ("grasp", "amodal", "unseg")
GRIPPER_MAX_OPENING = 0.085  # metres between the finger inner points
FINGER_LENGTH = 0.05  # contact midpoint -> gripper base centre
DEPTH_RANGE = (0.005, 0.04)  # how far past the surface (along the approach) the contacts sit
MAX_WIDTH = 0.08  # widest graspable side, a little under the opening
KIND_PROBS = {"box": 0.35, "cylinder": 0.3, "lying_cylinder": 0.15, "sphere": 0.2}


class SynthError(ValueError):
    """Bad arguments to the synthetic data generator."""


@dataclass
class Primitive:
    """A solid resting on the table at (x, y) with yaw about z. `size` depends on `kind`:
    box (sx, sy, sz); cylinder (radius, height); lying_cylinder (radius, length along local x);
    sphere (radius,)."""

    kind: str
    x: float
    y: float
    yaw: float
    size: tuple[float, ...]

    @property
    def footprint_radius(self) -> float:
        """Radius of a circle about (x, y) that contains the footprint."""
        s = self.size
        if self.kind == "box":
            return float(np.hypot(s[0], s[1]) / 2)
        if self.kind == "lying_cylinder":
            return float(np.hypot(s[1] / 2, s[0]))
        return float(s[0])

    def _to_local(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        dx, dy = px - self.x, py - self.y
        return c * dx + s * dy, -s * dx + c * dy

    def contains(self, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
        """Inside test; broadcasts over its (metre) coordinate arrays."""
        lx, ly = self._to_local(px, py)
        s = self.size
        if self.kind == "box":
            return (np.abs(lx) <= s[0] / 2) & (np.abs(ly) <= s[1] / 2) & (pz >= 0) & (pz <= s[2])
        if self.kind == "cylinder":
            return (lx * lx + ly * ly <= s[0] ** 2) & (pz >= 0) & (pz <= s[1])
        if self.kind == "lying_cylinder":
            return (np.abs(lx) <= s[1] / 2) & (ly * ly + (pz - s[0]) ** 2 <= s[0] ** 2)
        return lx * lx + ly * ly + (pz - s[0]) ** 2 <= s[0] ** 2

    def height(self) -> float:
        s = self.size
        if self.kind == "box":
            return s[2]
        return s[1] if self.kind == "cylinder" else 2 * s[0]

    def voxelize(self, ws: Workspace) -> np.ndarray:
        """(N,3) cells whose centres lie inside, sorted by (x, y, z); never empty."""
        r = self.footprint_radius
        lo = np.array([self.x - r, self.y - r, 0.0])
        hi = np.array([self.x + r, self.y + r, self.height()])
        dims = np.array(ws.dims)
        c0 = np.clip(np.floor((lo - ws.bbox_min) / ws.voxel_size - 0.5).astype(int), 0, dims - 1)
        c1 = np.clip(np.ceil((hi - ws.bbox_min) / ws.voxel_size - 0.5).astype(int) + 1, 1, dims)
        axes = [(np.arange(a, b) + 0.5) * ws.voxel_size + m for a, b, m in zip(c0, c1, ws.bbox_min)]
        px, py, pz = np.ix_(*axes)
        inside = self.contains(px, py, pz)
        cells = np.argwhere(inside) + c0
        if len(cells) == 0:  # a sliver between cell centres: keep the cell under its middle
            cells = ws.cell_of_point([[self.x, self.y, min(self.height() / 2, ws.voxel_size / 2)]])
        return cells

    def grasp_candidates(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, 3, 3) metre points [left finger, right finger, base] of antipodal grasps."""
        mid, close, half, out = _GRASPERS[self.kind](self.size, rng, n)
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        mid = mid @ rot.T + np.array([self.x, self.y, 0.0])
        close, out = close @ rot.T, out @ rot.T
        arm = half[:, None] * close
        return np.stack([mid - arm, mid + arm, mid + FINGER_LENGTH * out], axis=1)


# Analytic grasp families in the object's local frame (origin on the table under its centre).
# Each returns (mid, close, half, out): contacts at mid -/+ half*close, `out` points from the
# object towards the base (minus the approach direction), perpendicular to `close`.

def _depth(rng, n, extent):
    return rng.uniform(DEPTH_RANGE[0], np.minimum(DEPTH_RANGE[1], extent - 0.005), n)


def _unit(n, axis):
    v = np.zeros((n, 3))
    v[:, axis] = 1.0
    return v


def _box_grasps(size, rng, n):
    sx, sy, sz = size
    axes = [a for a, w in ((0, sx), (1, sy)) if w <= GRIPPER_MAX_OPENING]
    ax = rng.choice(axes, n)  # closing axis
    other = 1 - ax
    rows = np.arange(n)
    half_ext = np.array([sx / 2, sy / 2])
    top = rng.random(n) < 0.5
    mid = np.zeros((n, 3))
    out = np.zeros((n, 3))
    # From above: contacts below the top face, anywhere along the other side.
    d = _depth(rng, n, sz)
    mid[rows, other] = np.where(top, rng.uniform(-0.8, 0.8, n) * half_ext[other], 0.0)
    mid[:, 2] = np.where(top, sz - d, 0.0)
    out[:, 2] = top
    # From the side: along the other horizontal axis, contacts at some height.
    side = ~top
    sign = rng.choice([-1.0, 1.0], n)
    d = _depth(rng, n, 2 * half_ext[other])
    mid[rows[side], other[side]] = (sign * (half_ext[other] - d))[side]
    mid[side, 2] = rng.uniform(min(0.015, sz / 2), sz - 0.005, n)[side]
    out[rows[side], other[side]] = sign[side]
    return mid, _unit(n, 0) * (ax == 0)[:, None] + _unit(n, 1) * (ax == 1)[:, None], half_ext[ax], out


def _cylinder_grasps(size, rng, n):
    r, h = size
    theta = rng.uniform(0, 2 * np.pi, n)
    close = np.stack([np.cos(theta), np.sin(theta), np.zeros(n)], axis=1)
    top = rng.random(n) < 0.5
    mid = np.zeros((n, 3))
    mid[:, 2] = np.where(top, h - _depth(rng, n, h), rng.uniform(min(0.015, h / 2), h - 0.005, n))
    side_out = np.stack([-np.sin(theta), np.cos(theta), np.zeros(n)], axis=1)
    out = np.where(top[:, None], _unit(n, 2), side_out)
    return mid, close, np.full(n, r), out


def _lying_cylinder_grasps(size, rng, n):
    r, length = size
    caps = (rng.random(n) < 0.3) if length <= GRIPPER_MAX_OPENING else np.zeros(n, bool)
    # Across the round side, tilted at most 30 deg from horizontal, from above.
    phi = rng.uniform(-np.pi / 6, np.pi / 6, n)
    zeros = np.zeros(n)
    close = np.stack([zeros, np.cos(phi), np.sin(phi)], axis=1)
    out = np.stack([zeros, -np.sin(phi), np.cos(phi)], axis=1)
    mid = np.stack([rng.uniform(-0.45, 0.45, n) * length, zeros, np.full(n, r)], axis=1)
    # Across the two flat caps, from above.
    cap_mid = np.stack([zeros, zeros, 2 * r - _depth(rng, n, 2 * r)], axis=1)
    mid = np.where(caps[:, None], cap_mid, mid)
    close = np.where(caps[:, None], _unit(n, 0), close)
    out = np.where(caps[:, None], _unit(n, 2), out)
    return mid, close, np.where(caps, length / 2, r), out


def _sphere_grasps(size, rng, n):
    (r,) = size
    theta = rng.uniform(0, 2 * np.pi, n)
    beta = rng.uniform(-0.35, 0.35, n)
    close = np.stack([np.cos(theta) * np.cos(beta), np.sin(theta) * np.cos(beta), np.sin(beta)], axis=1)
    # Base anywhere on the upper half of the great circle perpendicular to the closing axis.
    up = _unit(n, 2) - close * close[:, 2:3]
    up /= np.linalg.norm(up, axis=1, keepdims=True)
    across = np.cross(close, up)
    psi = rng.uniform(-1.2, 1.2, n)[:, None]
    out = np.cos(psi) * up + np.sin(psi) * across
    mid = np.tile([0.0, 0.0, r], (n, 1))
    return mid, close, np.full(n, r), out


_GRASPERS = {"box": _box_grasps, "cylinder": _cylinder_grasps,
             "lying_cylinder": _lying_cylinder_grasps, "sphere": _sphere_grasps}


def _random_primitive(rng: np.random.Generator, voxel: float) -> Primitive:
    # Never thinner than ~1.5 voxels, so every object covers cells and its bottom layer.
    wmin, hmin, dmin = max(0.02, 1.5 * voxel), max(0.03, 1.5 * voxel), max(0.025, 2 * voxel)
    kinds = list(KIND_PROBS)
    kind = kinds[rng.choice(len(kinds), p=list(KIND_PROBS.values()))]
    if kind == "box":
        size = (rng.uniform(wmin, 0.12), rng.uniform(wmin, MAX_WIDTH), rng.uniform(hmin, 0.15))
    elif kind == "cylinder":
        size = (rng.uniform(dmin, MAX_WIDTH) / 2, rng.uniform(hmin, 0.15))
    elif kind == "lying_cylinder":
        size = (rng.uniform(dmin, 0.07) / 2, rng.uniform(max(0.06, 2 * voxel), 0.15))
    else:
        size = (rng.uniform(max(0.03, 2 * voxel), MAX_WIDTH) / 2,)
    return Primitive(kind, 0.0, 0.0, float(rng.uniform(0, np.pi)), tuple(float(v) for v in size))


def _place_objects(rng: np.random.Generator, ws: Workspace, count: int) -> list[Primitive]:
    """Up to `count` primitives whose footprint circles keep a gap (so fingers fit between)."""
    gap = 0.015 + ws.voxel_size
    lo, hi = np.array(ws.bbox_min[:2]), np.array(ws.bbox_max[:2])
    placed: list[Primitive] = []
    for _ in range(count):
        for _attempt in range(4 if len(placed) >= 2 else 100):  # 2 objects always fit
            obj = _random_primitive(rng, ws.voxel_size)
            r = obj.footprint_radius + 0.01
            xy = rng.uniform(lo + r, hi - r, size=(16, 2))
            ok = np.ones(len(xy), bool)
            for p in placed:
                ok &= np.hypot(xy[:, 0] - p.x, xy[:, 1] - p.y) >= r - 0.01 + p.footprint_radius + gap
            if ok.any():
                obj.x, obj.y = (float(v) for v in xy[np.argmax(ok)])
                placed.append(obj)
                break
    return placed


@dataclass
class SceneGeometry:
    """The labelled scene before it is written as tokens."""

    tags: list[int]  # object tag id per object
    cells: list[np.ndarray]  # (N_k, 3) cells per object, sorted
    grasps: list[np.ndarray]  # (G_k, 3) voxel ids [left, right, base] per object, sorted
    kinds: list[str]  # Primitive.kind per object (what an analysis of the grasps may group by)


class _LabelGrid:
    """Object labels (0 free, k+1 object k) padded by one free cell, for quick point lookups."""

    def __init__(self, labels: np.ndarray, ws: Workspace):
        self.ws = ws
        self.flat = np.pad(labels, 1).reshape(-1)
        X, Y, Z = (d + 2 for d in labels.shape)
        self.strides = np.array([Y * Z, Z, 1])
        self.hi = np.array([X - 1, Y - 1, Z - 1])

    def index(self, cells: np.ndarray) -> np.ndarray:
        """Flat index of cells (..., 3); cells off the grid land on the free padding."""
        return np.clip(cells + 1, 0, self.hi) @ self.strides

    def at_points(self, points: np.ndarray) -> np.ndarray:
        return self.flat[self.index(self.ws.cell_of_point(points))]


# The 27 cells within one step (Chebyshev) of a cell, as offsets.
_NEIGHBOURS = np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3)


def _grasps_for(obj: Primitive, k: int, grid: _LabelGrid, vocab: Vocab,
                rng: np.random.Generator, max_grasps: int) -> np.ndarray:
    """Collision-checked, deduplicated grasp cell triples (voxel ids) of object k."""
    if max_grasps <= 0:
        return np.zeros((0, 3), np.int64)
    ws, own = grid.ws, k + 1
    pts = obj.grasp_candidates(rng, max(2 * max_grasps, 32))
    cells = ws.cell_of_point(pts)  # (n, 3, 3)
    label = grid.flat[grid.index(cells)]
    free_or_own = (label == 0) | (label == own)
    ok = ws.in_bounds(cells).all(axis=1) & free_or_own[:, 0] & free_or_own[:, 1] & (label[:, 2] == 0)
    # Each finger cell touches the object (within one cell of one of its occupied cells).
    near = grid.flat[grid.index(cells[:, :2, None, :] + _NEIGHBOURS)]  # (n, 2, 27)
    ok &= (near == own).any(axis=2).all(axis=1)
    cells, pts = cells[ok], pts[ok]
    # Fingers (contact -> base level) and the palm between them stay clear of other objects.
    steps = np.linspace(0.0, 1.0, max(3, int(np.ceil(2 * FINGER_LENGTH / ws.voxel_size))))[:, None]
    out = pts[:, 2] - (pts[:, 0] + pts[:, 1]) / 2
    ends = pts[:, :2] + out[:, None, :]
    swept = np.concatenate([
        pts[:, 0, None] + steps * out[:, None], pts[:, 1, None] + steps * out[:, None],
        ends[:, 0, None] + steps * (ends[:, 1] - ends[:, 0])[:, None]], axis=1)
    sl = grid.at_points(swept)
    cells = cells[~((sl != 0) & (sl != own)).any(axis=1)]
    if len(cells) == 0:
        return np.zeros((0, 3), np.int64)
    ids = vocab.cell_ids(cells.reshape(-1, 3)).reshape(-1, 3)
    # Swapping the fingers is the same grasp: the left finger is the lower id.
    ids[:, :2].sort(axis=1)
    bits = 21  # 3 ids of < 2**21 pack into one int64 sort key
    if vocab.size >= 1 << bits:
        raise SynthError(f"grid {ws.dims} has over 2**21 voxel ids, too many for the grasp key; "
                         "use a coarser voxel size")
    key = np.unique((ids[:, 0] << 2 * bits) | (ids[:, 1] << bits) | ids[:, 2])
    if len(key) > max_grasps:
        key = np.sort(rng.choice(key, max_grasps, replace=False))
    mask = (1 << bits) - 1
    return np.stack([key >> 2 * bits, (key >> bits) & mask, key & mask], axis=1)


def scene_geometry(rng: np.random.Generator, workspace: Workspace, vocab: Vocab,
                   max_grasps_per_object: int = 100) -> SceneGeometry:
    """Random objects on the table, their cells and their grasps."""
    objs = _place_objects(rng, workspace, int(rng.integers(2, 7)))
    labels = np.zeros(workspace.dims, np.int8)
    cells = []
    for k, obj in enumerate(objs):
        c = obj.voxelize(workspace)
        labels[c[:, 0], c[:, 1], c[:, 2]] = k + 1
        cells.append(c)
    ids = rng.choice(NUM_OBJECT_TAGS, len(objs), replace=False)
    grid = _LabelGrid(labels, workspace)
    grasps = [_grasps_for(o, k, grid, vocab, rng, max_grasps_per_object) for k, o in enumerate(objs)]
    return SceneGeometry([vocab.object_tag(int(i)) for i in ids], cells, grasps, [o.kind for o in objs])


def _grasp_blocks(tags: list[int], grasps: list[np.ndarray]) -> list[Block]:
    if not grasps:
        return []
    g = np.concatenate(grasps)
    t = np.repeat(tags, [len(x) for x in grasps])
    key = np.concatenate([t[:, None], g], axis=1)
    key = np.unique(key, axis=0)  # equal tag and cells: one grasp (can happen once tags merge)
    key = key[np.argsort(key[:, 1], kind="stable")]
    return [Block(int(row[0]), row[1:]) for row in key]


def generate_scene(rng: np.random.Generator, workspace: Workspace, vocab: Vocab, task: str,
                   max_grasps_per_object: int = 100) -> Sample:
    """One random scene written in the layout of `task` ("grasp", "amodal" or "unseg")."""
    if task not in TASKS:
        raise SynthError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if tuple(vocab.dims) != tuple(workspace.dims):
        raise SynthError(f"vocab dims {vocab.dims} differ from workspace dims {workspace.dims}; "
                         "build the vocab with Vocab.for_workspace(workspace)")
    geo = scene_geometry(rng, workspace, vocab, max_grasps_per_object)
    blocks = [Block(t, vocab.cell_ids(c)) for t, c in zip(geo.tags, geo.cells)]
    blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    if task == "grasp":
        return Sample(scene=blocks, grasps=_grasp_blocks(geo.tags, geo.grasps))
    all_cells = np.concatenate(geo.cells)
    all_ids = vocab.cell_ids(all_cells)
    order = np.argsort(all_ids)
    all_ids, all_cells = all_ids[order], all_cells[order]
    if task == "amodal":
        seen = visible_mask(all_cells, workspace.dims, rng)
        grasps = _grasp_blocks([vocab.incomplete] * len(geo.grasps), geo.grasps)
        return Sample(scene=[Block(vocab.incomplete, all_ids[seen])], amodal=all_ids, grasps=grasps)
    grasps = _grasp_blocks([vocab.unlabel] * len(geo.grasps), geo.grasps)
    return Sample(scene=[Block(vocab.unlabel, all_ids)], unseg=blocks, grasps=grasps)


def parse_task_mix(s: str) -> dict[str, float]:
    """"grasp" or "grasp=0.6,amodal=0.2,unseg=0.2" -> task probabilities summing to 1."""
    weights: dict[str, float] = {}
    for part in str(s).split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if name not in TASKS:
            raise SynthError(f"task mix {s!r}: unknown task {name!r}; use names from {', '.join(TASKS)}, "
                             "e.g. 'grasp=0.6,amodal=0.2,unseg=0.2'")
        if name in weights:
            raise SynthError(f"task mix {s!r}: {name!r} is given twice; give each task once")
        try:
            w = float(value) if eq else 1.0
        except ValueError:
            raise SynthError(f"task mix {s!r}: weight {value.strip()!r} of {name!r} is not a number") from None
        if not np.isfinite(w) or w < 0:
            raise SynthError(f"task mix {s!r}: weight of {name!r} must be a finite number >= 0")
        weights[name] = w
    total = sum(weights.values())
    if total <= 0:
        raise SynthError(f"task mix {s!r}: weights sum to {total}; give at least one positive weight")
    return {k: v / total for k, v in weights.items() if v > 0}


MAX_VOXEL_SIZE = 0.035  # coarser grids leave no object size that is 2+ cells wide and still graspable


def _scene_rng(i: int, seed: int) -> tuple[np.random.Generator, float]:
    """Scene i's generator and its task draw, always taken first, so that the geometry drawn after it does
    not depend on the task mix."""
    rng = np.random.default_rng([int(seed), i])
    return rng, rng.random()


def _scene_ids(i: int, seed: int, workspace: Workspace, names: list[str], cum: np.ndarray,
               max_grasps_per_object: int) -> np.ndarray:
    rng, u = _scene_rng(i, seed)
    task = names[min(int(np.searchsorted(cum, u, side="right")), len(names) - 1)]
    vocab = Vocab.for_workspace(workspace)
    return serialize(generate_scene(rng, workspace, vocab, task, max_grasps_per_object), vocab)


def scene_geometry_of(i: int, seed: int, workspace: Workspace, max_grasps_per_object: int = 100) -> SceneGeometry:
    """The geometry of scene i of `generate_scenes(..., seed, workspace)` (any task mix): its objects, their
    kinds, cells and ground-truth grasps, without writing the scene."""
    rng, _ = _scene_rng(i, seed)
    return scene_geometry(rng, workspace, Vocab.for_workspace(workspace), max_grasps_per_object)


def generate_scenes(num_scenes: int, seed: int, workspace: Workspace | None = None,
                    task_mix: str = "grasp", max_grasps_per_object: int = 100,
                    progress: bool = False, workers: int = 1) -> Iterator[np.ndarray]:
    """Token id arrays (int64) of `num_scenes` scenes, in order. Scene i depends only on (seed, i),
    so `workers` processes produce the same scenes as one."""
    if int(num_scenes) != num_scenes or num_scenes < 0:
        raise SynthError(f"num_scenes must be an integer >= 0, got {num_scenes!r}")
    if int(seed) != seed or seed < 0:
        raise SynthError(f"seed must be an integer >= 0, got {seed!r}")
    workspace = workspace or Workspace()
    if workspace.voxel_size > MAX_VOXEL_SIZE:
        raise SynthError(f"voxel_size {workspace.voxel_size:g} m is too coarse for synthetic scenes: objects must span "
                         f"2+ cells and still fit the {GRIPPER_MAX_OPENING} m gripper; use at most {MAX_VOXEL_SIZE} m")
    Vocab.for_workspace(workspace)  # fail early on a bad workspace
    mix = parse_task_mix(task_mix)
    make = functools.partial(_scene_ids, seed=seed, workspace=workspace, names=list(mix),
                             cum=np.cumsum(list(mix.values())), max_grasps_per_object=max_grasps_per_object)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(num_scenes), unit="scene", file=sys.stderr, desc="synth")
    pool = None
    if workers > 1 and num_scenes > 1:
        # spawn, not fork: callers may already run threads (torch, a process group)
        pool = multiprocessing.get_context("spawn").Pool(workers)
        scenes = pool.imap(make, range(int(num_scenes)), chunksize=16)
    else:
        scenes = map(make, range(int(num_scenes)))
    try:
        for ids in scenes:
            yield ids
            if bar is not None:
                bar.update(1)
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
