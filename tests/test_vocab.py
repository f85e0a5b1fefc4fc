"""The vocabulary id layout must match existing GraspGPT data and checkpoints exactly."""
import json

import numpy as np
import pytest

from graspGPT.data.vocab import Vocab, VocabError, Workspace

DIMS = (80, 54, 34)


@pytest.fixture(scope="module")
def vocab():
    return Vocab(DIMS)


def test_real_vocab_size(vocab):
    assert vocab.size == len(vocab) == 147_219
    assert Vocab.for_workspace(Workspace()).size == 147_219


@pytest.mark.parametrize("token, i", [
    ("unknow", 0), ("unlabel", 1), ("incomplete", 2), ("object00", 3), ("object87", 90),
    ("scene", 91), ("segment", 92), ("endunseg", 93), ("amodal", 94), ("endamodal", 95),
    ("detectgrasp", 96), ("grasp", 97), ("end", 98), ("<serial1>", 99), ("<serial240>", 338),
])
def test_fixed_ids(vocab, token, i):
    assert vocab.id_of(token) == i
    assert vocab.token_of(i) == token


def test_named_ids(vocab):
    assert (vocab.unknow, vocab.unlabel, vocab.incomplete) == (0, 1, 2)
    assert (vocab.scene, vocab.end, vocab.voxel_base, vocab.serial_base) == (91, 98, 339, 99)
    assert vocab.object_tag(5) == 8 and vocab.object_tag(88) == vocab.unknow


def test_cell_ids(vocab):
    X, Y, Z = DIMS
    assert vocab.id_of((0, 0, 0)) == 339
    assert vocab.cell_id(0, 0, 1) == 340
    assert vocab.cell_id(0, 1, 0) == 339 + Z
    assert vocab.cell_id(1, 0, 0) == 339 + Y * Z
    x, y, z = 17, 40, 3
    assert vocab.cell_id(x, y, z) == 339 + (x * Y + y) * Z + z
    assert vocab.cell_id(X - 1, Y - 1, Z - 1) == vocab.size - 1
    assert vocab.token_of(vocab.size - 1) == (X - 1, Y - 1, Z - 1)


def test_classification(vocab):
    assert vocab.is_tag(0) and vocab.is_tag(90) and not vocab.is_tag(91)
    assert vocab.is_object_tag(3) and vocab.is_object_tag(90) and not vocab.is_object_tag(2)
    assert vocab.is_serial(99) and vocab.is_serial(338) and not vocab.is_serial(339)
    assert vocab.is_voxel(339) and vocab.is_voxel(vocab.size - 1) and not vocab.is_voxel(vocab.size)


def test_dynamic_tags_shift_later_ids(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"categories": ["mug", "bowl"]}))
    v = Vocab(DIMS, Vocab.read_categories(path))
    assert v.id_of("object87") == 90
    assert v.id_of("mug") == 91 and v.id_of("bowl") == 92
    assert v.is_tag(92) and not v.is_object_tag(92)
    assert v.scene == 93 and v.end == 100
    assert v.id_of("<serial1>") == 101
    assert v.voxel_base == 341 and v.cell_id(0, 0, 0) == 341
    assert v.size == 147_221
    assert v != Vocab(DIMS) and v == Vocab(DIMS, ["mug", "bowl"])
    assert v.to_meta() == {"dims": list(DIMS), "dynamic_tags": ["mug", "bowl"], "vocab_size": 147_221}


@pytest.mark.parametrize("content", ["not json", '["mug"]', '{"categories": "mug"}', '{"categories": [1, 2]}', '{}'])
def test_bad_categories_file(tmp_path, content):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(VocabError, match="vocab.json"):
        Vocab.read_categories(path)


def test_missing_categories_file(tmp_path):
    with pytest.raises(VocabError, match="cannot read"):
        Vocab.read_categories(tmp_path / "nope.json")


@pytest.mark.parametrize("tags", [["scene"], ["object05"], ["mug", "mug"]])
def test_clashing_dynamic_tags(tags):
    with pytest.raises(VocabError, match="dynamic tags"):
        Vocab(DIMS, tags)


def test_bad_dims():
    with pytest.raises(VocabError, match="dims"):
        Vocab((80, 54))
    with pytest.raises(VocabError, match="dims"):
        Vocab((80, 0, 34))


def test_encode_decode_round_trip(vocab):
    tokens = ["scene", "object05", (0, 0, 0), (79, 53, 33), "<serial7>", "detectgrasp", "grasp", "incomplete", (3, 2, 1), "end"]
    ids = vocab.encode(tokens)
    assert ids.dtype == np.int64
    assert ids.tolist() == [91, 8, 339, vocab.size - 1, 105, 96, 97, 2, vocab.cell_id(3, 2, 1), 98]
    assert vocab.decode(ids) == tokens


def test_cells_round_trip(vocab):
    rng = np.random.default_rng(0)
    cells = rng.integers(0, DIMS, size=(1000, 3))
    ids = vocab.cell_ids(cells)
    assert ids.min() >= vocab.voxel_base and ids.max() < vocab.size
    np.testing.assert_array_equal(vocab.cells_of(ids), cells)


@pytest.mark.parametrize("cell", [(80, 0, 0), (0, 54, 0), (0, 0, 34), (-1, 0, 0)])
def test_out_of_grid_cell(vocab, cell):
    with pytest.raises(VocabError, match=r"cell \(%d, %d, %d\) is outside the grid" % cell):
        vocab.cell_ids(np.array([[0, 0, 0], cell]))


