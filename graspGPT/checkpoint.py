"""Checkpoints: `OUTPUT/checkpoint_iter_N/` (N = optimizer steps) and an `OUTPUT/latest` pointer.

A checkpoint directory holds DeepSpeed's shards (written by `engine.save_checkpoint`, pickles that
must come from a trusted source) plus the toolkit's own state, which never goes through pickle:
`toolkit_state.json` (step, config, world size) and `rng_rank{r}.safetensors` + `rng_rank{r}.json`
(python/numpy/torch/device RNG states of each rank). `COMPLETE` is written by rank 0 after every rank
has finished writing; `latest` is updated only after that. A directory without `COMPLETE` is never used.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint_iter_"
MARKER = "COMPLETE"
STATE_FILE = "toolkit_state.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def tag_for(step: int) -> str:
    return f"{PREFIX}{step}"


def step_of(path: Path) -> int | None:
    m = re.fullmatch(PREFIX + r"(\d+)", path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / STATE_FILE).is_file()


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    found = [p for p in output_dir.glob(PREFIX + "*") if p.is_dir() and step_of(p) is not None and is_complete(p)]
    return sorted(found, key=step_of)


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


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable ({exc}); the checkpoint is damaged, "
                              f"resume from an earlier one") from exc


def check_compatible(path: Path, state: dict, model_shape: dict, vocab_meta: dict) -> None:
    """Same model size and vocabulary as this run, or a clear error naming both."""
    problems = []
    for key, ours in model_shape.items():
        theirs = state.get("model", {}).get(key)
        if theirs != ours:
            problems.append(f"model.{key} is {theirs} in the checkpoint but {ours} in this run")
    for key in ("dims", "dynamic_tags", "vocab_size"):
        theirs, ours = state.get("vocab", {}).get(key), vocab_meta.get(key)
        if theirs != ours:
            problems.append(f"vocabulary {key} is {theirs} in the checkpoint but {ours} in this run's data")
    if problems:
        raise CheckpointError(f"{path / STATE_FILE}: does not match this run: " + "; ".join(problems)
                              + ". Resume with the same model and data, or start fresh in another --output_dir")


# -- RNG state, per rank, without pickle ---------------------------------------------
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


def load_rng(path: Path, rank: int) -> RngState | None:
    """This rank's RNG state, or None when the checkpoint had fewer ranks (world-size change)."""
    jpath, tpath = path / f"rng_rank{rank}.json", path / f"rng_rank{rank}.safetensors"
    if not jpath.is_file() or not tpath.is_file():
        return None
    try:
        meta = json.loads(jpath.read_text())
        tensors = load_file(str(tpath))
    except Exception as exc:
        raise CheckpointError(f"{jpath.parent}: RNG state of rank {rank} is damaged ({exc})") from exc
    numpy_state = meta["numpy"]
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    return RngState(meta["python"], numpy_state, tensors["torch"], tensors.get("device"))


# -- save ---------------------------------------------------------------------------
def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, output_dir: Path, step: int, state: dict, rank: int, keep_last: int,
         protect: Path | None = None) -> Path:
    """Every rank calls this. Returns the checkpoint directory once it is complete everywhere."""
    tag = tag_for(step)
    path = output_dir / tag
    if rank == 0 and path.exists():  # a leftover from an interrupted save of the same step
        shutil.rmtree(path)
    _barrier()
    engine.save_checkpoint(str(output_dir), tag=tag, save_latest=False)
    _save_rng(path, rank)
    if rank == 0:
        _atomic_write(path / STATE_FILE, json.dumps({**state, "step": step}, indent=1))
    _barrier()  # every rank's shards and RNG files are on disk
    if rank == 0:
        _atomic_write(path / MARKER, f"{step}\n")
        _atomic_write(output_dir / LATEST, f"{tag}\n")
        _prune(output_dir, keep_last, protect)
    _barrier()
    return path


def _prune(output_dir: Path, keep_last: int, protect: Path | None) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, never the one this run resumed from."""
    done = complete_checkpoints(output_dir)
    keep = set(done[-keep_last:])
    if protect is not None:
        keep.add(protect.resolve() if protect.resolve().parent == output_dir.resolve() else protect)
    for p in done:
        if p not in keep and p.resolve() not in keep:
            shutil.rmtree(p, ignore_errors=True)
