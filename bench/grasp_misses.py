"""Where a quality run's decoded grasps miss, overall and by kind of object (built-in synthetic data).

    python bench/grasp_misses.py RUN_DIR        # a bench/quality.py run directory (config.json, predictions.json)

Each decoded grasp (predictions.json: per decoding, scene index -> [tag, cell ids]) is held against the ground
truth of the object its tag names, regenerated from the built-in data's seed (scene i of the data set is
synthetic scene i: `synth.scene_geometry_of`). A cell matches within one voxel (Chebyshev), the fingers either
way round, as the precision counts: the shares of grasps whose first finger lies on a true finger, whose
fingers are a true pair, and which are a true grasp (the precision), the last two also within two voxels; and
how far the second finger lies from the partner of the nearest true first finger ("second_off", in voxels,
6 = 6 or more; "none": the first finger is on no true finger). One JSON line per decoding.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

from graspGPT.data.synth import scene_geometry_of
from graspGPT.data.vocab import Vocab, Workspace
from graspGPT.grasp_metrics import correct_grasps


def truths(scenes, seed: int, ws: Workspace, cap: int) -> dict:
    """scene index -> tag -> (kind, (G, 3, 3) true grasp cells)."""
    vocab = Vocab.for_workspace(ws)
    out = {}
    for i in scenes:
        geo = scene_geometry_of(int(i), seed, ws, cap)
        out[i] = {int(t): (k, vocab.cells_of(g.reshape(-1)).reshape(-1, 3, 3))
                  for t, k, g in zip(geo.tags, geo.kinds, geo.grasps)}
    return out


def miss_counts(grasps: dict, truth: dict, vocab: Vocab) -> dict:
    """kind ("all" too) -> Counter of the shares' numerators and "n" (grasps written). Matches are
    `grasp_metrics.correct_grasps` (the precision's rule) on the grasps and on their first one or two cells."""
    counts = collections.defaultdict(collections.Counter)
    for i, written in grasps.items():
        true = [(tag, g) for tag, (_, T) in truth[i].items() for g in T]
        true_pairs = [(tag, g[:2]) for tag, g in true]
        true_fingers = [(tag, g[f:f + 1]) for tag, g in true for f in (0, 1)]
        decoded = [(int(tag), vocab.cells_of(np.asarray(ids, dtype=np.int64))) for tag, *ids in written]
        decoded = [(tag, c if len(c) == 3 else c[:0]) for tag, c in decoded]  # only whole grasps can match
        hits = dict(first=correct_grasps([(t, c[:1]) for t, c in decoded], true_fingers),
                    pair=correct_grasps([(t, c[:2]) for t, c in decoded], true_pairs),
                    whole=correct_grasps(decoded, true),
                    pair_2=correct_grasps([(t, c[:2]) for t, c in decoded], true_pairs, tol=2),
                    whole_2=correct_grasps(decoded, true, tol=2))
        for g, (tag, c) in enumerate(decoded):
            kind, T = truth[i].get(tag, ("unknown", None))
            found = collections.Counter(n=1, **{k: int(v[g]) for k, v in hits.items()})
            if T is not None and len(T) and len(c) == 3:
                near = [np.abs(T[:, f] - c[0]).max(1) <= 1 for f in (0, 1)]  # the first finger on true finger f
                off = [np.abs(T[near[f]][:, 1 - f] - c[1]).max(1).min() for f in (0, 1) if near[f].any()]
                found[f"second_off_{min(int(min(off)), 6)}" if off else "second_off_none"] = 1
            counts[kind].update(found)
            counts["all"].update(found)
    return counts


def shares(c: collections.Counter) -> dict:
    n = c["n"]
    row = {"grasps": n, **{k: round(c[k] / n, 4) for k in ("first", "pair", "whole", "pair_2", "whole_2")}}
    row["second_off"] = {k.removeprefix("second_off_"): round(v / n, 4) for k, v in sorted(c.items())
                         if k.startswith("second_off_")}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the run directory of bench/quality.py")
    args = ap.parse_args()
    from graspGPT.config import ConfigError, config_from_dict
    try:
        cfg = config_from_dict(json.loads((args.run / "config.json").read_text()), str(args.run / "config.json"))
        decodings = json.loads((args.run / "predictions.json").read_text())
    except (OSError, ValueError, ConfigError) as e:
        print(f"error: {e}; give a bench/quality.py run directory (config.json and predictions.json)", file=sys.stderr)
        return 2
    if cfg.dataset.data_path:
        print(f"error: the run trained on {cfg.dataset.data_path}; this analysis regenerates the built-in synthetic "
              f"data only", file=sys.stderr)
        return 2
    ws = Workspace(voxel_size=cfg.dataset.synthetic_voxel_size)
    seed, cap = cfg.system.seed, cfg.dataset.max_grasps_per_object
    vocab = Vocab.for_workspace(ws)
    truth = truths(sorted({i for d in decodings for i in d["grasps"]}, key=int), seed, ws, cap)
    for d in decodings:
        counts = miss_counts(d["grasps"], truth, vocab)
        print(json.dumps({"temperature": d["temperature"], "cell_temperature": d["cell_temperature"],
                          "independent_grasps": d["independent_grasps"], "base_rounding": d.get("base_rounding"),
                          **{kind: shares(c) for kind, c in sorted(counts.items())}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
