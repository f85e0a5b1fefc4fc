#!/usr/bin/env python3
"""Train GraspGPT with DeepSpeed on 1..N GPUs, several nodes, or CPU ranks.

    deepspeed --num_gpus=2 graspGPT/train_deepspeed.py --batch_size 24 --micro_batch_size 6
    ./run_deepspeed_training.sh 2 --max_iters 1000

Every count is in optimizer steps. The loss (logged and differentiated) is the mean over every
real target token of the global batch: all ranks, all accumulation steps, no padding.
SIGTERM, SIGINT or SIGUSR1 to any rank: every rank stops at the same step, saves and exits 0.
`train` reads top to bottom: the set-up (each part a builder below it or in a library module),
then the loop over optimizer steps.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

# The one path change left: `deepspeed graspGPT/train_deepspeed.py` (from the root or from inside
# graspGPT/) must run with the package not installed, and the file run decides which checkout is used.
# Its own directory leaves the path: its modules (distributed.py, engine.py, config.py, ...) are the
# package's, not top-level modules of those names (dask's `distributed`, say).
if __package__ in (None, ""):
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import numpy as np
import torch
import torch.distributed as dist

from graspGPT import artifact, checkpoint
from graspGPT.config import Config, ConfigError, load_config
from graspGPT.data.dataset import (AugmentConfig, BatchLoader, BatchSchedule, DatasetError, TrainingSamples,
                                   val_batches)
from graspGPT.data.packing import PackedSchedule
from graspGPT.data.source import DataSourceError, resolve_data_dir
from graspGPT.data.storage import DataChangedError, StorageError, TokenStore
from graspGPT.data.synth import SynthError
from graspGPT.data.upstream import UpstreamError
from graspGPT.distributed import (TIMEOUT_SETTING, LaunchError, RankLost, Ranks, all_sum, lost_rank_message, minutes,
                                  peer_lost, setup)
from graspGPT.ds_config import (DeepSpeedConfigError, ResolvedDeepSpeed, load_deepspeed_json, outdated_warning,
                                resolve_deepspeed_config, save_resolved)
from graspGPT.engine import build_engine, build_model, model_config, train_step
from graspGPT.evaluation import TrainingEvaluator, validation_loss
from graspGPT.model import ModelConfigError, fa4_asked
from graspGPT.observe import NonFiniteError, StepReport, Throughput, Wandb, oom_message, rank_logger
from graspGPT.runlock import OutputLock, OutputLockError

# DeepSpeed's ZeRO calls a torch collective that torch has deprecated; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

USER_ERRORS = (ConfigError, DeepSpeedConfigError, DataSourceError, DatasetError, SynthError, ModelConfigError,
               StorageError, UpstreamError, OutputLockError, checkpoint.CheckpointError, checkpoint.RankFailed)


class StopRequest:
    """Set by SIGTERM/SIGINT/SIGUSR1; ranks agree on it at the next step boundary."""

    def __init__(self):
        self.signal = 0
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def train(cfg: Config, stop: StopRequest, cleanup: contextlib.ExitStack) -> int:
    t = cfg.trainer
    ranks = setup(cfg.system)  # the process group (every group with the run's timeout); this rank's device
    checkpoint.seed_everything(cfg.system.seed)  # the same initial weights on every rank

    # Everything that can refuse the run is checked before the output directory changes at all.
    ds = resolve_deepspeed(cfg, ranks)
    if fa4_asked(ranks.device, PRECISIONS[ds.precision], cfg.model.dropout):  # refused here, before the data
        ds.notes.append("attention: flash-attn-4's kernels (GRASPGPT_ATTENTION=fa4)")  # not in the saved config
    store = open_data(cfg, ranks)
    # what a checkpoint of this run is (artifact.py), and what one it resumes from must fit
    record = artifact.ModelRecord(model_config(cfg, store.vocab), store.vocab, store.workspace, store.grasp_cells)
    state = checkpoint.run_state(cfg, ranks.world, ds, record, store)
    out = take_output_dir(Path(cfg.system.output_dir), ranks, cleanup)
    plan = checkpoint.plan_run(t.resume, out, state, record.check_resume, ranks.device)
    if plan is not None and plan.convert:  # another world size or stage: DeepSpeed loads a universal checkpoint
        ds.config["checkpoint"] = {**ds.config.get("checkpoint", {}), "load_universal": True}

    # Accepted: from here on the run writes its output directory.
    log = start_log(out, cfg, ranks, store, ds)
    engine = start_engine(cfg, record, ds, plan, state, out, ranks, log)
    start = step = plan.step if plan is not None else 0
    data = build_data(cfg, store, ds, ranks, start, out, log)
    meter = Throughput(engine.module.flops_per_token(record.model.block_size), ranks.world, ranks.on_gpu)
    wandb = start_wandb(cfg, ranks, ds, engine.module.num_params(), out, log)
    skipped = plan.state.get("skipped_steps", 0) if plan is not None else 0
    report = StepReport(t, out, ranks.rank, start, skipped, meter, log, wandb, data.samples.stats)
    saver = checkpoint.Saver(engine, out, ranks.rank, t.keep_last, plan)

    def save(step: int) -> None:
        path = saver(step, {**state, "skipped_steps": report.skips.total})
        if path is not None:
            log.info(f"saved {path}")

    try:
        while step < t.max_iters:
            sb = next(data.loader)
            # One collective agrees on the token counts of the global batch and on a pending stop.
            targets, tokens, stops = all_sum([sb.num_targets, sb.num_tokens, float(stop.signal != 0)], ranks.device)
            if stops:
                log.info(f"stop requested by a signal on {int(stops)} rank(s): saving at step {step}, exiting")
                save(step)
                return 0
            lr = engine.get_lr()[0]  # the rate this step runs at
            loss_sum = train_step(engine, sb.micro, scale=ranks.world * ds.batch.grad_accum / max(targets, 1.0))
            (loss_total,) = all_sum([loss_sum.item()], ranks.device)
            step += 1
            metrics = report.step(step, loss_total / max(targets, 1.0), lr, engine.was_step_applied(),
                                  engine.get_global_grad_norm(), targets, tokens, sb.wait_s, sb.epoch)
            if step % t.eval_every == 0 or step == t.max_iters:
                report.validation(step, validation_loss(engine, data.val_samples, data.val_batches), metrics)
                grasps = data.grasp_eval.run(engine.module, step, ranks.rank, ranks.world, lockstep=ds.zero_stage == 3)
                report.grasps(step, grasps, metrics)
            report.write(metrics)
            if step % t.save_every == 0 or step == t.max_iters:
                save(step)
    finally:
        data.loader.close()
        report.close()
    log.info(f"done: {step} steps, data {data.samples.stats}")
    return 0


# -- the set-up, in the order train() runs it -------------------------------------------------------
def open_data(cfg: Config, ranks: Ranks) -> TokenStore:
    """The run's data set, checked on every rank (a bad one is an error on all of them, printed once).
    Local rank 0 builds caches (synthetic data, imports) first; the other ranks then find them."""
    def build():
        if ranks.local_rank == 0:
            resolve_data_dir(cfg.dataset, cfg.system.seed, progress=ranks.rank == 0)

    checkpoint.agree(ranks.device, build, errors=USER_ERRORS)
    return checkpoint.agree(ranks.device, lambda: TokenStore.open(resolve_data_dir(cfg.dataset, cfg.system.seed)),
                            errors=USER_ERRORS)


def resolve_deepspeed(cfg: Config, ranks: Ranks) -> ResolvedDeepSpeed:
    """deepspeed_config.json with everything the training config decides filled in (ds_config.py)."""
    source = cfg.deepspeed.config
    return resolve_deepspeed_config(load_deepspeed_json(source), cfg, ranks.world, ranks.accelerator,
                                    ranks.bf16_supported, source=source)


def take_output_dir(out: Path, ranks: Ranks, cleanup: contextlib.ExitStack) -> Path:
    """Rank 0 holds the output directory for the life of the run (see runlock.py); a second run is refused."""
    lock = checkpoint.agree(ranks.device, lambda: OutputLock.acquire(out) if ranks.rank == 0 else None,
                            errors=USER_ERRORS)
    if lock is not None:
        cleanup.callback(lock.release)
    return out


def start_log(out: Path, cfg: Config, ranks: Ranks, store: TokenStore, ds: ResolvedDeepSpeed) -> logging.Logger:
    """This rank's log; rank 0 also writes the effective training and DeepSpeed configs."""
    out.mkdir(parents=True, exist_ok=True)  # for ranks on a node that does not share rank 0's file system
    log = rank_logger(out, ranks.rank)
    train_idx, val_idx = store.split(cfg.dataset.val_fraction, cfg.system.seed)
    log.info(f"rank {ranks.rank}/{ranks.world} on {ranks.accelerator}; output {out.resolve()}; a collective waits "
             f"at most {minutes(ranks.timeout)} min for the other ranks ({TIMEOUT_SETTING})")
    if cfg.system.collective_timeout_min is not None and "DEEPSPEED_TIMEOUT" in os.environ:
        log.warning(f"DEEPSPEED_TIMEOUT={os.environ['DEEPSPEED_TIMEOUT']} is not used: {TIMEOUT_SETTING} is set")
    log.info(f"data {store.path}: {len(store)} samples ({len(train_idx)} train, {len(val_idx)} val), "
             f"V={store.vocab.size}")
    for note in ds.notes:
        log.info(f"note: {note}")
    if outdated_warning(ds):
        log.warning(outdated_warning(ds))
    if ranks.rank == 0:
        cfg.save(out / "config.json")
        save_resolved(ds, out / "deepspeed_config.resolved.json")
    return log


