"""The model and its DeepSpeed engine as the trainer builds them, and one optimizer step on it.

bench/bench_train.py builds its engines and runs its steps with these functions too, so what it
measures is the trainer's step.
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch

from .config import Config
from .data.vocab import Vocab
from .ds_config import ResolvedDeepSpeed
from .model import GraspGPT, GraspGPTConfig
from .schedule import make_lr_scheduler


def model_config(cfg: Config, vocab: Vocab) -> GraspGPTConfig:
    """The model as the training config's model section and the data's vocabulary make it."""
    m = cfg.model
    return GraspGPTConfig.from_shape(model_type=m.model_type, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                                  n_kv_head=m.n_kv_head, vocab_size=vocab.size,
                                  block_size=cfg.dataset.max_sequence_length, dropout=m.dropout,
                                  rope_theta=m.rope_theta, activation_checkpointing=m.activation_checkpointing,
                                  voxel_grid=tuple(vocab.dims) if m.coordinate_embedding else None,
                                  axis_init=m.coordinate_init)


def zero_init(ds: ResolvedDeepSpeed | None):
    """Where a model is created: under ZeRO-3 its parameters are partitioned as they are made, so a model
    larger than one GPU fits."""
    if ds is not None and ds.zero_stage == 3:
        import deepspeed
        return deepspeed.zero.Init(config_dict_or_path=ds.config)
    return contextlib.nullcontext()


def build_model(mcfg: GraspGPTConfig, ds: ResolvedDeepSpeed | None = None) -> GraspGPT:
    with zero_init(ds):
        return GraspGPT(mcfg)


def build_engine(model: torch.nn.Module, ds: ResolvedDeepSpeed, trainer_cfg):
    """DeepSpeed's engine for `model` (anything with GraspGPT's `configure_param_groups`): weight decay on the
    layers' 2-D weights only, the trainer's learning-rate schedule, non-finite steps skipped at every stage."""
    import deepspeed
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.configure_param_groups(trainer_cfg.weight_decay), config=ds.config,
        lr_scheduler=functools.partial(make_lr_scheduler, trainer_cfg=trainer_cfg))
    guard_nonfinite(engine)
    return engine


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


def train_step(engine, micro_batches, scale, host_s: dict | None = None) -> torch.Tensor:
    """One optimizer step: forward and backward per micro-batch, DeepSpeed's step at the last one.

    Each micro-batch's loss is a sum over its real targets; `scale` (ranks x accumulation / the global
    batch's target count) makes the gradient the mean over every real target of the global batch. Returns
    this rank's loss sum, on the device, not synchronized. `host_s` adds up the host seconds spent in the
    forward, backward and step calls (bench/bench_train.py).
    """
    device = engine.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for mb in micro_batches:
        t0 = time.perf_counter()
        mb = mb.to(device, non_blocking=True)
        s, _ = engine(mb.input_ids, mb.targets, cu_seqlens=mb.cu_seqlens, num_targets=mb.num_targets)
        t1 = time.perf_counter()
        engine.backward(s * scale)
        t2 = time.perf_counter()
        engine.step()
        if host_s is not None:
            host_s["forward"] += t1 - t0
            host_s["backward"] += t2 - t1
            host_s["step"] += time.perf_counter() - t2
        loss_sum += s.detach().double()
    return loss_sum
