import copy
import json
import os
import socket
import subprocess
import sys

import pytest

from graspGPT.config import ConfigError, config_from_dict
from graspGPT.ds_config import (DERIVED, REPO_ROOT, DeepSpeedConfigError, load_deepspeed_json, outdated_warning,
                                plan_batch, resolve_deepspeed_config, save_resolved)

SHIPPED = load_deepspeed_json(REPO_ROOT / "deepspeed_config.json")


def resolve(ds=None, world_size=1, device="cpu", bf16_supported=False, **trainer):
    cfg = config_from_dict({"trainer": trainer} if trainer else {})
    return resolve_deepspeed_config(copy.deepcopy(SHIPPED if ds is None else ds), cfg, world_size, device,
                                    bf16_supported)


def autos(node):
    if isinstance(node, dict):
        return [a for v in node.values() for a in autos(v)]
    return [node] if node == "auto" else []


# ---------------------------------------------------------------- batch math (pitfall 11)

@pytest.mark.parametrize("batch,micro,world,acc,global_batch,adjusted", [
    (24, 6, 1, 4, 24, False),
    (24, 6, 2, 2, 24, False),
    (24, 5, 2, 2, 20, True),     # 2.4 units -> 2
    (26, 5, 2, 3, 30, True),     # 2.6 units -> 3
    (25, 5, 2, 3, 30, True),     # tie 20/30 -> the larger
    (7, 6, 2, 1, 12, True),      # below one unit -> accumulation 1
    (100, 3, 4, 8, 96, True),
    (1, 1, 1, 1, 1, False),
    (32, 8, 2, 2, 32, False),    # the guide's example
])
def test_plan_batch(batch, micro, world, acc, global_batch, adjusted):
    plan = plan_batch(batch, micro, world)
    assert (plan.grad_accum, plan.global_batch, plan.adjusted) == (acc, global_batch, adjusted)
    assert plan.global_batch == plan.micro_batch_size * plan.grad_accum * plan.world_size
    assert (plan.requested, plan.world_size, plan.micro_batch_size) == (batch, world, micro)


def test_plan_batch_messages():
    assert plan_batch(24, 5, 2).message == \
        "global batch 24 is not a multiple of micro 5 x 2 ranks; using 20 (accumulation 2)"
    assert plan_batch(7, 6, 2).message == "global batch 7 is smaller than micro 6 x 2 ranks; using 12 (accumulation 1)"
    assert plan_batch(24, 6, 1).message == "global batch 24 = micro 6 x accumulation 4 x 1 rank"


@pytest.mark.parametrize("args", [(0, 6, 1), (24, 0, 1), (24, 6, 0), (24, 2.5, 1), (24, True, 1)])
def test_plan_batch_errors(args):
    with pytest.raises(DeepSpeedConfigError, match="no batch plan is feasible"):
        plan_batch(*args)


# ---------------------------------------------------------------- derived keys

def test_shipped_json_gets_every_derived_key_on_cpu():
    r = resolve(world_size=2, batch_size=24, micro_batch_size=5, grad_clip=1.5, learning_rate=3e-4,
                min_lr=3e-6, betas=[0.8, 0.9], weight_decay=0.05, warmup_iters=7, max_iters=70)
    c = r.config
    assert autos(c) == [] and r.outdated == []
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (20, 5, 2)
    assert c["gradient_clipping"] == 1.5
    assert c["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.8, 0.9], "eps": 1e-8, "weight_decay": 0.05,
                                        "torch_adam": True}
    assert c["zero_optimization"]["stage"] == 2 and r.zero_stage == 2
    assert c["bf16"]["enabled"] is False and c["fp16"]["enabled"] is False and r.precision == "fp32"
    assert "scheduler" not in c  # the toolkit runs the schedule, not DeepSpeed
    assert r.batch.adjusted and r.batch.message in r.notes
    assert any("torch_adam" in n for n in r.notes)
    json.dumps(c)  # plain JSON for deepspeed.initialize


# What deepspeed_config.json held before the training config owned the batch, clipping, optimizer values and
# schedule: "auto" for each, and a scheduler section that the trainer only checked.
EARLIER = {**copy.deepcopy(SHIPPED), "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
           "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto",
                                                              "warmup_type": "linear", "cos_min_ratio": "auto"}}}
EARLIER["optimizer"]["params"].update(lr="auto", betas="auto", weight_decay="auto")