def start_engine(cfg: Config, record: artifact.ModelRecord, ds: ResolvedDeepSpeed,
                 plan: checkpoint.ResumePlan | None, state: dict, out: Path, ranks: Ranks, log: logging.Logger):
    """The model in DeepSpeed's engine: fresh, from trainer.init_from, or as the resumed checkpoint left it."""
    model = build_model(record.model, ds)
    if plan is None and cfg.trainer.init_from:
        checkpoint.agree(ranks.device, artifact.load_hf_weights, model, cfg.trainer.init_from, record.vocab)
        log.info(f"initial weights from {cfg.trainer.init_from}")
    elif cfg.trainer.init_from:
        log.info(f"trainer.init_from {cfg.trainer.init_from} is not used: the run resumes from {plan.path}")
    checkpoint.seed_everything(cfg.system.seed + ranks.rank)  # from here on (dropout) each rank draws its own numbers
    engine = build_engine(model, ds, cfg.trainer)
    batch = ds.batch
    log.info(f"model {cfg.model.model_type or 'custom'}: {model.num_params() / 1e6:.1f}M parameters; ZeRO "
             f"{ds.zero_stage}, {ds.precision}; global batch {batch.global_batch} = micro {batch.micro_batch_size} x "
             f"accumulation {batch.grad_accum} x {ranks.world} ranks")
    if plan is not None:
        checkpoint.resume(engine, plan, state, out, ranks.rank, ranks.device, log)
    return engine


