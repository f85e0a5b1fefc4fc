"""Real DeepSpeed training on CPU ranks: ZeRO stages, the gradient contract, errors, the launchers."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, TRAIN, launch, logged_steps, run_ok, train_env, write_config


@pytest.mark.ranks
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_loss_falls(tmp_path, cache_dir, stage):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.json", {"trainer": {"max_iters": 24, "save_every": 12}})
    run_ok(launch(2, ["--config", str(cfg), "--output_dir", str(out), "--zero_stage", str(stage)], cache_dir))
    steps = logged_steps(out)
    assert sorted(steps) == list(range(1, 25))
    first = np.mean([steps[s][0] for s in (1, 2, 3)])
    last = np.mean([steps[s][0] for s in (22, 23, 24)])
    assert last < first - 0.5, (first, last)
    for rank in (0, 1):
        assert (out / f"training_rank_{rank}.log").stat().st_size > 0
    assert (out / "latest").read_text().strip() == "checkpoint_iter_24"
    assert (out / "checkpoint_iter_12" / "COMPLETE").is_file()
    resolved = json.loads((out / "deepspeed_config.resolved.json").read_text())
    assert resolved["zero_optimization"]["stage"] == stage
    assert resolved["train_batch_size"] == 8 and resolved["gradient_accumulation_steps"] == 2
    effective = json.loads((out / "config.json").read_text())
    assert effective["deepspeed"]["zero_stage"] == stage and effective["trainer"]["max_iters"] == 24
    log = (out / "training_rank_0.log").read_text()
    assert "val_loss" in log


@pytest.mark.ranks
def test_zero3_with_parameter_and_optimizer_offload_trains(tmp_path, cache_dir):
    """The guide's memory configuration: ZeRO-3 with parameters and optimizer state offloaded to CPU."""
    ds = json.loads((REPO / "configs" / "deepspeed_zero3_offload.json").read_text())
    ds["optimizer"]["params"]["torch_adam"] = True  # DeepSpeed's CPU Adam would first compile for ~60 s
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.json", {"trainer": {"max_iters": 6, "save_every": 6, "eval_every": 6}})
    run_ok(launch(1, ["--config", str(cfg), "--output_dir", str(out), "--deepspeed_config", str(tmp_path / "ds.json")],
                  cache_dir))
    resolved = json.loads((out / "deepspeed_config.resolved.json").read_text())
    assert resolved["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert resolved["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    steps = logged_steps(out)
    assert sorted(steps) == list(range(1, 7)) and steps[6][0] < steps[1][0]
    assert (out / "checkpoint_iter_6" / "COMPLETE").is_file()


def _reference_gradient(cfg_path: Path, cache_dir: Path) -> tuple[dict, dict]:
    """Initial weights and the gradient of the mean loss over all real targets of global batch 0,
    computed in this one process on the whole batch at once, one sample per row (also when the run
    packs them)."""
    os.environ["GRASPGPT_CACHE"] = str(cache_dir)
    from graspGPT.config import load_config
    from graspGPT.data.dataset import AugmentConfig, BatchSchedule, TrainingSamples, collate
    from graspGPT.data.packing import PackedSchedule
    from graspGPT.data.source import resolve_data_dir
    from graspGPT.data.storage import TokenStore
    from graspGPT.checkpoint import seed_everything
    from graspGPT.engine import build_model, model_config

    cfg = load_config(["--config", str(cfg_path)])
    store = TokenStore.open(resolve_data_dir(cfg.dataset, cfg.system.seed))
    train_idx, _ = store.split(cfg.dataset.val_fraction, cfg.system.seed)
    L = cfg.dataset.max_sequence_length
    samples = TrainingSamples(store, train_idx, L, AugmentConfig.of(cfg.dataset), cfg.system.seed, cfg.dataset.overlong)
    # Any split of the global batch gives the same set; world 1 x accumulation 4 is one of them.
    if cfg.dataset.pack_length:
        schedule = PackedSchedule(samples.lengths, cfg.dataset.pack_length, cfg.trainer.micro_batch_size, 4, 1,
                                  cfg.system.seed)
        positions = [k for row in schedule.global_batch(0) for k in row]
    else:
        positions = BatchSchedule(samples.lengths, cfg.trainer.micro_batch_size, 4, 1, cfg.system.seed).global_batch(0)
    seqs = [samples.get(int(k), epoch=0) for k in positions]
    assert len({len(s) for s in seqs}) > 1, "the test needs padding: samples of different lengths"
    seed_everything(cfg.system.seed)
    model = build_model(model_config(cfg, store.vocab))
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = collate(seqs, pad_id=store.vocab.end, max_len=L)
    loss_sum, n = model(batch.input_ids, batch.targets)
    loss = loss_sum / n
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return w0, grads, float(loss)


@pytest.mark.ranks
@pytest.mark.parametrize("ranks,stage,packed", [(2, 2, False), (1, 1, False), (2, 2, True)])
def test_gradient_is_mean_over_global_batch_tokens(tmp_path, cache_dir, ranks, stage, packed):
    """One SGD step with lr 1 and no clipping moves each weight by exactly minus the gradient of the
    mean loss over every real target token of the global batch, whatever the split into ranks and
    accumulation steps, however much padding each micro-batch carries, and with samples packed into
    rows (4 rows of 512 positions: micro 1 x accumulation 2 x 2 ranks) as with one sample per row."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds = json.loads((REPO / "deepspeed_config.json").read_text())
    ds["optimizer"] = {"type": "SGD", "params": {"lr": "auto"}}
    ds["zero_allow_untested_optimizer"] = True
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    run = {"trainer": {"max_iters": 1, "save_every": 1, "eval_every": 100, "learning_rate": 1.0, "min_lr": 1.0,
                       "warmup_iters": 0, "lr_schedule": "constant", "weight_decay": 0.0, "grad_clip": 0.0},
           "system": {"output_dir": str(tmp_path / "out")}}
    if packed:
        run["trainer"].update(batch_size=4, micro_batch_size=1)  # rows
        run["dataset"] = {"pack_length": 512}
    cfg = write_config(tmp_path / "cfg.json", run)
    run_ok(launch(ranks, ["--config", str(cfg), "--deepspeed_config", str(tmp_path / "ds.json"),
                          "--zero_stage", str(stage)], cache_dir))
    resolved = json.loads((tmp_path / "out" / "deepspeed_config.resolved.json").read_text())
    assert resolved["gradient_accumulation_steps"] == 4 // ranks
    # an earlier JSON's "lr": "auto" works, and the log says the training config owns the key
    assert "still holds what the training config owns: optimizer.params.lr;" in \
        (tmp_path / "out" / "training_rank_0.log").read_text()

    w0, grads, loss = _reference_gradient(cfg, cache_dir)
    logged = json.loads((tmp_path / "out" / "metrics_rank0.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1 and logged["loss"] == pytest.approx(loss, rel=1e-6)  # the global mean, pitfall 6
    w1 = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "out"), tag="checkpoint_iter_1")
    for name, g in grads.items():
        step = w0[name] - w1[name]
        torch.testing.assert_close(step, g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_wandb_off_never_imports_it(tmp_path):
    code = ("import sys, logging; from pathlib import Path; from graspGPT.config import load_config; "
            "from graspGPT.observe import Wandb; cfg = load_config(['--no_wandb']); "
            "Wandb(cfg.wandb, 0, {}, Path('.'), logging.getLogger('t')); "
            "import graspGPT.train_deepspeed; assert 'wandb' not in sys.modules, 'wandb was imported'")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def _cli(args, cache_dir, cwd=REPO):
    return subprocess.run([sys.executable, str(TRAIN), *args], cwd=cwd, env=train_env(cache_dir),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.ranks
def test_unknown_flag_and_key_are_errors_with_suggestions(tmp_path, cache_dir):
    p = _cli(["--learning_rat", "1e-3"], cache_dir)
    assert p.returncode == 2 and "--learning_rate" in p.stderr and "Traceback" not in p.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"trainer": {"micro_batch": 2}}))
    p = _cli(["--config", str(bad)], cache_dir)
    assert p.returncode == 2 and "trainer.micro_batch_size" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.ranks
def test_conflicting_deepspeed_json_lists_every_conflict(tmp_path, cache_dir):
    ds = json.loads((REPO / "deepspeed_config.json").read_text())
    ds.update({"train_micro_batch_size_per_gpu": 3, "gradient_clipping": 9.0})
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = write_config(tmp_path / "cfg.json", {"system": {"output_dir": str(tmp_path / "out")}})
    p = launch(1, ["--config", str(cfg), "--deepspeed_config", str(tmp_path / "ds.json")], cache_dir)
    assert p.returncode != 0
    err = p.stdout + p.stderr
    assert "train_micro_batch_size_per_gpu" in err and "gradient_clipping" in err and "Traceback" not in err


@pytest.mark.ranks
def test_batch_adjustment_is_reported(tmp_path, cache_dir):
    """Raised to micro x ranks (no accumulation), the batch is reported; the padding figure counts every
    rank's tokens (rank 0's times the world size went negative at step 1 here)."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.json", {"trainer": {"max_iters": 2, "batch_size": 3}})
    run_ok(launch(2, ["--config", str(cfg), "--output_dir", str(out)], cache_dir))
    log = (out / "training_rank_0.log").read_text()
    resolved = json.loads((out / "deepspeed_config.resolved.json").read_text())
    assert resolved["train_batch_size"] == 4 and resolved["gradient_accumulation_steps"] == 1  # micro 2 x 2 ranks
    assert "3" in log and "4" in log and "WARNING" in log
    padding = [float(p) for p in re.findall(r" padding (\S+)%", log)]
    assert len(padding) == 2 and all(0 <= p < 100 for p in padding), padding


