"""Two quality evaluations of the same validation scenes, compared scene by scene (a paired bootstrap).

    python bench/paired.py runs/lab/base/quality.json runs/lab/try/quality.json
    python bench/paired.py q.json#0 q.json#1        # two decodings of one run (the k-th of its results)

Each argument is a quality.json written by bench/quality.py, with `#k` to pick its k-th result (default the
first). Prints one JSON line: each side's precision and coverage over the scenes both evaluated, B - A, and a 95%
interval of B - A from resampling the scenes (seeded). Two runs of the recipe differ by a few hundredths on
the real grid (docs/QUALITY_LAB.md): the interval says what the scenes' noise allows, not the training's.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def per_scene(spec: str) -> dict[int, dict]:
    path, _, k = spec.partition("#")
    try:
        results = json.load(open(path))["results"]
        return {s["index"]: s for s in results[int(k or 0)]["per_scene"]}
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise SystemExit(f"paired.py: cannot read the per-scene counts of {spec!r} ({e}); give a quality.json "
                         f"written by bench/quality.py, with #k below its number of results")


def ratios(counts: np.ndarray) -> tuple[float, float]:
    """Precision (correct / predicted) and coverage (covered / objects) of summed (predicted, correct,
    objects, covered) rows."""
    p, c, o, v = counts.sum(0)
    return c / max(p, 1), v / max(o, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--resamples", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    a, b = per_scene(args.a), per_scene(args.b)
    scenes = sorted(set(a) & set(b))
    if not scenes:
        raise SystemExit("paired.py: the two evaluations share no validation scene; compare runs of one data set")
    keys = ("predicted", "correct", "objects", "covered")
    A = np.array([[a[i][k] for k in keys] for i in scenes], dtype=np.float64)
    B = np.array([[b[i][k] for k in keys] for i in scenes], dtype=np.float64)
    draws = np.random.default_rng(args.seed).integers(0, len(scenes), (args.resamples, len(scenes)))
    diffs = np.array([np.subtract(ratios(B[d]), ratios(A[d])) for d in draws])
    (pa, ca), (pb, cb) = ratios(A), ratios(B)
    lo, hi = np.percentile(diffs, [2.5, 97.5], axis=0)
    print(json.dumps({"scenes": len(scenes), "precision": [round(pa, 4), round(pb, 4)],
                      "precision_diff": round(pb - pa, 4), "precision_ci95": [round(lo[0], 4), round(hi[0], 4)],
                      "coverage": [round(ca, 4), round(cb, 4)], "coverage_diff": round(cb - ca, 4),
                      "coverage_ci95": [round(lo[1], 4), round(hi[1], 4)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
