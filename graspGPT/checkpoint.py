"""Checkpoints: `OUTPUT/checkpoint_iter_N/` (N = optimizer steps), `OUTPUT/latest`, resume and retention.

A checkpoint directory holds
  DeepSpeed's shards              written by `engine.save_checkpoint`; pickles, so load only checkpoints
                                  from a trusted source
  toolkit_state.json              step, config, the model record (artifact.py: architecture, vocabulary,
                                  workspace), world size, ZeRO stage, counters
  rng_rank{r}.json/.safetensors   python/numpy/torch/device RNG states of rank r
  COMPLETE                        written last, by rank 0, once every rank has written its files: JSON
                                  naming every file of the checkpoint with its size
A directory without COMPLETE (a save that was killed) is never used; `latest` is replaced atomically
after COMPLETE. The toolkit's own state never goes through pickle.

A run's state (`run_state`: config, world size, model shape, vocabulary, data identity) is what a resume
is planned against (`plan_run`) and compared with (`resume`), and what each save records.

Every function that can fail because of a checkpoint raises CheckpointError; `agree` runs such a
function on every rank and raises on all of them if it failed on any, so no rank is left waiting in
a collective, and rank 0 can print the error whichever rank found it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .distributed import RANK_LOST, RankLost, peer_lost

PREFIX = "checkpoint_iter_"
MARKER = "COMPLETE"
STATE_FILE = "toolkit_state.json"
LATEST = "latest"
UNIVERSAL = ".universal"  # in the output directory: a checkpoint converted for another world size, while loading

T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


class RankFailed(RuntimeError):
    """Raised by `agree` on the ranks that did not fail; the message is the failing rank's error."""


def tag_for(step: int) -> str:
    return f"{PREFIX}{step}"


def step_of(path: Path) -> int | None:
    m = re.fullmatch(PREFIX + r"(\d+)", path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / STATE_FILE).is_file()


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    found = [p for p in Path(output_dir).glob(PREFIX + "*") if p.is_dir() and step_of(p) is not None and is_complete(p)]
    return sorted(found, key=step_of)


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


# -- where to resume from -------------------------------------------------------
def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """`--resume` value -> a complete checkpoint directory, or None for a fresh start.

    Accepts a checkpoint directory, a `latest` file (or the output directory holding one),
    or `auto` (newest complete checkpoint in the output directory, else a fresh start).
    """
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir() and (path / LATEST).is_file() and step_of(path) is None:
        path = path / LATEST
    if path.name == LATEST:
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file; give a checkpoint directory, or --resume auto")
        tag = path.read_text().strip()
        if not (path.parent / tag).is_dir():
            raise CheckpointError(f"{path}: names {tag!r}, which is not there (deleted or moved); give a checkpoint "
                                  f"directory, or --resume auto (the newest complete one, whatever latest says)")
        path = path.parent / tag
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found; give an existing checkpoint_iter_N directory, "
                              f"or --resume auto to take the newest complete one in the output directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected {PREFIX}N/ holding {MARKER})")
    if not is_complete(path):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER} marker: its save was interrupted); "
                              f"resume from an earlier one, or --resume auto")
    return path


def check_output_dir(output_dir: Path, resume: Path | None) -> None:
    """Checkpoints of one run only: a run never mixes its checkpoints with, or prunes, those of another.

    A fresh start (or a resume from elsewhere) needs an output directory without checkpoints; a resume
    from inside it needs every other checkpoint there to be older than the one it resumes from.
    """
    found = complete_checkpoints(output_dir)
    if resume is not None and any(_same(p, resume) for p in found):
        newer = [p.name for p in found if step_of(p) > step_of(resume)]
        if newer:
            raise CheckpointError(
                f"{output_dir}: holds {', '.join(newer)}, newer than {resume.name}; resuming there would mix two "
                f"runs. Resume into another --output_dir, or move the newer checkpoints away")
    elif found:
        raise CheckpointError(
            f"{output_dir}: already holds checkpoints of another run (newest {found[-1].name}); pass --resume auto "
            f"to continue it, or choose another --output_dir")


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable ({exc}); the checkpoint is damaged, "
                              f"resume from an earlier one") from exc