@pytest.mark.ranks
def test_script_runs_from_inside_graspGPT(tmp_path, cache_dir):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.json", {"trainer": {"max_iters": 2}})
    run_ok(launch(2, ["--config", str(cfg), "--output_dir", str(out), "--deepspeed_config", "../deepspeed_config.json"],
                  cache_dir, cwd=REPO / "graspGPT", script=Path("train_deepspeed.py"), checkout_on_path=False))
    assert sorted(logged_steps(out)) == [1, 2]


@pytest.mark.ranks
def test_launcher_script_from_another_directory(tmp_path, cache_dir):
    """Also: the run starts past a build lock that a killed DeepSpeed op build left (tests/test_build_locks.py)."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.json", {"trainer": {"max_iters": 2}})
    stale = tmp_path / "ext" / "fused_adam" / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    env = dict(train_env(cache_dir, checkout_on_path=False), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    p = subprocess.run([str(REPO / "run_deepspeed_training.sh"), "--config", str(cfg), "--output_dir", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    run_ok(p)
    assert re.search(r"launching 2 rank\(s\) on CPU, master port \d+\n", p.stdout)  # 2 ranks without a GPU; a free port
    assert (out / "training_rank_1.log").is_file() and not (out / "training_rank_2.log").exists()
    assert not stale.exists() and (p.stdout + p.stderr).count(f"removed {stale}") == 1  # one check per node


@pytest.mark.ranks
def test_launcher_refuses_a_busy_master_port(tmp_path, cache_dir):
    with socket.socket() as busy:  # another job's rendezvous
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = subprocess.run([str(REPO / "run_deepspeed_training.sh"), "--master_port", str(port), "--max_iters", "1"],
                           cwd=tmp_path, env=train_env(cache_dir), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith(f"error: --master_port {port} is in use"), p.stderr
    assert len(p.stderr.splitlines()) == 1 and "leave --master_port out" in p.stderr


@pytest.mark.ranks
def test_launcher_rejects_bad_rank_count(tmp_path, cache_dir):
    p = subprocess.run([str(REPO / "run_deepspeed_training.sh"), "0"], cwd=tmp_path, env=train_env(cache_dir),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "at least 1" in p.stderr


@pytest.mark.ranks
def test_two_nodes_on_one_machine(tmp_path, cache_dir):
    """`--hostfile ... --no_ssh --node_rank R` started once per node, as on a cluster without ssh."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.json", {"trainer": {"max_iters": 3}})
    from conftest import free_port
    port = str(free_port())
    procs = [subprocess.Popen([str(REPO / "run_deepspeed_training.sh"), "--hostfile", str(hostfile), "--no_ssh",
                               "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", port,
                               "--config", str(cfg), "--output_dir", str(out)],
                              cwd=tmp_path, env=train_env(cache_dir), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert sorted(logged_steps(out)) == [1, 2, 3]
    assert "x 2 ranks" in (out / "training_rank_0.log").read_text()
    assert (out / "training_rank_1.log").is_file()
