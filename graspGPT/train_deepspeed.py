#!/usr/bin/env python3
"""Train GraspGPT with DeepSpeed on 1..N GPUs, several nodes, or CPU ranks.

    deepspeed --num_gpus=2 graspGPT/train_deepspeed.py --batch_size 24 --micro_batch_size 6
    ./run_deepspeed_training.sh 2 --max_iters 1000

Every count is in optimizer steps. The loss (logged and differentiated) is the mean over every
real target token of the global batch: all ranks, all accumulation steps, no padding.
"""
from __future__ import annotations

import functools
import math
import os
import signal
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script, from the repo root or from inside graspGPT/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as dist

from graspGPT import checkpoint
from graspGPT.config import Config, ConfigError, load_config
from graspGPT.data.dataset import AugmentConfig, BatchLoader, BatchSchedule, TrainingSamples, collate, val_batches
from graspGPT.data.source import DataSourceError, open_dataset, resolve_data_dir
from graspGPT.ds_config import DeepSpeedConfigError, load_deepspeed_json, resolve_deepspeed_config, save_resolved
from graspGPT.model import GraspGPT, ModelConfig, ModelConfigError
from graspGPT.observe import Progress, Throughput, Wandb, oom_message, rank_logger
from graspGPT.schedule import make_lr_scheduler

# DeepSpeed's ZeRO calls a torch collective that torch has deprecated; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

USER_ERRORS = (ConfigError, DeepSpeedConfigError, DataSourceError, ModelConfigError, checkpoint.CheckpointError)


class StopRequest:
    """Set by SIGTERM/SIGINT/SIGUSR1; ranks agree on it at the next step boundary."""

    def __init__(self):
        self.signal = 0
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum


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


def build_model(cfg: Config, vocab_size: int, ds_config: dict, zero_stage: int) -> GraspGPT:
    m = cfg.model
    mcfg = ModelConfig.from_shape(model_type=m.model_type, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                                  n_kv_head=m.n_kv_head, vocab_size=vocab_size,
                                  block_size=cfg.dataset.max_sequence_length, dropout=m.dropout,
                                  rope_theta=m.rope_theta, activation_checkpointing=m.activation_checkpointing)
    if zero_stage == 3:  # parameters are partitioned as they are created, so a model larger than one GPU fits
        import deepspeed
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            return GraspGPT(mcfg)
    return GraspGPT(mcfg)


@torch.no_grad()
def evaluate(engine, samples: TrainingSamples, batches: list[np.ndarray], pad_id: int, max_len: int) -> float:
    """Mean loss over every real target token of the validation set (each rank holds a slice)."""
    engine.eval()
    loss_sum = count = 0.0
    for positions in batches:  # the same number on every rank, so ZeRO-3 gathers stay in step
        batch = collate([samples.get(int(k), epoch=0) for k in positions], pad_id=pad_id, max_len=max_len)
        s, n = engine(batch.input_ids.to(engine.device), batch.targets.to(engine.device))
        loss_sum, count = loss_sum + float(s), count + int(n)
    engine.train()
    loss_sum, count = all_sum([loss_sum, count], engine.device)
    return loss_sum / max(count, 1)