def test_an_earlier_json_still_works_and_is_told_what_to_remove():
    r = resolve(EARLIER, world_size=2, batch_size=24, micro_batch_size=5)
    assert r.config == resolve(world_size=2, batch_size=24, micro_batch_size=5).config
    warning = outdated_warning(r)
    for key in ("train_batch_size", "gradient_clipping", "optimizer.params.lr", '"scheduler" section'):
        assert key in warning
    assert "remove them" in warning and "\n" not in warning
    assert outdated_warning(resolve()) is None


def test_input_not_mutated():
    ds = copy.deepcopy(EARLIER)
    resolve(ds)
    assert ds == EARLIER


def test_precision_on_cuda():
    r = resolve(device="cuda", bf16_supported=True)
    assert r.config["bf16"]["enabled"] is True and r.precision == "bf16"
    assert "torch_adam" not in r.config["optimizer"]["params"]
    r = resolve(device="cuda", bf16_supported=False)
    assert r.config["bf16"]["enabled"] is False and r.precision == "fp32"
    fp16 = copy.deepcopy(SHIPPED)
    fp16["fp16"]["enabled"] = True
    r = resolve(fp16, device="cuda", bf16_supported=True)  # bf16 "auto" yields to an explicit fp16
    assert (r.config["fp16"]["enabled"], r.config["bf16"]["enabled"], r.precision) == (True, False, "fp16")


def test_precision_errors():
    fp16 = copy.deepcopy(SHIPPED)
    fp16["fp16"]["enabled"] = True
    with pytest.raises(DeepSpeedConfigError, match="fp16 is not supported on CPU"):
        resolve(fp16, device="cpu")
    fp16["bf16"]["enabled"] = True
    with pytest.raises(DeepSpeedConfigError, match="both true"):
        resolve(fp16, device="cuda", bf16_supported=True)
    bf16 = copy.deepcopy(SHIPPED)
    bf16["bf16"]["enabled"] = True
    with pytest.raises(DeepSpeedConfigError, match="does not support bf16"):
        resolve(bf16, device="cuda", bf16_supported=False)
    bf16["bf16"]["enabled"] = "yes"
    with pytest.raises(DeepSpeedConfigError, match='must be true, false or "auto"'):
        resolve(bf16)


def test_explicit_equal_values_are_fine():
    ds = copy.deepcopy(EARLIER)
    ds.update(train_batch_size=24, train_micro_batch_size_per_gpu=6, gradient_accumulation_steps=4, gradient_clipping=2)
    ds["optimizer"]["params"].update(lr=2e-4, betas=[0.9, 0.95], weight_decay=0.01)
    ds["scheduler"]["params"].update(warmup_num_steps=500, total_num_steps=20000, cos_min_ratio=1e-6 / 2e-4)
    r = resolve(ds)
    assert r.config["train_batch_size"] == 24 and r.config["gradient_clipping"] == 2 and "scheduler" not in r.config
    assert "gradient_clipping" in outdated_warning(r)


def test_all_conflicts_in_one_error():
    ds = copy.deepcopy(EARLIER)
    ds.update(train_batch_size=32, train_micro_batch_size_per_gpu=3, gradient_accumulation_steps=7,
              gradient_clipping=1.0)
    ds["optimizer"]["params"].update(lr=1e-3, betas=[0.9, 0.999], weight_decay=0.1)
    ds["scheduler"]["params"].update(warmup_num_steps=100, total_num_steps=999, cos_min_ratio=0.1)
    with pytest.raises(DeepSpeedConfigError) as err:
        resolve(ds)
    message = str(err.value)
    expected = ["train_batch_size is 32 but the batch plan from trainer.batch_size=24, micro_batch_size=6 and "
                "1 rank(s) is 24", "train_micro_batch_size_per_gpu is 3 but trainer.micro_batch_size "
                "(--micro_batch_size) is 6", "gradient_accumulation_steps is 7",
                "gradient_clipping is 1.0 but trainer.grad_clip is 2.0", "optimizer.params.lr is 0.001",
                "optimizer.params.betas is [0.9, 0.999] but trainer.betas is [0.9, 0.95]",
                "optimizer.params.weight_decay is 0.1",
                'the "scheduler" section says scheduler.params.warmup_num_steps 100, '
                "scheduler.params.total_num_steps 999, scheduler.params.cos_min_ratio 0.1, but the trainer runs "
                "cosine 0.0002 -> 1e-06, linear warmup 500 steps, 20000 steps"]
    for fragment in expected:
        assert fragment in message
    assert f"in {len(expected)} place(s)" in message and "\n" not in message
    assert message.endswith("The training config owns these: remove them from deepspeed_config.json and set the "
                            "training values (--config file or flag)")


