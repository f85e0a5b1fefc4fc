"""The ranks of a run: the process group, each rank's device, and how long a collective may wait.

Every process group, torch's default one and those DeepSpeed makes for ZeRO, times out after the
same `system.collective_timeout_min`: a rank that hangs mid-training ends the run on the others in
bounded time with an error that says so, where DeepSpeed's groups would otherwise wait torch's
default (30 minutes for gloo) whatever DEEPSPEED_TIMEOUT says.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from graspGPT import build_locks

DEFAULT_TIMEOUT_MIN = 15.0
TIMEOUT_SETTING = "system.collective_timeout_min"

RANK_LOST = (f"another rank stopped or stalled (killed, crashed, out of memory, hung past {TIMEOUT_SETTING}, or its "
             "node went down: see its log, and dmesg for the OOM killer)")


class LaunchError(RuntimeError):
    """The ranks could not meet; every rank says so (the one that knows more may be the missing one)."""


class RankLost(RuntimeError):
    """A collective failed because another rank is gone; the message says so (not: free disk space)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run."""

    rank: int
    world: int
    local_rank: int
    device: str  # this rank's torch device: "cuda:0", "cpu"
    accelerator: str  # "cuda" or "cpu"
    bf16_supported: bool
    timeout: timedelta  # how long any collective waits for the other ranks

    @property
    def on_gpu(self) -> bool:
        return self.accelerator == "cuda"


def collective_timeout(minutes: float | None) -> timedelta:
    """`system.collective_timeout_min`; null: DEEPSPEED_TIMEOUT (minutes, DeepSpeed's variable) if set, else 15."""
    if minutes is None:
        minutes = float(os.environ.get("DEEPSPEED_TIMEOUT", DEFAULT_TIMEOUT_MIN))
    return timedelta(minutes=minutes)


def time_out_every_group(timeout: timedelta) -> None:
    """Every process group made from now on without a timeout of its own waits `timeout`.

    torch (2.11 to 2.13) gives such a group `distributed_c10d._get_default_timeout(backend)`, which
    reads this module's `default_pg_timeout` (gloo: 30 min) or `default_pg_nccl_timeout` (NCCL: 10 min)
    each time a group is made; DeepSpeed makes its ZeRO groups that way (deepspeed.comm.new_group ->
    torch.distributed.new_group(ranks)). tests/test_distributed.py checks that torch still reads them.
    """
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timeout


def _join(timeout: timedelta) -> None:
    """The default process group (DeepSpeed's, with `timeout`), with clear errors when the ranks cannot meet."""
    import deepspeed
    try:
        deepspeed.init_distributed(timeout=timeout)
    except RuntimeError as exc:  # torch's DistNetworkError and DistStoreError are ones
        port, addr = os.environ.get("MASTER_PORT", "?"), os.environ.get("MASTER_ADDR", "?")
        if "EADDRINUSE" in str(exc):
            raise LaunchError(f"port {port} on {addr} is already in use (another job?); pass a free --master_port, "
                              f"or leave it out on a single node and run_deepspeed_training.sh picks one") from None
        if "timed out" in str(exc).lower():  # rank 0's store waited for ranks that never came
            detail = str(exc).strip().splitlines()[0]
            raise LaunchError(f"not every rank reached the rendezvous at {addr}:{port} within "
                              f"{minutes(timeout)} min ({TIMEOUT_SETTING}; {detail}): a node never came up, or was "
                              f"given another --master_addr/--master_port; check the hostfile and each node's "
                              f"launch") from None
        raise


def setup(system) -> Ranks:
    """Join the run's process group and set this process up: its device, its CPU threads, determinism.

    `system` is the training config's `system` section (collective_timeout_min, deterministic).
    """
    from deepspeed.accelerator import get_accelerator

    if not torch.cuda.is_available():
        # CPU ranks talk through plain gloo. DeepSpeed's shared-memory all-reduce would first compile
        # (~35 s) and leaves ~130 MB buffers in /dev/shm after every run.
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank == 0:  # one per node, before any rank can start a build
        build_locks.clear_orphaned_locks(warn=lambda message: print(message, file=sys.stderr, flush=True))
    timeout = collective_timeout(system.collective_timeout_min)
    time_out_every_group(timeout)  # first: DeepSpeed may make groups as it joins
    _join(timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    accel = get_accelerator()
    on_gpu = accel.device_name() == "cuda"
    if on_gpu:
        torch.cuda.set_device(local_rank)
    else:  # CPU ranks share the cores this process may run on (taskset and cgroup cpusets included)
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_SIZE", world))))
    if system.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        # Deterministic mode would also fill every new tensor with NaN; DeepSpeed's gradient buckets
        # (hundreds of MB, written before they are read) would then cost seconds per step on CPU.
        torch.utils.deterministic.fill_uninitialized_memory = False
    return Ranks(rank, world, local_rank, accel.current_device_name(), accel.device_name(),
                 on_gpu and accel.is_bf16_supported(), timeout)


def all_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over all ranks in one collective (float64 keeps token counts exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def minutes(timeout: timedelta) -> str:
    return f"{timeout.total_seconds() / 60:g}"


def peer_lost(exc: BaseException) -> bool:
    """Whether an error from a collective means another rank is gone or hangs: gloo reports a closed
    connection or a timed-out wait, NCCL a failed communicator, torch's store a timeout."""
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(s in text for s in (
        "connection reset", "connection closed", "connection refused", "broken pipe", "timed out", "nccl"))


def lost_rank_message(exc: BaseException) -> str:
    """One line for a collective that failed because of another rank: which rank waited, for what, what to do."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
    detail = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\] ", "", detail)  # gloo's source location
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else "?"
    if "timed out" in detail.lower():
        return (f"rank {rank}: a collective waited {minutes(c10d.default_pg_timeout)} min ({TIMEOUT_SETTING}) for "
                f"the other ranks and timed out ({detail}): another rank hangs or has stopped (its "
                f"training_rank_N.log shows its last step, py-spy dump --pid PID where it hangs). The last checkpoint "
                f"is intact: --resume auto; raise {TIMEOUT_SETTING} if such a wait is expected")
    return (f"rank {rank}: a collective failed ({type(exc).__name__}: {detail}): {RANK_LOST}; the last checkpoint "
            f"is intact: --resume auto")
