"""What gripper grounding alone gives: the precision of a model that knows nothing (all logits equal),
decoded like the recipe, on fresh built-in scenes. The reference that tells the learned share of a trained
model's precision from the decoder's (docs/QUALITY_LAB.md, 2026-12-02).

    python bench/grounding_alone.py --voxel_size 0.0075 --cap 100 --scenes 15 --grasps 128   # ~1 min
    python bench/grounding_alone.py --voxel_size 0.03 --cap 8 --scenes 40 --grasps 32        # seconds
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from graspGPT import decoding
from graspGPT.data import synth
from graspGPT.data.vocab import Vocab, Workspace
from graspGPT.grasp_metrics import GraspScore, score_grasps
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
    total = GraspScore()
    for i, ids in enumerate(synth.generate_scenes(args.scenes, args.seed, ws, "grasp", args.cap)):
        prompt = decoding.task_prompt(ids, vocab, "grasp")
        out = decoding.decode(model, prompt, vocab, seed=i, grounded=True, voxel_size=args.voxel_size,
                              cell_temperature=args.cell_temperature, independent=args.grasps)
        got = decoding.read_output(np.concatenate([prompt, out.new[0]]), vocab)
        s = score_grasps(decoding.grasp_list(got.grasps, vocab), decoding.grasp_list(decoding.truth_of(ids, vocab).grasps,
                                                                                       vocab))
        for k in ("predicted", "correct", "objects", "covered"):
            setattr(total, k, getattr(total, k) + getattr(s, k))
    print(json.dumps({"voxel_size": args.voxel_size, "cap": args.cap, "scenes": args.scenes, "grasps": args.grasps,
                      "grounded_uniform_precision": round(total.correct / max(total.predicted, 1), 4),
                      "coverage": round(total.covered / max(total.objects, 1), 4), "predicted": total.predicted}))


if __name__ == "__main__":
    main()
