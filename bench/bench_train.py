"""Training-step benchmark: the fast GraspGPT model against the plain Hugging Face model, one invocation.

Each case runs the real training step (model, loss, DeepSpeed engine, optimizer) on synthetic GraspGPT
data and prints one JSON line; then a ratio line per fast case that has a matching baseline, and a table.

    python bench/bench_train.py --model gpt2 --seq-len 8192,13000 --zero 1
    torchrun --nproc_per_node 4 bench/bench_train.py --impl fast --zero 1,2 --seq-len 8192
    python bench/bench_train.py --seq-len builtin:600 --grad-accum 8    # the trainer's own data pipeline
    python bench/bench_train.py --case baseline/gpt2/8192/1 --case fast/gpt2/8192/1/8   # explicit cases
    python bench/bench_train.py --impl fast --model gpt-mini,6x4x256 --seq-len 16384   # a shape of no preset

Implementations (--impl, comma-separated):
  baseline   transformers Qwen2ForCausalLM, sdpa attention, cross-entropy on the full fp32-cast logits
  fast       graspGPT.model.GraspGPT as the trainer builds it
  fast+X     fast with a switch: +cudnn (cuDNN attention first instead of flash), +eager (no
             torch.compile), +ckpt (activation checkpointing), +plain (no coordinate embedding: a
             plain embedding table, as the baseline has), +cce / +cce_filtered (the loss by the
             cut-cross-entropy package, exact / with its gradient filter; GPU only, its wheel in .whl),
             +sync (as before 2026-12-02: batches in pageable memory and the loss finding its targets
             on the GPU, each a host-device synchronization), +fa4 (flash-attn-4's kernels for whole
             and packed rows; its wheels in .whl); switches combine (fast+cudnn+ckpt)
Both run in the trainer's engine and step (graspGPT/engine.py: build_engine, train_step), its DeepSpeed
config resolved from a training config (graspGPT/ds_config.py): deepspeed_config.json with the ZeRO stage
asked, bf16 where the GPU has it, gradient clipping 2.0, and torch's fused AdamW (constant lr 2e-4,
betas 0.9/0.95, weight decay 0.01 on the layers' 2-D weights).

--seq-len: a fixed T (rows of T+1 tokens cut from concatenated synthetic scenes, so no padding), or
builtin:N, the built-in data set of N scenes through the trainer's own sampling, augmentation,
batching and prefetching loader (lengths vary, padding is real).

Figures: tokens/s per GPU counts real target tokens only. MFU = tokens/s per GPU x (6N + 12*L*d*T)
/ 989e12 (H100 SXM dense bf16 peak), T the length of each row. Peak memory is the largest
torch.cuda.max_memory_allocated of all ranks (on CPU ranks: the largest peak resident set of a rank's process,
everything since it started, so compare cases run in separate processes). data_wait_frac is the host time spent
obtaining batches over the timed span; padding_frac is 1 - real targets / batch positions.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import gc
import itertools
import json
import os
import re
import resource
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import graspGPT.model as gm
from graspGPT.config import Config, config_from_dict
from graspGPT.data.dataset import Batch, collate
from graspGPT.data.vocab import Vocab, Workspace
from graspGPT.ds_config import ResolvedDeepSpeed, load_deepspeed_json, resolve_deepspeed_config
from graspGPT.engine import build_engine, train_step, zero_init

ROOT = Path(__file__).resolve().parent.parent

PEAK_FLOPS = 989e12
MFU_DEF = "tokens/s/GPU x (6N + 12*L*d*T) / 989e12 (H100 SXM dense bf16)"
VOXEL = 0.0075  # the built-in data set's default; V = 147,219
DEFAULTS = dict(compile=gm.COMPILE, attention=list(gm.ATTENTION_BACKENDS), loss=gm.chunked_cross_entropy,
                flash=gm.ATTENTION)
CUDNN_FIRST = [torch.nn.attention.SDPBackend.CUDNN_ATTENTION] + DEFAULTS["attention"]


class HFWithLoss(nn.Module):
    """The baseline: Qwen2ForCausalLM logits, cast to fp32, plain cross-entropy; same (sum, count) contract."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, targets, cu_seqlens=None, num_targets=None):
        if cu_seqlens is not None:
            raise ValueError("the transformers baseline trains one sample per row; packed cases are ours only")
        logits = self.hf(input_ids=input_ids, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=gm.IGNORE_INDEX,
                               reduction="sum")
        return loss, (targets != gm.IGNORE_INDEX).sum()

    def configure_param_groups(self, weight_decay: float) -> list[dict]:
        """The trainer's groups: the wrapped model's parameter names are GraspGPT's."""
        return gm.GraspGPT.configure_param_groups(self.hf, weight_decay)


