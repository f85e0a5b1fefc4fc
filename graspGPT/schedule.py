"""The learning-rate schedule, the only implementation of it.

Linear warmup lr*(step+1)/warmup_iters for step < warmup_iters, then over [warmup_iters, max_iters)
cosine (or linear) decay from learning_rate to min_lr, or constant learning_rate; min_lr from
max_iters on (constant: learning_rate). `step` counts optimizer steps already taken (pitfall 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step: int, *, learning_rate: float, min_lr: float, warmup_iters: int, max_iters: int,
          schedule: str) -> float:
    """Learning rate of the optimizer step that follows `step` completed steps (0 for the first)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    if schedule == "constant":
        return learning_rate
    if step >= max_iters:
        return min_lr
    progress = (step - warmup_iters) / (max_iters - warmup_iters)  # in [0, 1); max_iters > step >= warmup_iters
    if schedule == "linear":
        return learning_rate - (learning_rate - min_lr) * progress
    return min_lr + 0.5 * (learning_rate - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """A schedule's parameters, named as in TrainerConfig (either works for make_lr_scheduler)."""

    lr_schedule: str
    learning_rate: float
    min_lr: float
    warmup_iters: int
    max_iters: int

    def lr(self, step: int) -> float:
        return lr_at(step, learning_rate=self.learning_rate, min_lr=self.min_lr, warmup_iters=self.warmup_iters,
                     max_iters=self.max_iters, schedule=self.lr_schedule)

    def describe(self) -> str:
        end = self.learning_rate if self.lr_schedule == "constant" else self.min_lr
        return (f"{self.lr_schedule} {self.learning_rate:g} -> {end:g}, linear warmup {self.warmup_iters} steps, "
                f"{self.max_iters} steps")

    @classmethod
    def of(cls, trainer_cfg) -> "Schedule":
        return cls(trainer_cfg.lr_schedule, trainer_cfg.learning_rate, trainer_cfg.min_lr,
                   trainer_cfg.warmup_iters, trainer_cfg.max_iters)


class _ScheduleLR(LambdaLR):
    """LambdaLR that restores only its position: the rates always come from the current schedule.

    A checkpoint's `base_lrs` would otherwise bring back the old peak after a resume with another
    --learning_rate, and LambdaLR alone leaves the fresh optimizer at lr_at(0) for the next step.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict.get("_step_count", self.last_epoch + 1)
        self.apply()

    def apply(self) -> None:
        """Put the schedule's rate for the current position into the optimizer (DeepSpeed restores
        the saved optimizer's rates after loading the scheduler, so the trainer calls this again)."""
        self._last_lr = [base * lam(self.last_epoch) for base, lam in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def make_lr_scheduler(optimizer: torch.optim.Optimizer, trainer_cfg) -> LambdaLR:
    """A LambdaLR giving every param group lr_at(k) for optimizer step k.

    Call scheduler.step() after each optimizer step (DeepSpeed does this for a client scheduler,
    skipping fp16-overflow steps). Pass it to deepspeed.initialize as a callable:
    `lr_scheduler=functools.partial(make_lr_scheduler, trainer_cfg=cfg.trainer)`.
    """
    schedule = Schedule.of(trainer_cfg)
    peak = schedule.learning_rate
    for group in optimizer.param_groups:  # LambdaLR scales each group's initial_lr; make it the peak
        group["lr"] = group["initial_lr"] = peak
    # The constructor takes step 0, so the first optimizer step already runs at lr_at(0).
    return _ScheduleLR(optimizer, lambda k: schedule.lr(k) / peak)
