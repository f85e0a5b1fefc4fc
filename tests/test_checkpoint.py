"""Checkpoint bookkeeping without DeepSpeed: resume forms, one run per output directory, file
verification, conversion decisions, RNG state without pickle, saving, retention, metrics, non-finite steps."""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import end_worker, free_port
from graspGPT import checkpoint
from graspGPT.artifact import ModelRecord
from graspGPT.checkpoint import CheckpointError, ResumePlan, Saver
from graspGPT.data.vocab import Vocab, Workspace
from graspGPT.engine import guard_nonfinite
from graspGPT.model import GraspGPTConfig
from graspGPT.observe import MetricsFile, NonFiniteError, NonFiniteSteps

WORKSPACE = Workspace(voxel_size=0.03)  # dims (20, 14, 9)


def record(vocab: Vocab = Vocab(WORKSPACE.dims), **model) -> ModelRecord:
    shape = dict(block_size=64, n_layer=2, n_head=2, n_embd=32, n_kv_head=2, voxel_grid=vocab.dims)
    return ModelRecord(GraspGPTConfig(vocab_size=vocab.size, **{**shape, **model}), vocab, WORKSPACE, "scene_grid")


RECORD = record()


class FakeEngine:
    """Writes one shard per save, as DeepSpeed's save_checkpoint would (rank 0 of a single process)."""

    def __init__(self):
        self.saved = []

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False  # `latest` is the toolkit's, written only once the checkpoint is complete
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / "mp_rank_00_model_states.pt").write_bytes(b"x" * (100 + len(self.saved)))
        self.saved.append(tag)


def make(out: Path, step: int, complete: bool = True, world: int = 1, stage: int = 2) -> Path:
    """A checkpoint directory as Saver writes it (complete) or as a killed save leaves it."""
    path = out / checkpoint.tag_for(step)
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"shard")
    state = {"step": step, "world_size": world, "zero_stage": stage, **RECORD.to_json()}
    (path / checkpoint.STATE_FILE).write_text(json.dumps(state))
    if complete:
        files = {f.name: f.stat().st_size for f in path.iterdir()}
        (path / checkpoint.MARKER).write_text(json.dumps({"step": step, "files": files}))
    return path


# -- where to resume from ------------------------------------------------------------------
def test_resume_forms(tmp_path):
    out = tmp_path / "out"
    c3, c6 = make(out, 3), make(out, 6)
    make(out, 9, complete=False)  # a save that was killed
    (out / "latest").write_text("checkpoint_iter_6\n")
    assert checkpoint.resolve_resume(None, out) is None
    assert checkpoint.resolve_resume("auto", out) == c6  # the newest complete one, never the half-written 9
    assert checkpoint.resolve_resume("auto", tmp_path / "empty") is None  # fresh start
    assert checkpoint.resolve_resume(str(c3), out) == c3
    assert checkpoint.resolve_resume(str(out / "latest"), out) == c6
    assert checkpoint.resolve_resume(str(out), out) == c6  # an output directory means its latest
    shutil.rmtree(c6)  # deleted by hand: latest names a directory that is gone
    with pytest.raises(CheckpointError, match=f"{out / 'latest'}: names 'checkpoint_iter_6', which is not there"):
        checkpoint.resolve_resume(str(out), out)
    assert checkpoint.resolve_resume("auto", out) == c3  # auto never trusts latest


@pytest.mark.parametrize("given,message", [
    ("missing/checkpoint_iter_5", "checkpoint not found"),
    ("out/checkpoint_iter_9", "incomplete checkpoint"),
    ("nolatest/latest", "no such file"),
])
def test_resume_errors_name_the_path(tmp_path, given, message):
    make(tmp_path / "out", 9, complete=False)
    with pytest.raises(CheckpointError, match=message) as e:
        checkpoint.resolve_resume(str(tmp_path / given), tmp_path / "out")
    assert str(tmp_path / given) in str(e.value)


def test_one_run_per_output_directory(tmp_path):
    out = tmp_path / "out"
    c3, c6 = make(out, 3), make(out, 6)
    make(out, 9, complete=False)
    checkpoint.check_output_dir(out, c6)  # resuming the newest: fine
    checkpoint.check_output_dir(tmp_path / "fresh", None)
    with pytest.raises(CheckpointError, match="checkpoint_iter_6, newer than checkpoint_iter_3"):
        checkpoint.check_output_dir(out, c3)
    with pytest.raises(CheckpointError, match="already holds checkpoints .* --resume auto"):
        checkpoint.check_output_dir(out, None)  # a fresh start would prune the other run's checkpoints
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        checkpoint.check_output_dir(out, make(tmp_path / "other", 3))