def train(cfg: Config) -> int:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    stop = StopRequest()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accel = get_accelerator()
    on_gpu = accel.device_name() == "cuda"
    if on_gpu:
        torch.cuda.set_device(local_rank)
    else:  # CPU ranks share the cores of the machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", world))))
    if cfg.system.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.system.seed)  # the same initial weights on every rank

    out = Path(cfg.system.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = rank_logger(out, rank)
    log.info(f"rank {rank}/{world} on {accel.device_name()}; output {out.resolve()}")
    if rank == 0:
        cfg.save(out / "config.json")

    # Data: local rank 0 builds caches (synthetic data, imports); the others then find them.
    if local_rank == 0:
        resolve_data_dir(cfg.dataset, cfg.system.seed, progress=rank == 0)
    dist.barrier()
    store = open_dataset(resolve_data_dir(cfg.dataset, cfg.system.seed))
    vocab = store.vocab
    train_idx, val_idx = store.split(cfg.dataset.val_fraction, cfg.system.seed)
    log.info(f"data {store.path}: {len(store)} samples ({len(train_idx)} train, {len(val_idx)} val), V={vocab.size}")

    # DeepSpeed config, batch math, model.
    bf16_ok = on_gpu and accel.is_bf16_supported()
    ds = resolve_deepspeed_config(load_deepspeed_json(cfg.deepspeed.config), cfg, world, accel.device_name(), bf16_ok,
                                  source=cfg.deepspeed.config)
    batch = ds.batch
    for note in ds.notes:
        log.info(f"note: {note}")
    if rank == 0:
        save_resolved(ds, out / "deepspeed_config.resolved.json")
    model = build_model(cfg, vocab.size, ds.config, ds.zero_stage)
    seed_everything(cfg.system.seed + rank)  # from here on (dropout) each rank draws its own numbers
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.configure_param_groups(cfg.trainer.weight_decay), config=ds.config,
        lr_scheduler=functools.partial(make_lr_scheduler, trainer_cfg=cfg.trainer))
    n_params = model.num_params()
    log.info(f"model {cfg.model.model_type or 'custom'}: {n_params / 1e6:.1f}M parameters; ZeRO {ds.zero_stage}, "
             f"{ds.precision}; global batch {batch.global_batch} = micro {batch.micro_batch_size} x accumulation "
             f"{batch.grad_accum} x {world} ranks")

    # Resume.
    start_step, resumed_from = 0, None
    resume = checkpoint.resolve_resume(cfg.trainer.resume, out)
    if resume is not None:
        state = checkpoint.read_state(resume)
        checkpoint.check_compatible(resume, state, model_shape(model), vocab.to_meta())
        engine.load_checkpoint(str(resume.parent), tag=resume.name)
        rng = checkpoint.load_rng(resume, rank)
        if rng is not None and state.get("world_size") == world:
            checkpoint.restore_rng(rng)
        start_step, resumed_from = state["step"], resume
        log.info(f"resumed from {resume} at step {start_step}")

    max_len = cfg.dataset.max_sequence_length
    samples = TrainingSamples(store, train_idx, max_len, AugmentConfig.of(cfg.dataset), cfg.system.seed,
                              overlong=cfg.dataset.overlong)
    schedule = BatchSchedule(samples.lengths, batch.micro_batch_size, batch.grad_accum, world, cfg.system.seed)
    loader = BatchLoader(samples, schedule, rank, start_step, pad_id=vocab.end, max_len=max_len)
    val_samples = TrainingSamples(store, val_idx, max_len, AugmentConfig.none(), cfg.system.seed,
                                  overlong=cfg.dataset.overlong)
    val = val_batches(val_samples.lengths, batch.micro_batch_size, world, rank,
                      limit=cfg.trainer.eval_iters * batch.micro_batch_size * world)
    run_config = {**cfg.to_dict(), "batch": vars(batch), "world_size": world, "num_params": n_params}
    wandb = Wandb(cfg.wandb, rank, run_config, out, log)
    if batch.adjusted:
        log.warning(batch.message)
        wandb.summary({"batch_adjustment": batch.message})
    meter = Throughput(model.flops_per_token(max_len), world, on_gpu)
    progress = Progress(rank, start_step, cfg.trainer.max_iters)
    state = {"config": cfg.to_dict(), "world_size": world, "model": model_shape(model), "vocab": vocab.to_meta(),
             "zero_stage": ds.zero_stage}

    def save(step):
        path = checkpoint.save(engine, out, step, state, rank, cfg.trainer.keep_last, protect=resumed_from)
        log.info(f"saved {path}")

    skipped_in_row = skipped_total = 0
    step = start_step
    try:
        while step < cfg.trainer.max_iters:
            sb = next(loader)
            # One collective agrees on the token count of the global batch and on a pending stop.
            global_targets, stop_votes = all_sum([sb.num_targets, float(stop.signal != 0)], engine.device)
            if stop_votes:
                log.info(f"stop requested (signal); saving at step {step}")
                save(step)
                return 0
            scale = world * batch.grad_accum / max(global_targets, 1.0)
            lr = engine.get_lr()[0]  # the rate this step runs at
            loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
            for mb in sb.micro:
                s, _ = engine(mb.input_ids.to(engine.device), mb.targets.to(engine.device))
                engine.backward(s * scale)
                engine.step()
                loss_sum += s.detach().double()
            step += 1
            (loss_total,) = all_sum([loss_sum.item()], engine.device)
            loss = loss_total / max(global_targets, 1.0)
            applied = engine.was_step_applied() and math.isfinite(loss)
            skipped_in_row = 0 if applied else skipped_in_row + 1
            skipped_total += not applied
            meter.add(int(global_targets), sb.num_tokens * world, sb.wait_s)
            progress.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{meter.figures()['tokens_per_s']:.0f}")
            if not applied:
                log.warning(f"step {step}: non-finite loss or gradient; the update was skipped "
                            f"({skipped_in_row} in a row, {skipped_total} in all)")
                if skipped_in_row > cfg.trainer.max_nonfinite_steps:
                    log.error(f"{skipped_in_row} non-finite steps in a row: stopping. The last good checkpoint is "
                              f"intact. Try a lower --learning_rate, bf16 instead of fp16, or a smaller grad_clip.")
                    return 1
            if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_iters:
                fig = meter.figures()
                grad_norm = engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                line = (f"step {step}/{cfg.trainer.max_iters} loss {loss:.4f} lr {lr:.3e} grad_norm {grad_norm:.3f} "
                        f"tokens/s {fig['tokens_per_s']:.0f} padding {fig['padding_frac']:.1%} "
                        f"data_wait {fig['data_wait_frac']:.1%} skipped {skipped_total}")
                if on_gpu:
                    line += f" mfu {fig['mfu']:.1%} mem {fig['gpu_mem_peak_gb']:.1f}GB"
                log.info(line)
                wandb.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                           "train/skipped_steps": skipped_total, "epoch": sb.epoch,
                           **{f"perf/{k}": v for k, v in fig.items()},
                           **{f"data/{k}": v for k, v in samples.stats.items()}}, step)
                meter.reset()
            if step % cfg.trainer.eval_every == 0 or step == cfg.trainer.max_iters:
                val_loss = evaluate(engine, val_samples, val, vocab.end, max_len)
                log.info(f"step {step} val_loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50)):.2f})")
                wandb.log({"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50))}, step)
            if step % cfg.trainer.save_every == 0 or step == cfg.trainer.max_iters:
                save(step)
    finally:
        loader.close()
        progress.close()
        wandb.finish()
    log.info(f"done: {step} steps, data {samples.stats}")
    return 0


def model_shape(model: GraspGPT) -> dict:
    c = model.cfg
    return {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_kv_head": c.n_kv_head,
            "vocab_size": c.vocab_size}


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
        return train(cfg)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as exc:
        print(f"error: {oom_message(exc)}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
