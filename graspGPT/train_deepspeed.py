#!/usr/bin/env python3
"""Train GraspGPT with DeepSpeed on 1..N GPUs, several nodes, or CPU ranks.

    deepspeed --num_gpus=2 graspGPT/train_deepspeed.py --batch_size 24 --micro_batch_size 6
    ./run_deepspeed_training.sh 2 --max_iters 1000

Every count is in optimizer steps. The loss (logged and differentiated) is the mean over every
real target token of the global batch: all ranks, all accumulation steps, no padding.
SIGTERM, SIGINT or SIGUSR1 to any rank: every rank stops at the same step, saves and exits 0.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import signal
import sys
import warnings
from pathlib import Path

# The one path insertion left: `deepspeed graspGPT/train_deepspeed.py` (from the root or from inside
# graspGPT/) must run with the package not installed, and the file run decides which checkout is used.
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as dist

from graspGPT import artifact, checkpoint
from graspGPT.config import Config, ConfigError, load_config
from graspGPT.data.dataset import AugmentConfig, BatchLoader, BatchSchedule, TrainingSamples, val_batches
from graspGPT.data.source import DataSourceError, resolve_data_dir
from graspGPT.data.storage import DataChangedError, StorageError, TokenStore
from graspGPT.data.synth import SynthError
from graspGPT.data.upstream import UpstreamError
from graspGPT.data.vocab import Vocab
from graspGPT.ds_config import DeepSpeedConfigError, load_deepspeed_json, resolve_deepspeed_config, save_resolved
from graspGPT.evaluation import TrainingEvaluator, validation_loss
from graspGPT.model import GraspGPT, GraspGPTConfig, ModelConfigError
from graspGPT.observe import Progress, Throughput, Wandb, oom_message, rank_logger
from graspGPT.runlock import OutputLock, OutputLockError
from graspGPT.schedule import make_lr_scheduler

# DeepSpeed's ZeRO calls a torch collective that torch has deprecated; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

USER_ERRORS = (ConfigError, DeepSpeedConfigError, DataSourceError, SynthError, ModelConfigError, StorageError,
               UpstreamError, OutputLockError, checkpoint.CheckpointError, checkpoint.RankFailed)
METRICS_FILE = "metrics_rank0.jsonl"


class StopRequest:
    """Set by SIGTERM/SIGINT/SIGUSR1; ranks agree on it at the next step boundary."""

    def __init__(self):
        self.signal = 0
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the message says what to try."""