def bench_config(zero: int, micro: int, accum: int, world: int, on_gpu: bool, lr: float = 2e-4,
                 overrides: tuple[str, ...] = ()) -> tuple[Config, ResolvedDeepSpeed]:
    """The training config of a case and its DeepSpeed config, resolved as the trainer resolves it;
    overrides are "dotted.key=JSON value" strings applied to the DeepSpeed config."""
    cfg = config_from_dict({
        "trainer": {"batch_size": micro * accum * world, "micro_batch_size": micro, "learning_rate": lr, "min_lr": 0.0,
                    "lr_schedule": "constant", "warmup_iters": 0, "grad_clip": 2.0, "betas": [0.9, 0.95],
                    "weight_decay": 0.01},
        "deepspeed": {"zero_stage": zero}})
    ds_json = load_deepspeed_json(ROOT / "deepspeed_config.json")
    ds_json["optimizer"] = {"type": "AdamW", "params": {"eps": 1e-8, "torch_adam": True, "fused": True}}
    ds = resolve_deepspeed_config(ds_json, cfg, world, "cuda" if on_gpu else "cpu", bf16_supported=on_gpu)
    for item in overrides:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = ds.config
        for part in path:
            node = node.setdefault(part, {})
        node[last] = json.loads(value)
    return cfg, ds


def model_config(model_type: str, vocab_size: int, block_size: int, ckpt: bool = False,
                 coordinates: bool = False) -> gm.GraspGPTConfig:
    """coordinates: the trainer's default coordinate embedding over the real grid (only the fast model has it)."""
    grid = Vocab.for_workspace(Workspace(voxel_size=VOXEL)).dims if coordinates else None
    custom = re.fullmatch(r"(\d+)x(\d+)x(\d+)", model_type)  # layers x heads x width, e.g. 6x4x256
    shape = dict(zip(("n_layer", "n_head", "n_embd"), map(int, custom.groups()))) if custom else {"model_type": model_type}
    return gm.GraspGPTConfig.from_shape(**shape, vocab_size=vocab_size, block_size=block_size,
                                     activation_checkpointing=ckpt, voxel_grid=grid)


def build_model(impl: str, mcfg: gm.GraspGPTConfig, device: torch.device, seed: int = 0,
                weights: dict | None = None) -> nn.Module:
    """The model of `impl` ("baseline" or "fast") on `device`, seeded, or with the GraspGPT state dict `weights`."""
    torch.manual_seed(seed)
    if impl == "fast":
        with device:
            model = gm.GraspGPT(mcfg)
        if weights is not None:
            model.load_state_dict(weights, strict=True)
        return model
    from transformers import Qwen2Config, Qwen2ForCausalLM
    with torch.device("meta"):
        hf_cfg = Qwen2Config.from_dict(gm.GraspGPT(mcfg).to_hf_config(dtype="float32"))
    with device:
        hf = Qwen2ForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    if weights is not None:
        hf.load_state_dict(weights, strict=True)  # the state-dict keys are the same
    return HFWithLoss(hf)


def apply_switches(impl: str) -> tuple[str, set[str]]:
    """("baseline"|"fast", switches), setting model.py's measuring switches for this case."""
    base, *switches = impl.split("+")
    unknown = set(switches) - {"cudnn", "eager", "ckpt", "plain", "cce", "cce_filtered", "sync", "fa4"}
    if base not in ("baseline", "fast") or unknown or (base == "baseline" and switches):
        raise SystemExit(f"error: unknown implementation {impl!r}; use baseline, fast, or "
                         f"fast+cudnn/+eager/+ckpt/+plain/+cce/+cce_filtered/+sync/+fa4")
    gm.COMPILE = DEFAULTS["compile"] and "eager" not in switches
    gm.ATTENTION_BACKENDS = CUDNN_FIRST if "cudnn" in switches else DEFAULTS["attention"]
    gm.ATTENTION = "fa4" if "fa4" in switches else DEFAULTS["flash"]
    cce = {"cce": None, "cce_filtered": "high"}
    loss = [s for s in switches if s in cce]
    gm.chunked_cross_entropy = cut_cross_entropy_loss(cce[loss[0]]) if loss else DEFAULTS["loss"]
    if "sync" in switches:  # the targets found and checked on the GPU, as before the host counted them
        gm.chunked_cross_entropy = functools.partial(counted_on_the_gpu, DEFAULTS["loss"])
    torch._dynamo.reset()  # every case compiles afresh (the attention kernel is fixed when tracing)
    return base, set(switches)


