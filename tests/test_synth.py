import numpy as np
import pytest

from graspGPT.data.grammar import parse
from graspGPT.data.synth import (GRIPPER_MAX_OPENING, SynthError, generate_scene, generate_scenes,
                                 parse_task_mix, scene_geometry_of)
from graspGPT.data.visibility import random_camera, visible_mask
from graspGPT.data.vocab import Vocab, Workspace

REAL = Workspace()
COARSE = Workspace(voxel_size=0.03)


def samples(ws, task, n, seed=0):
    vocab = Vocab.for_workspace(ws)
    return [parse(ids, vocab, strict=True) for ids in generate_scenes(n, seed, ws, task_mix=task)], vocab


def test_same_seed_same_ids_and_scene_independent_of_count():
    a = list(generate_scenes(4, 11, COARSE))
    b = list(generate_scenes(6, 11, COARSE))
    c = list(generate_scenes(4, 12, COARSE))
    assert all(x.dtype == np.int64 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b[:4]))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c))
    r1, r2 = list(generate_scenes(2, 3)), list(generate_scenes(2, 3, REAL))
    assert all(np.array_equal(x, y) for x, y in zip(r1, r2))


def test_geometry_does_not_depend_on_task_mix():
    (g,), vocab = samples(COARSE, "grasp", 1, seed=5)
    (u,), _ = samples(COARSE, "unseg", 1, seed=5)
    assert np.array_equal(np.sort(np.concatenate([b.cells for b in g.scene])), u.scene[0].cells)


def test_scene_geometry_of_gives_the_objects_of_the_written_scene():
    """scene_geometry_of(i) is scene i of generate_scenes, whatever the task mix: the written tags and
    ground-truth grasps, the cells of every object, and each object's primitive kind."""
    vocab = Vocab.for_workspace(COARSE)
    grasp = [parse(ids, vocab, strict=True) for ids in generate_scenes(6, 7, COARSE, task_mix="grasp")]
    mixed = [parse(ids, vocab, strict=True) for ids in generate_scenes(6, 7, COARSE, task_mix="grasp=0.5,unseg=0.5")]
    for i, (written, other) in enumerate(zip(grasp, mixed)):
        geo = scene_geometry_of(i, 7, COARSE)
        assert sorted(geo.tags) == sorted(b.tag for b in written.scene)
        assert sorted((b.tag, *b.cells) for b in written.grasps) == \
            sorted((t, *row) for t, rows in zip(geo.tags, geo.grasps) for row in rows.tolist())
        cells = np.sort(vocab.cell_ids(np.concatenate(geo.cells)))
        assert np.array_equal(cells, np.sort(np.concatenate([b.cells for b in other.scene])))
        assert len(geo.kinds) == len(geo.tags) and set(geo.kinds) <= {"box", "cylinder", "lying_cylinder", "sphere"}


@pytest.mark.parametrize("ws", [REAL, COARSE], ids=["real", "coarse"])
def test_grasp_layout_objects_and_grasp_physics(ws):
    vocab = Vocab.for_workspace(ws)
    scenes, _ = samples(ws, "grasp", 12, seed=1)
    diag = ws.voxel_size * np.sqrt(3)
    with_grasps = total = 0
    for s in scenes:
        assert s.amodal is None and s.unseg is None and s.grasps is not None
        tags = [b.tag for b in s.scene]
        assert 2 <= len(tags) <= 6 and len(set(tags)) == len(tags)
        assert all(vocab.is_object_tag(t) for t in tags)
        owner = {}
        for b in s.scene:
            cells = vocab.cells_of(b.cells)
            assert cells[:, 2].min() == 0  # resting on the table
            for c in b.cells.tolist():
                assert c not in owner, "two objects share a cell"
                owner[c] = b.tag
        occ = np.zeros(tuple(d + 2 for d in ws.dims), np.int64)  # padded tag grid, -1 free
        occ[:] = -1
        for b in s.scene:
            c = vocab.cells_of(b.cells) + 1
            occ[c[:, 0], c[:, 1], c[:, 2]] = b.tag

        firsts = [int(g.cells[0]) for g in s.grasps]
        assert firsts == sorted(firsts)
        per_object = {t: 0 for t in tags}
        for g in s.grasps:
            assert g.tag in per_object and len(g.cells) == 3
            per_object[g.tag] += 1
            left, right, base = vocab.cells_of(g.cells)
            pl, pr = ws.cell_center(np.array([left, right]))
            assert np.linalg.norm(pl - pr) <= GRIPPER_MAX_OPENING + diag
            for finger in (left, right):
                assert owner.get(vocab.cell_id(*finger), g.tag) == g.tag  # not inside another object
                around = occ[finger[0]:finger[0] + 3, finger[1]:finger[1] + 3, finger[2]:finger[2] + 3]
                assert (around == g.tag).any(), "finger cell is not on the object's surface"
            assert vocab.cell_id(*base) not in owner, "gripper base inside an object"
        assert max(per_object.values()) <= 100
        with_grasps += sum(n > 0 for n in per_object.values())
        total += len(tags)
    assert with_grasps >= 0.9 * total


