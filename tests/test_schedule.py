import math

import pytest
import torch

from graspGPT.config import config_from_dict
from graspGPT.schedule import Schedule, lr_at, make_lr_scheduler

LR, MIN, WARM, MAX = 2e-4, 1e-6, 10, 110


def at(step, schedule):
    return lr_at(step, learning_rate=LR, min_lr=MIN, warmup_iters=WARM, max_iters=MAX, schedule=schedule)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_first_step(schedule):
    assert at(0, schedule) == pytest.approx(LR * 1 / WARM)
    assert at(4, schedule) == pytest.approx(LR * 5 / WARM)
    assert at(WARM - 1, schedule) == pytest.approx(LR)


def test_cosine_key_steps():
    assert at(WARM, "cosine") == pytest.approx(LR)
    assert at(60, "cosine") == pytest.approx(MIN + 0.5 * (LR - MIN))  # halfway through [10, 110)
    assert at(MAX - 1, "cosine") == pytest.approx(MIN + 0.5 * (LR - MIN) * (1 + math.cos(math.pi * 99 / 100)))
    assert at(MAX, "cosine") == MIN and at(MAX + 50, "cosine") == MIN
    values = [at(s, "cosine") for s in range(WARM, MAX + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_linear_key_steps():
    assert at(WARM, "linear") == pytest.approx(LR)
    assert at(60, "linear") == pytest.approx(LR - (LR - MIN) * 0.5)
    assert at(MAX - 1, "linear") == pytest.approx(LR - (LR - MIN) * 0.99)
    assert at(MAX, "linear") == MIN


def test_constant_key_steps():
    for step in (WARM, 60, MAX - 1, MAX, MAX + 5):
        assert at(step, "constant") == LR


def test_edge_cases():
    no_warm = dict(learning_rate=LR, min_lr=MIN, warmup_iters=0, max_iters=MAX, schedule="cosine")
    assert lr_at(0, **no_warm) == LR
    # warmup longer than the run: the run never leaves warmup, no division by zero
    long_warm = dict(learning_rate=LR, min_lr=MIN, warmup_iters=500, max_iters=20, schedule="cosine")
    assert lr_at(19, **long_warm) == pytest.approx(LR * 20 / 500)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at(0, **{**no_warm, "schedule": "cosin"})
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_at(-1, **no_warm)


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    # the optimizer's own lr must not matter: the schedule sets it
    opt = torch.optim.AdamW([{"params": [model.weight], "weight_decay": 0.1},
                             {"params": [model.bias], "weight_decay": 0.0}], lr=123.0)
    return model, opt


def train_steps(model, opt, sched, n):
    seen = []
    for _ in range(n):
        seen.append([g["lr"] for g in opt.param_groups])  # lr the coming step will use
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return seen


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lambdalr_matches_lr_at(schedule):
    cfg = config_from_dict({"trainer": {"learning_rate": LR, "min_lr": MIN, "warmup_iters": 5, "max_iters": 15,
                                        "lr_schedule": schedule}})
    spec = Schedule.of(cfg.trainer)
    model, opt = model_and_optimizer()
    sched = make_lr_scheduler(opt, cfg.trainer)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    seen = train_steps(model, opt, sched, 20)
    for k, lrs in enumerate(seen):
        assert lrs == pytest.approx([spec.lr(k)] * 2, rel=1e-12), k


def test_state_dict_resumes_exactly():
    cfg = config_from_dict({"trainer": {"warmup_iters": 4, "max_iters": 20}})
    spec = Schedule.of(cfg.trainer)
    model, opt = model_and_optimizer()
    sched = make_lr_scheduler(opt, cfg.trainer)
    train_steps(model, opt, sched, 7)
    state = sched.state_dict()
    assert set(map(type, state["base_lrs"])) == {float}  # plain numbers, nothing to unpickle

    model2, opt2 = model_and_optimizer()  # a fresh process: new optimizer (its lr not restored)
    sched2 = make_lr_scheduler(opt2, cfg.trainer)
    sched2.load_state_dict(state)
    seen = train_steps(model2, opt2, sched2, 13)
    for k, lrs in enumerate(seen, start=7):
        assert lrs == pytest.approx([spec.lr(k)] * 2, rel=1e-12), k


def test_resume_with_another_learning_rate_follows_the_new_schedule():
    old = config_from_dict({"trainer": {"warmup_iters": 4, "max_iters": 20, "learning_rate": 1e-3}})
    new = config_from_dict({"trainer": {"warmup_iters": 4, "max_iters": 20, "learning_rate": 3e-4}})
    model, opt = model_and_optimizer()
    sched = make_lr_scheduler(opt, old.trainer)
    train_steps(model, opt, sched, 6)
    model2, opt2 = model_and_optimizer()
    sched2 = make_lr_scheduler(opt2, new.trainer)
    sched2.load_state_dict(sched.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([Schedule.of(new.trainer).lr(6)] * 2, rel=1e-12)


def test_schedule_describe():
    s = Schedule("cosine", 2e-4, 1e-6, 500, 20000)
    assert s.describe() == "cosine 0.0002 -> 1e-06, linear warmup 500 steps, 20000 steps"