def cut_cross_entropy_loss(filter_eps: str | None):
    """The model's loss (sum over real targets, count) computed by the cut-cross-entropy package (Apple's
    fused linear + cross-entropy Triton kernels, `pip install cut-cross-entropy`) instead of
    `model.chunked_cross_entropy`. filter_eps None: exact gradients; "high": the package's default, which
    skips gradient blocks whose softmax is below a threshold."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:  # the package, or the Triton it needs (none on CPU)
        raise SystemExit(f"error: +cce needs the cut-cross-entropy package on a GPU with Triton ({e}); "
                         f"pip install cut-cross-entropy, or leave the switch out") from None

    def loss(h, weight, targets, chunk_rows, num_targets=None):
        del chunk_rows, num_targets
        h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
        total = linear_cross_entropy(h, weight, targets, ignore_index=gm.IGNORE_INDEX, reduction="sum",
                                     filter_eps=filter_eps, impl="cce")
        return total.float(), (targets != gm.IGNORE_INDEX).sum()
    return loss


def counted_on_the_gpu(loss, h, weight, targets, chunk_rows, num_targets=None):
    return loss(h, weight, targets, chunk_rows)


# ------------------------------------------------------------------------------------------------ data

class ScenePool:
    """Concatenated token ids of built-in synthetic scenes, grown on demand (the same for every rank)."""

    def __init__(self, seed: int = 0):
        from graspGPT.data.synth import generate_scenes
        self.scenes = generate_scenes(10**9, seed, Workspace(voxel_size=VOXEL))
        self.tokens = np.zeros(0, dtype=np.int64)

    def window(self, index: int, length: int) -> np.ndarray:
        while len(self.tokens) < 4 * length:
            self.tokens = np.concatenate([self.tokens, *itertools.islice(self.scenes, 64)])
        start = (index * 7919 * length) % (len(self.tokens) - length)
        return self.tokens[start:start + length]


class FixedLengthData:
    """Micro-batches of `micro` rows of exactly T positions: no padding, every position a target."""

    def __init__(self, pool: ScenePool, T: int, micro: int, accum: int, rank: int, world: int, pin: bool):
        self.pool, self.T, self.micro, self.accum, self.rank, self.world = pool, T, micro, accum, rank, world
        self.pin = pin
        self.step = 0

    def __next__(self) -> tuple[list[Batch], int, float]:
        t0 = time.perf_counter()
        first = ((self.step * self.world + self.rank) * self.accum) * self.micro
        batches = [collate([self.pool.window(first + a * self.micro + m, self.T + 1) for m in range(self.micro)],
                           pad_id=0) for a in range(self.accum)]
        self.step += 1
        if self.pin:
            batches = [b.pin_memory() for b in batches]
        return batches, self.micro * self.accum * self.T * self.world, time.perf_counter() - t0

    def close(self):
        pass


class BuiltinData:
    """The trainer's pipeline: built-in data set of N scenes, augmentation, length-grouped batches, prefetch."""

    def __init__(self, num_scenes: int, max_len: int, micro: int, accum: int, rank: int, world: int, pin: bool):
        from graspGPT.config import DatasetConfig
        from graspGPT.data.dataset import AugmentConfig, BatchLoader, BatchSchedule, TrainingSamples
        from graspGPT.data.source import builtin_dataset
        from graspGPT.data.storage import TokenStore
        dcfg = DatasetConfig(synthetic_scenes=num_scenes, max_sequence_length=max_len)
        seed = 42
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            builtin_dataset(num_scenes, seed, dcfg.synthetic_voxel_size, dcfg.synthetic_task_mix,
                            dcfg.max_grasps_per_object)
        dist.barrier()
        store = TokenStore.open(builtin_dataset(num_scenes, seed, dcfg.synthetic_voxel_size, dcfg.synthetic_task_mix,
                                             dcfg.max_grasps_per_object))
        train_idx, _ = store.split(dcfg.val_fraction, seed)
        samples = TrainingSamples(store, train_idx, max_len, AugmentConfig.of(dcfg), seed, overlong=dcfg.overlong)
        schedule = BatchSchedule(samples.lengths, micro, accum, world, seed)
        self.loader = BatchLoader(samples, schedule, rank, 0, pin_memory=pin)

    def __next__(self) -> tuple[list[Batch], int | None, float]:
        t0 = time.perf_counter()
        sb = next(self.loader)
        return sb.micro, None, time.perf_counter() - t0

    def close(self):
        self.loader.close()