def test_amodal_layout():
    scenes, vocab = samples(REAL, "amodal", 6, seed=2)
    for s in scenes:
        assert [b.tag for b in s.scene] == [vocab.incomplete]
        assert s.unseg is None and s.amodal is not None
        seen, full = s.scene[0].cells, s.amodal
        assert np.isin(seen, full).all()
        assert 0 < len(seen) < len(full)  # one view never sees the whole scene
        assert all(g.tag == vocab.incomplete for g in s.grasps) and s.grasps


def test_unseg_layout():
    scenes, vocab = samples(REAL, "unseg", 6, seed=3)
    for s in scenes:
        assert [b.tag for b in s.scene] == [vocab.unlabel]
        assert s.amodal is None and 2 <= len(s.unseg) <= 6
        parts = np.concatenate([b.cells for b in s.unseg])
        assert len(np.unique(parts)) == len(parts)
        assert np.array_equal(np.sort(parts), s.scene[0].cells)
        assert all(vocab.is_object_tag(b.tag) for b in s.unseg)
        assert all(g.tag == vocab.unlabel for g in s.grasps) and s.grasps


def test_coarse_grid_gives_much_shorter_sequences():
    real = [len(x) for x in generate_scenes(6, 4, REAL)]
    coarse = [len(x) for x in generate_scenes(6, 4, COARSE)]
    assert np.mean(coarse) < 0.6 * np.mean(real)
    assert Vocab.for_workspace(COARSE).dims == (20, 14, 9)


def test_max_grasps_per_object():
    for s in samples(COARSE, "grasp", 5, seed=6)[0]:
        assert len(s.grasps) > 0
    vocab = Vocab.for_workspace(COARSE)
    s = generate_scene(np.random.default_rng(0), COARSE, vocab, "grasp", max_grasps_per_object=3)
    tags, counts = np.unique([g.tag for g in s.grasps], return_counts=True)
    assert counts.max() <= 3
    s = generate_scene(np.random.default_rng(0), COARSE, vocab, "grasp", max_grasps_per_object=0)
    assert s.grasps == []


def test_parse_task_mix():
    assert parse_task_mix("grasp") == {"grasp": 1.0}
    mix = parse_task_mix("grasp=0.6, amodal=0.2,unseg=0.2")
    assert mix == pytest.approx({"grasp": 0.6, "amodal": 0.2, "unseg": 0.2})
    assert parse_task_mix("grasp=3,unseg=1") == pytest.approx({"grasp": 0.75, "unseg": 0.25})
    assert parse_task_mix("grasp=1,unseg=0") == {"grasp": 1.0}
    for bad, words in [("graps", "unknown task"), ("grasp=x", "not a number"), ("grasp=0", "sum"),
                       ("grasp=-1,unseg=2", ">= 0"), ("grasp,grasp", "twice"), ("", "unknown task")]:
        with pytest.raises(SynthError, match=words):
            parse_task_mix(bad)


def test_task_mix_proportions():
    counts = {"grasp": 0, "amodal": 0, "unseg": 0}
    vocab = Vocab.for_workspace(COARSE)
    for ids in generate_scenes(200, 9, COARSE, task_mix="grasp=0.6,amodal=0.2,unseg=0.2"):
        s = parse(ids, vocab)
        counts["amodal" if s.amodal is not None else "unseg" if s.unseg is not None else "grasp"] += 1
    assert 95 <= counts["grasp"] <= 145
    assert 20 <= counts["amodal"] <= 60 and 20 <= counts["unseg"] <= 60


