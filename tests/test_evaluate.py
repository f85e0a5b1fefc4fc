"""Evaluation: grasp metrics on hand-made cases, a model that knows the answers, the random baseline,
the evaluator split over ranks (ZeRO-3 in lock-step), and the command line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, launch, run_ok
from graspGPT.data.dataset import AugmentConfig, TrainingSamples, val_batches
from graspGPT.data.grammar import read_output
from graspGPT.data.storage import DatasetWriter, TokenStore
from graspGPT.data.synth import FINGER_LENGTH, GRIPPER_MAX_OPENING, generate_scenes
from graspGPT.data.vocab import Vocab, Workspace
from graspGPT.decoding import (BASE_ROUNDING, Decoded, GenerateError, Grounding, accepts, grasp_list, join_grasps,
                               prompt_state, task_prompt, truth_of)
from graspGPT.evaluation import (COUNT_KEYS, GRASP_SLOTS, TrainingEvaluator, checkpoint_metrics, evaluate_scene,
                                 evaluate_scenes, grasp_scenes, grasp_slots, prefix_precision, summarize,
                                 teacher_forced_grasps, validation_loss)
from graspGPT.grasp_metrics import (ROUNDING, GraspScore, SceneVoxels, correct_grasps, random_grasps, score_grasps,
                                    segmentation_counts, untagged, valid_grasps, voxel_iou)
from graspGPT.model import GraspGPT, GraspGPTConfig

COARSE = Workspace(voxel_size=0.03)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def g(tag, *cells):
    return tag, np.array(cells)


# -- metrics ----------------------------------------------------------------------------------

def test_grasp_matching_rule():
    truth = [g(5, (10, 10, 10), (14, 10, 10), (12, 10, 16)), g(6, (0, 0, 0), (3, 0, 0), (1, 0, 5))]
    pred = [
        g(5, (10, 10, 10), (14, 10, 10), (12, 10, 16)),  # exact
        g(5, (11, 9, 11), (13, 11, 9), (13, 9, 17)),  # every cell 1 voxel off (Chebyshev 1)
        g(5, (14, 10, 10), (10, 10, 10), (12, 10, 16)),  # fingers swapped
        g(5, (12, 10, 10), (14, 10, 10), (12, 10, 16)),  # left finger 2 voxels off
        g(5, (14, 10, 10), (10, 10, 10), (12, 10, 18)),  # swapped, base 2 off
        g(6, (10, 10, 10), (14, 10, 10), (12, 10, 16)),  # right cells, another object's tag
        g(7, (0, 0, 0), (3, 0, 0), (1, 0, 5)),  # a tag no ground-truth grasp has
        g(6, (0, 0, 0), (3, 0, 0)),  # two cells against three
        g(5, (12, 10, 16), (14, 10, 10), (10, 10, 10)),  # base and a finger swapped: not symmetric
    ]
    assert correct_grasps(pred, truth).tolist() == [True, True, True, False, False, False, False, False, False]
    assert correct_grasps(pred[3:4], truth, tol=2).tolist() == [True]
    assert correct_grasps([], truth).tolist() == [] and correct_grasps(pred[:1], []).tolist() == [False]
    # without tags the two grasps under a wrong or unknown tag count; cell counts and geometry still rule
    assert correct_grasps(untagged(pred), untagged(truth)).tolist() == [True, True, True, False, False, True, True,
                                                                       False, False]
    s = score_grasps(pred, truth)
    assert (s.predicted, s.correct, s.objects, s.covered) == (9, 3, 2, 1)
    assert s.precision == pytest.approx(3 / 9) and s.coverage == 0.5
    both = s + score_grasps([g(6, (1, 1, 1), (3, 0, 0), (1, 0, 5))], truth)
    assert (both.predicted, both.correct, both.objects, both.covered) == (10, 4, 4, 2)
    assert GraspScore().precision == 0.0 and GraspScore().coverage == 0.0


def test_iou_and_segmentation_accuracy():
    assert voxel_iou([1, 2, 3, 4], [3, 4, 5]) == pytest.approx(2 / 5)
    assert voxel_iou([2, 2, 3], [3, 2]) == 1.0 and voxel_iou([], []) == 1.0 and voxel_iou([], [1]) == 0.0
    truth = [(10, np.array([1, 2, 3, 4])), (11, np.array([5, 6]))]
    pred = [
        (10, np.array([1, 2, 3])),  # 4 left out
        (11, np.array([3, 5, 7])),  # 3 given two tags; 7 is not in the truth (ignored)
        (12, np.array([6])),  # 6 gets the wrong tag
    ]
    assert segmentation_counts(pred, truth) == (3, 6)  # cells 1, 2 and 5
    assert segmentation_counts(truth, truth) == (6, 6)
    assert segmentation_counts([], truth) == (0, 6) and segmentation_counts(pred, []) == (0, 0)
    # tags are GraspNet object ids: renaming the objects is wrong, not a permutation to search
    assert segmentation_counts([(11, np.array([1, 2, 3, 4])), (10, np.array([5, 6]))], truth) == (0, 6)


def test_random_grasps_stay_on_the_objects():
    rng = np.random.default_rng(0)
    scene = [(5, np.array([[0, 0, 0], [1, 0, 0]])), (9, np.array([[10, 10, 3]]))]
    grasps = random_grasps(rng, scene, 400, dims=(20, 14, 9))
    assert len(grasps) == 400 and {t for t, _ in grasps} == {5, 9}
    for tag, cells in grasps:
        assert cells.shape == (3, 3) and (cells >= 0).all() and (cells < [20, 14, 9]).all()
        own = dict(scene)[tag]
        assert (np.abs(cells[:, None] - own[None]).max(-1).min(-1) <= 1).all()  # within one voxel of the object
    corner = {tuple(c) for t, cells in grasps if t == 5 for c in cells.tolist()}
    assert len(corner) == 3 * 2 * 2  # x in -1..2 clipped to 0..2, y and z in 0..1: the whole grown region
    assert random_grasps(rng, scene, 0, (20, 14, 9)) == [] and random_grasps(rng, [], 5, (20, 14, 9)) == []


def test_random_baseline_is_poor_on_the_real_grid():
    ws = Workspace()
    vocab = Vocab.for_workspace(ws)
    rng = np.random.default_rng(1)
    total = GraspScore()
    for ids in generate_scenes(6, seed=5, workspace=ws, max_grasps_per_object=16):
        truth = truth_of(ids, vocab)
        scene = [(b.tag, vocab.cells_of(b.cells)) for b in truth.scene]
        true = grasp_list(truth.grasps, vocab)
        total = total + score_grasps(random_grasps(rng, scene, 200, vocab.dims), true)
        assert score_grasps(true, true).precision == 1.0
    assert total.predicted == 1200 and total.precision < 0.01


def _box(lo, hi):
    return np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)


def test_physical_validity_of_hand_made_grasps():
    """At 1 cm voxels the gripper's finger length is 5 cells and its opening at most 8.5 (+1.7 for rounding)."""
    A, B, LONG = 3, 4, 5  # tags
    scene = [(A, _box((5, 5, 0), (7, 7, 3))), (B, _box((14, 5, 0), (15, 7, 3))), (LONG, _box((30, 20, 0), (41, 20, 2)))]
    dims, vox = (50, 30, 15), 0.01

    def ok(tag, *cells):
        return bool(valid_grasps([(tag, np.array(cells))], scene, dims, vox)[0])

    # Across A's x extent from above: contacts beside it, opening 4 cells, base 5 cells up.
    assert ok(A, (4, 6, 2), (8, 6, 2), (6, 6, 7))
    assert ok(A, (8, 6, 2), (4, 6, 2), (6, 6, 7))  # the fingers' order does not matter
    assert ok(A, (6, 4, 1), (6, 8, 1), (6, 6, 6))
    assert not ok(B, (4, 6, 2), (8, 6, 2), (6, 6, 7))  # the fingers are on A, not on the object named
    assert not ok(7, (4, 6, 2), (8, 6, 2), (6, 6, 7))  # a tag the scene does not hold
    assert not ok(A, (2, 6, 2), (8, 6, 2), (5, 6, 7))  # the left finger does not touch A
    assert not ok(A, (4, 5, 2), (4, 7, 2), (-1, 6, 2))  # both on one side: the closing segment misses A
    assert not ok(A, (4, 6, 2), (8, 6, 2), (6, 6, 4))  # base 2 cells from the contacts, not 5
    assert not ok(A, (4, 6, 2), (8, 6, 2), (11, 6, 2))  # approach along the closing direction
    assert not ok(A, (4, 6, 2), (8, 6, 2))  # not three cells
    assert not ok(LONG, (29, 20, 1), (42, 20, 1), (35, 20, 6))  # opening 13 cm
    assert ok(LONG, (35, 19, 1), (35, 21, 1), (35, 20, 6))
    grasp = [(A, np.array([(4, 6, 2), (8, 6, 2), (6, 6, 7)]))]
    # The left finger, swept up to the base's level, runs into a cell of another object.
    assert valid_grasps(grasp, scene + [(8, np.array([[4, 6, 5]]))], dims, vox).tolist() == [False]
    # The left finger's cell lies inside another object.
    assert valid_grasps(grasp, scene + [(9, _box((3, 6, 0), (4, 6, 3)))], dims, vox).tolist() == [False]


