"""What a run tells its user: per-rank log files, a progress bar, wandb, throughput figures."""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import torch

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16; MFU is quoted against it on every GPU


def rank_logger(output_dir: Path, rank: int) -> logging.Logger:
    """`training_rank_N.log` for every rank; rank 0 also prints INFO lines to stdout."""
    log = logging.getLogger(f"graspGPT.rank{rank}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    fh = logging.FileHandler(output_dir / f"training_rank_{rank}.log")
    fh.setFormatter(fmt)
    log.addHandler(fh)
    if rank == 0:
        sh = _TqdmHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)
    return log


class _TqdmHandler(logging.Handler):
    """Prints above the progress bar instead of through it."""

    def emit(self, record):
        from tqdm import tqdm
        tqdm.write(self.format(record), file=sys.stdout)


class Wandb:
    """wandb on rank 0 only; never imported when off; never prints the API key."""

    def __init__(self, cfg, rank: int, run_config: dict, output_dir: Path, log: logging.Logger):
        self.run = None
        if rank != 0 or not cfg.enabled or cfg.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            raise SystemExit("error: wandb is enabled but not installed; `pip install wandb`, or pass --no_wandb")
        try:
            self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.run_name, mode=cfg.mode,
                                  config=run_config, dir=str(output_dir))
        except Exception as exc:  # wandb raises many types; the message is what matters
            raise SystemExit(f"error: wandb could not start ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                             "run `wandb login`, set wandb.mode to \"offline\" in the config, or pass --no_wandb")
        log.info(f"wandb: {cfg.mode} run {self.run.name} in project {cfg.project}")

    def log(self, metrics: dict, step: int):
        if self.run is not None:
            self.run.log(metrics, step=step)

    def image(self, key: str, path: str, step: int):
        if self.run is not None:
            import wandb
            self.run.log({key: wandb.Image(path)}, step=step)

    def summary(self, metrics: dict):
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self):
        if self.run is not None:
            self.run.finish()


class Progress:
    """tqdm bar on rank 0 with loss, lr and tokens/s; nothing on other ranks."""

    def __init__(self, rank: int, start: int, total: int):
        self.bar = None
        if rank == 0:
            from tqdm import tqdm
            # Redirected to a file, the bar would add a line fragment every step: refresh rarely then.
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 60.0,
                            disable=os.environ.get("GRASPGPT_NO_PROGRESS") == "1")

    def update(self, **postfix):
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Throughput:
    """Accumulates real target tokens, step time and data wait between two log lines."""

    def __init__(self, flops_per_token: float, world_size: int, on_gpu: bool):
        self.flops_per_token, self.world_size, self.on_gpu = flops_per_token, world_size, on_gpu
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.tokens = self.padded = self.steps = 0
        self.wait_s = 0.0

    def add(self, real_tokens: int, padded_tokens: int, wait_s: float):
        self.tokens += real_tokens
        self.padded += padded_tokens
        self.wait_s += wait_s
        self.steps += 1

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)

    def figures(self) -> dict:
        """Everything for a log line; queries the GPU, so call it at log time, not every step."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt
        out = {
            "tokens_per_s": tps,
            "tokens_per_s_per_rank": tps / self.world_size,
            "step_time_s": dt / max(self.steps, 1),
            "data_wait_frac": self.wait_s / dt,
            "padding_frac": 1.0 - self.tokens / self.padded if self.padded else 0.0,
        }
        if self.on_gpu:
            out["mfu"] = tps / self.world_size * self.flops_per_token / PEAK_BF16_FLOPS
            out["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            try:
                out["gpu_util"] = float(torch.cuda.utilization())
            except Exception:  # needs pynvml; absent on some machines
                pass
        return out


def oom_message(exc: BaseException) -> str:
    return (f"out of memory ({str(exc).splitlines()[0][:160]}). What helps, roughly in order: a smaller "
            "--micro_batch_size (keep --batch_size: accumulation grows), a shorter --max_sequence_length, "
            "model.activation_checkpointing=true, a higher --zero_stage (2, then 3), and "
            "offload_optimizer / offload_param to cpu in deepspeed_config.json")