def test_bad_arguments():
    vocab = Vocab.for_workspace(COARSE)
    with pytest.raises(SynthError, match="unknown task"):
        generate_scene(np.random.default_rng(0), COARSE, vocab, "detect")
    with pytest.raises(SynthError, match="differ"):
        generate_scene(np.random.default_rng(0), REAL, vocab, "grasp")
    with pytest.raises(SynthError, match="seed"):
        next(generate_scenes(1, -1))
    with pytest.raises(SynthError, match="num_scenes"):
        next(generate_scenes(-2, 0))


def test_progress_bar_goes_to_stderr(capsys):
    list(generate_scenes(3, 0, COARSE, progress=True))
    out = capsys.readouterr()
    assert out.out == "" and "3/3" in out.err


# -- visibility ---------------------------------------------------------------

def test_column_seen_from_above_and_from_the_side():
    dims = (20, 20, 20)
    column = np.array([[5, 5, z] for z in range(6)])
    m = visible_mask(column, dims, camera=np.array([5.5, 5.5, 100.0]))
    assert m.tolist() == [False] * 5 + [True]
    m = visible_mask(column, dims, camera=np.array([80.0, 5.5, 30.0]))
    assert m.all()  # a one-cell column is seen whole from the side


def test_wall_hides_what_is_behind_it():
    dims = (30, 30, 12)
    wall = np.array([[10, y, z] for y in range(5, 25) for z in range(10)])
    behind = np.array([[4, 15, 0], [5, 14, 1]])
    cells = np.concatenate([wall, behind])
    m = visible_mask(cells, dims, camera=np.array([60.0, 15.5, 20.0]))
    assert not m[-2:].any()
    assert m[:-2].any()
    m = visible_mask(cells, dims, camera=np.array([-40.0, 15.5, 20.0]))
    assert m[-2:].all()  # the same cells from the other side


def test_random_camera_and_scene_visibility():
    dims = REAL.dims
    rng = np.random.default_rng(0)
    for _ in range(20):
        cam = random_camera(rng, dims)
        centre = np.array(dims) / 2
        d = cam - centre
        elevation = np.degrees(np.arcsin(d[2] / np.linalg.norm(d)))
        assert 30 - 1e-9 <= elevation <= 70 + 1e-9
        assert cam[2] > dims[2]
    block = np.argwhere(np.ones((12, 10, 15), bool)) + [30, 20, 0]
    m = visible_mask(block, dims, np.random.default_rng(1))
    assert 0 < m.sum() < len(block)
    assert m[block[:, 2] == 14].all()  # the whole top face is seen from any camera above
    interior = (block[:, 0] > 30) & (block[:, 0] < 41) & (block[:, 1] > 20) & (block[:, 1] < 29) & (block[:, 2] < 14)
    assert not m[interior].any()
    with pytest.raises(ValueError, match="rng"):
        visible_mask(block, dims)


def test_worker_processes_give_the_same_scenes(tmp_path):
    """Scenes generated by several processes are byte-identical to one process's, in order."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        subprocess.run([sys.executable, "-m", "graspGPT.data", "synth", "--out", str(out), "--num_scenes", "40",
                        "--seed", "5", "--voxel_size", "0.03", "--task_mix", "grasp=1,amodal=1,unseg=1",
                        "--workers", str(workers)], cwd=repo, check=True, capture_output=True)
        outs.append(out)
    for name in ("tokens.u32", "offsets.i64"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_too_coarse_a_grid_is_a_clear_error():
    with pytest.raises(SynthError, match="too coarse.*at most 0.035"):
        next(generate_scenes(1, 0, Workspace(voxel_size=0.04)))


def test_config_limit_matches_the_generator():
    from graspGPT.config import MAX_SYNTH_VOXEL
    from graspGPT.data.synth import MAX_VOXEL_SIZE
    assert MAX_SYNTH_VOXEL == MAX_VOXEL_SIZE
