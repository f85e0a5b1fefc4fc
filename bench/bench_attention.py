"""Attention kernels of training, forward + backward, at the models' shapes, each against the others.

    python bench/bench_attention.py                    # GPU: every kernel this machine has
    python bench/bench_attention.py --kernels sdpa,fa4 --cases dense

Cases: whole causal rows (the fixed-length harness: gpt2 4 x 8,192, gpt-mini 4 x 16,384) and packed
rows (the real-grid recipe: 8 rows of 16,384 holding samples of 1,500-8,000 tokens back to back, the
padding after them a sample of its own). Kernels: dense "sdpa" (the model's path: grouped key heads
expanded, SDPA's flash kernel) and "fa4" (flash-attn-4, `GRASPGPT_ATTENTION=fa4`); packed the model's
SampleMask kinds "varlen", "flex" (compiled, as inside the model's compiled blocks: eager flex attention
writes out every score) and "fa4". Each prints one JSON line: milliseconds per forward + backward (median of --iters after
--warmup, CUDA events), the kernel's TFLOP/s on causal FLOPs, and the largest difference of its output
and input gradients from the case's first kernel (bf16).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

import graspGPT.model as gm

SHAPES = {"gpt2": (12, 4, 64), "gpt-mini": (8, 4, 32)}  # heads, key heads, head dim


def packed_boundaries(rows: int, row_len: int, seed: int) -> torch.Tensor:
    """cu_seqlens of `rows` rows filled greedily with samples of 1,500-8,000 tokens, padding a sample."""
    g = torch.Generator().manual_seed(seed)
    starts = []
    for r in range(rows):
        at = r * row_len
        while True:
            n = int(torch.randint(1500, 8001, (1,), generator=g))
            if at + n > (r + 1) * row_len:
                break
            starts.append(at)
            at += n
        if at < (r + 1) * row_len:
            starts.append(at)
    return torch.tensor([*starts, rows * row_len], dtype=torch.int32)


def dense_sdpa(q, k, v):
    rep = q.size(2) // k.size(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    with sdpa_kernel(gm.ATTENTION_BACKENDS, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def packed(kind, cu_seqlens, samples):
    """The model's SampleMask of this kind: fa4 through GRASPGPT_ATTENTION, the others through
    GRASPGPT_PACKED_ATTENTION."""
    gm.ATTENTION, gm.PACKED_ATTENTION = ("fa4", "auto") if kind == "fa4" else ("auto", kind)
    mask = gm.sample_mask(cu_seqlens, samples, torch.bfloat16)
    gm.ATTENTION = "auto"
    return torch.compile(mask.attend) if kind == "flex" else mask.attend


def causal_flops(lengths: list[int], heads: int, hd: int) -> float:
    """Forward + backward matmul FLOPs of causal attention (backward 2.5x forward)."""
    return 3.5 * sum(4 * heads * hd * n * (n + 1) / 2 for n in lengths)


def time_it(fn, q, k, v, grad, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn(q, k, v).backward(grad)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(q, k, v).backward(grad)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2,gpt-mini")
    ap.add_argument("--cases", default="dense,packed")
    ap.add_argument("--kernels", default="sdpa,fa4,varlen,flex")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    kernels = args.kernels.split(",")
    dev = torch.device("cuda")
    for model in args.models.split(","):
        H, Hkv, D = SHAPES[model]
        for case in args.cases.split(","):
            if case == "dense":
                B, T = (4, 8192) if model == "gpt2" else (4, 16384)
                lengths = [T] * B
                fns = {"sdpa": dense_sdpa, "fa4": gm.fa4_causal}
            else:
                B, T = 8, 16384
                cu = packed_boundaries(B, T, seed=0)
                lengths = (cu[1:] - cu[:-1]).tolist()
                cu = cu.to(dev)
                _, samples = gm.sample_positions(cu, B, T)
                fns = {kind: packed(kind, cu, samples) for kind in ("varlen", "fa4", "flex")
                       if kind in kernels and not (kind == "fa4" and isinstance(gm.flash_attn_4(), Exception))}
            torch.manual_seed(0)
            q = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(B, T, Hkv, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(B, T, Hkv, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            grad = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
            reference = None
            for name, fn in fns.items():
                if name not in kernels:
                    continue
                try:
                    y = fn(q, k, v)
                    y.backward(grad)
                    got = [y.detach().float()] + [t.grad.float() for t in (q, k, v)]
                    for t in (q, k, v):
                        t.grad = None
                    ms = time_it(fn, q, k, v, grad, args.warmup, args.iters)
                except Exception as e:  # a kernel this machine lacks: say so, measure the rest
                    print(json.dumps({"model": model, "case": case, "kernel": name, "error": repr(e)[:300]}))
                    continue
                for t in (q, k, v):
                    t.grad = None
                diff = None
                if reference is None:
                    reference = got
                else:
                    diff = [round(float((a - b).abs().max()), 4) for a, b in zip(got, reference)]
                print(json.dumps({"model": model, "case": case, "kernel": name, "rows": B, "row_len": T,
                                  "samples": len(lengths), "ms": round(ms, 3),
                                  "tflops": round(causal_flops(lengths, H, D) / ms / 1e9, 1),
                                  "max_diff_out_dq_dk_dv": diff}), flush=True)


if __name__ == "__main__":
    main()