def test_an_earlier_scheduler_section_must_agree_with_the_schedule():
    for schedule, kind in (("linear", "WarmupDecayLR"), ("constant", "WarmupLR"), ("linear", "auto")):
        ds = copy.deepcopy(EARLIER)
        ds["scheduler"] = {"type": kind, "params": {"warmup_num_steps": "auto", "warmup_max_lr": 2e-4}}
        assert '"scheduler" section' in outdated_warning(resolve(ds, lr_schedule=schedule))
    ds = copy.deepcopy(EARLIER)
    with pytest.raises(DeepSpeedConfigError, match=r'says scheduler.type "WarmupCosineLR", but the trainer runs linear'):
        resolve(ds, lr_schedule="linear")
    ds["scheduler"]["params"]["warmup_type"] = "log"
    with pytest.raises(DeepSpeedConfigError, match='scheduler.params.warmup_type "log"'):
        resolve(ds)
    ds["scheduler"] = {"type": "OneCycle", "params": {}}
    with pytest.raises(DeepSpeedConfigError, match='scheduler.type "OneCycle"'):
        resolve(ds)


def test_optimizer_handling():
    ds = copy.deepcopy(SHIPPED)
    ds["optimizer"]["params"]["torch_adam"] = False  # explicit: respected
    assert resolve(ds).config["optimizer"]["params"]["torch_adam"] is False
    ds = copy.deepcopy(SHIPPED)
    ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}  # DeepSpeedCPUAdam is the right one there
    assert "torch_adam" not in resolve(ds).config["optimizer"]["params"]
    ds["optimizer"] = {"type": "SGD", "params": {"momentum": 0.9}}  # no betas or weight decay unless listed
    assert resolve(ds).config["optimizer"] == {"type": "SGD", "params": {"lr": 2e-4, "momentum": 0.9}}
    ds["optimizer"]["params"]["weight_decay"] = "auto"
    assert resolve(ds).config["optimizer"]["params"]["weight_decay"] == 0.01
    del ds["optimizer"]
    with pytest.raises(DeepSpeedConfigError, match='needs an "optimizer" section'):
        resolve(ds)


def test_zero_stage():
    cfg = config_from_dict({"deepspeed": {"zero_stage": 3}})
    r = resolve_deepspeed_config(copy.deepcopy(SHIPPED), cfg, 1, "cpu", False)
    assert r.zero_stage == 3 and r.config["zero_optimization"]["stage"] == 3
    assert any("replaces stage 2" in n for n in r.notes)
    ds = copy.deepcopy(SHIPPED)
    ds["zero_optimization"]["stage"] = "auto"
    assert resolve(ds).zero_stage == 2
    ds["zero_optimization"]["stage"] = 5
    with pytest.raises(DeepSpeedConfigError, match="zero_optimization.stage must be"):
        resolve(ds)


def test_overlap_comm_is_off_on_one_rank_only():
    """One rank has nothing to overlap, and DeepSpeed's overlap synchronizes the GPU after every backward."""
    one = resolve()
    assert one.config["zero_optimization"]["overlap_comm"] is False
    assert any("overlap_comm -> false on one rank" in n for n in one.notes)
    two = resolve(world_size=2)
    assert two.config["zero_optimization"]["overlap_comm"] is True
    assert not any("overlap_comm" in n for n in two.notes)
    cfg = config_from_dict({"deepspeed": {"zero_stage": 3}})  # stage 3's overlap also prefetches: left alone
    assert resolve_deepspeed_config(copy.deepcopy(SHIPPED), cfg, 1, "cpu", False).config[
        "zero_optimization"]["overlap_comm"] is True


def test_unfillable_auto():
    ds = copy.deepcopy(SHIPPED)
    ds["zero_optimization"]["reduce_bucket_size"] = "auto"
    with pytest.raises(DeepSpeedConfigError, match='zero_optimization.reduce_bucket_size is "auto" but'):
        resolve(ds)


