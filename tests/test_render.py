import numpy as np
import pytest
from PIL import Image

from graspGPT.data.grammar import Block, GrammarError, Sample
from graspGPT.data.render import PREDICTED, SIZE, render_sample, render_tokens
from graspGPT.data.synth import generate_scene, generate_scenes
from graspGPT.data.vocab import Vocab, Workspace

REAL = Workspace()
COARSE = Workspace(voxel_size=0.03)


def open_png(path):
    img = Image.open(path)
    assert img.format == "PNG" and img.size == SIZE
    return np.asarray(img.convert("RGB"))


def colours(pixels, limit=100_000):
    return len(Image.fromarray(pixels).getcolors(limit))


def is_predicted(pixels):
    d = np.abs(pixels.astype(int) - np.array(PREDICTED)).sum(-1)
    return d < 40


@pytest.mark.parametrize("ws", [REAL, COARSE], ids=["real", "coarse"])
def test_render_grasp_scene_with_and_without_predictions(tmp_path, ws):
    vocab = Vocab.for_workspace(ws)
    s = generate_scene(np.random.default_rng(0), ws, vocab, "grasp")
    render_sample(s, vocab, tmp_path / "gt.png", title="ground truth")
    render_sample(s, vocab, tmp_path / "pred.png", predicted=s.grasps[::10])
    gt, pred = open_png(tmp_path / "gt.png"), open_png(tmp_path / "pred.png")
    assert colours(gt) > 50
    assert is_predicted(pred).sum() > 50 > is_predicted(gt).sum()
    # Every object colour shows up: the scene blocks are drawn.
    assert (np.abs(gt.astype(int) - gt[0, 0]).sum(-1) > 60).mean() > 0.02


def test_render_tokens_for_each_layout(tmp_path):
    vocab = Vocab.for_workspace(COARSE)
    for task in ("grasp", "amodal", "unseg"):
        (ids,) = generate_scenes(1, 3, COARSE, task_mix=task)
        render_tokens(ids, vocab, tmp_path / f"{task}.png")
        assert colours(open_png(tmp_path / f"{task}.png")) > 20
    with pytest.raises(GrammarError):
        render_tokens(np.array([vocab.end]), vocab, tmp_path / "bad.png")


def test_render_edge_cases(tmp_path):
    vocab = Vocab.for_workspace(COARSE)
    render_sample(Sample(), vocab, tmp_path / "empty.png")
    open_png(tmp_path / "empty.png")
    # Model output may hold short grasps or stray non-voxel ids; they are drawn or skipped, never fatal.
    scene = [Block(vocab.object_tag(3), vocab.cell_ids(np.array([[5, 5, 0], [5, 5, 1]])))]
    odd = [Block(vocab.unlabel, np.array([vocab.cell_id(4, 5, 1)])),
           Block(vocab.unlabel, np.array([vocab.cell_id(4, 5, 1), vocab.end, vocab.cell_id(6, 5, 1)])),
           Block(vocab.unlabel, vocab.cell_ids(np.array([[4, 5, 1], [6, 5, 1], [5, 5, 4], [5, 5, 5]])))]
    render_sample(Sample(scene=scene, grasps=[]), vocab, tmp_path / "odd.png", predicted=odd)
    assert is_predicted(open_png(tmp_path / "odd.png")).any()


def test_grasp_points_follow_the_grasp_cell_convention():
    """Pictures place grasp cells where their convention puts them, in scene-cell units (voxel c spans [c, c+1))."""
    from graspGPT.data.render import _gripper_lines, _grasp_points

    v = Vocab.for_workspace(REAL)
    g = Block(v.object_tag(1), v.cell_ids([[60, 10, 5], [66, 10, 5], [63, 10, 12]]))
    np.testing.assert_allclose(_grasp_points(g, v, REAL, "scene_grid"), [[60.5, 10.5, 5.5], [66.5, 10.5, 5.5], [63.5, 10.5, 12.5]])
    # upstream: (c + 0.5) * step / voxel with step = extent / (dims - 1); x: 60.5 * (0.6 / 79) / 0.0075
    up = _grasp_points(g, v, REAL, "upstream")
    assert up[0, 0] == pytest.approx(60.5 * 0.6 / 79 / 0.0075) and up[2, 2] == pytest.approx(12.5 * 0.25 / 33 / 0.0075)
    # a posed grasp is drawn as a U: two fingers, the palm, a stem; a 2-cell grasp as its finger line
    assert len(_gripper_lines(up)) == 4 and len(_gripper_lines(up[:2])) == 1