def verify_files(path: Path) -> None:
    """Every file COMPLETE lists is there with its size: a missing or truncated shard is named before
    DeepSpeed would fail on it deep inside torch.load (and on some ranks only)."""
    try:
        files = json.loads((path / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / MARKER}: unreadable ({exc}); the checkpoint is damaged, "
                              f"resume from an earlier one") from exc
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint; copy it back, or resume from an earlier one")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes but {size} when saved (truncated or modified); "
                                  f"copy it again, or resume from an earlier one")


def needs_conversion(path: Path, state: dict, world: int, zero_stage: int) -> bool:
    """Whether DeepSpeed's partitioned optimizer state must be re-cut for this run's world size or stage."""
    saved_world, saved_stage = state.get("world_size"), state.get("zero_stage")
    group = {0: "0", 1: "1 or 2", 2: "1 or 2", 3: "3"}
    if group.get(saved_stage) != group[zero_stage]:
        raise CheckpointError(f"{path / STATE_FILE}: saved with ZeRO stage {saved_stage}, but this run uses stage "
                              f"{zero_stage}; resume with --zero_stage {group.get(saved_stage, saved_stage)}")
    partitioned = any(path.glob("*optim_states.pt"))  # ZeRO 1-3 and bf16 stage 0 split it over the ranks
    return partitioned and (saved_world, saved_stage) != (world, zero_stage)


@dataclass
class ResumePlan:
    path: Path
    state: dict
    convert: bool  # through DeepSpeed's universal checkpoint (another world size or ZeRO stage)

    @property
    def step(self) -> int:
        return int(self.state["step"])


def plan_resume(resume: str | None, output_dir: Path, world: int, zero_stage: int,
                check_fits: Callable[[Path, dict], None]) -> ResumePlan | None:
    """Everything about a resume that can be checked before the engine exists (files only, no collective).
    `check_fits(path, state)` raises CheckpointError when the saved model does not fit this run
    (`artifact.ModelRecord.check_resume`)."""
    path = resolve_resume(resume, output_dir)
    check_output_dir(output_dir, path)
    if path is None:
        return None
    state = read_state(path)
    check_fits(path, state)
    verify_files(path)
    return ResumePlan(path, state, needs_conversion(path, state, world, zero_stage))


def data_identity(store) -> dict:
    """What tells one data set (data.storage.TokenStore) from another cheaply: the sample count, the token
    count and a hash of every sample's length (offsets: 8 bytes a sample), not of every token."""
    return {"num_samples": len(store), "num_tokens": int(store.offsets[-1]),
            "offsets_sha1": hashlib.sha1(np.ascontiguousarray(store.offsets, dtype=np.int64).tobytes()).hexdigest()}


def run_state(cfg, world: int, ds, record, store) -> dict:
    """The run as toolkit_state.json records it (the step and skipped-step count are added at each save):
    `cfg` the training Config, `ds` the ds_config.ResolvedDeepSpeed, `record` the artifact.ModelRecord,
    `store` the data's TokenStore."""
    return {"config": cfg.to_dict(), "world_size": world, "zero_stage": ds.zero_stage, "precision": ds.precision,
            "global_batch": ds.batch.global_batch, **record.to_json(), "data": data_identity(store)}


def plan_run(resume: str | None, output_dir: Path, state: dict, check_fits: Callable[[Path, dict], None],
             device) -> ResumePlan | None:
    """Where this run starts (None: from scratch), checked on every rank (`plan_resume`), the same on all.
    `state`: this run's run_state."""
    plan = agree(device, plan_resume, resume, output_dir, state["world_size"], state["zero_stage"], check_fits)
    check_same_plan(device, plan)
    return plan


# -- agreement between ranks ---------------------------------------------------------
MESSAGE_BYTES = 2000  # of an error passed to the other ranks


