"""The grasp precision a perfect model could reach on the built-in synthetic data.

A perfect model writes grasps drawn from the generator's own distribution. Its precision against a
scene's ground truth is limited by how densely that truth samples the (continuous) grasp families:
a predicted grasp counts only when all three cells are within one voxel of one ground-truth grasp.
For each scene this draws the ground truth as the data set does (at most --cap grasps per object)
and, independently, 32 fresh grasps per object from the same distribution, and scores them.

    python bench/grasp_ceiling.py --voxel_size 0.0075 --cap 100    # ~10 s
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from graspGPT.data import synth
from graspGPT.data.vocab import Vocab, Workspace
from graspGPT.grasp_metrics import GraspScore, score_grasps


def ceiling(voxel_size: float, cap: int, scenes: int, fresh: int = 32) -> GraspScore:
    ws = Workspace(voxel_size=voxel_size)
    vocab = Vocab.for_workspace(ws)
    draw = synth._grasps_for  # the generator's per-object grasp sampler
    total = GraspScore()
    for seed in range(scenes):
        drawn = []

        def both(obj, k, grid, vocab_, rng, max_grasps, seed=seed):
            truth = draw(obj, k, grid, vocab_, rng, max_grasps)
            drawn.append((k, truth, draw(obj, k, grid, vocab_, np.random.default_rng([seed, k, 1]), fresh)))
            return truth

        synth._grasps_for = both
        try:
            synth.scene_geometry(np.random.default_rng(seed), ws, vocab, cap)
        finally:
            synth._grasps_for = draw
        truth = [(k, vocab.cells_of(row)) for k, t, _ in drawn for row in t]
        model = [(k, vocab.cells_of(row)) for k, _, p in drawn for row in p]
        total = total + score_grasps(model, truth)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voxel_size", type=float, default=0.0075)
    ap.add_argument("--cap", type=int, default=100, help="max_grasps_per_object of the ground truth")
    ap.add_argument("--scenes", type=int, default=40)
    args = ap.parse_args()
    s = ceiling(args.voxel_size, args.cap, args.scenes)
    print(json.dumps({"voxel_size": args.voxel_size, "cap": args.cap, "scenes": args.scenes, "grasps": s.predicted,
                      "perfect_model_precision": round(s.precision, 3), "coverage": round(s.coverage, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