@pytest.mark.parametrize("i", [-1, 147_219, 10**9])
def test_out_of_range_id(vocab, i):
    with pytest.raises(VocabError, match=f"id {i} is outside the vocabulary"):
        vocab.token_of(i)
    with pytest.raises(VocabError, match=f"token 1 has id {i}"):
        vocab.check_ids(np.array([91, i, 98]))


def test_non_voxel_and_unknown_tokens(vocab):
    with pytest.raises(VocabError, match="id 98 is not a voxel"):
        vocab.cells_of([339, 98])
    with pytest.raises(VocabError, match="unknown token 'object88'"):
        vocab.id_of("object88")
    vocab.check_ids(np.array([0, vocab.size - 1]))  # in range: no error


def test_workspace_dims():
    assert Workspace().dims == DIMS  # 0.6/0.0075 = 80.00000000000001 must not become 81
    coarse = Workspace(voxel_size=0.03)
    # ceil, not round or floor: 0.4/0.03 = 13.3 -> 14 and 0.25/0.03 = 8.3 -> 9
    assert coarse.dims == (20, 14, 9)
    assert Workspace((0, 0, 0), (1.0, 1.0, 1.0), 0.3).dims == (4, 4, 4)


def test_cell_of_point_floors():
    ws = Workspace()
    pts = np.array([
        [-0.3, -0.2, 0.0],  # the box corner is cell 0
        [-0.3 + 0.0074, -0.2 + 0.0076, 0.0149],  # just below / above a boundary
        [-0.3 - 1e-4, 0.0, 0.0],  # outside: floor goes negative, not toward zero
        [0.2999, 0.1999, 0.2499],
    ])
    np.testing.assert_array_equal(ws.cell_of_point(pts), [[0, 0, 0], [0, 1, 1], [-1, 26, 0], [79, 53, 33]])
    assert ws.in_bounds(ws.cell_of_point(pts)).tolist() == [True, True, False, True]
    centres = ws.cell_center(np.array([[0, 0, 0], [79, 53, 33]]))
    np.testing.assert_allclose(centres, [[-0.29625, -0.19625, 0.00375], [0.29625, 0.20125, 0.25125]])
    np.testing.assert_array_equal(ws.cell_of_point(centres), [[0, 0, 0], [79, 53, 33]])


def test_grasp_cell_conventions_by_hand():
    ws = Workspace()  # x -0.3..0.3, y -0.2..0.2, z 0..0.25, voxel 0.0075, dims (80, 54, 34)
    # scene grid: floor((p - min) / 0.0075), back to the voxel centre
    # x: 0.301 / 0.0075 = 40.13; y: 0.201 / 0.0075 = 26.8; z: 0.1 / 0.0075 = 13.3
    # x: 0.59 / 0.0075 = 78.7; y: 0.385 / 0.0075 = 51.3; z: 0.249 / 0.0075 = 33.2
    p = np.array([[0.001, 0.001, 0.1], [0.29, 0.185, 0.249]])
    np.testing.assert_array_equal(ws.grasp_cell_of_point(p, "scene_grid"), [[40, 26, 13], [78, 51, 33]])
    np.testing.assert_allclose(ws.grasp_point([[40, 26, 13]], "scene_grid"), [[0.00375, -0.00125, 0.10125]])
    np.testing.assert_allclose(ws.grasp_step("scene_grid"), [0.0075] * 3)
    # upstream: trunc((p - min) / extent * (dims - 1)); step extent / (dims - 1)
    step = np.array([0.6 / 79, 0.4 / 53, 0.25 / 33])
    np.testing.assert_allclose(ws.grasp_step("upstream"), step)
    # x: 0.301 / 0.6 * 79 = 39.63; y: 0.201 / 0.4 * 53 = 26.63; z: 0.1 / 0.25 * 33 = 13.2
    # x: 0.59 / 0.6 * 79 = 77.68; y: 0.385 / 0.4 * 53 = 51.01; z: 0.249 / 0.25 * 33 = 32.87
    np.testing.assert_array_equal(ws.grasp_cell_of_point(p, "upstream"), [[39, 26, 13], [77, 51, 32]])
    # back to the middle of the step: min + (c + 0.5) * step
    want = np.array([-0.3 + 39.5 * 0.6 / 79, -0.2 + 26.5 * 0.4 / 53, 13.5 * 0.25 / 33])
    np.testing.assert_allclose(ws.grasp_point([[39, 26, 13]], "upstream")[0], want, atol=1e-12)
    # the last cell holds only bbox_max: the point stays in the box
    np.testing.assert_allclose(ws.grasp_point([[79, 53, 33]], "upstream")[0], [0.3, 0.2, 0.25])
    # the two grids differ: x = 0.001 is scene voxel 40 but upstream cell 39 (the off-by-one)
    with pytest.raises(VocabError, match="grasp_cells 'corner'"):
        ws.grasp_point([[0, 0, 0]], "corner")


def test_upstream_round_trip_stays_within_half_a_step():
    ws = Workspace()
    rng = np.random.default_rng(0)
    p = rng.uniform(ws.bbox_min, ws.bbox_max, size=(20000, 3))
    for conv in ("scene_grid", "upstream"):
        err = np.abs(ws.grasp_point(ws.grasp_cell_of_point(p, conv), conv) - p)
        assert (err <= ws.grasp_step(conv) / 2 + 1e-12).all()