def test_notes_for_long_warmup():
    r = resolve(warmup_iters=500, max_iters=20)
    assert any("the whole run is warmup" in n for n in r.notes)


def test_save_resolved(tmp_path):
    r = resolve()
    save_resolved(r, tmp_path / "run" / "deepspeed_config.resolved.json")
    saved = json.loads((tmp_path / "run" / "deepspeed_config.resolved.json").read_text())
    assert saved == r.config and autos(saved) == []


def test_the_guide_says_which_file_owns_each_key():
    guide = (REPO_ROOT / "DeepSpeed_Training_Guide.md").read_text()
    table = guide[guide.index("| 键 | 归属 |"):].split("\n\n")[0]
    for key, owner in DERIVED.items():
        assert f"`{key}`" in table and owner.split(",")[0].split(" ")[0] in table, key
    for key in ("zero_optimization", "bf16", "fp16", "optimizer.type"):
        assert f"`{key}`" in table, key


# ---------------------------------------------------------------- loading the JSON

def test_load_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default name from anywhere: falls back to the repo root
    assert load_deepspeed_json("deepspeed_config.json") == SHIPPED
    monkeypatch.chdir(REPO_ROOT / "graspGPT")  # the guide's --deepspeed_config ../deepspeed_config.json
    assert load_deepspeed_json("../deepspeed_config.json") == SHIPPED
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DeepSpeedConfigError, match="not found .*pass --deepspeed_config"):
        load_deepspeed_json("missing.json")
    (tmp_path / "bad.json").write_text('{\n  "train_batch_size": 4,\n}')
    with pytest.raises(DeepSpeedConfigError, match="invalid JSON at line 3 column 1"):
        load_deepspeed_json("bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DeepSpeedConfigError, match="expected a JSON object"):
        load_deepspeed_json("list.json")
    assert issubclass(DeepSpeedConfigError, ConfigError)


# ---------------------------------------------------------------- DeepSpeed accepts it

INIT_SCRIPT = r"""
import functools, json
import torch, deepspeed, deepspeed.ops
from graspGPT.config import config_from_dict
from graspGPT.ds_config import load_deepspeed_json, resolve_deepspeed_config
from graspGPT.schedule import Schedule, make_lr_scheduler

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a ~35 s JIT build; gloo suffices here
cfg = config_from_dict({"trainer": {"batch_size": 4, "micro_batch_size": 2, "warmup_iters": 2, "max_iters": 6}})
r = resolve_deepspeed_config(load_deepspeed_json("deepspeed_config.json"), cfg, 1, "cpu", False)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
groups = [{"params": [p for p in model.parameters() if p.dim() >= 2]},
          {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
engine, optimizer, _, scheduler = deepspeed.initialize(
    model=model, config=r.config, model_parameters=groups,
    lr_scheduler=functools.partial(make_lr_scheduler, trainer_cfg=cfg.trainer))
lrs = []
for step in range(4):
    for micro in range(engine.gradient_accumulation_steps()):
        lrs.append([g["lr"] for g in engine.optimizer.param_groups])
        engine.backward(engine(torch.randn(2, 8)).pow(2).mean())
        engine.step()
spec = Schedule.of(cfg.trainer)
print(json.dumps({"lrs": lrs, "want": [spec.lr(k) for k in range(4)], "gas": engine.gradient_accumulation_steps(),
                  "tbs": engine.train_batch_size(), "stage": engine.zero_optimization_stage(),
                  "steps": engine.global_steps, "last_epoch": scheduler.last_epoch,
                  "wd": [g["weight_decay"] for g in engine.optimizer.param_groups],
                  "basic": type(engine.basic_optimizer).__module__ + "." + type(engine.basic_optimizer).__name__}))
"""


@pytest.mark.ranks
def test_deepspeed_initialize_accepts_resolved_config(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", INIT_SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["gas"], out["tbs"], out["stage"], out["steps"], out["last_epoch"]) == (2, 4, 2, 4, 4)
    assert out["basic"] == "torch.optim.adamw.AdamW"  # torch_adam: no CPU extension compiled
    assert out["wd"] == [0.01, 0.0]  # group weight decay kept, the JSON's fills the rest
    # every micro-step of optimizer step k ran at lr_at(k)
    for i, lrs in enumerate(out["lrs"]):
        assert lrs == pytest.approx([out["want"][i // 2]] * 2, rel=1e-12)