def agree(device, fn: Callable[..., T], *args, errors: tuple = (CheckpointError,)) -> T:
    """fn(*args) on every rank; if it raises one of `errors` on any rank, raise on all of them: the
    failing rank its own error, the others RankFailed carrying the first failing rank's message.

    The all-reduce also acts as a barrier. Call it where every rank calls it, with fn failing before
    any collective of its own.
    """
    error, result = None, None
    try:
        result = fn(*args)
    except errors as exc:
        error = exc
    # Row r: rank r's flag and error text as byte values; a sum leaves each row to its rank.
    rows = torch.zeros((dist.get_world_size(), 1 + MESSAGE_BYTES), dtype=torch.int32, device=device)
    if error is not None:
        text = str(error).encode()[:MESSAGE_BYTES]
        rows[dist.get_rank(), 0] = 1
        rows[dist.get_rank(), 1:1 + len(text)] = torch.tensor(list(text), dtype=torch.int32)
    dist.all_reduce(rows)
    if error is not None:
        raise error
    failed = [r for r in range(len(rows)) if rows[r, 0]]
    if failed:
        text = bytes(v for v in rows[failed[0], 1:].tolist() if v).decode(errors="replace")
        raise RankFailed(f"rank {failed[0]}: {text}" + (f" (and {len(failed) - 1} more rank(s))" if failed[1:] else ""))
    return result


