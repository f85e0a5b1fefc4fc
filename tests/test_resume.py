"""Exact resume, preemption, crash safety, world-size change, bad checkpoints and non-finite steps,
on real DeepSpeed CPU ranks.

Ranks are started directly (RANK/WORLD_SIZE/MASTER_PORT, as torchrun would) rather than through the
deepspeed launcher, which saves two interpreter start-ups per run; test_train.py and the preemption
test here cover the launchers. Runs are shared: one uninterrupted run per (ranks, ZeRO stage) is the
reference for every test that resumes from it or compares with it.

Run as a script, this file is the trainer with faults injected from outside (see the bottom), so
the product carries no test hooks.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, Ranks, assert_refused, free_port, train_env, write_config
from graspGPT.runlock import LOCK_FILE, OutputLock, OutputLockError

HOOKED = Path(__file__)  # the trainer with fault hooks: this file run as a script
pytestmark = pytest.mark.ranks  # every test here runs ranks

S, K = 6, 3  # steps of a run, and the step it is stopped at and resumed from

# Dropout and every augmentation on, so exactness covers their random streams; eval at K and S.
RUN = {"model": {"dropout": 0.1},
       "trainer": {"max_iters": S, "save_every": K, "eval_every": K, "log_every": 1, "keep_last": 10},
       "dataset": {"amodal_prob": 0.25, "unseg_prob": 0.25}}


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> SimpleNamespace:
    """The run's config, and a DeepSpeed JSON whose buckets fit the tiny model (the default 2e8-element
    buckets cost seconds per step on CPU)."""
    d = tmp_path_factory.mktemp("resume_files")
    ds = json.loads((REPO / "deepspeed_config.json").read_text())
    ds["zero_optimization"].update(reduce_bucket_size=500_000, allgather_bucket_size=500_000,
                                   stage3_prefetch_bucket_size=100_000, stage3_param_persistence_threshold=0)
    (d / "ds.json").write_text(json.dumps(ds))
    return SimpleNamespace(cfg=write_config(d / "cfg.json", RUN), ds=d / "ds.json", dir=d)


def args(files, out: Path, stage: int, *more) -> list:
    return ["--config", files.cfg, "--deepspeed_config", files.ds, "--zero_stage", stage, "--output_dir", out, *more]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir, files):
    """reference(ranks, stage): output directory of one uninterrupted run of S steps (made once)."""
    runs = {}

    def get(ranks: int, stage: int) -> Path:
        if (ranks, stage) not in runs:
            d = tmp_path_factory.mktemp(f"reference_{ranks}r_zero{stage}")
            Ranks(ranks, args(files, d / "out", stage), cache_dir, d).ok()
            runs[ranks, stage] = d / "out"
        return runs[ranks, stage]

    return get


# -- reading results ---------------------------------------------------------------------
def metrics(out: Path) -> dict[int, dict]:
    lines = (out / "metrics_rank0.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def universal_state(ckpt: Path, work: Path) -> dict:
    """Every rank's optimizer state merged by DeepSpeed's universal-checkpoint converter: per parameter
    the fp32 weight, Adam's moments and step; plus the param groups' learning rates."""
    from deepspeed.checkpoint import ds_to_universal
    target = work / f"universal_{len(list(work.glob('universal_*')))}" / ckpt.name
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(SimpleNamespace(input_folder=str(ckpt), output_folder=str(target), num_extract_workers=1,
                                             num_merge_workers=1, keep_temp_folder=False, strict=True,
                                             inject_missing_state=True))
    state = {}
    for f in sorted((target / "zero").glob("*/*.pt")):
        t = torch.load(f, weights_only=True)
        state[f"{f.parent.name}/{f.stem}"] = t["param"] if isinstance(t, dict) else t
    common = torch.load(target / "zero" / "optimizer_state.pt", weights_only=False)  # written just now, by us
    state["lr"] = torch.tensor([g["lr"] for g in common["param_groups"]], dtype=torch.float64)
    for i, s in common.get("optimizer_state_dict", {}).get("state", {}).items():  # ZeRO 3 keeps the step here
        state[f"step{i}"] = s["step"]
    return state


def assert_same_state(a: Path, b: Path, work: Path) -> None:
    sa, sb = universal_state(a, work), universal_state(b, work)
    assert sa.keys() == sb.keys()
    assert sum(1 for k in sa if k.endswith("/exp_avg_sq")) >= 20  # every parameter, with Adam's moments
    differ = {k: int((sa[k] != sb[k]).sum()) for k in sa if not torch.equal(sa[k], sb[k])}
    assert not differ, f"elements that differ between {a} and {b}: {differ}"


def toolkit_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "toolkit_state.json").read_text())


# -- exact resume ------------------------------------------------------------------------
@pytest.mark.parametrize("ranks,stage", [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)])
def test_resume_is_bitwise_exact(tmp_path, cache_dir, files, reference, ranks, stage):
    """Resumed at K, the run logs the same per-step numbers and ends with the same weights and
    optimizer state, bit for bit, as the run that never stopped."""
    ref = reference(ranks, stage)
    out = tmp_path / "out"
    Ranks(ranks, args(files, out, stage, "--resume", ref / f"checkpoint_iter_{K}"), cache_dir, tmp_path).ok()
    expected = {s: m for s, m in metrics(ref).items() if s > K}
    assert metrics(out) == expected and sorted(expected) == list(range(K + 1, S + 1))
    assert_same_state(ref / f"checkpoint_iter_{S}", out / f"checkpoint_iter_{S}", tmp_path)
    log = (out / "training_rank_0.log").read_text()
    assert f"resumed from {ref / f'checkpoint_iter_{K}'} at step {K}" in log and "the data set differs" not in log
    done = (ref / "training_rank_0.log").read_text()
    assert "'amodal': 0," not in done and "'unseg': 0}" not in done  # the augmentations did run


def test_resume_with_packing_is_bitwise_exact(tmp_path, cache_dir, files):
    """Packed rows (dataset.pack_length) on 2 ranks, amodal/unseg on (samples can outgrow their room):
    resumed at K, across an epoch's end, the run is the uninterrupted one bit for bit."""
    packed = {**RUN, "model": {"dropout": 0.0}, "dataset": {**RUN["dataset"], "pack_length": 512},
              "trainer": {**RUN["trainer"], "batch_size": 4, "micro_batch_size": 1}}
    cfg = write_config(tmp_path / "packed.json", packed)
    ref, out = tmp_path / "ref", tmp_path / "out"
    run = ["--config", cfg, "--deepspeed_config", files.ds, "--zero_stage", 2]
    Ranks(2, [*run, "--output_dir", ref], cache_dir, tmp_path / "ref_logs").ok()
    Ranks(2, [*run, "--output_dir", out, "--resume", ref / f"checkpoint_iter_{K}"], cache_dir, tmp_path).ok()
    expected = {s: m for s, m in metrics(ref).items() if s > K}
    assert metrics(out) == expected and sorted(expected) == list(range(K + 1, S + 1))
    assert_same_state(ref / f"checkpoint_iter_{S}", out / f"checkpoint_iter_{S}", tmp_path)
    log = (ref / "training_rank_0.log").read_text()
    steps_per_epoch = int(log.split(" steps an epoch")[0].rsplit("; ", 1)[1])
    assert "packing: rows of 512 positions" in log and steps_per_epoch < S  # the run crossed an epoch


