"""Shared helpers: launch real DeepSpeed training on CPU ranks (gloo) with a tiny model and data set."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent  # pyproject's pytest `pythonpath` puts it on sys.path
TRAIN = REPO / "graspGPT" / "train_deepspeed.py"

# A model and data set small enough that a 2-rank step takes milliseconds on 2 cores.
TINY = {
    "model": {"model_type": None, "n_layer": 2, "n_head": 2, "n_embd": 32},
    "trainer": {"batch_size": 8, "micro_batch_size": 2, "learning_rate": 3e-3, "min_lr": 1e-4, "warmup_iters": 2,
                "max_iters": 20, "log_every": 1, "eval_every": 10, "save_every": 10, "eval_iters": 2,
                "eval_scenes": 2},
    "dataset": {"synthetic_scenes": 64, "synthetic_voxel_size": 0.03, "max_grasps_per_object": 4,
                "max_sequence_length": 512},
    "system": {"deterministic": True},
    "wandb": {"enabled": False},
}


def merge(base: dict, over: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: extra threads only add scheduling noise on a shared 2-core machine."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data cache for the whole session, so the tiny synthetic set is generated once."""
    return tmp_path_factory.mktemp("graspgpt_cache")


# The test being set up, so that starting ranks from a test not marked `ranks` fails (see train_env).
_current: dict = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _current["item"] = item  # before the item's fixtures, which may start ranks themselves


def train_env(cache_dir: Path, checkout_on_path: bool = True) -> dict:
    """The environment of every launch of training ranks (the trainer, the launcher script, test workers).

    checkout_on_path=False leaves PYTHONPATH as the caller has it: the trainer must then find its own
    checkout, as on a machine where the package is not installed.
    """
    item = _current.get("item")
    if item is not None and item.get_closest_marker("ranks") is None:
        pytest.fail(f"{item.nodeid} starts training ranks: mark it @pytest.mark.ranks so -m 'not ranks' leaves it out")
    env = dict(os.environ, GRASPGPT_CACHE=str(cache_dir), GRASPGPT_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    if checkout_on_path:  # subprocesses import this checkout's package, not another installed copy
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def write_config(path: Path, overrides: dict | None = None) -> Path:
    path.write_text(json.dumps(merge(TINY, overrides or {})))
    return path


def launch(ranks: int, args: list[str], cache_dir: Path, cwd: Path = REPO, script: Path = TRAIN,
           timeout: int = 300, checkout_on_path: bool = True) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus=ranks script args` on CPU ranks; returns the finished process."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(free_port()), str(script), *args]
    env = train_env(cache_dir, checkout_on_path)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def end_worker() -> None:
    """End a launched test worker once every rank has written its result.

    Exits without interpreter shutdown: a gloo worker thread may still be dropping the last collective's
    tensors, and CPython stops such a thread mid-destructor during shutdown, which aborts the process
    ("terminate called without an active exception", 2 in 30 runs of the ZeRO-3 export worker).
    """
    import torch.distributed as dist

    dist.barrier()  # no rank leaves while another still reads its last collective
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc


STEP_LINE = re.compile(r"step (\d+)/\d+ loss ([0-9.naninf]+) lr ([0-9.e+-]+)")


def logged_steps(output_dir: Path, rank: int = 0) -> dict[int, tuple[float, float]]:
    """{step: (loss, lr)} from a rank's training log."""
    text = (output_dir / f"training_rank_{rank}.log").read_text()
    return {int(m.group(1)): (float(m.group(2)), float(m.group(3))) for m in STEP_LINE.finditer(text)}
