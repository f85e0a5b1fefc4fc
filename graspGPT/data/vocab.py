"""The GraspGPT vocabulary: the exact id layout of existing data and checkpoints.

    0-2            unknow, unlabel, incomplete
    3-90           object00 ... object87
    next D ids     dynamic tags (every later id shifts by D)
    91-98   (+D)   scene segment endunseg amodal endamodal detectgrasp grasp end
    99-338  (+D)   <serial1> ... <serial240>
    339+D ...      voxel (x, y, z) -> 339 + D + (x*Y + y)*Z + z
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

SPECIAL_TAGS = ("unknow", "unlabel", "incomplete")
NUM_OBJECT_TAGS = 88
OBJECT_TAGS = tuple(f"object{i:02d}" for i in range(NUM_OBJECT_TAGS))
COMMANDS = ("scene", "segment", "endunseg", "amodal", "endamodal", "detectgrasp", "grasp", "end")
NUM_SERIALS = 240
SERIALS = tuple(f"<serial{i}>" for i in range(1, NUM_SERIALS + 1))

# The real GraspGPT workspace (metres).
REAL_BBOX_MIN = (-0.3, -0.2, 0.0)
REAL_BBOX_MAX = (0.3, 0.2, 0.25)
REAL_VOXEL_SIZE = 0.0075


# How a data set's grasp cells map to metres (its meta.json "grasp_cells"; docs/FORMAT.md has the table).
# scene_grid: the scene's own voxels, cell floor((p - bbox_min) / voxel), centre (c + 0.5) * voxel + bbox_min
#             (the toolkit's synthetic data).
# upstream:   the research code's grasp encoder, c = trunc((p - bbox_min) / (bbox_max - bbox_min) * (dims - 1)):
#             a grid of dims - 1 steps across the box, slightly coarser than the voxels (imported data).
SCENE_GRID = "scene_grid"
UPSTREAM_GRID = "upstream"
GRASP_CELL_CONVENTIONS = (SCENE_GRID, UPSTREAM_GRID)


class VocabError(ValueError):
    """A token or id that the vocabulary does not have."""


@dataclass(frozen=True)
class Workspace:
    """The box a scene is cut to and its voxel grid."""

    bbox_min: tuple[float, float, float] = REAL_BBOX_MIN
    bbox_max: tuple[float, float, float] = REAL_BBOX_MAX
    voxel_size: float = REAL_VOXEL_SIZE

    @property
    def dims(self) -> tuple[int, int, int]:
        # The 1e-9 guards against 0.6/0.0075 = 80.00000000000001 -> 81.
        return tuple(
            int(math.ceil((hi - lo) / self.voxel_size - 1e-9))
            for lo, hi in zip(self.bbox_min, self.bbox_max)
        )

    def cell_of_point(self, points: np.ndarray) -> np.ndarray:
        """(N,3) metres -> (N,3) integer cells, floor((p - bbox_min) / voxel)."""
        return np.floor((np.asarray(points, dtype=np.float64) - self.bbox_min) / self.voxel_size).astype(np.int64)

    def cell_center(self, cells: np.ndarray) -> np.ndarray:
        """(N,3) cells -> (N,3) metres at the cell centres."""
        return (np.asarray(cells, dtype=np.float64) + 0.5) * self.voxel_size + np.asarray(self.bbox_min)

    def grasp_step(self, convention: str) -> np.ndarray:
        """(3,) metres: the extent of one grasp cell along each axis under `convention`."""
        check_grasp_cells(convention)
        if convention == SCENE_GRID:
            return np.full(3, float(self.voxel_size))
        extent = np.asarray(self.bbox_max, dtype=np.float64) - self.bbox_min
        return extent / np.maximum(np.asarray(self.dims) - 1, 1)

    def grasp_cell_of_point(self, points: np.ndarray, convention: str) -> np.ndarray:
        """(N,3) metres inside the box -> (N,3) grasp cells, as the data's writer encoded them."""
        if check_grasp_cells(convention) == SCENE_GRID:
            return self.cell_of_point(points)
        # trunc == floor inside the box; written as the research code writes it
        return np.trunc((np.asarray(points, dtype=np.float64) - self.bbox_min) / self.grasp_step(convention)).astype(np.int64)

    def grasp_point(self, cells: np.ndarray, convention: str) -> np.ndarray:
        """(N,3) grasp cells -> (N,3) metres: the middle of the region the encoder mapped to the cell.

        Every point of that region is within half a `grasp_step` per axis of the result. The research
        code decodes an upstream cell to its corner, c * voxel + bbox_min, which is up to 1.5 cm off at
        the far end of the real box; the middle of the step is never more than half a step off. The
        last upstream cell holds only points on bbox_max, so the result is kept inside the box.
        """
        cells = np.asarray(cells, dtype=np.float64)
        if check_grasp_cells(convention) == SCENE_GRID:
            return self.cell_center(cells)
        p = (cells + 0.5) * self.grasp_step(convention) + np.asarray(self.bbox_min)
        return np.minimum(p, np.asarray(self.bbox_max, dtype=np.float64))

    def in_bounds(self, cells: np.ndarray) -> np.ndarray:
        cells = np.asarray(cells)
        return np.all((cells >= 0) & (cells < np.asarray(self.dims)), axis=-1)