# -- preemption and crash safety ---------------------------------------------------------
def _wait_for(predicate, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_signals_and_a_killed_save_resume_to_the_same_run(tmp_path, cache_dir, files, reference):
    """One run, interrupted three ways and resumed with `--resume auto` each time, ends exactly like the
    uninterrupted one: SIGTERM to the launcher script, SIGUSR1 to one rank, SIGKILL during a save."""
    ref, out = reference(2, 2), tmp_path / "out"
    log = out / "training_rank_0.log"

    # 1. SIGTERM to run_deepspeed_training.sh once step 1 is done: it forwards to the ranks, which save.
    script = [str(REPO / "run_deepspeed_training.sh"), "--master_port", str(free_port())]
    launcher = subprocess.Popen([*script, *map(str, args(files, out, 2))], cwd=tmp_path,
                                env=train_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    _wait_for(lambda: log.exists() and "step 1/" in log.read_text(), "step 1")
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 0, output[-3000:]
    stopped = int((out / "latest").read_text().split("_")[-1])
    assert 1 <= stopped <= 4, f"the run reached step {stopped} before the signal took effect"
    assert f"saving at step {stopped}" in log.read_text()
    assert (out / f"checkpoint_iter_{stopped}" / "COMPLETE").is_file()

    # 2. SIGUSR1 to rank 1 alone at step 4 (sent by the rank to itself, so it lands at a known step).
    Ranks(2, args(files, out, 2, "--resume", "auto"), cache_dir, tmp_path / "leg2", {"HOOK_SIGNAL_AT": "4:1"},
          HOOKED).ok()
    assert (out / "latest").read_text().strip() == "checkpoint_iter_4"
    assert "stop requested by a signal on 1 rank(s): saving at step 4" in log.read_text()

    # 3. SIGKILL every rank while the save of step S is half written.
    leg3 = Ranks(2, args(files, out, 2, "--resume", "auto"), cache_dir, tmp_path / "leg3",
                 {"HOOK_STALL_SAVE": f"checkpoint_iter_{S}"}, HOOKED)
    half = out / f"checkpoint_iter_{S}"
    _wait_for(lambda: all((half / f"rng_rank{r}.json").exists() for r in (0, 1)), "the stalled save")
    with pytest.raises(OutputLockError, match=f"pid {leg3.procs[0].pid}, "):
        OutputLock.acquire(out)  # rank 0 holds the output directory while the run lives
    leg3.kill()
    assert not (half / "COMPLETE").exists() and (out / "latest").read_text().strip() == "checkpoint_iter_4"

    # 4. `auto` ignores the half-written checkpoint, resumes from step 4 and writes step S anew.
    Ranks(2, args(files, out, 2, "--resume", "auto"), cache_dir, tmp_path / "leg4").ok()
    assert "resumed from" in log.read_text() and f"checkpoint_iter_4 at step 4" in log.read_text()
    assert metrics(out) == metrics(ref)  # every step, as if never interrupted
    assert not (out / LOCK_FILE).exists()  # let go at the end (and the SIGKILLed holder never blocked leg 4)
    assert_same_state(ref / f"checkpoint_iter_{S}", half, tmp_path)


def test_a_rank_killed_during_a_save_is_reported_as_such(tmp_path, cache_dir, files):
    """Not as a disk problem: the survivor says a rank stopped; the half-written checkpoint is never used."""
    out = tmp_path / "out"
    run = Ranks(2, args(files, out, 2), cache_dir, tmp_path, {"HOOK_DIE_IN_SAVE": f"checkpoint_iter_{K}:1"}, HOOKED)
    assert run.wait() == [1, -signal.SIGKILL], run.output()
    errors = [line for line in run.output(0).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another rank stopped" in errors[0] and "Free space" not in errors[0], run.output(0)
    assert "Traceback" not in run.output(0)
    assert not (out / f"checkpoint_iter_{K}" / "COMPLETE").exists() and not (out / LOCK_FILE).exists()


def test_a_hung_rank_ends_the_run_in_bounded_time(tmp_path, cache_dir, files):
    """Rank 1 hangs in its forward of the second step, so rank 0 waits in ZeRO's gradient reduction, in a
    process group DeepSpeed made (torch's 30-minute default before). Rank 0 gives up after
    system.collective_timeout_min and says which rank waited and what to do, in one line."""
    cfg = write_config(tmp_path / "cfg.json", {**RUN, "system": {"collective_timeout_min": 0.25}})
    run = Ranks(2, ["--config", cfg, "--deepspeed_config", files.ds, "--zero_stage", 2, "--output_dir", tmp_path / "out"],
                cache_dir, tmp_path, {"HOOK_HANG_AT": "1:1"}, HOOKED)
    try:
        code = run.procs[0].wait(timeout=150)
    except subprocess.TimeoutExpired:
        code = None
    run.kill()  # the hung rank
    assert code == 1, f"rank 0: exit {code}\n{run.output(0)}"
    errors = [line for line in run.output(0).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in run.output(0), run.output(0)
    assert errors[0].startswith("error: rank 0: a collective waited 0.25 min (system.collective_timeout_min) for the "
                                "other ranks and timed out"), errors[0]
    assert "--resume auto" in errors[0]
    assert "step 1/" in (tmp_path / "out" / "training_rank_0.log").read_text()


# -- world-size change -------------------------------------------------------------------
@pytest.mark.parametrize("saved,ranks", [((1, 2), (2, 2)), ((2, 2), (4, 2)), ((2, 3), (1, 3)), ((2, 1), (2, 2))],
                         ids=["1to2", "2to4", "zero3_2to1", "zero1to2"])
def test_new_world_size_or_stage_restores_the_state_exactly(tmp_path, cache_dir, files, reference, saved, ranks):
    """Resumed with another number of ranks (or ZeRO 1 <-> 2) and stopped before its first step, the
    run's checkpoint holds exactly the weights, Adam moments, step and learning rate it resumed from."""
    (saved_ranks, saved_stage), (ranks, stage) = saved, ranks
    ref, out = reference(saved_ranks, saved_stage), tmp_path / "out"
    Ranks(ranks, args(files, out, stage, "--resume", ref / f"checkpoint_iter_{K}"), cache_dir, tmp_path,
          {"HOOK_SIGNAL_AT": f"{K}:0"}, HOOKED).ok()
    assert_same_state(ref / f"checkpoint_iter_{K}", out / f"checkpoint_iter_{K}", tmp_path)
    assert toolkit_state(out / f"checkpoint_iter_{K}")["world_size"] == ranks
    log = (out / "training_rank_0.log").read_text()
    assert f"saved by {saved_ranks} rank(s) with ZeRO {saved_stage}: converting" in log
    assert ("dropout draws new random streams" in log) == (ranks != saved_ranks)
    assert not (out / ".universal").exists()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_world_size_change_trains_on_like_the_uninterrupted_run(tmp_path, cache_dir, files, reference, stage):
    """2 ranks -> 1, then S - K steps: every later step sees the same samples (the global batch does not
    depend on the world size) at the same learning rate, and Adam's step counts one per optimizer step
    in every parameter group, as in the run that never stopped; only dropout and summation order differ."""
    ref, out = reference(2, stage), tmp_path / "out"
    Ranks(1, args(files, out, stage, "--resume", ref / f"checkpoint_iter_{K}"), cache_dir, tmp_path).ok()
    got, want = metrics(out), metrics(ref)
    assert sorted(got) == list(range(K + 1, S + 1))
    for s in got:
        assert (got[s]["tokens"], got[s]["lr"]) == (want[s]["tokens"], want[s]["lr"])
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=0.01)
    ours, theirs = (universal_state(d / f"checkpoint_iter_{S}", tmp_path) for d in (out, ref))
    steps = {k: float(v) for k, v in ours.items() if k.startswith("step") or k.endswith("/step")}
    assert steps and steps == {k: float(theirs[k]) for k in steps} and set(steps.values()) == {S}, steps


# -- bad checkpoints ---------------------------------------------------------------------
def test_missing_checkpoint_is_refused(tmp_path, cache_dir, files):
    missing = tmp_path / "elsewhere" / "checkpoint_iter_7"
    run = Ranks(2, args(files, tmp_path / "out", 2, "--resume", missing), cache_dir, tmp_path)
    assert_refused(run, f"{missing}: checkpoint not found", "--resume auto")


def test_truncated_shard_is_named(tmp_path, cache_dir, files, reference):
    ckpt = tmp_path / "copy" / f"checkpoint_iter_{K}"
    shutil.copytree(reference(2, 2) / f"checkpoint_iter_{K}", ckpt)
    shard = ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # only rank 1 would read it
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    run = Ranks(2, args(files, tmp_path / "out", 2, "--resume", ckpt), cache_dir, tmp_path)
    assert_refused(run, f"{shard}:", "truncated")


@pytest.mark.parametrize("change,needle", [
    ({"model": {"n_embd": 64}}, "model.n_embd is 32 in the checkpoint but 64 in this run"),
    ({"dataset": {"synthetic_voxel_size": 0.025}}, "vocabulary dims is"),
])
def test_mismatched_checkpoint_is_refused(tmp_path, cache_dir, files, reference, change, needle):
    cfg = write_config(tmp_path / "cfg.json", {**RUN, **{k: {**RUN.get(k, {}), **v} for k, v in change.items()}})
    ckpt = reference(2, 2) / f"checkpoint_iter_{K}"
    run = Ranks(2, ["--config", cfg, "--deepspeed_config", files.ds, "--output_dir", tmp_path / "out",
                    "--resume", ckpt], cache_dir, tmp_path)
    assert_refused(run, str(ckpt / "toolkit_state.json"), needle)


# -- non-finite steps --------------------------------------------------------------------
@pytest.mark.parametrize("stage", [0, 3])
def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, cache_dir, files, stage):
    """A NaN loss on one rank skips that step on every rank (weights and optimizer untouched) and
    training goes on; past trainer.max_nonfinite_steps in a row it stops, the last checkpoint intact."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.json", {**RUN, "trainer": {**RUN["trainer"], "max_iters": 8, "save_every": 1,
                                                                  "max_nonfinite_steps": 2, "keep_last": 20}})
    run = Ranks(2, ["--config", cfg, "--deepspeed_config", files.ds, "--zero_stage", stage, "--output_dir", out],
                cache_dir, tmp_path, {"HOOK_NAN_STEPS": "3,5,6,7", "HOOK_NAN_RANK": "1"}, HOOKED)
    codes = run.wait(120)
    assert codes == [1, 1], f"exit codes {codes}\n{run.output()}"
    assert "3 non-finite steps in a row" in run.output(0) and "--learning_rate" in run.output(0)
    log = (out / "training_rank_0.log").read_text()
    assert "step 3: non-finite loss or gradient; the update was skipped on every rank (1 in a row, 1 in all)" in log
    assert "step 4/8 loss" in log and "skipped 1\n" in log and "skipped 3\n" in log
    m = metrics(out)
    assert [s for s in m if m[s]["skipped"]] == [3, 5, 6] and m[3]["loss"] is None
    assert m[4]["lr"] == m[3]["lr"]  # a skipped step does not advance the schedule
    assert (out / "latest").read_text().strip() == "checkpoint_iter_6" and not (out / "checkpoint_iter_7").exists()

    state = {s: _weights_and_optimizer(out / f"checkpoint_iter_{s}", tmp_path) for s in (2, 3, 4, 6)}
    assert _equal(state[2], state[3]) and _equal(state[4], state[6])  # the skipped steps changed nothing
    assert not _equal(state[3], state[4])  # ... and step 4 did train


def _weights_and_optimizer(ckpt: Path, work: Path) -> dict:
    if list(ckpt.glob("*optim_states.pt")):
        return universal_state(ckpt, work)
    sd = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)  # ZeRO 0: one file; ours, trusted
    opt = sd["optimizer"]["state"]
    return {**sd["module"], **{f"{i}/{k}": v for i, s in opt.items() for k, v in s.items()}}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- fault hooks: this file run as the trainer ---------------------------------------------
def _run_with_hooks() -> int:
    """The trainer with faults injected from outside, per environment variable:
    HOOK_SIGNAL_AT=k:r    rank r sends itself SIGUSR1 when it fetches the batch of step index k
    HOOK_NAN_STEPS=a,b    (with HOOK_NAN_RANK=r) rank r's loss is NaN at those steps (1-based, as logged)
    HOOK_STALL_SAVE=name  saving checkpoint `name` stalls after each rank wrote its files
    HOOK_DIE_IN_SAVE=name:r  rank r is SIGKILLed while saving checkpoint `name`, its shards written
    HOOK_HANG_AT=k:r      rank r stops taking part (sleeps) in its first forward of step index k
    """
    from graspGPT import checkpoint, train_deepspeed
    from graspGPT.data import dataset
    from graspGPT.model import GraspGPT

    rank, hooks = int(os.environ["RANK"]), os.environ
    current = {"step": -1}
    fetch = dataset.BatchLoader.__next__

    def fetch_and_signal(self):
        sb = fetch(self)
        current["step"] = sb.step
        if hooks.get("HOOK_SIGNAL_AT") == f"{sb.step}:{rank}":
            os.kill(os.getpid(), signal.SIGUSR1)
        return sb

    nan_steps = {int(s) for s in hooks.get("HOOK_NAN_STEPS", "").split(",") if s}
    forward = GraspGPT.forward

    def poisoned_forward(self, input_ids, targets=None, **decoding):
        if targets is None:  # decoding (the in-training evaluation): untouched
            return forward(self, input_ids, **decoding)
        if self.training and hooks.get("HOOK_HANG_AT") == f"{current['step']}:{rank}":
            time.sleep(600)
        s, n = forward(self, input_ids, targets, **decoding)
        if self.training and current["step"] + 1 in nan_steps and rank == int(hooks.get("HOOK_NAN_RANK", -1)):
            s = s * float("nan")
        return s, n

    save_rng = checkpoint._save_rng

    def stalled_save_rng(path, r):
        if f"{path.name}:{r}" == hooks.get("HOOK_DIE_IN_SAVE"):
            os.kill(os.getpid(), signal.SIGKILL)
        save_rng(path, r)
        if path.name == hooks.get("HOOK_STALL_SAVE"):
            time.sleep(600)

    dataset.BatchLoader.__next__ = fetch_and_signal
    GraspGPT.forward = poisoned_forward
    checkpoint._save_rng = stalled_save_rng
    return train_deepspeed.main()


if __name__ == "__main__":
    from graspGPT.train_deepspeed import exit_process
    exit_process(_run_with_hooks())
