"""Synthetic scene generation speed, one core: one JSON line per (voxel size, task).

    python bench/bench_synth.py [--num-scenes 300] [--voxel-sizes 0.0075,0.03]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from graspGPT.data.synth import TASKS, generate_scenes
from graspGPT.data.vocab import Workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-scenes", type=int, default=300)
    ap.add_argument("--voxel-sizes", default="0.0075,0.03")
    ap.add_argument("--tasks", default=",".join(TASKS))
    args = ap.parse_args()
    for voxel in (float(v) for v in args.voxel_sizes.split(",")):
        ws = Workspace(voxel_size=voxel)
        for task in args.tasks.split(","):
            for _ in generate_scenes(5, seed=1, workspace=ws, task_mix=task):  # warm-up
                pass
            t0 = time.perf_counter()
            lengths = [len(ids) for ids in generate_scenes(args.num_scenes, seed=0, workspace=ws, task_mix=task)]
            dt = time.perf_counter() - t0
            print(json.dumps({"task": task, "voxel_size": voxel, "dims": list(ws.dims),
                              "scenes_per_s": round(args.num_scenes / dt, 1),
                              "mean_tokens": round(float(np.mean(lengths)), 1),
                              "max_tokens": int(np.max(lengths))}), flush=True)


if __name__ == "__main__":
    main()
