"""Gripper poses from grasp cells. Every expected value is worked out by hand from the definitions
(centre = (L + R) / 2, width = |R - L|, approach = unit(centre - B), closing = R - L orthogonalised
against approach, transform columns = closing, approach x closing, approach, centre), not from the code."""
import math

import numpy as np
import pytest

from graspGPT.data.vocab import Vocab, Workspace
from graspGPT.grasp_pose import grid_of_meta, pose_from_cells, poses_from_ids, tolerance

# voxel 0.01 m from the origin: cell c has its centre at (c + 0.5) * 0.01
UNIT = Workspace((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.01)
REAL = Workspace()


def test_top_down_grasp():
    p = pose_from_cells([[10, 20, 30], [14, 20, 30], [12, 20, 36]], UNIT, "scene_grid", tag=7)
    assert p.problem is None and p.tag == 7
    np.testing.assert_allclose(p.points, [[0.105, 0.205, 0.305], [0.145, 0.205, 0.305], [0.125, 0.205, 0.365]])
    np.testing.assert_allclose(p.centre, [0.125, 0.205, 0.305])
    assert p.width == pytest.approx(0.04) and p.depth == pytest.approx(0.06)
    np.testing.assert_allclose(p.approach, [0, 0, -1], atol=1e-12)  # base above: approach downwards
    np.testing.assert_allclose(p.closing, [1, 0, 0], atol=1e-12)
    # y = approach x closing = (0, 0, -1) x (1, 0, 0) = (0, -1, 0)
    want = [[1, 0, 0, 0.125], [0, -1, 0, 0.205], [0, 0, -1, 0.305], [0, 0, 0, 1]]
    np.testing.assert_allclose(p.transform, want, atol=1e-12)
    assert np.linalg.det(p.transform[:3, :3]) == pytest.approx(1.0)


def test_closing_is_orthogonalised_against_approach():
    # R - L = (0.04, 0, 0.02); centre = (0.125, 0.105, 0.115); B = (0.125, 0.105, 0.045)
    p = pose_from_cells([[10, 10, 10], [14, 10, 12], [12, 10, 4]], UNIT, "scene_grid")
    np.testing.assert_allclose(p.centre, [0.125, 0.105, 0.115])
    np.testing.assert_allclose(p.approach, [0, 0, 1], atol=1e-12)
    assert p.depth == pytest.approx(0.07)
    assert p.width == pytest.approx(math.sqrt(0.04 ** 2 + 0.02 ** 2))  # the finger distance, not its projection
    np.testing.assert_allclose(p.closing, [1, 0, 0], atol=1e-12)  # (0.04, 0, 0.02) - 0.02 * (0, 0, 1), normalised
    np.testing.assert_allclose(p.transform[:3, 1], [0, 1, 0], atol=1e-12)  # (0, 0, 1) x (1, 0, 0)


def test_tilted_grasp_frame():
    # L = (0.005, 0.005, 0.005), R = (0.025, 0.005, 0.005), B = (0.015, 0.025, 0.025)
    p = pose_from_cells([[0, 0, 0], [2, 0, 0], [1, 2, 2]], UNIT, "scene_grid")
    # centre = (0.015, 0.005, 0.005); centre - B = (0, -0.02, -0.02) -> approach (0, -1, -1) / sqrt 2
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(p.approach, [0, -s, -s], atol=1e-12)
    assert p.depth == pytest.approx(0.02 * math.sqrt(2))
    np.testing.assert_allclose(p.closing, [1, 0, 0], atol=1e-12)
    # y = (0, -s, -s) x (1, 0, 0) = (0, -s, s)
    np.testing.assert_allclose(p.transform[:3, :3], [[1, 0, 0], [0, -s, -s], [0, s, -s]], atol=1e-12)


def test_upstream_cells_use_the_research_grid():
    cells = [[39, 26, 13], [45, 26, 13], [42, 26, 20]]
    p = pose_from_cells(cells, REAL, "upstream")
    sx, sy, sz = 0.6 / 79, 0.4 / 53, 0.25 / 33  # extent / (dims - 1)
    left = [-0.3 + 39.5 * sx, -0.2 + 26.5 * sy, 13.5 * sz]
    right = [-0.3 + 45.5 * sx, -0.2 + 26.5 * sy, 13.5 * sz]
    base = [-0.3 + 42.5 * sx, -0.2 + 26.5 * sy, 20.5 * sz]
    np.testing.assert_allclose(p.points, [left, right, base], atol=1e-12)
    assert p.width == pytest.approx(6 * sx)
    np.testing.assert_allclose(p.centre, [-0.3 + 42.5 * sx, -0.2 + 26.5 * sy, 13.5 * sz], atol=1e-12)
    np.testing.assert_allclose(p.approach, [0, 0, -1], atol=1e-12)
    # The same cells read on the scene grid are a different gripper: 6 voxels wide, centre (c + 0.5) * voxel
    q = pose_from_cells(cells, REAL, "scene_grid")
    assert q.width == pytest.approx(6 * 0.0075)
    assert q.centre[0] == pytest.approx(-0.3 + 42.5 * 0.0075)


@pytest.mark.parametrize("cells, problem", [
    ([[1, 1, 1], [3, 1, 1]], "2 cells: a pose needs 3"),
    ([[1, 1, 1]], "1 cells: a pose needs 3"),
    ([[1, 1, 1], [3, 1, 1], [2, 1, 5], [2, 2, 2]], "4 cells"),
    ([[4, 4, 4], [4, 4, 4], [4, 4, 9]], "the finger points coincide"),
    ([[1, 1, 1], [3, 1, 1], [2, 1, 1]], "the base is at the fingers' midpoint"),
    ([[1, 1, 1], [3, 1, 1], [6, 1, 1]], "the finger line runs along the approach direction"),
])
def test_degenerate_grasps_say_why(cells, problem):
    p = pose_from_cells(cells, UNIT, "scene_grid")
    assert p.problem.startswith(problem)
    assert p.transform is None and p.centre is None and p.width is None
    np.testing.assert_allclose(p.points, (np.array(cells) + 0.5) * 0.01)  # the points are still given
    rec = p.to_json()
    assert rec["pose"] is None and rec["problem"] == p.problem


def test_tolerance_of_one_cell():
    t = tolerance(REAL, "scene_grid")
    np.testing.assert_allclose(t.per_axis, [0.00375] * 3)
    assert t.point == pytest.approx(0.00375 * math.sqrt(3)) and t.width == pytest.approx(0.0075 * math.sqrt(3))
    assert t.angle_deg(0.04) == pytest.approx(math.degrees(math.asin(0.0075 * math.sqrt(3) / 0.04)))
    assert t.angle_deg(0.01) == 180.0  # the points could coincide
    u = tolerance(REAL, "upstream")
    np.testing.assert_allclose(u.per_axis, [0.3 / 79, 0.2 / 53, 0.125 / 33])
    rec = pose_from_cells([[10, 10, 10], [16, 10, 10], [13, 10, 16]], REAL, "scene_grid").to_json(tol=t)
    assert rec["pose"]["tolerance"]["width_m"] == round(0.0075 * math.sqrt(3), 5)
    assert rec["pose"]["tolerance"]["finger_line_deg"] == round(math.degrees(math.asin(0.0075 * math.sqrt(3) / 0.045)), 2)


def test_poses_from_ids():
    v = Vocab.for_workspace(UNIT)
    g1 = ["grasp", "object03", (10, 20, 30), (14, 20, 30), (12, 20, 36)]
    g2 = ["grasp", "object04", (1, 1, 1), (3, 1, 1)]  # a point fell outside the box
    whole = v.encode(["scene", "object03", (10, 20, 30), "detectgrasp"] + g1 + g2 + ["end"])
    poses = poses_from_ids(whole, v, UNIT, "scene_grid")
    assert [p.tag for p in poses] == [v.id_of("object03"), v.id_of("object04")]
    assert poses[0].problem is None and poses[0].width == pytest.approx(0.04)
    assert poses[1].problem.startswith("2 cells")
    # just the generated grasp blocks, and unfinished output
    assert len(poses_from_ids(v.encode(g1), v, UNIT)) == 1
    assert len(poses_from_ids(v.encode(g1 + ["grasp"]), v, UNIT)) == 1
    with pytest.raises(ValueError, match="grid"):
        poses_from_ids(whole, Vocab((4, 4, 4)), UNIT)


def test_grid_of_meta():
    box = {"bbox_min": [-0.3, -0.2, 0.0], "bbox_max": [0.3, 0.2, 0.25], "voxel_size": 0.0075}
    data = {**box, "dims": [80, 54, 34], "dynamic_tags": [], "grasp_cells": "upstream"}
    vocab, ws, conv = grid_of_meta(data)
    assert vocab.dims == (80, 54, 34) and ws == REAL and conv == "upstream"
    model = {"vocab": {"dims": [80, 54, 34], "dynamic_tags": []}, "workspace": {**box, "grasp_cells": "scene_grid"}}
    assert grid_of_meta(model)[2] == "scene_grid"
    with pytest.raises(ValueError, match="does not record its workspace or grasp_cells"):
        grid_of_meta({"vocab": model["vocab"], "workspace": None})
