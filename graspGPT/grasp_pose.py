"""Parallel-jaw gripper poses from grasp cells: what a robot executes.

A grasp block holds 3 cells in the format's order: left finger inner point L, right finger inner
point R, gripper-base centre B. They become metres with the data's grasp-cell convention
(`Workspace.grasp_point`, meta.json `grasp_cells`), then, in the workspace frame:

    centre     c = (L + R) / 2
    width      w = |R - L|
    approach   a = (c - B) / |c - B|                       from the base towards the fingers
    closing    x = (R - L) - ((R - L) . a) a, normalised    left to right finger, orthogonal to a
    transform  T = [x  a×x  a  c; 0 0 0 1]                  columns: x = closing, y = a × x, z = approach,
                                                            origin at the centre; right-handed (det +1)

A grasp cell stands for every point of a small box: half a `grasp_step` per axis h (half a voxel on
the scene grid). So each point is within |h| of the truth, the centre within |h|, the width within
2|h|; the finger line R - L and the vector c - B each move by at most 2|h|, which turns them by at
most asin(2|h| / length).

Grasps without a pose say why in `problem`: fewer than 3 cells (data drops a point that fell outside
the box, and which one is not recorded), more than 3, coincident finger points, a base on the
fingers' midpoint, or a finger line along the approach direction.

    from graspGPT.grasp_pose import grid_of_meta, poses_from_ids
    vocab, workspace, grasp_cells = grid_of_meta(json.load(open("exported/graspgpt_meta.json")))
    for pose in poses_from_ids(ids, vocab, workspace, grasp_cells):
        if pose.problem is None:
            robot.move_to(pose.transform, opening=pose.width)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .data.grammar import read_output
from .data.storage import grasp_cells_of_meta
from .data.vocab import SCENE_GRID, Vocab, Workspace, check_grasp_cells

GRASP_CELLS = 3
EPS = 1e-9  # metres (or relative, for the finger line): shorter counts as zero; distinct cells are >= ~1 mm apart


@dataclass(frozen=True)
class Tolerance:
    """What one grasp cell leaves open, in metres: any point of a cell is within `per_axis` of its
    decoded point on each axis and within `point` overall."""

    per_axis: np.ndarray  # (3,) half a grasp cell per axis
    point: float  # |per_axis|: bound on each of L, R, B, and on the centre

    @property
    def width(self) -> float:
        return 2 * self.point

    def angle_deg(self, length: float) -> float:
        """Bound on the turn of a vector between two decoded points `length` metres apart (each off by
        <= `point`): asin(2 point / length); 180 when the points could coincide."""
        if length <= 2 * self.point:
            return 180.0
        return float(np.degrees(np.arcsin(2 * self.point / length)))

    def to_json(self) -> dict:
        return {"per_axis_m": _r(self.per_axis), "point_m": _r(self.point), "centre_m": _r(self.point),
                "width_m": _r(self.width)}


def tolerance(workspace: Workspace, grasp_cells: str) -> Tolerance:
    half = workspace.grasp_step(grasp_cells) / 2
    return Tolerance(half, float(np.linalg.norm(half)))


@dataclass(frozen=True)
class GraspPose:
    """One grasp: its cells and their points, and the gripper pose when it has one (else `problem`)."""

    tag: int
    cells: np.ndarray  # (k, 3) grasp cells
    points: np.ndarray  # (k, 3) metres
    centre: np.ndarray | None = None
    approach: np.ndarray | None = None  # unit
    closing: np.ndarray | None = None  # unit, orthogonal to approach
    width: float | None = None  # metres between the finger points
    depth: float | None = None  # metres from the base to the centre
    transform: np.ndarray | None = None  # (4, 4) workspace <- gripper
    problem: str | None = None

    def to_json(self, vocab: Vocab | None = None, tol: Tolerance | None = None) -> dict:
        """JSON-ready: tag name (with a vocab), cells, points, pose; per-grasp bounds with a Tolerance."""
        out = {"tag": vocab.token_of(self.tag) if vocab is not None else self.tag, "cells": self.cells.tolist(),
               "points_m": _r(self.points)}
        names = ("left_finger", "right_finger", "base") if len(self.points) == GRASP_CELLS else ()
        out.update({n: _r(p) for n, p in zip(names, self.points)})
        if self.problem is not None:
            return {**out, "pose": None, "problem": self.problem}
        out["pose"] = {"centre": _r(self.centre), "approach": _r(self.approach, 6), "closing": _r(self.closing, 6),
                       "width": _r(self.width), "depth": _r(self.depth), "transform": _r(self.transform, 6)}
        if tol is not None:
            out["pose"]["tolerance"] = {"width_m": _r(tol.width), "finger_line_deg": round(tol.angle_deg(self.width), 2),
                                        "approach_deg": round(tol.angle_deg(self.depth), 2)}
        return out


def _r(x, digits: int = 5):
    return np.round(np.asarray(x, dtype=np.float64), digits).tolist()


def pose_from_points(points: np.ndarray, tag: int = -1, cells: np.ndarray | None = None) -> GraspPose:
    """The pose of (k, 3) metric grasp points L, R, B (see the module docstring)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    cells = np.zeros((0, 3), np.int64) if cells is None else np.asarray(cells, dtype=np.int64).reshape(-1, 3)
    base = GraspPose(tag, cells, points)
    k = len(points)
    if k != GRASP_CELLS:
        why = ("data drops a point that fell outside the box, and which one is not recorded" if k < GRASP_CELLS
               else "the format's grasps have 3")
        return _degenerate(base, f"{k} cells: a pose needs 3 (left finger, right finger, base); {why}")
    left, right, b = points
    line = right - left
    width = float(np.linalg.norm(line))
    if width < EPS:
        return _degenerate(base, "the finger points coincide: no width or closing direction")
    centre = (left + right) / 2
    depth = float(np.linalg.norm(centre - b))
    if depth < EPS:
        return _degenerate(base, "the base is at the fingers' midpoint: no approach direction")
    approach = (centre - b) / depth
    closing = line - (line @ approach) * approach  # why: the fingers close across the approach axis
    if np.linalg.norm(closing) < EPS * width:
        return _degenerate(base, "the finger line runs along the approach direction: no closing direction")
    closing /= np.linalg.norm(closing)
    transform = np.eye(4)
    transform[:3, :3] = np.stack([closing, np.cross(approach, closing), approach], axis=1)
    transform[:3, 3] = centre
    return GraspPose(tag, cells, points, centre, approach, closing, width, depth, transform)


