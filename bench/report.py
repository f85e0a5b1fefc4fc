"""Tables from the JSON lines of bench_train.py: figures, speed-ups, multi-GPU scaling, ZeRO-3 memory.

    python bench/report.py results.jsonl [more.jsonl ...]
"""
from __future__ import annotations

import json
import sys


def load(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [r for r in map(json.loads, f) if "impl" in r and "error" not in r]
    return rows


def main(paths: list[str]) -> None:
    rows = load(paths)
    print("| impl | model | GPUs | ZeRO | T | accum | tokens/s/GPU | MFU | peak GB | vs baseline | mem vs baseline |")
    print("|" + "---|" * 11)
    for r in rows:
        label = r["impl"] + (f" [{', '.join(r['ds'])}]" if r.get("ds") else "")
        print(f"| {label} | {r['model']} | {r['gpus']} | {r['zero']} | {r['seq_len']} | {r['grad_accum']} | "
              f"{r['tokens_per_s_per_gpu']:,} | {r['mfu']:.1%} | {r['peak_mem_gb']} | "
              f"{r.get('ratio', '')} | {r.get('mem_ratio', '')} |")
    key = lambda r: (r["impl"], r["model"], r["seq_len"], r["zero"], r["grad_accum"])  # noqa: E731
    one = {key(r): r for r in rows if r["gpus"] == 1}
    scaling = [(r, one.get(key(r))) for r in rows if r["gpus"] > 1]
    if any(s for _, s in scaling):
        print("\n| impl | model | T | ZeRO | GPUs | tokens/s all GPUs | scaling over 1 GPU |")
        print("|" + "---|" * 7)
        for r, s in scaling:
            if s:
                total = r["tokens_per_s_per_gpu"] * r["gpus"]
                print(f"| {r['impl']} | {r['model']} | {r['seq_len']} | {r['zero']} | {r['gpus']} | {total:,} | "
                      f"{total / s['tokens_per_s_per_gpu']:.2f}x |")
    z1 = {(r["impl"], r["model"], r["seq_len"], r["gpus"]): r for r in rows if r["zero"] == 1}
    for r in rows:
        base = z1.get((r["impl"], r["model"], r["seq_len"], r["gpus"]))
        if r["zero"] == 3 and base:
            print(f"\nZeRO-3 vs ZeRO-1, {r['model']} on {r['gpus']} GPUs, T={r['seq_len']}: peak memory "
                  f"{r['peak_mem_gb']} vs {base['peak_mem_gb']} GB ({r['peak_mem_gb'] / base['peak_mem_gb']:.0%}), "
                  f"tokens/s/GPU {r['tokens_per_s_per_gpu']:,} vs {base['tokens_per_s_per_gpu']:,} "
                  f"({r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu'] - 1:+.0%})")


if __name__ == "__main__":
    main(sys.argv[1:])