def _scene_voxels(voxel_size: float, seed: int):
    """One built-in scene's objects (tag, cells) and their SceneVoxels."""
    from graspGPT.grasp_metrics import SceneVoxels
    ws = Workspace(voxel_size=voxel_size)
    vocab = Vocab.for_workspace(ws)
    ids = next(iter(generate_scenes(1, seed=seed, workspace=ws)))
    scene = [(b.tag, vocab.cells_of(b.cells)) for b in read_output(task_prompt(ids, vocab, "grasp"), vocab).scene]
    return scene, SceneVoxels(scene, vocab.dims, voxel_size)


def test_the_sparse_first_pass_decides_segments_as_the_full_sampling_does():
    """SceneVoxels._through samples each segment's middle first, then every fourth point, and the rest only
    where those found nothing: the same answer as sampling every point, for segments crossing, grazing and
    missing the objects."""
    scene, voxels = _scene_voxels(0.0075, seed=3)
    rng = np.random.default_rng(0)
    for own, (_, cells) in enumerate(scene, start=1):
        a = cells[rng.integers(len(cells), size=400)] + rng.normal(0, 4, (400, 3))
        b = a + rng.normal(0, 6, (400, 3))
        full = (voxels._labels_along(a, b) == own).any(1)
        assert 0 < full.sum() < len(full)
        assert np.array_equal(voxels._through(own, a, b), full)
        sparse = voxels._labels_along(a, b, every=4)
        assert sparse.shape[1] < voxels._labels_along(a, b).shape[1]
        middle = voxels._labels_along(a, b, middle=True)[:, 0] == own
        assert middle.shape == (400,) and 0 < middle.sum() < full.sum()  # one of the samples, deciding some


@pytest.mark.parametrize("voxel", [0.0075, 0.03])
def test_base_cells_come_from_the_shell_as_from_the_whole_box(voxel):
    """SceneVoxels.base_cells tests only the cells of the shell where a base may lie (shell_offsets): the same
    cells, in the same order, as testing every cell of the box around it, at both roundings."""
    scene, voxels = _scene_voxels(voxel, seed=5)
    rng = np.random.default_rng(0)
    found = 0
    for own, (tag, _) in enumerate(scene, start=1):
        fingers = voxels.left_cells(tag)
        for left in fingers[rng.integers(len(fingers), size=6)]:
            for right in voxels.right_cells(tag, left)[:4]:
                for rounding in (ROUNDING, ROUNDING / 2):
                    r = FINGER_LENGTH / voxel + rounding
                    lo = np.maximum(np.floor((left + right) / 2 - r), 0).astype(int)
                    hi = np.minimum(np.ceil((left + right) / 2 + r), np.asarray(voxels.dims) - 1).astype(int)
                    box = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij"),
                                   -1).reshape(-1, 3)
                    want = box[voxels._base_ok(own, left, right, box, rounding)]
                    got = voxels.base_cells(tag, left, right, rounding)
                    assert np.array_equal(got, want)
                    found += len(got) > 0
    assert found > 20


