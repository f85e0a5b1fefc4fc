"""The host's share of grounded decoding: the seconds `decoding.Grounding` takes to say where each cell of a
grasp may go, as decoding asks it (the first finger, the second given the first, the base given both).

    python bench/bench_grounding.py --scenes 4 --grasps 128            # real grid (0.0075 m), ~1 min on 2 cores
    python bench/bench_grounding.py --scenes 4 --grasps 128 --profile  # and the functions that take longest
    python bench/bench_grounding.py --scenes 4 --grasps 128 --one_by_one   # each row asked alone (before 2026-12-02)

Built-in scenes (100 grasps per object), each grasp's prefixes taken from the scene's own true grasps, drawn with
repeats as a trained model's are (`--distinct`: the share of the draws that are new grasps; the cache serves the
rest). Prints one JSON line: milliseconds per grasp and per call kind. The decoding's own host time is this plus
the grammar's per-row work; the GPU's is not in it. What it measures runs on any CPU the same way. The grasps of
a scene are asked as decoding's independent rows ask them: all first fingers together, then all second fingers,
then all bases (`Grounding.next_cells_many`), or with --one_by_one a row at a time.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import numpy as np

from graspGPT.data.synth import generate_scenes
from graspGPT.data.vocab import Vocab, Workspace
from graspGPT.decoding import Grounding, task_prompt, truth_of


def grasp_draws(truth, rng: np.random.Generator, n: int, distinct: float) -> list[tuple[int, np.ndarray]]:
    """n (tag, three cell ids) true grasps of one scene: a `distinct` share new, the rest repeats of those."""
    pool = [(g.tag, np.asarray(g.cells, dtype=np.int64)) for g in truth.grasps]
    fresh = [pool[i] for i in rng.permutation(len(pool))[: max(1, int(round(n * distinct)))]]
    return [fresh[i] if i < len(fresh) else fresh[rng.integers(len(fresh))] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=4)
    ap.add_argument("--grasps", type=int, default=128, help="grasps decoded per scene")
    ap.add_argument("--distinct", type=float, default=0.5, help="share of the grasps that are not repeats")
    ap.add_argument("--voxel_size", type=float, default=0.0075)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--one_by_one", action="store_true", help="ask for each row's cells alone")
    args = ap.parse_args()
    if args.scenes < 1 or args.grasps < 1 or not 0 < args.distinct <= 1:
        ap.error(f"need --scenes >= 1, --grasps >= 1 and 0 < --distinct <= 1; got {args.scenes}, {args.grasps}, "
                 f"{args.distinct}")
    ws = Workspace(voxel_size=args.voxel_size)
    vocab = Vocab.for_workspace(ws)
    rng = np.random.default_rng(args.seed)
    scenes = [(task_prompt(ids, vocab, "grasp"), truth_of(ids, vocab))
              for ids in generate_scenes(args.scenes, args.seed, ws, max_grasps_per_object=100)]
    seconds = dict(build=0.0, first=0.0, second=0.0, base=0.0)

    def run():
        for prompt, truth in scenes:
            t = time.perf_counter()
            g = Grounding(prompt, vocab, args.voxel_size)
            seconds["build"] += time.perf_counter() - t
            draws = grasp_draws(truth, rng, args.grasps, args.distinct)
            for n, kind in enumerate(("first", "second", "base")):
                asks = [(tag, cells[:n]) for tag, cells in draws]
                t = time.perf_counter()
                if args.one_by_one:
                    for ask in asks:
                        g.next_cells(*ask)
                else:
                    g.next_cells_many(asks)
                seconds[kind] += time.perf_counter() - t

    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    run()
    out = dict(scenes=args.scenes, grasps=args.grasps, distinct=args.distinct, voxel_size=args.voxel_size,
               asked="one by one" if args.one_by_one else "a step's rows together",
               ms_per_grasp=round(1e3 * sum(seconds.values()) / (args.scenes * args.grasps), 3),
               ms={k: round(1e3 * v / (args.scenes * args.grasps), 3) for k, v in seconds.items()})
    if profiler:
        profiler.disable()
        stats = pstats.Stats(profiler)
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]
        out["host_top"] = [[f"{f[0].rsplit('/', 1)[-1]}:{f[1]}:{f[2]}", s[1], round(s[2], 3), round(s[3], 3)]
                           for f, s in rows]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