def test_plan_checks_model_vocabulary_and_files(tmp_path):
    out = tmp_path / "out"
    path = make(out, 3)
    plan = checkpoint.plan_resume("auto", out, 1, 2, RECORD.check_resume)
    assert plan == ResumePlan(path, json.loads((path / "toolkit_state.json").read_text()), convert=False)
    checkpoint.plan_resume("auto", out, 1, 2, record(block_size=128).check_resume)  # RoPE: any length works
    with pytest.raises(CheckpointError, match=r"model.n_embd is 32 in the checkpoint but 64 in this run") as e:
        checkpoint.plan_resume("auto", out, 1, 2, record(n_embd=64).check_resume)
    assert str(path / "toolkit_state.json") in str(e.value)
    with pytest.raises(CheckpointError, match=r"vocabulary dims is \[20, 14, 9\] in the checkpoint but \[9, 9, 9\]"):
        checkpoint.plan_resume("auto", out, 1, 2, record(Vocab((9, 9, 9))).check_resume)


def test_missing_or_truncated_files_are_named(tmp_path):
    path = make(tmp_path, 3)
    checkpoint.verify_files(path)
    shard = path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"sh")
    with pytest.raises(CheckpointError, match="2 bytes but 5 when saved .truncated") as e:
        checkpoint.verify_files(path)
    assert str(shard) in str(e.value)
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        checkpoint.verify_files(path)
    (path / "COMPLETE").write_text("{")
    with pytest.raises(CheckpointError, match="COMPLETE: unreadable"):
        checkpoint.verify_files(path)


def test_conversion_only_where_the_optimizer_state_is_cut_differently(tmp_path):
    path = make(tmp_path, 3, world=2, stage=2)
    state = checkpoint.read_state(path)
    assert not checkpoint.needs_conversion(path, state, world=2, zero_stage=2)
    assert checkpoint.needs_conversion(path, state, world=1, zero_stage=2)
    assert checkpoint.needs_conversion(path, state, world=2, zero_stage=1)
    with pytest.raises(CheckpointError, match="saved with ZeRO stage 2, but this run uses stage 3; resume with "
                                              "--zero_stage 1 or 2"):
        checkpoint.needs_conversion(path, state, world=2, zero_stage=3)
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()  # ZeRO 0 fp32: the whole state on every rank
    assert not checkpoint.needs_conversion(path, {**state, "zero_stage": 0}, world=3, zero_stage=0)


def test_changed_settings_are_listed():
    saved = {"trainer": {"learning_rate": 3e-3, "resume": None}, "system": {"output_dir": "a", "seed": 1}}
    now = {"trainer": {"learning_rate": 1e-3, "resume": "auto"}, "system": {"output_dir": "b", "seed": 1}}
    assert checkpoint.changed_settings(saved, now) == ["trainer.learning_rate 0.003 -> 0.001"]


# -- RNG state -------------------------------------------------------------------------------
def test_rng_round_trip_without_pickle(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    checkpoint._save_rng(tmp_path, rank=1)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.restore_rng(checkpoint.load_rng(tmp_path, rank=1))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    assert set(json.loads((tmp_path / "rng_rank1.json").read_text())) == {"python", "numpy"}
    assert (tmp_path / "rng_rank1.safetensors").read_bytes()[8:9] == b"{"  # a safetensors JSON header
    (tmp_path / "rng_rank1.json").write_text("[")
    with pytest.raises(CheckpointError, match="RNG state of rank 1 is damaged"):
        checkpoint.load_rng(tmp_path, rank=1)


def test_new_world_size_gets_fresh_reproducible_streams(tmp_path):
    plan = ResumePlan(tmp_path, {"step": 5, "world_size": 2}, convert=True)
    assert not checkpoint.resume_rng(plan, rank=0, world=1, seed=42)
    a = torch.rand(4)
    checkpoint.resume_rng(plan, rank=0, world=1, seed=42)
    assert torch.equal(torch.rand(4), a)
    checkpoint.resume_rng(ResumePlan(tmp_path, {"step": 6, "world_size": 2}, True), rank=0, world=1, seed=42)
    assert not torch.equal(torch.rand(4), a)


# -- saving and retention ----------------------------------------------------------------------
def test_saver_writes_complete_checkpoints_and_keeps_the_last_k(tmp_path):
    out, engine = tmp_path / "out", FakeEngine()
    save = Saver(engine, out, rank=0, keep_last=2, plan=None)
    assert save(0, {}) is None  # nothing to save before the first step
    for step in (2, 4, 6):
        path = save(step, {"config": {}})
        assert path == out / f"checkpoint_iter_{step}" and checkpoint.is_complete(path)
        assert (out / "latest").read_text() == f"checkpoint_iter_{step}\n"
        checkpoint.verify_files(path)
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["checkpoint_iter_4", "checkpoint_iter_6"]
    assert json.loads((out / "checkpoint_iter_6" / "toolkit_state.json").read_text())["step"] == 6
    listed = json.loads((out / "checkpoint_iter_6" / "COMPLETE").read_text())["files"]
    assert set(listed) == {"mp_rank_00_model_states.pt", "toolkit_state.json", "rng_rank0.json",
                           "rng_rank0.safetensors"}
    assert save(6, {}) is None and engine.saved == ["checkpoint_iter_2", "checkpoint_iter_4", "checkpoint_iter_6"]


def test_saver_never_touches_the_checkpoint_it_resumed_from(tmp_path):
    out, engine = tmp_path / "out", FakeEngine()
    resumed = make(out, 3)
    make(out, 5, complete=False)  # left by a killed save: replaced, not trusted
    (out / "checkpoint_iter_5" / "stale").write_text("?")
    save = Saver(engine, out, rank=0, keep_last=1, plan=ResumePlan(resumed, {"step": 3}, False))
    assert save(3, {}) is None  # a stop right after resuming: that step is on disk already
    save(5, {})
    save(7, {})
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["checkpoint_iter_3", "checkpoint_iter_7"]
    assert not (out / "checkpoint_iter_5").exists()  # pruned, with the leftover it replaced
    assert (resumed / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes() == b"shard"


def test_saver_writes_the_start_step_when_resumed_from_elsewhere(tmp_path):
    other = make(tmp_path / "other", 3)
    save = Saver(FakeEngine(), tmp_path / "out", rank=0, keep_last=1, plan=ResumePlan(other, {"step": 3}, True))
    assert save(3, {}) == tmp_path / "out" / "checkpoint_iter_3"  # so `--resume auto` finds it here
    assert checkpoint.is_complete(other)


# -- agreement between ranks -------------------------------------------------------------------
@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_agree_returns_or_raises_everywhere(one_rank_group):
    assert checkpoint.agree("cpu", lambda a, b: a + b, 2, 3) == 5

    def broken():
        raise CheckpointError("x: damaged")

    with pytest.raises(CheckpointError, match="x: damaged"):
        checkpoint.agree("cpu", broken)


# -- trainer helpers -----------------------------------------------------------------------
def test_metrics_file_drops_steps_after_the_resumed_one(tmp_path):
    path = tmp_path / "metrics_rank0.jsonl"
    m = MetricsFile(path, rank=0, start_step=0)
    for step in (1, 2, 3):
        m.write({"step": step, "loss": 1.0 / 3 + step, "grad_norm": float("nan")})
    m.close()
    path.write_text(path.read_text() + '{"step": 4, "lo')  # a line cut short by a kill
    m = MetricsFile(path, rank=0, start_step=2)
    m.write({"step": 3, "loss": 0.5})
    m.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0 / 3 + 1, "grad_norm": None},
                    {"step": 2, "loss": 1.0 / 3 + 2, "grad_norm": None}, {"step": 3, "loss": 0.5}]
    MetricsFile(tmp_path / "other.jsonl", rank=1, start_step=0).write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()  # rank 0 only