@pytest.mark.parametrize("voxel", [0.0075, 0.015, 0.03])
def test_cells_asked_together_are_the_cells_asked_one_by_one(voxel):
    """Decoding asks for a step's rows together (right_cells_many, base_cells_many, Grounding.next_cells_many):
    the same cells, in the same order, as asking row by row; the second finger's as its definition says
    (within the opening, the closing segment sampled in full meeting the object)."""
    ws = Workspace(voxel_size=voxel)
    vocab = Vocab.for_workspace(ws)
    ids = next(iter(generate_scenes(1, seed=5, workspace=ws)))
    prompt = task_prompt(ids, vocab, "grasp")
    scene, voxels = _scene_voxels(voxel, seed=5)
    rng = np.random.default_rng(1)
    seconds, bases = [], []
    for tag, _ in scene:
        fingers = voxels.left_cells(tag)
        for left in fingers[rng.integers(len(fingers), size=8)]:
            seconds.append((tag, left))
            rights = voxels.right_cells(tag, left)
            bases += [(tag, left, right) for right in rights[rng.integers(len(rights), size=min(3, len(rights)))]]
    seconds.append((999, seconds[0][1]))  # a tag the scene does not hold: nothing
    together = voxels.right_cells_many(seconds)
    for (tag, left), got in zip(seconds, together):
        assert np.array_equal(got, voxels.right_cells(tag, left))
        fingers, own = voxels.left_cells(tag), voxels.label_of.get(tag)
        near = fingers[np.linalg.norm(fingers - left, axis=1) * voxel <= GRIPPER_MAX_OPENING + ROUNDING * voxel]
        assert np.array_equal(got, near[(voxels._labels_along(left, near) == own).any(1)] if own else near)
    assert sum(len(g) > 0 for g in together) >= len(seconds) - 1
    for rounding in (ROUNDING, BASE_ROUNDING):
        together = voxels.base_cells_many(bases, rounding)
        assert [g.tolist() for g in together] == [voxels.base_cells(*b, rounding).tolist() for b in bases]
        assert sum(len(g) > 0 for g in together) > len(bases) // 2
    asks = [(tag, vocab.cell_ids(np.array(cells).reshape(-1, 3)).tolist())
            for tag, left, right in bases for cells in ([], [left], [left, right])]
    asks += asks[:5] + [(vocab.incomplete, []), (999, [])]
    many = Grounding(prompt, vocab, voxel).next_cells_many(asks)
    one = Grounding(prompt, vocab, voxel)
    for ask, got in zip(asks, many):
        want = one.next_cells(*ask)
        assert (got is None and want is None) or np.array_equal(got, want)
    assert many[-1] is None and many[-2] is None and sum(g is not None for g in many) > len(asks) // 2


def test_the_boxes_around_fingers_find_other_objects_as_a_search_of_their_cells_does():
    """SceneVoxels._others_in (a summed-volume table) against a search of every other object's cells, for boxes
    inside, across the edge of and outside the grid."""
    scene, voxels = _scene_voxels(0.015, seed=4)
    rng = np.random.default_rng(0)
    lo = rng.uniform(-10, np.asarray(voxels.dims) + 5, (500, 3))
    hi = lo + rng.uniform(0, 12, (500, 3))
    for own in range(1, len(scene) + 1):
        others = np.argwhere((voxels.grid != 0) & (voxels.grid != own))
        want = [bool(np.all((others >= np.floor(a)) & (others <= np.ceil(b)), axis=1).any()) for a, b in zip(lo, hi)]
        assert voxels._others_in(own, lo, hi).tolist() == want
        assert 0 < sum(want) < len(want)


@pytest.mark.parametrize("voxel,scenes", [(0.03, 40), (0.0075, 6)])
def test_generator_grasps_are_valid_and_random_ones_mostly_not(voxel, scenes):
    ws = Workspace(voxel_size=voxel)
    vocab = Vocab.for_workspace(ws)
    rng = np.random.default_rng(0)
    good = bad = total = 0
    for ids in generate_scenes(scenes, seed=7, workspace=ws, max_grasps_per_object=24):
        truth = truth_of(ids, vocab)
        scene = [(b.tag, vocab.cells_of(b.cells)) for b in truth.scene]
        true = grasp_list(truth.grasps, vocab)
        good += valid_grasps(true, scene, vocab.dims, voxel).sum()
        bad += valid_grasps(random_grasps(rng, scene, len(true), vocab.dims), scene, vocab.dims, voxel).sum()
        total += len(true)
    assert total > 300 and good / total >= 0.95
    assert bad / total < (0.6 if voxel > 0.02 else 0.25)


@pytest.mark.parametrize("voxel,scenes", [(0.03, 12), (0.0075, 5)])
def test_decodings_base_shell_holds_nearly_every_true_base_and_is_snugger_than_validity(voxel, scenes):
    """Grounding puts a base only where the gripper's shape puts it, up to BASE_ROUNDING: a subset of what
    validity allows (so every grounded grasp stays valid) that still holds >= 0.99 of the generator's bases."""
    ws = Workspace(voxel_size=voxel)
    vocab = Vocab.for_workspace(ws)
    held = total = snug = loose = 0
    for ids in generate_scenes(scenes, seed=7, workspace=ws, max_grasps_per_object=6):
        truth = truth_of(ids, vocab)
        scene = [(b.tag, vocab.cells_of(b.cells)) for b in truth.scene]
        voxels = SceneVoxels(scene, vocab.dims, voxel)
        for tag, (left, right, base) in grasp_list(truth.grasps, vocab):
            if not voxels.valid([(tag, np.array([left, right, base]))])[0]:
                continue
            inner = {tuple(c) for c in voxels.base_cells(tag, left, right, BASE_ROUNDING)}
            outer = {tuple(c) for c in voxels.base_cells(tag, left, right, ROUNDING)}
            assert inner <= outer
            held += tuple(base) in inner
            total += 1
            snug, loose = snug + len(inner), loose + len(outer)
    assert total > 100 and held / total >= 0.99
    assert snug < 0.6 * loose


# -- a model that knows the answers -----------------------------------------------------------

