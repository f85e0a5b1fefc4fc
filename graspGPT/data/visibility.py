"""Single-view visibility of voxel cells: which cells a camera above the table sees.

Everything is in cell units: cell (i, j, k) is the unit cube [i, i+1) x [j, j+1) x [k, k+1).
A cell is visible when the ray from its camera-facing corner to the camera crosses no
occupied cell. Casting from the corner rather than the centre keeps a flat top surface
seen at a grazing angle visible (a ray from the centre would clip the neighbour's top
half). Rays are marched in fixed steps on the occupancy grid, vectorized over cells.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# The real workspace is 0.6 m along x; camera distances are given in metres of that workspace.
WORKSPACE_X_METRES = 0.6
DISTANCE_RANGE = (0.6, 1.0)  # metres from the workspace centre
ELEVATION_RANGE = (30.0, 70.0)  # degrees above the table
STEP = 0.5  # march step in cells; finer gains little, a grazed corner is ambiguous anyway
CHUNK = 16  # steps marched before dropping the rays already decided


def random_camera(rng: np.random.Generator, dims: Sequence[int]) -> np.ndarray:
    """A camera position (cell units) above the table: random azimuth, elevation 30-70 deg,
    0.6-1.0 m (scaled to the grid) from the workspace centre, which it looks at."""
    X, Y, Z = (float(d) for d in dims)
    azimuth = rng.uniform(0.0, 2 * np.pi)
    elevation = np.deg2rad(rng.uniform(*ELEVATION_RANGE))
    distance = rng.uniform(*DISTANCE_RANGE) * X / WORKSPACE_X_METRES
    centre = np.array([X / 2, Y / 2, Z / 2])
    return centre + distance * np.array(
        [np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)]
    )


def visible_mask(
    cells: np.ndarray,
    dims: Sequence[int],
    rng: np.random.Generator | None = None,
    camera: np.ndarray | None = None,
) -> np.ndarray:
    """(N,3) occupied cells -> (N,) bool, True where the camera sees the cell.

    The camera is `random_camera(rng, dims)` unless given (cell units, above every cell).
    """
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 3)
    dims = tuple(int(d) for d in dims)
    if camera is None:
        if rng is None:
            raise ValueError("visible_mask needs an rng or a camera position; pass rng=np.random.default_rng(seed)")
        camera = random_camera(rng, dims)
    camera = np.asarray(camera, dtype=np.float64)
    n = len(cells)
    visible = np.zeros(n, dtype=bool)
    if n == 0:
        return visible
    if camera[2] <= cells[:, 2].max() + 1:
        raise ValueError(f"camera at z={camera[2]:.1f} is not above the occupied cells; place it higher")

    occ = np.zeros(dims, dtype=bool)
    occ[cells[:, 0], cells[:, 1], cells[:, 2]] = True
    # A cell whose six face neighbours are all occupied is hidden from every direction.
    pad = np.pad(occ, 1)
    x, y, z = cells.T + 1
    interior = (pad[x - 1, y, z] & pad[x + 1, y, z] & pad[x, y - 1, z] & pad[x, y + 1, z]
                & pad[x, y, z - 1] & pad[x, y, z + 1])
    todo = np.flatnonzero(~interior)

    centre = cells[todo] + 0.5
    d = camera - centre
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    start = centre + 0.5 * np.sign(d)
    # Nothing above the highest occupied cell or outside the grid can occlude: stop there.
    top = cells[:, 2].max() + 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        t_end = (top - start[:, 2]) / d[:, 2]
        for a in (0, 1):
            exit_a = np.where(d[:, a] > 0, (dims[a] - start[:, a]) / d[:, a], -start[:, a] / d[:, a])
            t_end = np.minimum(t_end, np.where(d[:, a] != 0, exit_a, np.inf))

    flat_occ = occ.reshape(-1)
    strides = np.array([dims[1] * dims[2], dims[2], 1])
    hi = np.array(dims) - 1
    ts = 0.05 + STEP * np.arange(CHUNK)  # 0.05: just past the corner, into the next cells
    open_ = np.arange(len(todo))  # rays not yet decided
    while open_.size:
        t = ts[None, :]
        p = start[open_, None, :] + t[..., None] * d[open_, None, :]
        idx = np.clip(np.floor(p).astype(np.int64), 0, hi) @ strides
        inside = t < t_end[open_, None]
        hit = (flat_occ[idx] & inside).any(axis=1)
        done = hit | ~inside[:, -1]
        visible[todo[open_[done & ~hit]]] = True
        open_ = open_[~done]
        ts = ts + STEP * CHUNK
    return visible