# ------------------------------------------------------------------------------------------------ run

def run_case(impl: str, model_type: str, seq: str, zero: int, args, pool: ScenePool) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    on_gpu = device.type == "cuda"
    base, switches = apply_switches(impl)
    vocab_size = Vocab.for_workspace(Workspace(voxel_size=VOXEL)).size
    builtin = seq.startswith("builtin:")
    max_len = args.max_len if builtin else int(seq) + 1
    mcfg = model_config(model_type, vocab_size, max_len, ckpt="ckpt" in switches,
                        coordinates=base == "fast" and "plain" not in switches)
    cfg, ds = bench_config(zero, args.micro_batch, args.grad_accum, world, on_gpu, overrides=tuple(args.ds))

    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    mem_before = torch.cuda.memory_allocated() / 2**30 if on_gpu else 0.0
    t_init = time.perf_counter()
    with zero_init(ds):  # under ZeRO-3 the parameters are partitioned as they are created, as the trainer does
        model = build_model(base, mcfg, device)
    with torch.device("meta"):
        n_params = gm.GraspGPT(mcfg).num_params()
    engine = build_engine(model, ds, cfg.trainer)
    init_s = time.perf_counter() - t_init

    pin = on_gpu and "sync" not in switches  # pageable batches: each copy to the GPU waits for its queued work
    data = (BuiltinData(int(seq.split(":")[1]), max_len, args.micro_batch, args.grad_accum, rank, world, pin)
            if builtin else FixedLengthData(pool, int(seq), args.micro_batch, args.grad_accum, rank, world, pin))
    host = dict(forward=0.0, backward=0.0, step=0.0)  # host seconds inside each engine call

    def step():
        micro, global_targets, wait = next(data)
        rows = [int(r) for b in micro for r in (b.targets != gm.IGNORE_INDEX).sum(1)]
        counts = {"targets": sum(rows), "positions": sum(b.num_tokens for b in micro),
                  "flops": sum(r * (6 * n_params + 12 * mcfg.n_layer * mcfg.n_embd * r) for r in rows)}
        # the global target count, as the trainer divides by it; made on the device (torch.full: no copy,
        # no host sync) and, when lengths vary, summed over ranks there
        total = torch.full((), float(global_targets or counts["targets"]), device=device)
        if global_targets is None:
            dist.all_reduce(total)
        loss_sum = train_step(engine, micro, world * args.grad_accum / total.clamp(min=1.0), host)
        return counts, wait, loss_sum / total

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    t0 = time.perf_counter()
    step()  # the first step compiles; kept apart from the steady state
    sync()
    first_step_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    sync()
    totals = dict(targets=0, positions=0, flops=0, wait=0.0)
    losses = []
    host.update(forward=0.0, backward=0.0, step=0.0)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        counts, wait, loss = step()
        for k in ("targets", "positions", "flops"):
            totals[k] += counts[k]
        totals["wait"] += wait
        losses.append(loss)
    sync()
    elapsed = time.perf_counter() - t0
    host_ms = {k: round(1000 * v / args.steps, 1) for k, v in host.items()}
    if args.profile and rank == 0 and on_gpu:
        profile(step, impl)
    if args.live_tensors and rank == 0:
        live_tensors(impl)
    if args.host_profile and rank == 0:
        host_profile(step, impl)
    if args.trace and rank == 0 and on_gpu:
        trace(step, Path(args.trace) / f"trace_{impl}_{model_type}_{seq}_z{zero}.json.gz".replace(":", "-"))
    data.close()

    last_loss = losses[-1].clone()
    dist.all_reduce(last_loss)  # each rank holds its share of the global mean
    # on CPU ranks the process's peak resident memory (since it started: one case a process to compare cases)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if on_gpu else
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    sums = torch.tensor([totals["targets"], totals["positions"], totals["flops"]], dtype=torch.float64, device=device)
    dist.all_reduce(sums)  # every rank's real tokens; rates are then per GPU
    tokens_per_s = sums[0].item() / elapsed / world
    result = {
        "impl": impl, "model": model_type, "params_M": round(n_params / 1e6, 1), "seq_len": seq, "zero": zero,
        "gpus": world, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "steps": args.steps,
        "tokens_per_s_per_gpu": round(tokens_per_s), "mfu": round(sums[2].item() / elapsed / world / PEAK_FLOPS, 4),
        "mfu_def": MFU_DEF, "peak_mem_gb": round(peak.item(), 2),
        "padding_frac": round(1 - sums[0].item() / max(sums[1].item(), 1), 4),
        "data_wait_frac": round(totals["wait"] / elapsed, 4), "step_ms": round(1000 * elapsed / args.steps, 1),
        "first_step_s": round(first_step_s, 1), "init_s": round(init_s, 1), "mem_before_gb": round(mem_before, 2),
        "loss_last": round(float(last_loss), 4), "host_ms_per_step": host_ms, "ds": args.ds,
    }
    if base == "baseline":
        result["attn_implementation"] = model.hf.config._attn_implementation
    engine.destroy() if hasattr(engine, "destroy") else None
    del engine, model, data
    gc.collect()
    return result