@dataclass
class TrainingData:
    """What the loop reads: this rank's micro-batches of each step, the validation batches, the scenes
    decoded for grasp metrics."""

    samples: TrainingSamples
    loader: BatchLoader
    val_samples: TrainingSamples
    val_batches: list[np.ndarray]
    grasp_eval: TrainingEvaluator


def build_data(cfg: Config, store: TokenStore, ds: ResolvedDeepSpeed, ranks: Ranks, start_step: int,
               out: Path, log: logging.Logger) -> TrainingData:
    d, seed, batch = cfg.dataset, cfg.system.seed, ds.batch
    train_idx, val_idx = store.split(d.val_fraction, seed)
    samples = TrainingSamples(store, train_idx, d.max_sequence_length, AugmentConfig.of(d), seed,
                              overlong=d.overlong, loss_on=d.loss_on)
    if d.pack_length:
        schedule = PackedSchedule(samples.lengths, d.pack_length, batch.micro_batch_size, batch.grad_accum,
                                  ranks.world, seed)
        log.info(f"packing: rows of {schedule.row_len} positions, {schedule.fill():.1%} filled by the samples' "
                 f"lengths before augmentation; {schedule.steps_per_epoch} steps an epoch")
    else:
        schedule = BatchSchedule(samples.lengths, batch.micro_batch_size, batch.grad_accum, ranks.world, seed)
    loader = BatchLoader(samples, schedule, ranks.rank, start_step, pin_memory=ranks.on_gpu)
    val_augment = AugmentConfig.validation(d.train_grasps_per_object)
    val_samples = TrainingSamples(store, val_idx, d.max_sequence_length, val_augment, seed,
                                  overlong=d.overlong, loss_on=d.loss_on)
    val = val_batches(val_samples.lengths, batch.micro_batch_size, ranks.world, ranks.rank,
                      limit=cfg.trainer.eval_iters * batch.micro_batch_size * ranks.world)
    grasp_eval = TrainingEvaluator(store, val_idx, cfg.trainer.eval_scenes, out, seed=seed,
                                   max_len=d.max_sequence_length, temperature=cfg.trainer.eval_temperature,
                                   cell_temperature=cfg.trainer.eval_cell_temperature,
                                   independent=cfg.trainer.eval_independent_grasps)
    return TrainingData(samples, loader, val_samples, val, grasp_eval)