def check_same_plan(device, plan: ResumePlan | None) -> None:
    """Every rank resumes from the same step (or none): ranks on nodes that do not share the output
    directory's file system, or see it with a delay, would each load another checkpoint."""
    step = plan.step if plan is not None else -1
    bounds = torch.tensor([step, -step], dtype=torch.float64, device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    if bounds[0] != -bounds[1]:
        raise CheckpointError(f"the ranks found different checkpoints to resume from (steps {int(-bounds[1])} to "
                              f"{int(bounds[0])}; -1 is none): put the output directory on a file system every node "
                              f"shares, or pass --resume with one checkpoint directory")


# -- load ---------------------------------------------------------------------------
def _convert_to_universal(path: Path, output_dir: Path) -> None:
    """DeepSpeed's universal checkpoint of `path`, into OUTPUT/.universal/ (by rank 0, in a separate process)."""
    target = output_dir / UNIVERSAL / path.name
    shutil.rmtree(output_dir / UNIVERSAL, ignore_errors=True)
    target.parent.mkdir(parents=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
           "--output_folder", str(target), "--inject_missing_state", "--num_extract_workers", "4",
           "--num_merge_workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise CheckpointError(f"{path}: conversion to DeepSpeed's universal checkpoint failed ({' | '.join(tail)}); "
                              f"resume with the world size and ZeRO stage it was saved with")


def _load_engine(engine, path: Path) -> None:
    try:
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    except Exception as exc:  # DeepSpeed raises whatever torch.load or its own checks raise
        raise CheckpointError(f"{path}: DeepSpeed could not load it ({type(exc).__name__}: {exc}); "
                              f"resume from an earlier checkpoint") from exc
    if loaded is None:
        raise CheckpointError(f"{path}: DeepSpeed found no model states in it; resume from an earlier checkpoint")


def _untie_adam_steps(engine) -> None:
    """Give every parameter group's optimizer state its own step tensor.

    DeepSpeed 0.19.8's ZeRO-3 universal-checkpoint load stores one step tensor in the state of every
    parameter group; Adam increments it in place once per group, so after the load the step (and with
    it the bias correction) advanced by the number of groups per optimizer step.
    """
    for state in getattr(getattr(engine.optimizer, "optimizer", None), "state", {}).values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load(engine, plan: ResumePlan, output_dir: Path, rank: int, device) -> None:
    """Weights, optimizer, LR schedule into `engine`, on every rank; converted first when `plan.convert`."""
    source = plan.path
    if plan.convert:
        convert = _convert_to_universal if rank == 0 else lambda *_: None
        agree(device, convert, plan.path, output_dir)  # the other ranks wait in agree's all-reduce
        source = output_dir / UNIVERSAL / plan.path.name
    agree(device, _load_engine, engine, source)
    if plan.convert:
        _untie_adam_steps(engine)
        if rank == 0:
            shutil.rmtree(output_dir / UNIVERSAL, ignore_errors=True)


def resume(engine, plan: ResumePlan, state: dict, output_dir: Path, rank: int, device, log) -> None:
    """Load `plan`'s checkpoint into the engine and the RNG streams, and say what differs from the saved
    run (`state`: this run's run_state)."""
    saved_world, world = plan.state.get("world_size"), state["world_size"]
    if plan.convert:
        log.info(f"{plan.path} was saved by {saved_world} rank(s) with ZeRO {plan.state.get('zero_stage')}: "
                 f"converting it to DeepSpeed's universal checkpoint for {world} rank(s)")
    load(engine, plan, output_dir, rank, device)
    engine.lr_scheduler.apply()  # the current schedule's rate, not the one the saved optimizer held
    seed = state["config"]["system"]["seed"]
    if not agree(device, resume_rng, plan, rank, world, seed):
        log.warning(f"world size {saved_world} -> {world}: weights, optimizer state, step and learning rate are "
                    f"restored exactly; dropout draws new random streams, and sums run in another order")
    global_batch = state["global_batch"]
    if plan.state.get("global_batch", global_batch) != global_batch:
        log.warning(f"the global batch was {plan.state['global_batch']} and is {global_batch} now: from here on "
                    f"the steps see other samples than the saved run would have")
    # A data set rewritten (or another one at the same path) changes what every later step trains on.
    data_changes = changed_settings({"data": plan.state.get("data", state["data"])}, {"data": state["data"]})
    if data_changes:
        log.warning(f"the data set differs from the checkpoint's ({'; '.join(data_changes)}): from here on the steps "
                    f"see other samples than the saved run would have")
    changes = changed_settings(plan.state.get("config", {}), state["config"])
    if changes:
        log.warning("resuming with changed settings: " + "; ".join(changes))
    log.info(f"resumed from {plan.path} at step {plan.step}")


# -- RNG state, per rank, without pickle ---------------------------------------------
def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's random streams from `seed`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RngState:
    python: list
    numpy: dict
    torch: torch.Tensor
    device: torch.Tensor | None


def capture_rng() -> RngState:
    py = random.getstate()
    device = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return RngState([py[0], list(py[1]), py[2]], np.random.get_state(legacy=False), torch.get_rng_state(), device)


def restore_rng(state: RngState) -> None:
    random.setstate((state.python[0], tuple(state.python[1]), state.python[2]))
    np.random.set_state(state.numpy)
    torch.set_rng_state(state.torch)
    if state.device is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state.device)


def _save_rng(path: Path, rank: int) -> None:
    s = capture_rng()
    tensors = {"torch": s.torch}
    if s.device is not None:
        tensors["device"] = s.device
    save_file(tensors, str(path / f"rng_rank{rank}.safetensors"))
    numpy_state = dict(s.numpy, state={"key": s.numpy["state"]["key"].tolist(), "pos": int(s.numpy["state"]["pos"])})
    (path / f"rng_rank{rank}.json").write_text(json.dumps({"python": s.python, "numpy": numpy_state}))


def load_rng(path: Path, rank: int) -> RngState:
    jpath, tpath = path / f"rng_rank{rank}.json", path / f"rng_rank{rank}.safetensors"
    try:
        meta = json.loads(jpath.read_text())
        tensors = load_file(str(tpath))
        numpy_state = meta["numpy"]
        numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
        return RngState(meta["python"], numpy_state, tensors["torch"], tensors.get("device"))
    except Exception as exc:  # json, safetensors and a missing key each raise their own kind
        raise CheckpointError(f"{jpath}: RNG state of rank {rank} is damaged ({exc}); "
                              f"resume from an earlier checkpoint") from exc


