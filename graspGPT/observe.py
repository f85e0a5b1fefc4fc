"""What a run tells its user: per-rank log files, a progress bar, wandb, throughput figures, the
per-step metrics file, and the count of non-finite steps that stops a run gone bad."""
from __future__ import annotations

import json
import logging
import math
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


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the message says what to try."""


class NonFiniteSteps:
    """Counts skipped steps; past `limit` in a row, training stops (the last checkpoint is untouched)."""

    def __init__(self, limit: int, total: int, log):
        self.limit, self.total, self.in_row, self.log = limit, total, 0, log

    def update(self, step: int, applied: bool, loss: float) -> None:
        if applied and not math.isfinite(loss):
            raise NonFiniteError(f"step {step}: DeepSpeed applied an update whose loss is {loss}; the weights are "
                                 f"no longer trustworthy. Keep zero_optimization.compute_grad_norm on, and resume "
                                 f"from the last checkpoint with --resume auto")
        self.in_row = 0 if applied else self.in_row + 1
        self.total += not applied
        if applied:
            return
        self.log.warning(f"step {step}: non-finite loss or gradient; the update was skipped on every rank "
                         f"({self.in_row} in a row, {self.total} in all)")
        if self.in_row > self.limit:
            message = (f"{self.in_row} non-finite steps in a row (more than trainer.max_nonfinite_steps="
                       f"{self.limit}): stopping; the last checkpoint is intact. Try a lower --learning_rate or a "
                       f"longer warmup_iters, a smaller trainer.grad_clip, bf16 instead of fp16, and check the data "
                       f"(python -m graspGPT.data inspect); then --resume auto")
            self.log.error(message)
            raise NonFiniteError(message)


class MetricsFile:
    """`metrics_rank0.jsonl`: one JSON line per optimizer step in full precision (rank 0 only).

    On resume the lines after the resumed step are dropped, so the file reads as one uninterrupted run.
    """

    NAME = "metrics_rank0.jsonl"

    def __init__(self, path: Path, rank: int, start_step: int):
        self.file = None
        if rank != 0:
            return
        kept = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                if json.loads(line)["step"] <= start_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                pass
        path.write_text("".join(kept))
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        if self.file is not None:
            finite = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
            self.file.write(json.dumps(finite) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class StepReport:
    """What each optimizer step tells the user: the metrics file, the progress bar, the log line and
    wandb every `log_every` steps, the evaluations, and the count of skipped (non-finite) steps."""

    def __init__(self, trainer_cfg, out: Path, rank: int, start_step: int, skipped: int, meter: Throughput,
                 log: logging.Logger, wandb: Wandb, data_stats: dict):
        self.every, self.max_iters = trainer_cfg.log_every, trainer_cfg.max_iters
        self.meter, self.log, self.wandb, self.data_stats = meter, log, wandb, data_stats
        self.progress = Progress(rank, start_step, trainer_cfg.max_iters)
        self.metrics = MetricsFile(out / MetricsFile.NAME, rank, start_step)
        self.skips = NonFiniteSteps(trainer_cfg.max_nonfinite_steps, skipped, log)
        cells = trainer_cfg.eval_cell_temperature
        self.decoding = f"T={trainer_cfg.eval_temperature:g}" + ("" if cells is None else f", cells {cells:g}")
        if trainer_cfg.eval_independent_grasps:
            self.decoding += f", {trainer_cfg.eval_independent_grasps} independent grasps"

    def step(self, step: int, loss: float, lr: float, applied: bool, grad_norm, targets: float, tokens: float,
             wait_s: float, epoch: int) -> dict:
        """Record optimizer step `step` (1-based); returns its metrics record, written by `write`."""
        self.skips.update(step, applied, loss)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        self.meter.add(int(targets), int(tokens), wait_s)
        self.progress.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{self.meter.tokens_per_s():.0f}")
        if step % self.every == 0 or step == self.max_iters:
            fig = self.meter.figures()
            line = (f"step {step}/{self.max_iters} loss {loss:.4f} lr {lr:.3e} grad_norm {grad_norm:.3f} "
                    f"tokens/s {fig['tokens_per_s']:.0f} padding {fig['padding_frac']:.1%} "
                    f"data_wait {fig['data_wait_frac']:.1%} skipped {self.skips.total}")
            if self.meter.on_gpu:
                line += f" mfu {fig['mfu']:.1%} mem {fig['gpu_mem_peak_gb']:.1f}GB"
            self.log.info(line)
            self.wandb.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                            "train/skipped_steps": self.skips.total, "epoch": epoch,
                            **{f"perf/{k}": v for k, v in fig.items()},
                            **{f"data/{k}": v for k, v in self.data_stats.items()}}, step)
            self.meter.reset()
        return {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(targets),
                "skipped": not applied}

    def validation(self, step: int, val_loss: float, record: dict) -> None:
        record["val_loss"] = val_loss
        ppl = math.exp(min(val_loss, 50))
        self.log.info(f"step {step} val_loss {val_loss:.4f} (ppl {ppl:.2f})")
        self.wandb.log({"val/loss": val_loss, "val/ppl": ppl}, step)

    def grasps(self, step: int, gen: dict, record: dict) -> None:
        """The grasp metrics of decoding the validation scenes (evaluate.TrainingEvaluator), and its picture."""
        if not gen:
            return
        picture = gen.pop("picture", None)
        # The metrics file holds what a resumed run must reproduce exactly; timings go to the log and wandb.
        record.update({f"eval/{k}": v for k, v in gen.items() if k not in ("eval_seconds", "decode_tokens_per_s")})
        # What was decoded besides the constrained rows: none with --grounding none, no free rows with
        # independent grasps; say only what was measured.
        also = "".join(f"; {label} {gen[key]:.3f}" for key, label in (
            ("grammar_grasp_precision", "grammar mask only: precision"), ("free_valid_rate", "unmasked valid"))
            if key in gen)
        if gen.get("valid_rate", 1.0) < 1.0:  # a constrained sequence is whole unless it ran out of tokens
            also += (f"; {1 - gen['valid_rate']:.0%} of the sequences stopped at the token cap (twice the "
                     f"truth's length + 64) before `end`")
        self.log.info(
            f"step {step} grasps ({self.decoding}): precision {gen['grasp_precision']:.3f}, any object "
            f"{gen['any_tag_precision']:.3f}, validity {gen['grasp_validity']:.3f}, coverage "
            f"{gen['grasp_coverage']:.3f} (random {gen['baseline_precision']:.3f}, "
            f"{gen['baseline_any_tag_precision']:.3f}, {gen['baseline_validity']:.3f}, "
            f"{gen['baseline_coverage']:.3f}){also}; "
            f"{gen['scenes']} scenes in {gen['eval_seconds']:.0f}s" + (f", picture {picture}" if picture else ""))
        self.wandb.log({f"eval/{k}": v for k, v in gen.items()}, step)
        if picture:
            self.wandb.image("eval/picture", picture, step)

    def write(self, record: dict) -> None:
        self.metrics.write(record)

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()
        self.wandb.finish()
