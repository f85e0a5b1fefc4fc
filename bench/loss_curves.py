"""Fast vs baseline loss curves: the same initial weights, data and DeepSpeed config, N optimizer steps each.

    python bench/loss_curves.py --model gpt2 --seq-len 2048 --steps 300

Prints one JSON line per implementation (its loss at every step) and a summary line: the mean and
largest gap between the curves, beside the step-to-step noise of each curve (the standard deviation
of its losses around their 21-step moving average over the second half).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import bench_train as bt


def train(impl: str, mcfg, weights: dict, args, pool) -> list[float]:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    bt.apply_switches(impl)
    cfg, ds = bt.bench_config(args.zero, args.micro_batch, 1, 1, on_gpu=device.type == "cuda", lr=args.lr)
    model = bt.build_model(impl, mcfg, device, weights=weights)  # whole: the weights are loaded into it
    engine = bt.build_engine(model, ds, cfg.trainer)
    data = bt.FixedLengthData(pool, args.seq_len, args.micro_batch, 1, 0, 1)
    losses = []
    for _ in range(args.steps):
        micro, total, _ = next(data)
        losses.append(bt.train_step(engine, micro, 1.0 / total) / total)
    losses = torch.stack(losses).tolist()
    engine.destroy()
    return losses


def noise(curve: np.ndarray) -> float:
    half = curve[len(curve) // 2:]
    smooth = np.convolve(half, np.ones(21) / 21, mode="valid")
    return float(np.std(half[10:10 + len(smooth)] - smooth))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--zero", type=int, default=1)
    ap.add_argument("--impl", default="baseline,fast")
    ap.add_argument("--out", help="write the JSON lines to this file too")
    args = ap.parse_args()
    if args.steps < 60:
        raise SystemExit("error: --steps must be >= 60 (the noise estimate smooths over 21 steps of the second half)")
    bt.init_distributed()
    vocab_size = bt.Vocab.for_workspace(bt.Workspace(voxel_size=bt.VOXEL)).size
    mcfg = bt.model_config(args.model, vocab_size, args.seq_len + 1)
    torch.manual_seed(0)
    weights = bt.gm.GraspGPT(mcfg).state_dict()
    pool = bt.ScenePool()
    curves = {impl: train(impl, mcfg, weights, args, pool) for impl in args.impl.split(",")}
    lines = [{"impl": impl, "model": args.model, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
              "lr": args.lr, "losses": [round(x, 4) for x in c]} for impl, c in curves.items()]
    a, b = (np.array(c) for c in curves.values())
    gap = np.abs(a - b)
    lines.append({"summary": list(curves), "steps": args.steps, "mean_abs_gap": round(float(gap.mean()), 4),
                  "max_abs_gap": round(float(gap.max()), 4),
                  "mean_abs_gap_last100": round(float(gap[-100:].mean()), 4),
                  "last50_mean": [round(float(c[-50:].mean()), 4) for c in (a, b)],
                  "noise_std": [round(noise(c), 4) for c in (a, b)],
                  "every25": [[i + 1, round(float(a[i]), 3), round(float(b[i]), 3)]
                              for i in range(24, args.steps, 25)]})
    for line in lines:
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
