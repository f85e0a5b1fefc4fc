"""What gripper grounding alone gives: the precision of a model that knows nothing (all logits equal),
decoded like the recipe, on fresh built-in scenes. The reference that tells the learned share of a trained
model's precision from the decoder's (docs/QUALITY_LAB.md, 2026-12-02).

    python bench/grounding_alone.py --voxel_size 0.0075 --cap 100 --scenes 15 --grasps 128   # ~1 min
    python bench/grounding_alone.py --voxel_size 0.03 --cap 8 --scenes 40 --grasps 32        # seconds
"""
from __future__ import annotations

import argparse
import json

import torch

from graspGPT.data import synth
from graspGPT.data.vocab import Vocab, Workspace
from graspGPT.evaluation import COUNT_KEYS, evaluate_scene, summarize
from graspGPT.model import GraspGPT, GraspGPTConfig


def uniform_model(vocab: Vocab, block_size: int = 16384) -> GraspGPT:
    """A tiny GraspGPT whose logits are all 0 (embedding table, hence the tied output layer, zero)."""
    model = GraspGPT(GraspGPTConfig(vocab_size=vocab.size, block_size=block_size, n_layer=1, n_head=2, n_embd=8))
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voxel_size", type=float, default=0.0075)
    ap.add_argument("--cap", type=int, default=100, help="max_grasps_per_object of the ground truth")
    ap.add_argument("--scenes", type=int, default=15)
    ap.add_argument("--grasps", type=int, default=128, help="independent grasps per scene")
    ap.add_argument("--cell_temperature", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=12345, help="scene seed (not the training data's)")
    args = ap.parse_args()
    ws = Workspace(voxel_size=args.voxel_size)
    vocab = Vocab.for_workspace(ws)
    model = uniform_model(vocab)
    counts = dict.fromkeys(COUNT_KEYS, 0.0)
    for i, ids in enumerate(synth.generate_scenes(args.scenes, args.seed, ws, "grasp", args.cap)):
        c, _, _ = evaluate_scene(model, ids, vocab, args.voxel_size, seed=i, cell_temperature=args.cell_temperature,
                                 independent=args.grasps)
        counts = {k: counts[k] + c[k] for k in COUNT_KEYS}
    m = summarize(counts)
    print(json.dumps({"voxel_size": args.voxel_size, "cap": args.cap, "scenes": args.scenes, "grasps": args.grasps,
                      "grounded_uniform_precision": round(m["grasp_precision"], 4),
                      "coverage": round(m["grasp_coverage"], 4), "predicted": int(counts["predicted"]),
                      "random_precision": round(m["baseline_precision"], 4)}))


if __name__ == "__main__":
    main()