class Oracle(torch.nn.Module):
    """Puts all the probability on the true next token of the data sample that its prompt begins."""

    def __init__(self, samples: list[np.ndarray], vocab_size: int, block_size: int = 4096):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the decoder a device
        self.cfg = SimpleNamespace(block_size=block_size)
        self.samples, self.vocab_size, self.current = [np.asarray(s) for s in samples], vocab_size, None

    def new_kv_cache(self, batch_size: int, max_len: int):
        k = torch.zeros(1, batch_size, 1, max_len, 1)
        return SimpleNamespace(k=k, v=k.clone(), batch_size=batch_size, max_len=max_len)

    def forward_cached(self, ids: torch.Tensor, cache, start_pos: int, last_only: bool = False,
                       key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if start_pos == 0 and ids.shape[1] > 1:  # a batch of left-padded prompts: find each one's sample
            self.current, self.pad = [], []
            for row in range(ids.shape[0]):
                pad = 0 if key_mask is None else int((~key_mask[row, :ids.shape[1]]).sum())
                prompt = ids[row, pad:].tolist()
                self.current.append(next(s for s in self.samples if s[: len(prompt)].tolist() == prompt))
                self.pad.append(pad)
        rows_per_prompt = max(1, ids.shape[0] // len(self.current))
        logits = torch.full((ids.shape[0], 1, self.vocab_size), -30.0)
        for b in range(ids.shape[0]):
            sample, pad = self.current[b // rows_per_prompt], self.pad[b // rows_per_prompt]
            logits[b, 0, int(sample[min(start_pos + ids.shape[1] - pad, len(sample) - 1)])] = 30.0
        return logits


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> TokenStore:
    """Nine coarse-grid samples, three of each task."""
    path = tmp_path_factory.mktemp("mixed") / "data"
    vocab = Vocab.for_workspace(COARSE)
    with DatasetWriter(path, vocab, COARSE, "test") as w:
        for ids in generate_scenes(9, seed=2, workspace=COARSE, task_mix="grasp=1,amodal=1,unseg=1",
                                   max_grasps_per_object=6):
            w.add(ids)
    return TokenStore.open(path)


def test_oracle_scores_perfectly_end_to_end(mixed, tmp_path):
    oracle = Oracle([mixed[i] for i in range(len(mixed))], mixed.vocab.size)
    # Finger grounding holds every true grasp; the gripper's shape turns away the few true grasps that
    # the validity check rejects (~3% on this coarse grid), and the oracle then writes valid ones instead.
    ev = TrainingEvaluator(mixed, np.arange(len(mixed)), 9, tmp_path, seed=3, num_samples=2, grounding="fingers")
    m = ev.run(oracle, step=7)
    shaped = TrainingEvaluator(mixed, np.arange(len(mixed)), 9, tmp_path, seed=3, num_samples=2).run(oracle, step=7)
    assert 0.95 <= shaped["grasp_precision"] < 1.0 and shaped["grasp_validity"] > m["grasp_validity"]
    assert m["scenes"] == 9
    for key in ("valid_rate", "grasp_precision", "grasp_coverage", "free_valid_rate", "free_grasp_precision",
                "free_grasp_coverage", "amodal_iou", "seg_accuracy", "any_tag_precision", "free_any_tag_precision",
                "grammar_valid_rate", "grammar_grasp_precision", "grammar_grasp_coverage"):
        assert m[key] == 1.0, key
    assert m["grasp_validity"] >= 0.9 and m["baseline_validity"] < m["grasp_validity"]
    assert m["baseline_precision"] <= m["baseline_any_tag_precision"]
    assert m["baseline_precision"] < 0.5 and m["grasps_per_sequence"] > 1
    assert Path(m["picture"]) == tmp_path / "eval" / "step_7.png"
    assert Image.open(m["picture"]).format == "PNG"
    cap = int(np.median(mixed.lengths))  # only scenes that fit the model are picked
    short = TrainingEvaluator(mixed, np.arange(len(mixed)), 9, tmp_path, max_len=cap).scenes
    assert 0 < len(short) < 9 and (mixed.lengths[short] <= cap).all()


def test_untrained_model_and_split_scenes_add_up(mixed):
    torch.manual_seed(0)
    model = GraspGPT(GraspGPTConfig(vocab_size=mixed.vocab.size, block_size=1024, n_layer=2, n_head=2, n_embd=32))
    scenes = np.arange(6)
    each = []
    whole, first = evaluate_scenes(model, mixed, scenes, seed=1, max_new_tokens=40, per_scene=each)
    assert [i for i, _, _ in each] == list(scenes)  # each scene's own counts, which add up to the whole
    assert all(sum(c[k] for _, c, _ in each) == whole[k] for k in COUNT_KEYS if k != "decode_seconds")
    assert [len(g) for _, _, g in each] == [c["predicted"] for _, c, _ in each]  # and its grasps
    a, _ = evaluate_scenes(model, mixed, scenes[0::2], seed=1, max_new_tokens=40)
    b, _ = evaluate_scenes(model, mixed, scenes[1::2], seed=1, max_new_tokens=40)
    alone, _ = evaluate_scenes(model, mixed, scenes, seed=1, max_new_tokens=40, scenes_per_batch=1)
    for k in COUNT_KEYS:  # a scene's samples do not depend on which scenes share its batch
        if k != "decode_seconds":
            assert whole[k] == a[k] + b[k] == alone[k], k
    assert first[0] == 0
    m = summarize(whole)
    assert whole["sequences"] == whole["free_sequences"] == 6 and m["scenes"] == 6
    assert m["free_valid_rate"] <= 0.5 and 0.0 <= m["grasp_precision"] <= 1.0
    c, grasps, truth = evaluate_scene(model, mixed[0], mixed.vocab, mixed.workspace.voxel_size, unconstrained=False,
                                      max_new_tokens=40)
    assert c["free_sequences"] == 0 and "free_valid_rate" not in summarize(c)



def test_join_grasps_keeps_each_rows_whole_distinct_grasp(mixed):
    vocab = mixed.vocab
    ids = next(mixed[i] for i in range(len(mixed)) if "detectgrasp" in vocab.decode(mixed[i]))
    prompt = task_prompt(ids, vocab, "grasp")
    first = ids[len(prompt) + 0: len(prompt) + 5]  # the data's first two grasp blocks: grasp, tag, 3 cells
    second = ids[len(prompt) + 5: len(prompt) + 10]
    assert first[0] == second[0] == vocab.grasp
    rows = [first, first, [vocab.end], first[:4], second, np.append(second[:4], vocab.grasp)]
    joined = join_grasps(Decoded(prompt, [np.asarray(r) for r in rows], np.zeros(6, bool), 5, 1.0), 3, vocab)
    # rows 0-2: one distinct grasp (the repeat and the `end` row add none); rows 3-5: a short row adds none
    assert [j.tolist() for j in joined.new] == [[*first, vocab.end], [*second, vocab.end]]
    assert joined.ended.all() and all(accepts(prompt_state(prompt, vocab), j) for j in joined.new)
    with pytest.raises(GenerateError, match="do not split"):
        join_grasps(Decoded(prompt, [first] * 4, np.zeros(4, bool), 1, 1.0), 3, vocab)


def test_independent_grasps_are_each_drawn_right_after_the_scene(mixed, tmp_path):
    oracle = Oracle([mixed[i] for i in range(len(mixed))], mixed.vocab.size)
    ev = TrainingEvaluator(mixed, np.arange(len(mixed)), 9, tmp_path, seed=3, grounding="fingers", independent=6)
    assert len(ev.scenes) == 3  # the grasp scenes of the nine
    m = ev.run(oracle, step=1)
    # Each of the 6 rows writes the first true grasp, the oracle's certainty: one distinct grasp, correct.
    assert m["grasp_precision"] == 1.0 and m["grasps_per_sequence"] == 1.0 and m["valid_rate"] == 1.0
    assert m["grammar_grasp_precision"] == 1.0 and "free_valid_rate" not in m  # no free rows
    torch.manual_seed(0)
    model = GraspGPT(GraspGPTConfig(vocab_size=mixed.vocab.size, block_size=1024, n_layer=2, n_head=2, n_embd=32))
    c, grasps, _ = evaluate_scene(model, mixed[int(ev.scenes[0])], mixed.vocab, mixed.workspace.voxel_size,
                                  independent=8, seed=2)
    assert c["sequences"] == c["grammar_sequences"] == 1 and len(grasps) == c["predicted"] <= 8
    assert c["feasible"] == c["predicted"]  # gripper grounding holds in every row
    amodal = next(i for i in range(len(mixed)) if i not in ev.scenes)
    with pytest.raises(GenerateError, match="grasp prompts only"):
        evaluate_scene(model, mixed[amodal], mixed.vocab, mixed.workspace.voxel_size, independent=8)

ZERO3_SCRIPT = '''
import argparse, json
import numpy as np, torch, deepspeed, torch.distributed as dist
from graspGPT.data.storage import TokenStore
from graspGPT.evaluation import TrainingEvaluator, evaluate_scenes, summarize
from graspGPT.model import GraspGPT, GraspGPTConfig

ap = argparse.ArgumentParser()
ap.add_argument("--local_rank", type=int)
ap.add_argument("--data")
ap.add_argument("--out")
args = ap.parse_args()
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # plain gloo, as the trainer uses on CPU
deepspeed.init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
store = TokenStore.open(args.data)
cfg = GraspGPTConfig(vocab_size=store.vocab.size, block_size=1024, n_layer=2, n_head=2, n_embd=32)
ds = {{"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": 3}},
      "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-3, "torch_adam": True}}}}}}
torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=ds):
    model = GraspGPT(cfg)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
module = engine.module
calls = [0]
forward_cached = module.forward_cached
def counted(*a, **k):
    calls[0] += 1
    return forward_cached(*a, **k)
module.forward_cached = counted
ev = TrainingEvaluator(store, np.arange(len(store)), 3, args.out, seed=0, temperature=0.0, max_new_tokens=40)
metrics = ev.run(module, step=3, rank=rank, world=world, lockstep=True)
# Independent grasps: the three grasp scenes of the nine, 2 on rank 0 and 1 on rank 1, 4 rows each.
each = TrainingEvaluator(store, np.arange(len(store)), 9, args.out, seed=0, temperature=0.0, independent=4)
independent = each.run(module, step=3, rank=rank, world=world, lockstep=True)
with deepspeed.zero.GatheredParameters(list(module.parameters())):
    weights = {{n: p.detach().clone() for n, p in module.named_parameters()}}
reference = None
if rank == 0:
    full = GraspGPT(cfg)
    full.load_state_dict(weights, strict=False)
    reference = [summarize(evaluate_scenes(full, store, e.scenes, e.seed, **e.options)[0]) for e in (ev, each)]
with open(f"{{args.out}}/rank{{rank}}.json", "w") as f:
    json.dump({{"metrics": [metrics, independent], "reference": reference, "calls": calls[0]}}, f)
'''


@pytest.mark.ranks
def test_zero3_ranks_decode_in_lockstep(mixed, tmp_path, cache_dir):
    """Three scenes on two ZeRO-3 ranks: uneven work (rank 1 runs a dummy round), the same forward calls
    on both, and the metrics one process gets evaluating every scene with the gathered weights; the same
    with independent grasps."""
    script = tmp_path / "zero3_eval.py"
    script.write_text(ZERO3_SCRIPT.format())
    out = tmp_path / "out"
    out.mkdir()
    run_ok(launch(2, ["--data", str(mixed.path), "--out", str(out)], cache_dir, script=script, timeout=240))
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["calls"] == r1["calls"] > 10
    for i in range(2):  # sequences, then independent grasps
        assert Path(r0["metrics"][i].pop("picture")).is_file() and "picture" not in r1["metrics"][i]
        for m in (r0["metrics"][i], r1["metrics"][i], r0["reference"][i]):
            for k in ("eval_seconds", "decode_tokens_per_s"):
                m.pop(k, None)
        assert r0["metrics"][i] == r1["metrics"][i] == r0["reference"][i]
        assert r0["metrics"][i]["scenes"] == 3


# -- the command line -------------------------------------------------------------------------

def write_exported(model: GraspGPT, vocab: Vocab, path: Path) -> Path:
    """An exported model directory in the format `python -m graspGPT.export` writes."""
    from safetensors.torch import save_file

    from graspGPT import artifact

    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != artifact.TIED},
              str(path / artifact.WEIGHTS_FILE))
    (path / "config.json").write_text(json.dumps(model.to_hf_config("float32")))
    meta = {"format": artifact.META_FORMAT, "format_version": artifact.META_VERSION,
            **artifact.ModelRecord(model.cfg, vocab).to_json(), "step": 0,
            "training_config": {"dataset": {"val_fraction": 0.3}, "system": {"seed": 4}}}
    (path / artifact.META_FILE).write_text(json.dumps(meta))
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graspGPT.evaluate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_table_json_and_errors(mixed, tmp_path):
    torch.manual_seed(0)
    model = GraspGPT(GraspGPTConfig(vocab_size=mixed.vocab.size, block_size=1024, n_layer=2, n_head=2, n_embd=32))
    ckpt = write_exported(model, mixed.vocab, tmp_path / "model")
    out = tmp_path / "metrics.json"
    proc = cli("--checkpoint", str(ckpt), "--data", str(mixed.path), "--num_scenes", "2", "--out", str(out),
               "--cell_temperature", "0.7", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    for text in ("grasp precision", "grammar only", "random", "grasp validity (physical)", "validation loss"):
        assert text in proc.stdout, text
    assert "precision after a true prefix" in proc.stdout and "cell3" in proc.stdout
    m = json.loads(out.read_text())
    assert m["scenes"] == 2 and m["split"] == "val" and 0 <= m["free_valid_rate"] <= 1
    assert 0 <= m["prefix_precision"] <= 1 and m["prefix_grasps"] > 0 and 0 <= m["tf_cell1_near"] <= 1
    assert 4 < m["val_loss"] < 12 and m["val_ppl"] == pytest.approx(np.exp(m["val_loss"]))
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == m
    _, val = mixed.split(0.3, 4)  # the checkpoint's training split
    assert len(val) == 3

    ws = Workspace(voxel_size=0.02)
    other = tmp_path / "other"
    with DatasetWriter(other, Vocab.for_workspace(ws), ws, "test") as w:
        for ids in generate_scenes(2, 0, ws, max_grasps_per_object=2):
            w.add(ids)
    for args, words in (((tmp_path / "missing", mixed.path), ["missing", "no such file"]),
                        ((ckpt, tmp_path / "nodata"), ["nodata"]),
                        ((ckpt, other), ["vocabulary", "[20, 14, 9]", "[30, 20, 13]"]),
                        ((ckpt, mixed.path, "--num_scenes", "0"), ["--num_scenes"]),
                        ((ckpt, mixed.path, "--cell_temperature", "0"), ["--cell_temperature"])):
        proc = cli("--checkpoint", str(args[0]), "--data", str(args[1]), *args[2:], "--device", "cpu")
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and all(w in proc.stderr for w in words), proc.stderr


def test_scene_choices_are_nested_and_fit_the_model():
    from graspGPT.evaluation import pick_scenes

    indices = np.arange(100, 500)
    lengths = np.where(np.arange(600) % 7 == 0, 5000, 100)  # every 7th sample too long for the model
    picks = {n: pick_scenes(indices, n, seed=0, lengths=lengths, max_len=1000) for n in (6, 12, 50, 1000)}
    assert all(np.all(np.diff(p) > 0) for p in picks.values())  # sorted, no repeats
    assert set(picks[6]) < set(picks[12]) < set(picks[50])  # more scenes extend fewer: comparable runs
    assert len(picks[1000]) == np.sum(lengths[indices] <= 1000) and np.all(lengths[picks[1000]] <= 1000)
    assert not np.array_equal(pick_scenes(indices, 12, seed=1), picks[12])  # the seed picks them
    assert len(pick_scenes(indices, 0, seed=0)) == 0


def test_validation_loss_is_the_mean_over_every_target_token(mixed):
    """The one validation loss (the trainer's and evaluate's): the summed loss of the batches over their
    target count, whatever the batching, with the model's training mode given back."""
    torch.manual_seed(0)
    model = GraspGPT(GraspGPTConfig(vocab_size=mixed.vocab.size, block_size=1024, n_layer=2, n_head=2, n_embd=32))
    samples = TrainingSamples(mixed, np.arange(5), 1024, AugmentConfig.none(), seed=0)
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(5):
            b = samples.batch(np.array([i]), epoch=0)
            s, n = model(b.input_ids, b.targets)
            total, count = total + float(s), count + int(n)
    model.train()
    for micro in (1, 2, 5):
        loss = validation_loss(model, samples, val_batches(samples.lengths, micro))
        assert loss == pytest.approx(total / count, rel=1e-5) and model.training
    assert validation_loss(model.eval(), samples, []) == 0.0 and not model.training


def test_evaluates_loss_is_the_trainers_under_a_training_cap_on_grasps(mixed):
    """With dataset.train_grasps_per_object the trainer's validation scores capped samples; evaluate's loss
    of the same checkpoint must score the same ones."""
    torch.manual_seed(0)
    model = GraspGPT(GraspGPTConfig(vocab_size=mixed.vocab.size, block_size=1024, n_layer=2, n_head=2, n_embd=32))
    scenes = grasp_scenes(mixed, np.arange(len(mixed)))  # 6 grasps an object
    capped = TrainingSamples(mixed, scenes, 1024, AugmentConfig.validation(2), seed=0)
    assert (capped.lengths < mixed.lengths[scenes]).all()
    want = validation_loss(model, capped, val_batches(capped.lengths, 4))
    got = checkpoint_metrics(model, mixed, scenes, train_grasps_per_object=2)["val_loss"]
    whole = checkpoint_metrics(model, mixed, scenes)["val_loss"]
    assert got == pytest.approx(want, rel=1e-6) and whole != pytest.approx(want, rel=1e-3)


def test_quality_configs_keep_a_ground_truth_dense_enough_for_the_bar():
    """A perfect model (fresh grasps from the generator's distribution) reaches the 0.8 precision bar
    only when the truth holds every grasp (<= 100 per object), not 32 (bench/grasp_ceiling.py)."""
    import importlib.util

    from graspGPT.config import load_config

    spec = importlib.util.spec_from_file_location("grasp_ceiling", REPO / "bench" / "grasp_ceiling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.ceiling(0.0075, 100, scenes=10).precision > 0.85
    assert bench.ceiling(0.0075, 32, scenes=10).precision < 0.8
    cfgs = {name: load_config(["--config", str(REPO / "configs" / f"quality_{name}.json")])
            for name in ("gpt-mini", "gpt2")}
    for cfg in cfgs.values():
        assert cfg.dataset.max_grasps_per_object >= 100 and cfg.dataset.synthetic_voxel_size == 0.0075
        # the recipe (docs/QUALITY_LAB.md): random order, loss on every token, 8 of the truth's 100 a sample
        d = cfg.dataset
        assert (d.grasp_order, d.loss_on, d.train_grasps_per_object) == ("random", "all", 8)


def test_the_lab_is_the_quickstart_with_more_validation_scenes():
    """What the lab measures is what the README's first command trains: the configs differ only in the
    validation split, whether it decodes grasps during training (the lab decodes after it, the same way)
    and where the run goes."""
    from graspGPT.config import load_config

    quick, lab = (load_config(["--config", str(REPO / "configs" / name)]).to_dict()
                  for name in ("quickstart.json", "quality_lab.json"))
    differ = {f"{section}.{key}" for section in quick for key in quick[section]
              if quick[section][key] != lab[section][key]}
    assert differ == {"dataset.val_fraction", "trainer.eval_scenes", "trainer.resume", "system.output_dir"}
    t = quick["trainer"]
    assert (t["eval_temperature"], t["eval_cell_temperature"], t["eval_independent_grasps"]) == (1.0, 0.3, 32)
    assert quick["dataset"]["grasp_order"] == "random"


# -- teacher-forced diagnostics of the grasp tokens -------------------------------------------

def test_grasp_slots_label_each_token_of_a_grasp_block():
    vocab = Vocab.for_workspace(COARSE)
    c = [vocab.cell_id(1, 2, 3), vocab.cell_id(4, 2, 3), vocab.cell_id(2, 2, 6), vocab.cell_id(5, 5, 5)]
    o5, o9 = vocab.object_tag(5), vocab.object_tag(9)
    ids = np.array([vocab.scene, o5, c[0], c[1], vocab.detectgrasp, vocab.grasp, o5, c[0], c[1], c[2],
                    vocab.grasp, o9, c[1], c[3], vocab.end])
    assert grasp_slots(ids, vocab).tolist() == [-1, -1, -1, -1, -1, -1, 0, 1, 2, 3, -1, 0, 1, 2, -1]
    assert (grasp_slots(ids[:4], vocab) == -1).all()  # no grasp section


def test_grasp_slots_mark_the_grasps_the_lenient_reader_reads(mixed):
    """One reader of the grammar: on cut and broken sequences too, the slots mark the grasp blocks of
    grammar.read_output (a block without a cell aside)."""
    vocab, rng = mixed.vocab, np.random.default_rng(0)
    for i in range(len(mixed)):
        ids = np.asarray(mixed[i], dtype=np.int64)
        for _ in range(20):
            seq = ids[: rng.integers(1, len(ids) + 1)].copy()
            where = rng.integers(0, len(seq), 3)
            seq[where] = rng.choice([vocab.grasp, vocab.scene, vocab.end, vocab.object_tag(1), vocab.voxel_base + 5], 3)
            slots = grasp_slots(seq, vocab)
            grasps = read_output(seq, vocab).grasps or []
            tags = [int(seq[p]) for p in np.flatnonzero(slots == 0) if p + 1 < len(seq) and slots[p + 1] == 1]
            assert tags == [g.tag for g in grasps]
            assert seq[slots > 0].tolist() == [c for g in grasps for c in g.cells.tolist()]


class ShiftedOracle(torch.nn.Module):
    """Puts probability `p` on the true next token moved by `shift` cells along x (tags: the true tag),
    the rest spread evenly over the vocabulary: teacher-forced scores then have closed forms."""

    def __init__(self, vocab: Vocab, shift: int, p: float = 1.0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.cfg = SimpleNamespace(block_size=4096)
        self.vocab, self.shift, self.p = vocab, shift, p

    def logits_at(self, ids: torch.Tensor, positions: torch.Tensor, chunk: int) -> list[torch.Tensor]:
        V = self.vocab.size
        probs = torch.full((len(positions), V), (1 - self.p) / V, dtype=torch.float64)
        for row, t in enumerate(positions.tolist()):
            target = int(ids[0, t + 1])
            if self.vocab.is_voxel(target):
                x, y, z = self.vocab.cells_of([target])[0]
                target = self.vocab.cell_id(min(x + self.shift, self.vocab.dims[0] - 1), y, z)
            probs[row, target] += self.p
        logits = probs.log().float()
        return [logits[lo: lo + chunk] for lo in range(0, len(positions), chunk)]


def test_teacher_forced_scores_have_their_closed_forms(mixed):
    vocab, scenes = mixed.vocab, np.arange(3)  # grasp-task samples among them
    exact = teacher_forced_grasps(ShiftedOracle(vocab, 0), mixed, scenes)
    for slot in GRASP_SLOTS:
        assert exact[f"tf_{slot}_top1"] == 1.0 and exact[f"tf_{slot}_near"] == pytest.approx(1.0)
        assert exact[f"tf_{slot}_loss"] < 1e-4
    one_off = teacher_forced_grasps(ShiftedOracle(vocab, 1), mixed, scenes)
    assert one_off["tf_tag_top1"] == 1.0 and one_off["tf_cell1_top1"] == 1.0  # within a voxel counts
    assert one_off["tf_cell2_near"] == pytest.approx(1.0) and one_off["tf_cell2_loss"] > 10
    two_off = teacher_forced_grasps(ShiftedOracle(vocab, 2), mixed, scenes)
    # only cells at the grid's far x edge (clamped to within a voxel) still count
    assert two_off["tf_cell1_top1"] < 0.5 and two_off["tf_cell1_near"] < 0.5
    uniform = teacher_forced_grasps(ShiftedOracle(vocab, 0, p=0.0), mixed, scenes)
    V = vocab.size
    assert uniform["tf_tag_loss"] == pytest.approx(np.log(V), rel=1e-5)
    assert uniform["tf_tag_near"] == pytest.approx(1 / V, rel=1e-4)
    assert 8 / V <= uniform["tf_cell3_near"] <= 27 / V  # the in-grid neighbours of each true cell


def test_logits_at_equals_the_full_logits_there(mixed):
    torch.manual_seed(0)
    model = GraspGPT(GraspGPTConfig(vocab_size=mixed.vocab.size, block_size=1024, n_layer=2, n_head=2, n_embd=32,
                                 voxel_grid=mixed.vocab.dims)).eval()
    ids = torch.from_numpy(np.asarray(mixed[0], dtype=np.int64))[None]
    T = ids.shape[1]
    positions = torch.tensor([0, 5, T - 1, 17, T // 2])
    got = torch.cat(list(model.logits_at(ids, positions, chunk=2)))
    with torch.no_grad():
        full = model(ids)[0, positions]
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    m = teacher_forced_grasps(model, mixed, np.arange(3))  # an untrained model: about uniform
    assert set(m) == {f"tf_{s}_{k}" for s in GRASP_SLOTS for k in ("loss", "top1", "near")}
    assert all(abs(m[f"tf_{s}_loss"] - np.log(mixed.vocab.size)) < 1.0 for s in GRASP_SLOTS)


class MisplacingOracle(Oracle):
    """The oracle, but every voxel it writes is moved two cells along x (kept on the grid)."""

    def __init__(self, samples, vocab: Vocab):
        super().__init__(samples, vocab.size)
        self.vocab = vocab

    def forward_cached(self, ids, cache, start_pos, last_only=False, key_mask=None):
        logits = super().forward_cached(ids, cache, start_pos, last_only, key_mask)
        for b, t in enumerate(logits[:, 0].argmax(-1).tolist()):
            if self.vocab.is_voxel(t):
                x, y, z = self.vocab.cells_of([t])[0]
                moved = self.vocab.cell_id(x + 2 if x + 2 < self.vocab.dims[0] else x - 2, y, z)
                logits[b, 0, t], logits[b, 0, moved] = -30.0, 30.0
        return logits


def test_prefix_precision_scores_one_grasp_after_true_prefixes(mixed):
    samples = [mixed[i] for i in range(len(mixed))]
    grasp_scenes = np.array([i for i in range(len(mixed)) if truth_of(mixed[i], mixed.vocab).grasps])
    m = prefix_precision(Oracle(samples, mixed.vocab.size), mixed, grasp_scenes, per_scene=3)
    assert m["prefix_precision"] == m["prefix_any_tag_precision"] == 1.0
    assert m["prefix_grasps"] == 3 * len(grasp_scenes)
    off = prefix_precision(MisplacingOracle(samples, mixed.vocab), mixed, grasp_scenes, per_scene=3)
    # each sampled grasp is the true next one moved two cells: right only where that lands on another true grasp
    expected = []
    for i in grasp_scenes:
        true = grasp_list(truth_of(mixed[i], mixed.vocab).grasps, mixed.vocab)
        for j in np.unique(np.linspace(0, len(true) - 1, 3).round().astype(int)):
            tag, cells = true[j]
            moved = cells.copy()
            moved[:, 0] = np.where(cells[:, 0] + 2 < mixed.vocab.dims[0], cells[:, 0] + 2, cells[:, 0] - 2)
            expected.append(correct_grasps([(tag, moved)], true)[0])
    assert off["prefix_precision"] == pytest.approx(np.mean(expected)) and off["prefix_precision"] < 0.5
    torch.manual_seed(0)
    model = GraspGPT(GraspGPTConfig(vocab_size=mixed.vocab.size, block_size=1024, n_layer=2, n_head=2, n_embd=32))
    a = prefix_precision(model, mixed, grasp_scenes, per_scene=2, seed=4)
    assert a == prefix_precision(model, mixed, grasp_scenes, per_scene=2, seed=4)  # seeded
    assert a["prefix_grasps"] == 2 * len(grasp_scenes) and 0.0 <= a["prefix_precision"] <= a["prefix_any_tag_precision"]


def test_grasp_misses_counts_true_grasps_as_hits_and_moved_ones_as_misses():
    """bench/grasp_misses.py: a scene's own grasps are all first-finger, pair and whole hits; the same grasps
    with the second finger moved three voxels keep their first finger and lose pair and whole."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("grasp_misses", REPO / "bench" / "grasp_misses.py")
    misses = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(misses)
    ws = Workspace(voxel_size=0.03)
    vocab = Vocab.for_workspace(ws)
    truth = misses.truths(["0", "1"], 5, ws, 8)
    exact, moved = {}, {}
    for i, objects in truth.items():
        for tag, (_, cells) in objects.items():
            exact.setdefault(i, []).extend([tag, *vocab.cell_ids(g)] for g in cells)
            shifted = cells.copy()
            shifted[:, 1, 0] = np.where(shifted[:, 1, 0] >= 3, shifted[:, 1, 0] - 3, shifted[:, 1, 0] + 3)
            moved.setdefault(i, []).extend([tag, *vocab.cell_ids(g)] for g in shifted)
    hits = misses.shares(misses.miss_counts(exact, truth, vocab)["all"])
    assert hits["grasps"] > 10 and hits["first"] == hits["pair"] == hits["whole"] == 1.0
    assert hits["second_off"]["0"] == 1.0
    off = misses.shares(misses.miss_counts(moved, truth, vocab)["all"])
    assert off["first"] == 1.0 and off["pair"] < 0.5 and off["whole"] <= off["pair"]


def test_grounding_benchmark_replays_true_grasps_with_repeats(monkeypatch, capsys):
    """bench/bench_grounding.py: the draws are the scene's own grasps, `distinct` of them new, the rest repeats
    of those; a run prints its milliseconds per grasp and per kind of call."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_grounding", REPO / "bench" / "bench_grounding.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ws = Workspace(voxel_size=0.03)
    vocab = Vocab.for_workspace(ws)
    truth = truth_of(next(iter(generate_scenes(1, 2, ws, max_grasps_per_object=8))), vocab)
    draws = bench.grasp_draws(truth, np.random.default_rng(0), 20, 0.25)
    true = {(g.tag, tuple(g.cells)) for g in truth.grasps}
    keys = [(tag, tuple(c)) for tag, c in draws]
    assert len(draws) == 20 and set(keys) <= true and len(set(keys)) == 5 and len(set(keys[:5])) == 5
    monkeypatch.setattr("sys.argv", ["bench_grounding.py", "--voxel_size", "0.03", "--scenes", "1", "--grasps", "8"])
    bench.main()
    line = json.loads(capsys.readouterr().out)
    assert line["ms_per_grasp"] > 0 and set(line["ms"]) == {"build", "first", "second", "base"}
    assert line["asked"] == "a step's rows together"
    monkeypatch.setattr("sys.argv", sys.argv + ["--one_by_one"])
    bench.main()
    assert json.loads(capsys.readouterr().out)["asked"] == "one by one"
    monkeypatch.setattr("sys.argv", ["bench_grounding.py", "--scenes", "0"])
    with pytest.raises(SystemExit) as bad:
        bench.main()
    assert bad.value.code == 2 and "--scenes >= 1" in capsys.readouterr().err


def test_paired_comparison_of_two_evaluations(tmp_path):
    """bench/paired.py: scene by scene over the scenes both evaluated; a run against itself differs by exactly
    nothing, and a run that is right on every grasp of every scene is ahead by 1 - precision."""
    rng = np.random.default_rng(0)
    scenes = [dict(index=i, predicted=10, correct=int(c), objects=3, covered=int(c > 0), feasible=10,
                   baseline_correct=0) for i, c in enumerate(rng.integers(0, 11, 30))]
    perfect = [dict(s, correct=10, covered=3) for s in scenes[:20]]  # evaluated on fewer scenes
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"results": [{"per_scene": scenes}]}))
    b.write_text(json.dumps({"results": [{"per_scene": scenes}, {"per_scene": perfect}]}))

    def paired(*specs):
        r = run_ok(subprocess.run([sys.executable, str(REPO / "bench" / "paired.py"), *map(str, specs)],
                                  capture_output=True, text=True))
        return json.loads(r.stdout)

    same = paired(a, f"{b}#0")
    assert same["scenes"] == 30 and same["precision_diff"] == 0.0 and same["precision_ci95"] == [0.0, 0.0]
    ahead = paired(a, f"{b}#1")
    base = sum(s["correct"] for s in scenes[:20]) / 200
    assert ahead["scenes"] == 20 and ahead["precision"] == [round(base, 4), 1.0]
    assert 0 < ahead["precision_ci95"][0] <= ahead["precision_diff"] <= ahead["precision_ci95"][1]
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "paired.py"), str(a), f"{b}#5"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "with #k below its number of results" in bad.stderr


def test_touching_cells_are_the_sorted_in_grid_cells_next_to_an_object():
    from graspGPT.grasp_metrics import touching_cells
    dims = (7, 5, 4)
    rng = np.random.default_rng(1)
    for cells in ([[0, 0, 0]], [[6, 4, 3], [3, 2, 1]], rng.integers(0, dims, (12, 3)), np.zeros((0, 3), int)):
        cells = np.asarray(cells).reshape(-1, 3)
        every = np.argwhere(np.ones(dims, bool))
        brute = [c for c in every.tolist() if len(cells) and (np.abs(cells - c).max(1) <= 1).any()]
        got = touching_cells(cells, dims)
        assert got.dtype == np.int64 and got.shape == (len(brute), 3) and got.tolist() == sorted(brute)
