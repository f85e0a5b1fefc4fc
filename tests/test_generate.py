"""Generation: prompts, lenient reading, grammar-constrained batched decoding with a KV cache, the CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY, launch, run_ok, write_config
from graspGPT.data.grammar import Block, GrammarState, parse, read_output
from graspGPT.data.storage import DatasetWriter, TokenStore
from graspGPT.data.synth import generate_scenes
from graspGPT.data.vocab import Vocab, Workspace
from graspGPT.decoding import (GenerateError, _sample_tokens, accepts, allowed_masks, decode, decode_many, grasp_list,
                               prompt_state, scene_prompt, task_of, task_prompt, truth_of)
from graspGPT.grasp_metrics import valid_grasps
from graspGPT.model import GraspGPT, GraspGPTConfig

COARSE = Workspace(voxel_size=0.03)
VOCAB = Vocab.for_workspace(COARSE)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(block_size: int = 1024, seed: int = 0) -> GraspGPT:
    torch.manual_seed(seed)
    return GraspGPT(GraspGPTConfig(vocab_size=VOCAB.size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))


@pytest.fixture(scope="module")
def scenes() -> list[np.ndarray]:
    return list(generate_scenes(9, seed=3, workspace=COARSE, task_mix="grasp=1,amodal=1,unseg=1",
                                max_grasps_per_object=4))


# -- prompts and reading ----------------------------------------------------------------------

def test_prompts_per_task(scenes):
    tasks = set()
    for ids in scenes:
        truth = parse(ids, VOCAB)
        task = task_of(truth)
        tasks.add(task)
        scene = scene_prompt(ids, VOCAB)
        assert scene[0] == VOCAB.scene and len(scene) == 1 + sum(len(b) for b in truth.scene)
        prompt = task_prompt(ids, VOCAB, task)
        assert (prompt[: len(scene)] == scene).all()
        assert len(prompt) == len(scene) + (task == "grasp") and (task != "grasp" or prompt[-1] == VOCAB.detectgrasp)
    assert tasks == {"grasp", "amodal", "unseg"}
    with pytest.raises(GenerateError, match="does not start with 'scene'"):
        scene_prompt(np.array([VOCAB.end]), VOCAB)


def test_read_output_matches_parse_and_reads_broken_output(scenes):
    for ids in scenes:
        p, r = parse(ids, VOCAB), read_output(ids, VOCAB)
        assert [(b.tag, b.cells.tolist()) for b in r.scene] == [(b.tag, b.cells.tolist()) for b in p.scene]
        assert [(b.tag, b.cells.tolist()) for b in r.grasps] == [(b.tag, b.cells.tolist()) for b in p.grasps]
        for a, b in ((r.amodal, p.amodal), (r.unseg, p.unseg)):
            assert (a is None) == (b is None)
        if p.amodal is not None:
            assert r.amodal.tolist() == p.amodal.tolist()
        if p.unseg is not None:
            assert [(b.tag, b.cells.tolist()) for b in r.unseg] == [(b.tag, b.cells.tolist()) for b in p.unseg]
    v = VOCAB
    c = [v.cell_id(1, 2, 3), v.cell_id(4, 5, 6), v.cell_id(7, 8, 0), v.cell_id(0, 0, 1)]
    obj = v.object_tag(5)
    # unfinished, a tag without `grasp`, a 2-cell grasp, a grasp without cells, a cut-off last grasp
    ids = [v.scene, obj, c[0], c[1], v.detectgrasp, v.grasp, obj, c[0], c[1], c[2], obj, c[3],
           v.grasp, obj, c[0], c[1], v.grasp, v.grasp, obj, c[2]]
    got = read_output(np.array(ids), v)
    assert [(g.tag, g.cells.tolist()) for g in got.grasps] == [(obj, c[:3]), (obj, c[:2]), (obj, [c[2]])]
    assert read_output(np.array(ids[:4] + [v.end, v.detectgrasp, v.grasp, obj, c[0]]), v).grasps is None


# -- decoding ---------------------------------------------------------------------------------

def test_constrained_decoding_of_untrained_model_is_always_valid(scenes):
    model = tiny_model()
    for ids in scenes[:3]:
        truth = truth_of(ids, VOCAB)
        prompt = task_prompt(ids, VOCAB, task_of(truth))
        out = decode(model, prompt, VOCAB, num_samples=20, max_new_tokens=400, seed=1)
        start = prompt_state(prompt, VOCAB)
        assert len(out.new) == 20 and out.ended.all()
        assert all(accepts(start, new) and new[-1] == VOCAB.end for new in out.new)
        scene_tags = {b.tag for b in truth.scene}
        for new in out.new:  # exactly 3 in-grid cells per grasp, tags of the scene; parses strictly
            sample = parse(np.concatenate([prompt, new]), VOCAB, strict=True)
            assert all(len(g.cells) == 3 and g.tag in scene_tags for g in sample.grasps or [])
        assert len({tuple(n.tolist()) for n in out.new}) > 1, "the rows of the batch are sampled independently"


def test_grounded_decoding_puts_every_finger_on_the_named_object(scenes):
    model = tiny_model()
    touching, plain, plain_near = 0, 0, 0
    for ids in scenes[:3]:
        prompt = task_prompt(ids, VOCAB, task_of(truth_of(ids, VOCAB)))
        blocks = {}
        for b in truth_of(ids, VOCAB).scene:
            blocks.setdefault(b.tag, []).append(VOCAB.cells_of(b.cells))
        for grounded in (True, False):
            out = decode(model, prompt, VOCAB, num_samples=16, max_new_tokens=300, seed=4, grounded=grounded)
            start = prompt_state(prompt, VOCAB)
            assert all(accepts(start, new) for new in out.new if out.ended.all())
            for new in out.new:
                for g in read_output(np.concatenate([prompt, new]), VOCAB).grasps or []:
                    cells = np.concatenate(blocks[g.tag])
                    near = [bool((np.abs(cells - c).max(axis=1) <= 1).any()) for c in VOCAB.cells_of(g.cells[:2])]
                    if grounded:
                        assert all(near), "a grounded finger off the named object"
                        touching += 1
                    else:
                        plain, plain_near = plain + 1, plain_near + all(near)
    assert touching >= 15 and plain >= 15 and plain_near < 0.8 * plain  # alone, an untrained model often misses


def test_sampling_follows_the_distribution_and_never_picks_a_masked_token():
    """Each row inverts its distribution's CDF at its own uniform draw: frequencies match the softmax
    (at the temperature), and tokens of probability 0 (masked, or outside the top k) never come out, even
    at the draws 0 and 1 - 1e-16."""
    logits = torch.tensor([0.0, 1.0, float("-inf"), 2.0, -1.0, float("-inf")]).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for temperature, top_k in ((1.0, None), (0.5, None), (1.0, 2)):
        tok = _sample_tokens(logits, [None] * len(u), temperature, top_k, u)
        expected = torch.softmax(logits[0] / temperature, -1)
        if top_k:
            expected[expected < expected.topk(top_k).values[-1]] = 0
            expected /= expected.sum()
        freq = torch.bincount(tok, minlength=6).double() / len(u)
        assert (freq - expected).abs().max() < 0.01, (temperature, top_k, freq)
        assert freq[expected == 0].sum() == 0
    edges = _sample_tokens(logits[:2], [None, None], 1.0, None, torch.tensor([0.0, 1 - 1e-16], dtype=torch.float64))
    assert edges.tolist() == [0, 4]
    # A cell temperature: ids >= 3 (the "cells") keep their share at the temperature, split at their own.
    tok = _sample_tokens(logits, [None] * len(u), 1.0, None, u, cell_temperature=0.5, voxel_base=3)
    freq = torch.bincount(tok, minlength=6).double() / len(u)
    p1 = torch.softmax(logits[0], -1)
    cells = torch.softmax(logits[0, 3:] / 0.5, -1) * p1[3:].sum()
    assert (freq[:3] - p1[:3]).abs().max() < 0.01 and (freq[3:] - cells).abs().max() < 0.01


def test_gripper_grounding_writes_only_physically_valid_grasps(scenes):
    """With the data's voxel size, grounded decoding also keeps to the gripper's shape: every grasp it
    writes on a grasp task's scene passes valid_grasps; finger grounding alone leaves an untrained
    model's grasps mostly invalid. (Completion and segmentation prompts are the scene alone, which the
    model may go on writing: grasps of objects it made up are not held.)"""
    model = tiny_model()
    rate = {}
    for voxel_size in (COARSE.voxel_size, None):
        valid = total = 0
        for ids in scenes:
            truth = truth_of(ids, VOCAB)
            if task_of(truth) != "grasp":
                continue
            prompt = task_prompt(ids, VOCAB, "grasp")
            scene = [(b.tag, VOCAB.cells_of(b.cells)) for b in truth.scene]
            out = decode(model, prompt, VOCAB, num_samples=16, max_new_tokens=200, seed=2, grounded=True,
                         voxel_size=voxel_size)
            for new in out.new:
                grasps = grasp_list(read_output(np.concatenate([prompt, new]), VOCAB).grasps, VOCAB)
                valid += valid_grasps(grasps, scene, VOCAB.dims, COARSE.voxel_size).sum()
                total += len(grasps)
        rate[voxel_size] = valid / total
        assert total >= 30
    assert rate[COARSE.voxel_size] == 1.0 and rate[None] < 0.7


def test_unconstrained_decoding_of_untrained_model_is_mostly_invalid(scenes):
    model = tiny_model()
    prompt = task_prompt(scenes[0], VOCAB, "grasp")
    out = decode(model, prompt, VOCAB, num_samples=20, max_new_tokens=60, constrained=False, seed=1)
    start = prompt_state(prompt, VOCAB)
    valid_rate = np.mean([accepts(start, n) for n in out.new])
    assert valid_rate <= 0.5
    assert all(len(n) <= 60 for n in out.new)


def test_truncated_decoding_stops_at_the_cap_and_stays_on_grammar(scenes):
    prompt = task_prompt(scenes[0], VOCAB, "grasp")
    out = decode(tiny_model(), prompt, VOCAB, num_samples=4, max_new_tokens=2, seed=0)
    assert all(len(n) <= 2 for n in out.new)
    for n in out.new:  # a prefix the grammar allows, finished or not
        prompt_state(prompt, VOCAB).feed(n)
    assert decode(tiny_model(), prompt, VOCAB, max_new_tokens=0).new[0].size == 0


def test_greedy_cached_decoding_equals_full_recomputation(scenes):
    """The KV cache, its copy into the batch rows and the positions give what a full forward gives."""
    model = tiny_model().eval()
    prompt = task_prompt(scenes[1], VOCAB, "grasp")
    out = decode(model, prompt, VOCAB, num_samples=3, max_new_tokens=25, temperature=0.0)
    assert all((n == out.new[0]).all() for n in out.new)
    state, seq = prompt_state(prompt, VOCAB, scene_tags_only=True), list(prompt)
    with torch.no_grad():
        for _ in range(len(out.new[0])):
            logits = model(torch.tensor([seq]))[0, -1].masked_fill(~allowed_masks([state], VOCAB.size, "cpu")[0],
                                                                   float("-inf"))
            t = int(logits.argmax())
            seq.append(t)
            state.advance(t)
    assert seq[len(prompt):] == out.new[0].tolist()


def test_prompts_batched_together_decode_as_each_alone(scenes):
    """Prompts of different lengths in one batch, several samples each: every row continues its own prompt
    (left padding, the key mask and the prompt's cache copied into its rows), as that prompt decoded alone."""
    model = tiny_model().eval()
    prompts = [task_prompt(scenes[i], VOCAB, task_of(truth_of(scenes[i], VOCAB))) for i in (0, 1, 2)]
    assert len({len(p) for p in prompts}) == 3
    together = decode_many(model, prompts, VOCAB, num_samples=2, max_new_tokens=20, temperature=0.0)
    for prompt, out in zip(prompts, together):
        alone = decode(model, prompt, VOCAB, num_samples=1, max_new_tokens=20, temperature=0.0)
        assert [n.tolist() for n in out.new] == [alone.new[0].tolist()] * 2


def test_sampling_is_seeded_and_top_k_one_is_greedy(scenes):
    model = tiny_model()
    prompt = task_prompt(scenes[2], VOCAB, task_of(truth_of(scenes[2], VOCAB)))
    a = decode(model, prompt, VOCAB, num_samples=3, max_new_tokens=40, seed=7)
    b = decode(model, prompt, VOCAB, num_samples=3, max_new_tokens=40, seed=7)
    assert [n.tolist() for n in a.new] == [n.tolist() for n in b.new]
    g = decode(model, prompt, VOCAB, max_new_tokens=40, temperature=0.0)
    k1 = decode(model, prompt, VOCAB, max_new_tokens=40, top_k=1, seed=3)
    assert g.new[0].tolist() == k1.new[0].tolist()


def test_lockstep_sync_adds_dummy_forwards_only(scenes):
    model = tiny_model()
    prompt = task_prompt(scenes[0], VOCAB, "grasp")
    alone = decode(model, prompt, VOCAB, num_samples=2, max_new_tokens=30, seed=2)
    extra = []

    def others_still_running(active: bool) -> bool:  # another rank needs 5 more steps after we finish
        if not active:
            extra.append(1)
        return active or len(extra) <= 5

    synced = decode(model, prompt, VOCAB, num_samples=2, max_new_tokens=30, seed=2, sync=others_still_running)
    assert [n.tolist() for n in synced.new] == [n.tolist() for n in alone.new]
    assert synced.forwards == alone.forwards + 5


def test_decode_cost_per_token_is_flat():
    """Tokens/s at a 2000-token prompt is within 2x of a 200-token prompt (KV cache, no recompute)."""
    model = tiny_model(block_size=2400).eval()
    cells = VOCAB.voxel_base + np.arange(VOCAB.num_cells)
    obj = VOCAB.object_tag(1)

    def rate(n_cells: int) -> float:
        """Decoded tokens per second, prefill excluded: (time of 1 + n steps - time of 1 step) / n."""
        prompt = np.concatenate([[VOCAB.scene, obj], cells[:n_cells], [VOCAB.detectgrasp]])
        best = 0.0
        for _ in range(3):  # best of 3: the machine may be busy
            one = decode(model, prompt, VOCAB, num_samples=2, max_new_tokens=1, constrained=False).seconds
            many = decode(model, prompt, VOCAB, num_samples=2, max_new_tokens=151, constrained=False, seed=0)
            assert many.forwards == 150
            best = max(best, 150 / max(many.seconds - one, 1e-6))
        return best

    short, long = rate(197), rate(1997)
    assert long > short / 2, (short, long)


def test_decode_errors(scenes):
    model = tiny_model(block_size=16)
    prompt = task_prompt(scenes[0], VOCAB, "grasp")
    assert len(prompt) > 16
    with pytest.raises(GenerateError, match="block size"):
        decode(model, prompt, VOCAB)
    bad = np.array([VOCAB.scene, VOCAB.cell_id(1, 1, 1)])  # a cell without a tag
    with pytest.raises(GenerateError, match="breaks the grammar"):
        decode(model, bad, VOCAB)
    with pytest.raises(GenerateError, match="num_samples"):
        decode(model, prompt[:10], VOCAB, num_samples=0)


# -- the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A real toolkit checkpoint (one CPU rank, TINY model, 4 steps) and a copy of its data set: the run
    trained on a data directory that is deleted afterwards, so everything here uses the checkpoint alone."""
    from graspGPT.data.source import builtin_dataset

    tmp = tmp_path_factory.mktemp("trained")
    d = TINY["dataset"]
    data = builtin_dataset(d["synthetic_scenes"], 42, d["synthetic_voxel_size"], "grasp", d["max_grasps_per_object"],
                           root=cache_dir)
    shutil.copytree(data, tmp / "train_data")
    cfg = write_config(tmp / "cfg.json", {"trainer": {"batch_size": 4, "micro_batch_size": 4, "max_iters": 4,
                                                      "save_every": 4, "eval_every": 4},
                                          "system": {"deterministic": False}})
    run_ok(launch(1, ["--config", str(cfg), "--output_dir", str(tmp / "out"), "--data_path", str(tmp / "train_data")],
                  cache_dir))
    shutil.rmtree(tmp / "train_data")
    return tmp / "out" / "checkpoint_iter_4", data


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graspGPT.generate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.ranks
def test_cli_writes_tokens_grasps_ply_png(trained, tmp_path):
    ckpt, data = trained
    out = tmp_path / "gen"
    proc = cli("--checkpoint", str(ckpt), "--data", str(data), "--index", "3", "--num_samples", "3",
               "--top_k", "50", "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "constrained: grammar-valid 3/3" in proc.stdout and "unconstrained: grammar-valid" in proc.stdout
    assert "with a gripper pose" in proc.stdout and "note:" not in proc.stderr
    store = TokenStore.open(data)
    truth = parse(store[3], store.vocab)
    for suffix in ("", "_free"):
        tokens = json.loads((out / f"tokens{suffix}.json").read_text())
        assert tokens["index"] == 3 and len(tokens["samples"]) == 3
        assert tokens["prompt"]["ids"] == task_prompt(store[3], store.vocab, "grasp").tolist()
        assert tokens["prompt"]["tokens"][0] == "scene" and tokens["prompt"]["tokens"][-1] == "detectgrasp"
        grasps = json.loads((out / f"grasps{suffix}.json").read_text())
        assert grasps["workspace"]["grasp_cells"] == "scene_grid" and grasps["grasp_step_m"] == [0.03] * 3
        assert grasps["tolerance"]["per_axis_m"] == [0.015] * 3 and "right-handed" in grasps["pose_frame"]
        for s in grasps["samples"]:
            for g in s["grasps"]:
                assert isinstance(g["correct"], bool)
                if len(g["cells"]) != 3:
                    assert g["pose"] is None and g["problem"]
                    continue
                # scene grid: a cell's point is its voxel centre, (c + 0.5) * voxel + bbox_min
                lo = np.array(store.workspace.bbox_min)
                left, right, base = (np.array(g["cells"]) + 0.5) * 0.03 + lo
                assert np.allclose([g["left_finger"], g["right_finger"], g["base"]], [left, right, base], atol=1e-4)
                if g["pose"] is None:
                    assert g["problem"]
                    continue
                pose, centre = g["pose"], (left + right) / 2
                approach = (centre - base) / np.linalg.norm(centre - base)
                closing = (right - left) - np.dot(right - left, approach) * approach
                closing /= np.linalg.norm(closing)
                assert np.allclose(pose["centre"], centre, atol=1e-4) and np.allclose(pose["approach"], approach, atol=1e-4)
                assert np.allclose(pose["closing"], closing, atol=1e-4)
                assert abs(pose["width"] - np.linalg.norm(right - left)) < 1e-4
                T = np.array(pose["transform"])
                assert np.allclose(T[:3, 0], closing, atol=1e-4) and np.allclose(T[:3, 2], approach, atol=1e-4)
                assert np.allclose(T[:3, 1], np.cross(approach, closing), atol=1e-4)
                assert np.allclose(T[:3, 3], centre, atol=1e-4) and T[3].tolist() == [0, 0, 0, 1]
        ply = (out / f"scene{suffix}.ply").read_text().splitlines()
        n = int(next(line for line in ply if line.startswith("element vertex")).split()[-1])
        n_grasp_points = sum(len(g["cells"]) for s in grasps["samples"] for g in s["grasps"])
        assert n == sum(len(b.cells) for b in truth.scene) + n_grasp_points
        assert len(ply) == ply.index("end_header") + 1 + n
        assert Image.open(out / f"scene{suffix}.png").format == "PNG"
    constrained = json.loads((out / "tokens.json").read_text())["samples"]
    assert all(s["grammar_valid"] and s["tokens"][-1] == "end" for s in constrained)
    one_by_one = tmp_path / "independent"  # each sample: 5 rows of one grasp, joined
    proc = cli("--checkpoint", str(ckpt), "--data", str(data), "--index", "3", "--num_samples", "2",
               "--independent_grasps", "5", "--out", str(one_by_one), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "constrained: grammar-valid 2/2" in proc.stdout and "unconstrained" not in proc.stdout
    samples = json.loads((one_by_one / "grasps.json").read_text())["samples"]
    assert len(samples) == 2 and all(len(s["grasps"]) <= 5 for s in samples)
    assert not (one_by_one / "tokens_free.json").exists()


@pytest.mark.ranks
def test_cli_bad_inputs_exit_2(trained, tmp_path):
    ckpt, data = trained
    proc = cli("--checkpoint", str(tmp_path / "nope"), "--data", str(data), "--index", "0")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "nope" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = cli("--checkpoint", str(ckpt), "--data", str(data), "--index", "64", "--device", "cpu")
    assert proc.returncode == 2 and "out of range" in proc.stderr and "0..63" in proc.stderr
    proc = cli("--checkpoint", str(ckpt), "--data", str(data), "--index", "0", "--independent_grasps", "-1")
    assert proc.returncode == 2 and "--independent_grasps must be >= 0" in proc.stderr
    other = tmp_path / "other"  # scenes on a finer grid: another vocabulary
    ws = Workspace(voxel_size=0.02)
    with DatasetWriter(other, Vocab.for_workspace(ws), ws, "test") as w:
        for ids in generate_scenes(2, 0, ws, max_grasps_per_object=2):
            w.add(ids)
    proc = cli("--checkpoint", str(ckpt), "--data", str(other), "--index", "0", "--device", "cpu")
    assert proc.returncode == 2 and "vocabulary" in proc.stderr
    assert "[20, 14, 9]" in proc.stderr and "[30, 20, 13]" in proc.stderr


@pytest.mark.ranks
def test_real_checkpoint_records_its_model_and_its_old_layout_loads(trained, tmp_path):
    """The trainer writes the whole record; the same checkpoint in the layout before the record loads the same."""
    from graspGPT.artifact import load_model

    ckpt, _ = trained
    state = json.loads((ckpt / "toolkit_state.json").read_text())
    assert state["model"] == {"vocab_size": VOCAB.size, "block_size": 512, "n_layer": 2, "n_head": 2, "n_embd": 32,
                              "n_kv_head": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "coordinate_embedding": True}
    assert state["workspace"]["grasp_cells"] == "scene_grid" and state["vocab"]["dims"] == [20, 14, 9]
    old = tmp_path / "old" / ckpt.name
    shutil.copytree(ckpt, old)
    shape = {k: state["model"][k] for k in ("n_layer", "n_head", "n_embd", "n_kv_head", "vocab_size",
                                            "coordinate_embedding")}
    vocab = {k: state["vocab"][k] for k in ("dims", "dynamic_tags", "vocab_size")}
    (old / "toolkit_state.json").write_text(json.dumps({**state, "model": shape, "vocab": vocab}))
    new_model, new_meta = load_model(ckpt)
    old_model, old_meta = load_model(old)
    assert {**old_meta, "source_checkpoint": None} == {**new_meta, "source_checkpoint": None}
    for (name, a), b in zip(new_model.state_dict().items(), old_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_batched_grammar_masks_equal_each_states_own_mask(scenes):
    """The (B, V) mask decoding builds at once holds exactly the tokens each row's GrammarState allows; None
    rows allow all."""
    states = []
    for ids in scenes[:4]:
        prompt = task_prompt(ids, VOCAB, task_of(truth_of(ids, VOCAB)))
        states.append(prompt_state(prompt, VOCAB, scene_tags_only=True))
        states.append(prompt_state(ids[: len(prompt) + 7], VOCAB, scene_tags_only=True))  # inside the answer
    states.append(None)
    got = allowed_masks(states, VOCAB.size, "cpu")
    for row, s in zip(got, states):
        allowed = None if s is None else s.allowed()
        expected = torch.tensor([allowed is None or t in allowed for t in range(VOCAB.size)])
        assert torch.equal(row, expected)
    assert len({tuple(r.nonzero().flatten().tolist()[:5]) for r in got}) > 2  # the rows really differ


def test_full_vocab_mask_speed():
    """On the real grid's vocabulary (147,219 ids) the mask is a few vectorized operations, not a loop over ids."""
    v = Vocab((80, 54, 34))
    st = GrammarState(v).feed([v.scene, v.object_tag(5), v.cell_id(40, 20, 10)])
    m = allowed_masks([st], v.size, "cpu")[0]
    assert m.shape == (147_219,)
    assert int(m.sum()) == (v.size - v.cell_id(40, 20, 10) - 1) + 91 + 4  # later cells, tags, 4 section openers

    # Timed against one vectorized O(V) operation, so a loaded machine slows both alike; a Python loop over
    # the vocabulary would be hundreds of times slower than that reference. Each side takes its best of
    # three, so a burst of load during one timing cannot fail the test; the 15 ms floor is still far under
    # a per-id Python loop writing a tensor (0.5 s here).
    def per_call(fn, n=200):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n

    reference = min(per_call(lambda: torch.zeros(v.size, dtype=torch.bool).fill_(True)) for _ in range(3))
    assert min(per_call(lambda: allowed_masks([st], v.size, "cpu")) for _ in range(3)) < 30 * reference + 15e-3


def test_output_frame_uses_the_models_grasp_cells(tmp_path):
    """Predicted grasps become metres with the model's training-data convention; a mismatch is noted."""
    from graspGPT.generate import output_frame

    ws = Workspace()
    with DatasetWriter(tmp_path / "d", Vocab.for_workspace(ws), ws, "test", grasp_cells="upstream") as w:
        w.add(Vocab.for_workspace(ws).encode(["scene", "end"]))
    store = TokenStore.open(tmp_path / "d")
    frame, note = output_frame({"workspace": {"grasp_cells": "upstream"}}, store)
    assert (frame.truth_cells, frame.predicted_cells, note) == ("upstream", "upstream", None)
    frame, note = output_frame({"workspace": {"grasp_cells": "scene_grid"}}, store)
    assert (frame.truth_cells, frame.predicted_cells) == ("upstream", "scene_grid") and "different grids" in note
    frame, note = output_frame({"workspace": None}, store)
    assert frame.predicted_cells == "upstream" and "does not record" in note


def test_grasp_records_in_the_upstream_convention():
    from graspGPT.generate import _grasp_records

    ws = Workspace()
    vocab = Vocab.for_workspace(ws)
    g = Block(vocab.object_tag(3), vocab.cell_ids([[39, 26, 13], [45, 26, 13], [42, 26, 20]]))
    short = Block(vocab.object_tag(3), vocab.cell_ids([[39, 26, 13], [45, 26, 13]]))
    rec, deg = _grasp_records([g, short], None, vocab, ws, "upstream")
    sx, sy, sz = 0.6 / 79, 0.4 / 53, 0.25 / 33  # the research grid: extent / (dims - 1)
    assert np.allclose(rec["left_finger"], [-0.3 + 39.5 * sx, -0.2 + 26.5 * sy, 13.5 * sz], atol=1e-5)
    assert np.allclose(rec["base"], [-0.3 + 42.5 * sx, -0.2 + 26.5 * sy, 20.5 * sz], atol=1e-5)
    assert abs(rec["pose"]["width"] - 6 * sx) < 1e-5 and rec["pose"]["approach"] == [0, 0, -1]
    assert rec["tag"] == "object03" and rec["correct"] is None
    assert deg["pose"] is None and deg["problem"].startswith("2 cells")