def resume_rng(plan: ResumePlan, rank: int, world: int, seed: int) -> bool:
    """Each rank's saved RNG streams (exact resume); after a world-size change, fresh streams seeded
    from (seed, step, rank), as a rank's stream has no counterpart then. True when restored."""
    if plan.state.get("world_size") == world:
        restore_rng(load_rng(plan.path, rank))
        return True
    seed_everything(int(np.random.SeedSequence([seed, plan.step, rank]).generate_state(1)[0]))
    return False


def changed_settings(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """`section.key old -> new` for every setting that differs from the checkpoint's config."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" not in ("trainer.resume", "trainer.init_from", "system.output_dir"):
            out.append(f"{prefix}{key} {json.dumps(a)} -> {json.dumps(b)}")
    return out


# -- save ---------------------------------------------------------------------------
def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _remove(path: Path) -> None:
    """Marker first: a removal cut short leaves an incomplete directory, never a damaged complete one."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


class Saver:
    """Writes checkpoints for one run and prunes old ones.

    Keeps the newest `keep_last` complete checkpoints plus the one the run resumed from; never writes
    a step that is already on disk for this output directory (the resumed-from checkpoint, or a save
    this run made), so a stop right after a save or right after a resume costs nothing.
    """

    def __init__(self, engine, output_dir: Path, rank: int, keep_last: int, plan: ResumePlan | None):
        self.engine, self.output_dir, self.rank, self.keep_last = engine, Path(output_dir), rank, keep_last
        self.protect = plan.path if plan is not None else None
        here = plan is None or _same(plan.path.parent, self.output_dir)
        self.last_step = (plan.step if plan is not None else 0) if here else None

    def __call__(self, step: int, state: dict) -> Path | None:
        """Every rank calls this. The checkpoint directory, once complete everywhere; None if nothing new."""
        if step == self.last_step:
            return None
        path = self.output_dir / tag_for(step)
        try:
            self._write(step, path, state)
        except (OSError, RuntimeError) as exc:  # a full disk surfaces as either, through torch.save
            if peer_lost(exc):
                raise RankLost(f"{path}: {RANK_LOST} during the save ({type(exc).__name__}: {exc}); the checkpoint "
                               f"stays incomplete and unused, the earlier ones are intact: --resume auto") from exc
            raise CheckpointError(f"{path}: could not write the checkpoint ({type(exc).__name__}: {exc}); it stays "
                                  f"incomplete and unused, the earlier ones are intact. Free space, then "
                                  f"--resume auto") from exc
        self.last_step = step
        return path

    def _write(self, step: int, path: Path, state: dict) -> None:
        if self.rank == 0 and path.exists():  # a leftover of a save that was killed
            _remove(path)
        _barrier()
        self.engine.save_checkpoint(str(self.output_dir), tag=path.name, save_latest=False)
        _save_rng(path, self.rank)
        if self.rank == 0:
            _atomic_write(path / STATE_FILE, json.dumps({**state, "step": step}, indent=1))
        _barrier()  # every rank's shards and RNG files are written
        if self.rank == 0:
            files = sorted(f for f in path.rglob("*") if f.is_file())
            for f in files:
                _fsync(f)
            sizes = {str(f.relative_to(path)): f.stat().st_size for f in files}
            _atomic_write(path / MARKER, json.dumps({"step": step, "files": sizes}, indent=1))
            _atomic_write(self.output_dir / LATEST, f"{path.name}\n")
            self._prune()
        _barrier()

    def _prune(self) -> None:
        """Old complete checkpoints beyond the newest keep_last (never the resumed-from one), and leftovers."""
        done = complete_checkpoints(self.output_dir)
        keep = done[-self.keep_last:] + ([self.protect] if self.protect is not None else [])
        for p in self.output_dir.glob(PREFIX + "*"):
            if p.is_dir() and step_of(p) is not None and not any(_same(p, k) for k in keep):
                _remove(p)
