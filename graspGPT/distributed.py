"""The ranks of a run: the process group, each rank's device, and what a surviving rank says when
another one is gone."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

RANK_LOST = ("another rank stopped or stalled (killed, crashed, out of memory, hung past DEEPSPEED_TIMEOUT, or its "
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

    @property
    def on_gpu(self) -> bool:
        return self.accelerator == "cuda"


def _join() -> None:
    """The default process group (DeepSpeed's), with clear errors when the ranks cannot meet."""
    import deepspeed
    try:
        deepspeed.init_distributed()
    except RuntimeError as exc:  # torch's DistNetworkError and DistStoreError are ones
        port, addr = os.environ.get("MASTER_PORT", "?"), os.environ.get("MASTER_ADDR", "?")
        if "EADDRINUSE" in str(exc):
            raise LaunchError(f"port {port} on {addr} is already in use (another job?); pass a free --master_port, "
                              f"or leave it out on a single node and run_deepspeed_training.sh picks one") from None
        if "timed out" in str(exc).lower():  # rank 0's store waited for ranks that never came
            detail = str(exc).strip().splitlines()[0]
            raise LaunchError(f"not every rank reached the rendezvous at {addr}:{port} within DEEPSPEED_TIMEOUT "
                              f"({os.environ.get('DEEPSPEED_TIMEOUT', 10)} min; {detail}): a node never came up, or "
                              f"was given another --master_addr/--master_port; check the hostfile and each node's "
                              f"launch") from None
        raise


def setup(system) -> Ranks:
    """Join the run's process group and set this process up: its device, its CPU threads, determinism.

    `system` is the training config's `system` section (deterministic).
    """
    from deepspeed.accelerator import get_accelerator

    if not torch.cuda.is_available():
        # CPU ranks talk through plain gloo. DeepSpeed's shared-memory all-reduce would first compile
        # (~35 s) and leaves ~130 MB buffers in /dev/shm after every run.
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    _join()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
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
                 on_gpu and accel.is_bf16_supported())


def all_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over all ranks in one collective (float64 keeps token counts exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def peer_lost(exc: BaseException) -> bool:
    """Whether an error from a collective means another rank is gone: gloo reports a closed connection,
    NCCL a failed communicator, torch's store a timeout."""
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(s in text for s in (
        "connection reset", "connection closed", "connection refused", "broken pipe", "timed out", "nccl"))


def lost_rank_message(exc: BaseException) -> str:
    """One line for a collective that failed because of another rank."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
    return (f"a collective failed ({type(exc).__name__}: {detail}): {RANK_LOST}; the last checkpoint is intact: "
            f"--resume auto")