def profile(step, impl: str, top: int = 25):
    """The heaviest GPU kernels of two steps, as one JSON line."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        step()
        step()
        torch.cuda.synchronize()
    rows = sorted(p.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:top]
    total = sum(e.device_time_total for e in p.key_averages())
    print(json.dumps({"profile": impl, "gpu_ms_per_step": round(total / 2e3, 2),
                      "kernels": [[e.key[:90], round(e.device_time_total / 2e3, 3), e.count // 2] for e in rows]}),
          flush=True)


def live_tensors(impl: str, top: int = 8):
    """The tensors alive on this rank now (a gc walk, each storage counted once; what the allocator keeps beside
    them is not in it), as one JSON line: their total and the largest, in MiB."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            st = obj.untyped_storage()
            if st.data_ptr() and st.data_ptr() not in storages:
                storages[st.data_ptr()] = (st.nbytes(), list(obj.shape), str(obj.dtype).removeprefix("torch."))
    largest = sorted(storages.values(), key=lambda s: s[0], reverse=True)[:top]
    print(json.dumps({"live_tensors": impl, "gib": round(sum(s[0] for s in storages.values()) / 2**30, 2),
                      "storages": len(storages),
                      "largest_mib": [[round(n / 2**20), shape, dtype] for n, shape, dtype in largest]}), flush=True)


def host_profile(step, impl: str, steps: int = 5, top: int = 30):
    """Where the host's time goes in `steps` steps (cProfile), as one JSON line: the functions of most own
    time, and DeepSpeed's and the model's of most time inside them, in ms a step."""
    import cProfile
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        step()
    pr.disable()
    stats = pstats.Stats(pr).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, callers)

    def rows(key, keep=lambda f: True):
        picked = sorted(((k, v) for k, v in stats.items() if keep(k[0])), key=lambda kv: kv[1][key], reverse=True)
        return [[f"{Path(f).name}:{line}({name})", round(1000 * v[key] / steps, 2), v[0] // steps]
                for (f, line, name), v in picked[:top]]
    ours = lambda f: "deepspeed" in f or "graspGPT" in f  # noqa: E731
    print(json.dumps({"host_profile": impl, "own_ms": rows(2), "inside_ms": rows(3, ours)}), flush=True)


def trace(step, path: Path):
    """A gzipped Chrome trace (host and GPU) of one step, for finding where the GPU waits."""
    import gzip
    import tempfile
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        step()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        p.export_chrome_trace(tmp.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp.name, "rb") as src, gzip.open(path, "wb") as dst:
            dst.write(src.read())


def environment() -> dict:
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__}
    if torch.cuda.is_available():
        env.update(device=torch.cuda.get_device_name(), cudnn=torch.backends.cudnn.version())
    import deepspeed
    import transformers
    env.update(deepspeed=deepspeed.__version__, transformers=transformers.__version__)
    return env


