"""Export real DeepSpeed checkpoints (ZeRO 0, 1, 3) as Hugging Face directories and load them back.

Run as a script under the DeepSpeed launcher, this file is the ZeRO-3 side of `load_hf_weights`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import REPO, end_worker, launch, run_ok, train_env, write_config
from graspGPT.artifact import ArtifactError, config_of, load_hf_weights, load_model, read_meta
from graspGPT.data.vocab import Vocab
from graspGPT.export import export, main
from graspGPT.model import GraspGPT, GraspGPTConfig

STAGES = {0: 1, 1: 1, 3: 2}  # ZeRO stage: ranks
STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> dict[int, Path]:
    """Output directories of real training runs, launched side by side (their start-up is mostly imports)."""
    root = tmp_path_factory.mktemp("export_runs")
    cfg = write_config(root / "cfg.json", {"trainer": {"max_iters": STEPS, "save_every": STEPS, "eval_every": 100}})
    # The shipped 2e8-element ZeRO buckets (an 800 MB gradient buffer) cost ZeRO 1 seconds per step on CPU.
    ds = json.loads((REPO / "deepspeed_config.json").read_text())
    ds["zero_optimization"].update(reduce_bucket_size=10**6, allgather_bucket_size=10**6)
    (root / "ds.json").write_text(json.dumps(ds))
    with ThreadPoolExecutor(len(STAGES)) as pool:
        jobs = {stage: pool.submit(launch, ranks, ["--config", str(cfg), "--output_dir", str(root / f"zero{stage}"),
                                                   "--deepspeed_config", str(root / "ds.json"),
                                                   "--zero_stage", str(stage)], cache_dir)
                for stage, ranks in STAGES.items()}
    for job in jobs.values():
        run_ok(job.result())
    return {stage: root / f"zero{stage}" for stage in STAGES}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("exported")
    for stage, out in runs.items():
        export(out / f"checkpoint_iter_{STEPS}", root / f"zero{stage}")
    return {stage: root / f"zero{stage}" for stage in runs}


def ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.ranks
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_hf_logits_match_toolkit(runs, exported, stage):
    from transformers import AutoModelForCausalLM

    ours, meta = load_model(runs[stage] / f"checkpoint_iter_{STEPS}")
    hf, info = AutoModelForCausalLM.from_pretrained(exported[stage], output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert hf.dtype == torch.float32 and hf.lm_head.weight is hf.model.embed_tokens.weight
    x = ids(meta["vocab"]["vocab_size"])
    with torch.no_grad():
        ref, theirs = ours(x), hf(x).logits
        fresh = GraspGPT(config_of(meta))(x)
    assert (ref - theirs).abs().max().item() <= 1e-5
    assert (ref - fresh).abs().max().item() > 1e-2  # the trained weights, not an initialization

    again, meta2 = load_model(exported[stage])
    assert meta2 == meta
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert meta["step"] == STEPS and meta["zero_stage"] == stage
    assert meta["vocab"]["dims"] == [20, 14, 9] and meta["vocab"]["vocab_size"] == 339 + 20 * 14 * 9
    assert meta["workspace"]["voxel_size"] == 0.03 and meta["workspace"]["bbox_min"] == [-0.3, -0.2, 0.0]
    assert meta["workspace"]["grasp_cells"] == "scene_grid"  # the built-in data, recorded at training time
    assert meta["model"]["n_embd"] == 32 and meta["source_checkpoint"].endswith(f"zero{stage}/checkpoint_iter_{STEPS}")
    assert hf.generation_config.eos_token_id == meta["vocab"]["end_id"] == 98


@pytest.mark.ranks
def test_cli_bf16_from_output_dir(runs, exported, tmp_path):
    """`python -m graspGPT.export OUTPUT` follows `latest`; bf16 weights are the fp32 ones rounded."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    p = subprocess.run([sys.executable, "-m", "graspGPT.export", str(runs[3]), "--out", str(out), "--dtype", "bfloat16"],
                       cwd=REPO, env=train_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "trusted source" in p.stderr and f"exported step {STEPS}" in p.stdout
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"} and "lm_head.weight" not in f.keys()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    fp32, _ = load_model(exported[3])
    bf16, _ = load_model(out, dtype=torch.bfloat16)
    for (name, a), b in zip(fp32.state_dict().items(), bf16.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    x = ids(fp32.cfg.vocab_size)
    with torch.no_grad():
        assert (hf(x).logits.float() - bf16(x).float()).abs().max().item() <= 1e-2
        assert (bf16(x).float() - fp32(x)).abs().max().item() <= 0.1


@pytest.mark.ranks
def test_load_hf_weights_round_trip_and_mismatches(exported, tmp_path):
    d = exported[1]
    meta = read_meta(d)
    ref, _ = load_model(d)
    model = GraspGPT(config_of(meta))
    load_hf_weights(model, d, vocab=Vocab(meta["vocab"]["dims"]))
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert model.lm_head.weight is model.model.embed_tokens.weight

    shape = dict(vocab_size=2859, block_size=64, n_layer=2, n_head=2, n_embd=32, n_kv_head=2)
    load_hf_weights(GraspGPT(GraspGPTConfig(**shape)), d)  # another block_size is fine: RoPE has no learned positions
    with pytest.raises(ArtifactError, match=r"n_embd is 32 in .* but 64 in this model"):
        load_hf_weights(GraspGPT(GraspGPTConfig(**{**shape, "n_embd": 64})), d)
    with pytest.raises(ArtifactError, match=r"vocab_size is 2859 in .* but 3000 in this model"):
        load_hf_weights(GraspGPT(GraspGPTConfig(**{**shape, "vocab_size": 3000})), d)
    # the same V from another grid is another vocabulary
    with pytest.raises(ArtifactError, match=r"vocabulary dims is \[20, 14, 9\] in the export but \[14, 20, 9\] in this"):
        load_hf_weights(model, d, vocab=Vocab((14, 20, 9)))

    # metadata that lies about the shape: the strict tensor check still refuses
    liar = tmp_path / "liar"
    shutil.copytree(d, liar)
    m = json.loads((liar / "graspgpt_meta.json").read_text())
    m["model"]["n_layer"] = 3
    (liar / "graspgpt_meta.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"missing 12: .*model\.layers\.2\."):
        load_hf_weights(GraspGPT(GraspGPTConfig(**{**shape, "n_layer": 3})), liar)
    (liar / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="lacks model.safetensors"):
        load_model(liar)


@pytest.mark.ranks
def test_refusals_and_cli_errors(runs, exported, tmp_path, capsys):
    ckpt = runs[1] / f"checkpoint_iter_{STEPS}"
    broken = tmp_path / "out" / "checkpoint_iter_7"
    shutil.copytree(ckpt, broken)
    (broken / "COMPLETE").unlink()
    with pytest.raises(ArtifactError, match="incomplete checkpoint"):
        load_model(broken)
    with pytest.raises(ArtifactError, match="no such file"):
        load_model(tmp_path / "nowhere")

    def cli(*args) -> str:
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
        return err[-1]

    assert "incomplete checkpoint" in cli(broken, "--out", tmp_path / "x")
    assert "no such file" in cli(tmp_path / "nowhere", "--out", tmp_path / "x")
    assert "neither a toolkit checkpoint" in cli(REPO / "tests", "--out", tmp_path / "x")
    assert "already an exported model directory" in cli(exported[1], "--out", tmp_path / "x")
    assert "not empty" in cli(ckpt, "--out", exported[1]) and not (tmp_path / "x").exists()
    (tmp_path / "file").write_text("")
    assert "is a file" in cli(ckpt, "--out", tmp_path / "file")
    with pytest.raises(SystemExit) as exc:
        main([str(ckpt), "--out", str(tmp_path / "x"), "--dtype", "float16"])
    assert exc.value.code == 2

    again = tmp_path / "again"
    shutil.copytree(exported[1], again)
    assert main([str(runs[1] / "latest"), "--out", str(again), "--overwrite"]) == 0
    assert read_meta(again) == read_meta(exported[1])
    (broken / "COMPLETE").write_text("7\n")
    with pytest.raises(ArtifactError, match="neither a toolkit checkpoint.*newest complete checkpoint here is .*checkpoint_iter_7"):
        load_model(broken.parent)  # an output directory without a latest file


@pytest.mark.ranks
def test_zero3_load_hf_weights(exported, tmp_path, cache_dir):
    """Under ZeRO-3 every rank holds a slice; after load_hf_weights the gathered weights are the file's."""
    result = tmp_path / "result"
    run_ok(launch(2, [str(exported[3]), str(result)], cache_dir, script=Path(__file__)))
    for rank in (0, 1):
        r = json.loads((tmp_path / f"result{rank}.json").read_text())
        assert r == {"partitioned": True, "equal": True}, (rank, r)


def _zero3_worker(directory: Path, result: Path) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import load_file

    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # plain gloo, as the trainer uses on CPU
    deepspeed.init_distributed(dist_backend="gloo")
    meta = read_meta(directory)
    with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 2, "zero_optimization": {"stage": 3}}):
        model = GraspGPT(config_of(meta))
    partitioned = all(p.data.numel() == 0 and p.ds_tensor.numel() < p.ds_numel for p in model.parameters())
    load_hf_weights(model, directory)
    ref = load_file(str(directory / "model.safetensors"))
    equal = True
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            equal &= torch.equal(p.data, ref[name])
    result.with_name(f"{result.name}{dist.get_rank()}.json").write_text(
        json.dumps({"partitioned": partitioned, "equal": equal}))
    end_worker()


if __name__ == "__main__":
    _zero3_worker(*(Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank")))