def check_grasp_cells(convention: str) -> str:
    """`convention` if it names a grasp-cell convention, else VocabError listing them."""
    if convention not in GRASP_CELL_CONVENTIONS:
        raise VocabError(f"grasp_cells {convention!r} is not a known convention; use one of {', '.join(GRASP_CELL_CONVENTIONS)}")
    return convention


class Vocab:
    """Token <-> id maps for one grid size and set of dynamic tags.

    All lookups are O(1) arithmetic or a dict built once; nothing is rebuilt per sample.
    """

    def __init__(self, dims: Sequence[int], dynamic_tags: Sequence[str] = ()):
        dims = tuple(int(d) for d in dims)
        if len(dims) != 3 or min(dims) < 1:
            raise VocabError(f"dims must be three positive integers, got {dims}")
        fixed = set(SPECIAL_TAGS) | set(OBJECT_TAGS) | set(COMMANDS) | set(SERIALS)
        dynamic_tags = tuple(str(t) for t in dynamic_tags)
        clash = [t for t in dynamic_tags if t in fixed]
        if clash or len(set(dynamic_tags)) != len(dynamic_tags):
            raise VocabError(f"dynamic tags must be new and unique; clashing or repeated: {clash or dynamic_tags}")
        self.dims = dims
        self.dynamic_tags = dynamic_tags
        D = len(dynamic_tags)
        self.num_tags = len(SPECIAL_TAGS) + NUM_OBJECT_TAGS + D  # ids [0, num_tags) are tags
        self.command_base = self.num_tags
        self.serial_base = self.command_base + len(COMMANDS)
        self.voxel_base = self.serial_base + NUM_SERIALS
        self.num_cells = dims[0] * dims[1] * dims[2]
        self.size = self.voxel_base + self.num_cells

        names = list(SPECIAL_TAGS) + list(OBJECT_TAGS) + list(dynamic_tags) + list(COMMANDS) + list(SERIALS)
        self._names = names  # id -> name for every non-voxel id
        self._ids = {name: i for i, name in enumerate(names)}
        # Named command ids: vocab.scene, vocab.end, ...
        for name in COMMANDS:
            setattr(self, name, self._ids[name])
        self.unknow, self.unlabel, self.incomplete = 0, 1, 2
        self.object_base = len(SPECIAL_TAGS)
        # Segment blocks take object tags. The research parser tests the name ('object' + digits), so a
        # dynamic tag named like one (e.g. 'object120') is a segment tag too.
        named = [self._ids[t] for t in dynamic_tags if re.fullmatch(r"object\d+", t)]
        self.segment_tags = tuple(range(self.object_base, self.object_base + NUM_OBJECT_TAGS)) + tuple(named)

    # -- construction -------------------------------------------------------
    @classmethod
    def for_workspace(cls, workspace: Workspace, dynamic_tags: Sequence[str] = ()) -> "Vocab":
        return cls(workspace.dims, dynamic_tags)

    @staticmethod
    def read_categories(path: str | Path) -> list[str]:
        """Dynamic tags from a JSON file holding a ``categories`` list."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise VocabError(f"{path}: cannot read vocabulary file ({exc})") from exc
        cats = data.get("categories") if isinstance(data, dict) else None
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            raise VocabError(f'{path}: expected a JSON object with a "categories" list of strings')
        return cats

    def to_meta(self) -> dict:
        return {"dims": list(self.dims), "dynamic_tags": list(self.dynamic_tags), "vocab_size": self.size}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.dims == other.dims and self.dynamic_tags == other.dynamic_tags

    def __hash__(self) -> int:
        return hash((self.dims, self.dynamic_tags))

    def __repr__(self) -> str:
        return f"Vocab(dims={self.dims}, dynamic_tags={len(self.dynamic_tags)}, V={self.size})"

    def __len__(self) -> int:
        return self.size

    # -- classification -----------------------------------------------------
    def is_tag(self, i: int) -> bool:
        return 0 <= i < self.num_tags

    def is_object_tag(self, i: int) -> bool:
        return self.object_base <= i < self.object_base + NUM_OBJECT_TAGS

    def is_segment_tag(self, i: int) -> bool:
        """A tag a segment block may carry: objectNN, or a dynamic tag named like one."""
        return self.is_object_tag(i) or (i >= self.object_base + NUM_OBJECT_TAGS and i in self.segment_tags)

    def is_serial(self, i: int) -> bool:
        return self.serial_base <= i < self.voxel_base

    def is_voxel(self, i: int) -> bool:
        return self.voxel_base <= i < self.size

    def object_tag(self, object_id: int) -> int:
        """Tag id for a GraspNet object id; ids above 87 fall back to `unknow`."""
        return self.object_base + object_id if 0 <= object_id < NUM_OBJECT_TAGS else self.unknow

    # -- voxels ---------------------------------------------------------------
    def cell_ids(self, cells: np.ndarray) -> np.ndarray:
        """(N,3) integer cells -> (N,) voxel token ids (x-major). Raises on out-of-grid cells."""
        cells = np.asarray(cells, dtype=np.int64).reshape(-1, 3)
        X, Y, Z = self.dims
        bad = ~np.all((cells >= 0) & (cells < np.array(self.dims)), axis=1)
        if bad.any():
            raise VocabError(f"cell {tuple(cells[bad][0].tolist())} is outside the grid {self.dims}")
        return self.voxel_base + (cells[:, 0] * Y + cells[:, 1]) * Z + cells[:, 2]

    def cells_of(self, ids: np.ndarray) -> np.ndarray:
        """(N,) voxel token ids -> (N,3) integer cells. Raises on non-voxel ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = (ids < self.voxel_base) | (ids >= self.size)
        if bad.any():
            raise VocabError(f"id {int(ids[bad][0])} is not a voxel token (voxels are {self.voxel_base}..{self.size - 1})")
        flat = ids - self.voxel_base
        _, Y, Z = self.dims
        return np.stack([flat // (Y * Z), (flat // Z) % Y, flat % Z], axis=1)

    def cell_id(self, x: int, y: int, z: int) -> int:
        return int(self.cell_ids(np.array([[x, y, z]]))[0])

    # -- tokens <-> ids -------------------------------------------------------
    def id_of(self, token: str | tuple[int, int, int]) -> int:
        """Name (``"scene"``, ``"object05"``, ``"<serial3>"``) or cell tuple -> id."""
        if isinstance(token, tuple):
            return self.cell_id(*token)
        try:
            return self._ids[token]
        except KeyError:
            raise VocabError(f"unknown token {token!r}") from None

    def token_of(self, i: int) -> str | tuple[int, int, int]:
        """Id -> name, or (x, y, z) for a voxel id."""
        i = int(i)
        if 0 <= i < self.voxel_base:
            return self._names[i]
        if 0 <= i < self.size:
            return tuple(int(v) for v in self.cells_of(np.array([i]))[0])
        raise VocabError(f"id {i} is outside the vocabulary (V = {self.size})")

    def encode(self, tokens: Sequence[str | tuple[int, int, int]]) -> np.ndarray:
        return np.array([self.id_of(t) for t in tokens], dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> list[str | tuple[int, int, int]]:
        return [self.token_of(i) for i in ids]

    def check_ids(self, ids: np.ndarray) -> None:
        """Raise VocabError naming the first position whose id is outside [0, V)."""
        ids = np.asarray(ids)
        bad = np.flatnonzero((ids < 0) | (ids >= self.size))
        if bad.size:
            raise VocabError(f"token {int(bad[0])} has id {int(ids[bad[0]])}, outside the vocabulary (V = {self.size})")