def init_distributed():
    import deepspeed
    if "RANK" not in os.environ:  # a plain `python bench/...`: one rank
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:  # plain gloo, as the trainer uses on CPU ranks (no ~35 s build of the shared-memory op)
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def label(r: dict) -> str:
    """The implementation, with its DeepSpeed overrides if any."""
    return r["impl"] + (f" [{', '.join(r['ds'])}]" if r.get("ds") else "")


def table(results: list[dict]) -> str:
    lines = ["| impl | model | GPUs | ZeRO | T | accum | tokens/s/GPU | MFU | peak GB | vs baseline |",
             "|" + "---|" * 10]
    for r in results:
        lines.append(f"| {label(r)} | {r['model']} | {r['gpus']} | {r['zero']} | {r['seq_len']} | {r['grad_accum']} | "
                     f"{r['tokens_per_s_per_gpu']:,} | {r['mfu']:.1%} | {r['peak_mem_gb']} | {r.get('ratio', '')} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", default="baseline,fast")
    ap.add_argument("--model", default="gpt2",
                    help="presets (gpt-mini, gpt2, gpt2-large, ...) or LAYERSxHEADSxWIDTH (6x4x256), comma-separated")
    ap.add_argument("--seq-len", default="8192", help="comma-separated: T values and/or builtin:N")
    ap.add_argument("--zero", default="1", help="ZeRO stages, comma-separated")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=13000, help="max_sequence_length for builtin:N")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps, the first one compiles")
    ap.add_argument("--profile", action="store_true", help="also print the heaviest kernels of each case")
    ap.add_argument("--case", action="append", default=[], metavar="IMPL/MODEL/T/ZERO[/ACCUM]",
                    help="run these cases instead of the product of the lists above (repeatable)")
    ap.add_argument("--ds", action="append", default=[], metavar="KEY=JSON",
                    help="override a DeepSpeed config entry for every case, e.g. timers.throughput.enabled=false")
    ap.add_argument("--live-tensors", action="store_true",
                    help="also print the tensors alive on rank 0 after the timed steps (total, largest)")
    ap.add_argument("--host-profile", action="store_true",
                    help="also print where the host's time goes in 5 steps of each case (cProfile)")
    ap.add_argument("--trace", metavar="DIR", help="also write a gzipped Chrome trace of one step of each case")
    ap.add_argument("--out", help="append the JSON lines to this file too")
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("error: --warmup and --steps must be >= 1")

    init_distributed()
    rank = dist.get_rank()
    env = environment()
    pool = ScenePool()
    results = []

    def emit(obj):
        if rank == 0:
            line = json.dumps(obj)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")

    emit({"env": env, "gpus": dist.get_world_size()})
    cases = [(m, t, int(z), i, args.grad_accum) for m, t, z, i in itertools.product(
        args.model.split(","), args.seq_len.split(","), args.zero.split(","), args.impl.split(","))]
    if args.case:
        cases = []
        for c in args.case:
            impl, model_type, seq, zero, *accum = c.split("/")
            cases.append((model_type, seq, int(zero), impl, int(accum[0]) if accum else args.grad_accum))
    for model_type, seq, zero, impl, accum in cases:
        args.grad_accum = accum
        try:
            r = run_case(impl, model_type, seq, zero, args, pool)
        except torch.OutOfMemoryError as exc:
            r = {"impl": impl, "model": model_type, "seq_len": seq, "zero": zero, "gpus": dist.get_world_size(),
                 "grad_accum": accum, "ds": args.ds, "error": f"out of memory: {str(exc).splitlines()[0][:200]}"}
            gc.collect()
            torch.cuda.empty_cache()
        r.update(device=env.get("device", "cpu"), date=env["date"])
        base = next((b for b in results if b["impl"] == "baseline" and "error" not in b
                     and all(b.get(k) == r.get(k) for k in ("model", "seq_len", "zero", "gpus", "ds", "grad_accum"))),
                    None)
        if base is not None and "error" not in r:
            r["ratio"] = round(r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"], 2)
            if base["peak_mem_gb"]:
                r["mem_ratio"] = round(r["peak_mem_gb"] / base["peak_mem_gb"], 2)
        results.append(r)
        emit(r)
    if rank == 0:
        print(table([r for r in results if "error" not in r]), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