def _degenerate(pose: GraspPose, problem: str) -> GraspPose:
    return GraspPose(pose.tag, pose.cells, pose.points, problem=problem)


def pose_from_cells(cells: np.ndarray, workspace: Workspace, grasp_cells: str, tag: int = -1) -> GraspPose:
    """The pose of (k, 3) grasp cells under the data's grasp-cell convention."""
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 3)
    return pose_from_points(workspace.grasp_point(cells, grasp_cells), tag, cells)


def poses_from_ids(ids: Sequence[int] | np.ndarray, vocab: Vocab, workspace: Workspace,
                   grasp_cells: str = SCENE_GRID) -> list[GraspPose]:
    """One GraspPose per grasp block of `ids`: a whole sequence, model output (read leniently, up to
    `end`), or just grasp blocks (`grasp tag cell cell cell ...`, read as a detectgrasp section)."""
    check_grasp_cells(grasp_cells)
    if tuple(vocab.dims) != tuple(workspace.dims):
        raise ValueError(f"the vocabulary's grid {vocab.dims} is not the workspace's {workspace.dims}")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if not (ids == vocab.detectgrasp).any():
        ids = np.concatenate([[vocab.detectgrasp], ids])
    grasps = read_output(ids, vocab).grasps or []
    return [pose_from_cells(vocab.cells_of(g.cells), workspace, grasp_cells, g.tag) for g in grasps]


def grid_of_meta(meta: dict) -> tuple[Vocab, Workspace, str]:
    """(vocab, workspace, grasp_cells) of a data set's meta.json or an exported model's graspgpt_meta.json."""
    if "vocab" in meta:  # exported model
        voc, ws = meta["vocab"], meta.get("workspace")
        if not ws or ws.get("grasp_cells") is None:
            raise ValueError("the model's metadata does not record its workspace or grasp_cells (its training data "
                             "was moved before export); take them from the data set's meta.json instead")
        vocab, box, conv = Vocab(voc["dims"], voc["dynamic_tags"]), ws, ws["grasp_cells"]
    else:  # data set
        vocab, box, conv = Vocab(meta["dims"], meta["dynamic_tags"]), meta, grasp_cells_of_meta(meta)
    workspace = Workspace(tuple(box["bbox_min"]), tuple(box["bbox_max"]), float(box["voxel_size"]))
    return vocab, workspace, check_grasp_cells(conv)
