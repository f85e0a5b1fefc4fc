"""Shared helpers: launch real DeepSpeed training on CPU ranks (gloo) with a tiny model and data set."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
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


class Ranks:
    """`ranks` processes of the trainer, started directly (RANK/WORLD_SIZE/MASTER_PORT, as torchrun would:
    no launcher, two interpreter start-ups fewer); outputs in `log_dir`. With `hooks`, `script` is a
    test file that runs the trainer with faults injected (see test_resume.py)."""

    def __init__(self, ranks: int, args: list, cache_dir: Path, log_dir: Path, hooks: dict | None = None,
                 script: Path = TRAIN, port: int | None = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir, port = log_dir, str(port or free_port())
        self.procs = []
        for r in range(ranks):
            env = dict(train_env(cache_dir), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks),
                       LOCAL_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(hooks or {}))
            with open(log_dir / f"rank{r}.out", "w") as f:
                self.procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=REPO, env=env,
                                                   stdout=f, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = 180) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"ranks still running after {timeout} s (a hang?)\n{self.output()}")

    def kill(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()

    def output(self, rank: int | None = None) -> str:
        ranks = range(len(self.procs)) if rank is None else [rank]
        return "\n".join(f"--- rank {r}\n" + (self.log_dir / f"rank{r}.out").read_text()[-3000:] for r in ranks)

    def ok(self, timeout: float = 180) -> "Ranks":
        codes = self.wait(timeout)
        assert codes == [0] * len(codes), f"exit codes {codes}\n{self.output()}"
        return self


def assert_refused(run: Ranks, *needles: str) -> str:
    """Every rank exits 2; rank 0 prints one line `error: ...` holding the needles, the others nothing."""
    codes = run.wait(120)
    assert codes == [2] * len(codes), f"exit codes {codes}\n{run.output()}"
    errors = [line for line in run.output(0).splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.output()
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    for r in range(len(run.procs)):
        text = run.output(r)
        assert "Traceback" not in text, text
        assert r == 0 or "error" not in text.lower(), f"rank {r} is not quiet:\n{text}"
    return errors[0]


def hold_output_dir(out: Path) -> subprocess.Popen:
    """Another process holding `out`, as a running training run's rank 0 does; kill it to let go."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from graspGPT.runlock import OutputLock; "
            "OutputLock.acquire(sys.argv[2]); print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(out)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child