def start_wandb(cfg: Config, ranks: Ranks, ds: ResolvedDeepSpeed, num_params: int, out: Path,
                log: logging.Logger) -> Wandb:
    run_config = {**cfg.to_dict(), "batch": vars(ds.batch), "world_size": ranks.world, "num_params": num_params}
    wandb = Wandb(cfg.wandb, ranks.rank, run_config, out, log)
    if ds.batch.adjusted:
        log.warning(ds.batch.message)
        wandb.summary({"batch_adjustment": ds.batch.message})
    return wandb


def main(argv: list[str] | None = None) -> int:
    stop = StopRequest()  # first: a signal during start-up also ends in a clean stop
    # Every rank meets the same error (agree hands one rank's error to all): rank 0 alone prints it.
    quiet = int(os.environ.get("RANK", "0")) != 0
    try:
        cfg = load_config(argv)
        with contextlib.ExitStack() as cleanup:
            return train(cfg, stop, cleanup)
    except DataChangedError as exc:  # met mid-run, maybe by some ranks only: each one that met it says so
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except USER_ERRORS as exc:
        if not quiet:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as exc:
        print(f"error: {oom_message(exc)}", file=sys.stderr)
        return 3
    except LaunchError as exc:  # every rank says it: the rank that knows more may be the missing one
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RankLost as exc:  # every surviving rank says it: which ones survive is unknown
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a collective that failed or timed out because of another rank
        if not peer_lost(exc):
            raise
        print(f"error: {lost_rank_message(exc)}", file=sys.stderr)
        return 1


def exit_process(code: int) -> None:
    """Exit with `code`. Once ranks have talked, without interpreter shutdown: a gloo thread may still be
    dropping the last collective's tensors, and CPython stopping it mid-destructor aborts the process
    ("terminate called without an active exception", exit -6 instead of the code; seen on a rank
    refused at start-up)."""
    if dist.is_available() and dist.is_initialized():
        logging.shutdown()  # flush and close the rank logs
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
