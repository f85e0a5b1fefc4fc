#!/usr/bin/env python3
"""Turn a finished run's directory into one small summary JSON for bench/results/.

    python bench/summarize_run.py RUN_DIR --out bench/results/DATE/NAME.json [--points 20]

RUN_DIR holds what a run left: `training_rank_0.log`, optionally `metrics_rank0.jsonl`, a `plan.json`
or `config.json`, a `README.txt` or `run.json` note, and evaluation outputs (any other `*.json`).
The summary keeps the configuration, every validation loss, the throughput and token figures, each
evaluation as written, and a loss curve thinned to about --points points (the mean training loss of
each stretch of steps), so the per-step logs need not be kept in the repository.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

LOG_STEP = re.compile(r"step (\d+)/\d+ loss ([0-9.naninf]+) .*?tokens/s (\d+)")
LOG_VAL = re.compile(r"step (\d+) val_loss ([0-9.naninf]+)")
SETTINGS = ("plan.json", "config.json", "run.json")


def per_step(run: Path) -> dict[int, dict]:
    """{step: record}; a resumed run logs some steps twice, and the last record of a step is the one kept."""
    steps: dict[int, dict] = {}
    metrics = run / "metrics_rank0.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                steps[r["step"]] = r
    log = (run / "training_rank_0.log").read_text() if (run / "training_rank_0.log").is_file() else ""
    for m in LOG_STEP.finditer(log):
        r = steps.setdefault(int(m.group(1)), {"step": int(m.group(1)), "loss": float(m.group(2))})
        r["tokens_per_s"] = int(m.group(3))
    for m in LOG_VAL.finditer(log):
        steps.setdefault(int(m.group(1)), {"step": int(m.group(1))})["val_loss"] = float(m.group(2))
    return dict(sorted(steps.items()))


def thinned(steps: dict[int, dict], points: int) -> list[list]:
    """[last step of a stretch, mean loss over its steps]: about `points` stretches of equal length."""
    losses = [(s, r["loss"]) for s, r in steps.items() if "loss" in r]
    size = max(1, -(-len(losses) // points))
    return [[chunk[-1][0], round(statistics.fmean(v for _, v in chunk), 4)]
            for chunk in (losses[i:i + size] for i in range(0, len(losses), size))]


def summarize(run: Path, points: int) -> dict:
    steps = per_step(run)
    if not steps:
        raise ValueError(f"{run} has no training_rank_0.log or metrics_rank0.jsonl with steps")
    out: dict = {"run": run.name}
    note = run / "README.txt"
    if note.is_file():
        out["note"] = note.read_text().strip()
    for name in SETTINGS:
        if (run / name).is_file():
            out[Path(name).stem] = json.loads((run / name).read_text())
    rates = [r["tokens_per_s"] for r in steps.values() if "tokens_per_s" in r]
    train = {"last_step": max(steps), "final_loss": round(steps[max(s for s in steps if "loss" in steps[s])]["loss"], 4),
             "val_loss": {s: round(r["val_loss"], 4) for s, r in steps.items() if "val_loss" in r}}
    if rates:
        train["median_tokens_per_s_logged"] = int(statistics.median(rates))
    if all("tokens" in r for r in steps.values()):
        train["tokens"] = sum(r["tokens"] for r in steps.values())
    out["train"] = train
    out["loss_curve"] = thinned(steps, points)
    evals = {p.name: json.loads(p.read_text()) for p in sorted(run.glob("*.json")) if p.name not in SETTINGS}
    if evals:
        out["evaluations"] = evals
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--points", type=int, default=20)
    args = ap.parse_args(argv)
    try:
        summary = summarize(args.run, args.points)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{args.out}: {args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