def all_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over all ranks in one collective (float64 keeps token counts exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def seed_everything(seed: int):
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_config(cfg: Config, vocab: Vocab) -> GraspGPTConfig:
    m = cfg.model
    return GraspGPTConfig.from_shape(model_type=m.model_type, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                                  n_kv_head=m.n_kv_head, vocab_size=vocab.size,
                                  block_size=cfg.dataset.max_sequence_length, dropout=m.dropout,
                                  rope_theta=m.rope_theta, activation_checkpointing=m.activation_checkpointing,
                                  voxel_grid=tuple(vocab.dims) if m.coordinate_embedding else None)


def data_identity(store: TokenStore) -> dict:
    """What tells one data set from another cheaply: the sample count, the token count and a hash of every
    sample's length (offsets: 8 bytes a sample), not of every token."""
    return {"num_samples": len(store), "num_tokens": int(store.offsets[-1]),
            "offsets_sha1": hashlib.sha1(np.ascontiguousarray(store.offsets, dtype=np.int64).tobytes()).hexdigest()}


def build_model(cfg: Config, vocab: Vocab, ds_config: dict, zero_stage: int) -> GraspGPT:
    mcfg = model_config(cfg, vocab)
    if zero_stage == 3:  # parameters are partitioned as they are created, so a model larger than one GPU fits
        import deepspeed
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            return GraspGPT(mcfg)
    return GraspGPT(mcfg)


def guard_nonfinite(engine) -> None:
    """Skip a step whose gradient is not finite, at every ZeRO stage and precision.

    DeepSpeed's ZeRO optimizers and its fp16/bf16 wrappers skip such a step themselves (the LR schedule
    does not advance and engine.was_step_applied() is False); a plain fp32 optimizer (ZeRO 0) would
    apply it. Its step gets the same check: gradients are averaged over the ranks by then, so every
    rank decides alike.
    """
    opt = engine.optimizer
    if hasattr(opt, "overflow"):
        return
    step = opt.step

    def checked_step(*args, **kwargs):
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        opt.overflow = bool(grads) and not torch.isfinite(torch.stack([g.norm() for g in grads]).sum()).item()
        if not opt.overflow:
            return step(*args, **kwargs)

    opt.overflow = False
    opt.step = checked_step


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


def train_step(engine, micro_batches, scale: float) -> float:
    """Forward, backward and (at the last micro-batch) the optimizer step; this rank's loss sum."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    for mb in micro_batches:
        s, _ = engine(mb.input_ids.to(engine.device), mb.targets.to(engine.device))
        engine.backward(s * scale)
        engine.step()
        loss_sum += s.detach().double()
    return loss_sum.item()


def open_data(cfg: Config, local_rank: int, device) -> TokenStore:
    """The run's data set, checked on every rank (a bad one is an error on all of them, printed once).
    Local rank 0 builds caches (synthetic data, imports) first; the other ranks then find them."""
    def build():
        if local_rank == 0:
            resolve_data_dir(cfg.dataset, cfg.system.seed, progress=dist.get_rank() == 0)

    checkpoint.agree(device, build, errors=USER_ERRORS)
    return checkpoint.agree(device, lambda: TokenStore.open(resolve_data_dir(cfg.dataset, cfg.system.seed)),
                            errors=USER_ERRORS)


def take_output_dir(out: Path, rank: int) -> OutputLock | None:
    """Rank 0 holds the output directory for the life of the run (see runlock.py)."""
    return OutputLock.acquire(out) if rank == 0 else None


class LaunchError(RuntimeError):
    """The ranks could not meet; every rank says so (the one that knows more may be the missing one)."""


def init_distributed() -> None:
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


def train(cfg: Config, stop: StopRequest, cleanup: contextlib.ExitStack) -> int:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not torch.cuda.is_available():
        # CPU ranks talk through plain gloo. DeepSpeed's shared-memory all-reduce would first compile
        # (~35 s) and leaves ~130 MB buffers in /dev/shm after every run.
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accel = get_accelerator()
    on_gpu = accel.device_name() == "cuda"
    if on_gpu:
        torch.cuda.set_device(local_rank)
    else:  # CPU ranks share the cores this process may run on (taskset and cgroup cpusets included)
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_SIZE", world))))
    device = accel.current_device_name()
    if cfg.system.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        # Deterministic mode would also fill every new tensor with NaN; DeepSpeed's gradient buckets
        # (hundreds of MB, written before they are read) would then cost seconds per step on CPU.
        torch.utils.deterministic.fill_uninitialized_memory = False
    seed_everything(cfg.system.seed)  # the same initial weights on every rank

    # Everything that can refuse the run is checked before the output directory changes at all.
    store = open_data(cfg, local_rank, device)
    vocab = store.vocab
    train_idx, val_idx = store.split(cfg.dataset.val_fraction, cfg.system.seed)
    bf16_ok = on_gpu and accel.is_bf16_supported()
    ds = resolve_deepspeed_config(load_deepspeed_json(cfg.deepspeed.config), cfg, world, accel.device_name(), bf16_ok,
                                  source=cfg.deepspeed.config)
    batch = ds.batch
    # what a checkpoint of this run is, and what one it resumes from must fit
    record = artifact.ModelRecord(model_config(cfg, vocab), vocab, store.workspace, store.grasp_cells)
    # The output directory: held by this run (a second run is refused), then what to resume from in it.
    out = Path(cfg.system.output_dir)
    lock = checkpoint.agree(device, take_output_dir, out, rank, errors=USER_ERRORS)
    if lock is not None:
        cleanup.callback(lock.release)
    plan = checkpoint.agree(device, checkpoint.plan_resume, cfg.trainer.resume, out, world, ds.zero_stage,
                            record.check_resume)
    checkpoint.check_same_plan(device, plan)

    # Accepted: from here on the run writes its output directory.
    out.mkdir(parents=True, exist_ok=True)  # for ranks on a node that does not share rank 0's file system
    log = rank_logger(out, rank)
    log.info(f"rank {rank}/{world} on {accel.device_name()}; output {out.resolve()}")
    log.info(f"data {store.path}: {len(store)} samples ({len(train_idx)} train, {len(val_idx)} val), V={vocab.size}")
    for note in ds.notes:
        log.info(f"note: {note}")
    if rank == 0:
        cfg.save(out / "config.json")
    if plan is not None and plan.convert:
        ds.config["checkpoint"] = {**ds.config.get("checkpoint", {}), "load_universal": True}
    if rank == 0:
        save_resolved(ds, out / "deepspeed_config.resolved.json")

    # Model and engine; then the resumed state, or the weights of --init_from.
    model = build_model(cfg, vocab, ds.config, ds.zero_stage)
    if plan is None and cfg.trainer.init_from:
        checkpoint.agree(device, artifact.load_hf_weights, model, cfg.trainer.init_from, vocab)
        log.info(f"initial weights from {cfg.trainer.init_from}")
    elif cfg.trainer.init_from:
        log.info(f"trainer.init_from {cfg.trainer.init_from} is not used: the run resumes from {plan.path}")
    seed_everything(cfg.system.seed + rank)  # from here on (dropout) each rank draws its own numbers
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.configure_param_groups(cfg.trainer.weight_decay), config=ds.config,
        lr_scheduler=functools.partial(make_lr_scheduler, trainer_cfg=cfg.trainer))
    guard_nonfinite(engine)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 partitions them
    log.info(f"model {cfg.model.model_type or 'custom'}: {n_params / 1e6:.1f}M parameters; ZeRO {ds.zero_stage}, "
             f"{ds.precision}; global batch {batch.global_batch} = micro {batch.micro_batch_size} x accumulation "
             f"{batch.grad_accum} x {world} ranks")
    start_step = 0
    if plan is not None:
        resume_from(engine, plan, cfg, out, rank, world, batch.global_batch, data_identity(store), device, log)
        start_step = plan.step

    max_len = cfg.dataset.max_sequence_length
    samples = TrainingSamples(store, train_idx, max_len, AugmentConfig.of(cfg.dataset), cfg.system.seed,
                              overlong=cfg.dataset.overlong, loss_on=cfg.dataset.loss_on)
    schedule = BatchSchedule(samples.lengths, batch.micro_batch_size, batch.grad_accum, world, cfg.system.seed)
    loader = BatchLoader(samples, schedule, rank, start_step)
    val_samples = TrainingSamples(store, val_idx, max_len, AugmentConfig.none(), cfg.system.seed,
                                  overlong=cfg.dataset.overlong, loss_on=cfg.dataset.loss_on)
    val = val_batches(val_samples.lengths, batch.micro_batch_size, world, rank,
                      limit=cfg.trainer.eval_iters * batch.micro_batch_size * world)
    grasp_eval = TrainingEvaluator(store, val_idx, cfg.trainer.eval_scenes, out, seed=cfg.system.seed, max_len=max_len,
                                   temperature=cfg.trainer.eval_temperature,
                                   cell_temperature=cfg.trainer.eval_cell_temperature)
    run_config = {**cfg.to_dict(), "batch": vars(batch), "world_size": world, "num_params": n_params}
    wandb = Wandb(cfg.wandb, rank, run_config, out, log)
    if batch.adjusted:
        log.warning(batch.message)
        wandb.summary({"batch_adjustment": batch.message})
    meter = Throughput(model.flops_per_token(max_len), world, on_gpu)
    progress = Progress(rank, start_step, cfg.trainer.max_iters)
    metrics = MetricsFile(out / METRICS_FILE, rank, start_step)
    skips = NonFiniteSteps(cfg.trainer.max_nonfinite_steps, plan.state.get("skipped_steps", 0) if plan else 0, log)
    saver = checkpoint.Saver(engine, out, rank, cfg.trainer.keep_last, plan)
    run_state = {"config": cfg.to_dict(), "world_size": world, "zero_stage": ds.zero_stage, "precision": ds.precision,
                 "global_batch": batch.global_batch, **record.to_json(), "data": data_identity(store)}

    def save(step):
        path = saver(step, {**run_state, "skipped_steps": skips.total})
        if path is not None:
            log.info(f"saved {path}")

    step = start_step
    try:
        while step < cfg.trainer.max_iters:
            sb = next(loader)
            # One collective agrees on the token counts of the global batch and on a pending stop.
            global_targets, global_tokens, stop_votes = all_sum(
                [sb.num_targets, sb.num_tokens, float(stop.signal != 0)], engine.device)
            if stop_votes:
                log.info(f"stop requested by a signal on {int(stop_votes)} rank(s): saving at step {step}, exiting")
                save(step)
                return 0
            lr = engine.get_lr()[0]  # the rate this step runs at
            loss_sum = train_step(engine, sb.micro, scale=world * batch.grad_accum / max(global_targets, 1.0))
            (loss_total,) = all_sum([loss_sum], engine.device)
            loss = loss_total / max(global_targets, 1.0)
            step += 1
            applied = engine.was_step_applied()
            skips.update(step, applied, loss)
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(global_targets),
                      "skipped": not applied}
            meter.add(int(global_targets), int(global_tokens), sb.wait_s)
            progress.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{meter.tokens_per_s():.0f}")
            if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_iters:
                fig = meter.figures()
                line = (f"step {step}/{cfg.trainer.max_iters} loss {loss:.4f} lr {lr:.3e} grad_norm {grad_norm:.3f} "
                        f"tokens/s {fig['tokens_per_s']:.0f} padding {fig['padding_frac']:.1%} "
                        f"data_wait {fig['data_wait_frac']:.1%} skipped {skips.total}")
                if on_gpu:
                    line += f" mfu {fig['mfu']:.1%} mem {fig['gpu_mem_peak_gb']:.1f}GB"
                log.info(line)
                wandb.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                           "train/skipped_steps": skips.total, "epoch": sb.epoch,
                           **{f"perf/{k}": v for k, v in fig.items()},
                           **{f"data/{k}": v for k, v in samples.stats.items()}}, step)
                meter.reset()
            if step % cfg.trainer.eval_every == 0 or step == cfg.trainer.max_iters:
                record["val_loss"] = val_loss = validation_loss(engine, val_samples, val)
                log.info(f"step {step} val_loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50)):.2f})")
                wandb.log({"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50))}, step)
                grasp_metrics(grasp_eval, engine, step, rank, world, ds.zero_stage, record, log, wandb)
            metrics.write(record)
            if step % cfg.trainer.save_every == 0 or step == cfg.trainer.max_iters:
                save(step)
    finally:
        loader.close()
        progress.close()
        metrics.close()
        wandb.finish()
    log.info(f"done: {step} steps, data {samples.stats}")
    return 0


def grasp_metrics(grasp_eval: TrainingEvaluator, engine, step: int, rank: int, world: int, zero_stage: int,
                  record: dict, log, wandb) -> None:
    """Decode the fixed validation scenes and report grasp precision, coverage and a picture."""
    gen = grasp_eval.run(engine.module, step, rank, world, lockstep=zero_stage == 3)
    if not gen:
        return
    picture = gen.pop("picture", None)
    # The metrics file holds what a resumed run must reproduce exactly; timings go to the log and wandb.
    record.update({f"eval/{k}": v for k, v in gen.items() if k not in ("eval_seconds", "decode_tokens_per_s")})
    log.info(f"step {step} grasps (T={grasp_eval.options['temperature']:g}): precision {gen['grasp_precision']:.3f}, any object {gen['any_tag_precision']:.3f}, "
             f"validity {gen['grasp_validity']:.3f}, coverage {gen['grasp_coverage']:.3f} (random "
             f"{gen['baseline_precision']:.3f}, {gen['baseline_any_tag_precision']:.3f}, {gen['baseline_validity']:.3f}, "
             f"{gen['baseline_coverage']:.3f}); grammar mask only: precision "
             f"{gen.get('grammar_grasp_precision', float('nan')):.3f}; unmasked valid "
             f"{gen.get('free_valid_rate', float('nan')):.3f}; {gen['scenes']} scenes in {gen['eval_seconds']:.0f}s"
             + (f", picture {picture}" if picture else ""))
    wandb.log({f"eval/{k}": v for k, v in gen.items()}, step)
    if picture:
        wandb.image("eval/picture", picture, step)


def resume_from(engine, plan: checkpoint.ResumePlan, cfg: Config, out: Path, rank: int, world: int,
                global_batch: int, data: dict, device, log) -> None:
    """Load a checkpoint into the engine and the RNG streams, and say what differs from the saved run."""
    saved_world = plan.state.get("world_size")
    if plan.convert:
        log.info(f"{plan.path} was saved by {saved_world} rank(s) with ZeRO {plan.state.get('zero_stage')}: "
                 f"converting it to DeepSpeed's universal checkpoint for {world} rank(s)")
    checkpoint.load(engine, plan, out, rank, device)
    engine.lr_scheduler.apply()  # the current schedule's rate, not the one the saved optimizer held
    if not checkpoint.agree(device, checkpoint.resume_rng, plan, rank, world, cfg.system.seed):
        log.warning(f"world size {saved_world} -> {world}: weights, optimizer state, step and learning rate are "
                    f"restored exactly; dropout draws new random streams, and sums run in another order")
    if plan.state.get("global_batch", global_batch) != global_batch:
        log.warning(f"the global batch was {plan.state['global_batch']} and is {global_batch} now: from here on "
                    f"the steps see other samples than the saved run would have")
    # A data set rewritten (or another one at the same path) changes what every later step trains on.
    data_changes = checkpoint.changed_settings({"data": plan.state.get("data", data)}, {"data": data})
    if data_changes:
        log.warning(f"the data set differs from the checkpoint's ({'; '.join(data_changes)}): from here on the steps "
                    f"see other samples than the saved run would have")
    changes = checkpoint.changed_settings(plan.state.get("config", {}), cfg.to_dict())
    if changes:
        log.warning("resuming with changed settings: " + "; ".join(changes))
    log.info(f"resumed from {plan.path} at step {plan.step}")


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
    except checkpoint.RankLost as exc:  # every surviving rank says it: which ones survive is unknown
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if not checkpoint.peer_lost(exc):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        print(f"error: a collective failed ({type(exc).__name__}: {detail}): {checkpoint.RANK_LOST}; the last "
              f"checkpoint is intact: --resume auto", file=sys.stderr)
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