class PlainEngine:
    def __init__(self, model):
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)


def test_plain_optimizer_skips_a_nonfinite_step():
    model = torch.nn.Linear(3, 2)
    engine = PlainEngine(model)
    guard_nonfinite(engine)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.tensor([[1.0, float("nan"), 0.0]])).sum().backward()
    engine.optimizer.step()
    assert engine.optimizer.overflow and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not engine.optimizer.state  # Adam's moments untouched too
    engine.optimizer.zero_grad()
    model(torch.ones(1, 3)).sum().backward()
    engine.optimizer.step()
    assert not engine.optimizer.overflow and not torch.equal(before[0], model.weight)


def test_nonfinite_steps_are_counted_and_stop_past_the_limit(caplog):
    log = logging.getLogger("test_nonfinite")
    skips = NonFiniteSteps(limit=2, total=1, log=log)
    with caplog.at_level(logging.WARNING, logger="test_nonfinite"):
        for step, applied in ((1, True), (2, False), (3, False), (4, True), (5, False), (6, False)):
            skips.update(step, applied, 1.0 if applied else float("nan"))
        with pytest.raises(NonFiniteError, match="3 non-finite steps in a row .* the last checkpoint is intact"):
            skips.update(7, False, float("nan"))
    assert skips.total == 6 and "step 2: non-finite loss or gradient; the update was skipped" in caplog.text
    with pytest.raises(NonFiniteError, match="applied an update whose loss is nan"):
        NonFiniteSteps(2, 0, log).update(1, True, float("nan"))



def _two_ranks(rank: int, port: int, out: str) -> None:
    """Rank 1 fails where rank 0 does not, and they found different checkpoints: both must raise, rank 0
    with rank 1's message."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    seen = []

    def only_rank_1_fails():
        if rank == 1:
            raise CheckpointError("rank 1's copy is damaged")

    for call in (lambda: checkpoint.agree("cpu", only_rank_1_fails),
                 lambda: checkpoint.check_same_plan("cpu", ResumePlan(Path(out), {"step": 3 * rank}, False))):
        try:
            call()
            seen.append(None)
        except (CheckpointError, checkpoint.RankFailed) as exc:
            seen.append(f"{type(exc).__name__}: {exc}")
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    end_worker()


@pytest.mark.ranks
def test_disagreeing_ranks_all_raise(tmp_path):
    torch.multiprocessing.spawn(_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0[0] == "RankFailed: rank 1: rank 1's copy is damaged"  # rank 0 can print what rank 1 found
    assert r1[0] == "CheckpointError: rank 1's copy is damaged"
    assert r0[1] == r1[1] and "found different checkpoints to resume from (steps 0 to 3" in r0[1]
