"""Evaluate a model on validation scenes: loss, grammar validity, grasp precision and coverage.

    python -m graspGPT.evaluate --checkpoint CKPT --data DIR [--split val] [--num_scenes 50]
        [--num_samples 1] [--temperature 1] [--top_k K] [--seed 0] [--out metrics.json]

For each scene the model continues the task prompt (decoding.task_prompt) twice: with the
grammar mask and without it. Reported, as a table and as JSON:

  val_loss, val_ppl        mean next-token loss over the evaluated samples, and exp of it (each sample
                           capped to the grasps per object the model's training samples kept, as the
                           trainer's validation does: dataset.train_grasps_per_object)
  valid_rate               sequences that are whole valid sequences (with the mask: all that
                           finished within the token cap); free_valid_rate: without the mask
  grasp_precision          predicted grasps matching a ground-truth grasp (grasp_metrics)
  grasp_coverage           objects with a correct predicted grasp / objects with grasps
  any_tag_precision        predicted grasps whose cells match a ground-truth grasp of any object
                           (a diagnostic: the gap to grasp_precision is grasps put under the wrong tag)
  grasp_validity           predicted grasps a parallel-jaw gripper could execute in the scene, judged
                           from its voxels (grasp_metrics.valid_grasps: fingers on the named object,
                           opening, gripper shape, no collision); needs no ground-truth grasp
  baseline_*               the same for random grasps (grasp_metrics.random_grasps), as many per
                           sequence as the model predicted there
  amodal_iou               completion samples: IoU of the written amodal cells with the truth
  seg_accuracy             segmentation samples: ground-truth cells given their own tag
  prefix_precision         one grasp sampled after a true prefix (evenly spaced true grasps, 8 per
                           scene), scored like grasp_precision; the gap between the two is what
                           decoding loses by continuing its own output
  tf_<slot>_loss/top1/near each token of the true grasps (tag, cell1-3) predicted from the true
                           prefix: loss, most likely token right (cells: within a voxel), probability
                           within a voxel (teacher_forced_grasps): which part of a grasp is not learned

Inside the trainer, `evaluation.TrainingEvaluator` does the same on a fixed set of validation scenes,
split over ranks. User errors print one `error: ...` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .data.storage import StorageError, TokenStore
from .decoding import GenerateError, default_device, load_checked
from .evaluation import DECODINGS, GRASP_SLOTS, GROUNDINGS, evaluate
from .model import ModelInputError


TABLE = (  # label, metric name (each decoding's key is its prefix + the name), baseline key, format
    ("grammar-valid rate", "valid_rate", None, "{:.3f}"),
    ("grasp precision", "grasp_precision", "baseline_precision", "{:.3f}"),
    ("precision, any object", "any_tag_precision", "baseline_any_tag_precision", "{:.3f}"),
    ("grasp validity (physical)", "grasp_validity", "baseline_validity", "{:.3f}"),
    ("grasp coverage", "grasp_coverage", "baseline_coverage", "{:.3f}"),
    ("precision after a true prefix", "prefix_precision", None, "{:.3f}"),
    ("grasps per sequence", "grasps_per_sequence", "grasps_per_sequence", "{:.1f}"),
    ("amodal IoU", "amodal_iou", None, "{:.3f}"),
    ("segmentation accuracy", "seg_accuracy", None, "{:.3f}"),
)


def format_table(m: dict) -> str:
    """The metrics as a table: a column per decoding (constrained, grammar only, unconstrained) and the
    random baseline."""
    lines = [f"{'metric':<30}{'constrained':>13}{'grammar only':>14}{'unconstrained':>15}{'random':>9}"]
    for label, name, baseline, fmt in TABLE:
        if name not in m:
            continue
        cells = [fmt.format(m[k]) if k in m else "-" for k in (*(p + name for p in DECODINGS), baseline)]
        lines.append(f"{label:<30}{cells[0]:>13}{cells[1]:>14}{cells[2]:>15}{cells[3]:>9}")
    if "val_loss" in m:
        lines.append(f"{'validation loss (ppl)':<30}{m['val_loss']:>14.4f}  ({m['val_ppl']:.3f})")
    if any(f"tf_{slot}_loss" in m for slot in GRASP_SLOTS):
        lines.append(f"{'true grasp tokens after a true prefix:':<44}{'loss':>8}{'top-1':>8}{'near':>8}")
        for slot in GRASP_SLOTS:
            if f"tf_{slot}_loss" in m:
                values = "".join(f"{m[f'tf_{slot}_{k}']:>8.3f}" for k in ("loss", "top1", "near"))
                lines.append(f"  {slot:<42}{values}")
    lines.append(f"{m['scenes']} scenes, {m['decode_tokens_per_s']:.0f} decoded tokens/s")
    return "\n".join(lines)


def select_indices(store: TokenStore, split: str, meta: dict, val_fraction: float | None,
                   seed: int | None) -> np.ndarray:
    """The samples of `split`: the data set's recorded split, else the trainer's seeded split with the
    checkpoint's dataset.val_fraction and system.seed (or the flags, or the toolkit defaults)."""
    from .config import DatasetConfig, SystemConfig

    if split == "all":
        return np.arange(len(store))
    config = meta.get("training_config") or {}
    if val_fraction is None:
        val_fraction = config.get("dataset", {}).get("val_fraction", DatasetConfig().val_fraction)
    if seed is None:
        seed = config.get("system", {}).get("seed", SystemConfig().seed)
    train, val = store.split(val_fraction, seed)
    chosen = val if split == "val" else train
    if len(chosen) == 0:
        raise GenerateError(f"the {split} split of {store.path} is empty (val_fraction {val_fraction}); "
                            f"use --split all or another --val_fraction")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m graspGPT.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="exported model directory or OUTPUT/checkpoint_iter_N")
    p.add_argument("--data", required=True, help="toolkit data set directory")
    p.add_argument("--split", choices=("val", "train", "all"), default="val")
    p.add_argument("--num_scenes", type=int, default=50, help="scenes to evaluate, picked with --seed (default 50)")
    p.add_argument("--num_samples", type=int, default=1, help="sequences per scene and mode (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1)")
    p.add_argument("--cell_temperature", type=float, default=None,
                   help="temperature of the cells (where grasps go) within the share of probability --temperature "
                        "gives them; the odds of a cell against a tag, another grasp or end stay at --temperature "
                        "(default: --temperature for all)")
    p.add_argument("--independent_grasps", type=int, default=0, metavar="N",
                   help="sample N grasps per scene, each on its own right after the scene (in one batch), instead "
                        "of one sequence whose grasps follow one another (default 0: the sequence); no free run")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="scene choice and sampling seed")
    p.add_argument("--no_free", action="store_true", help="skip the unconstrained run")
    p.add_argument("--grounding", choices=GROUNDINGS, default="gripper",
                   help="what constrained decoding holds each grasp to besides the grammar: gripper (default: the "
                        "fingers on the object its tag names and the gripper's shape, so every grasp is physically "
                        "valid), fingers (the fingers only), none (the grammar alone); unless none, the "
                        "grammar-only figures are reported beside")
    p.add_argument("--no_grounding", dest="grounding", action="store_const", const="none",
                   help="the same as --grounding none")
    p.add_argument("--batch_size", type=int, default=4, help="samples per forward for the loss")
    p.add_argument("--val_fraction", type=float, default=None,
                   help="split of a data set without a recorded one (default: the checkpoint's training config)")
    p.add_argument("--split_seed", type=int, default=None, help="seed of that split (default: the checkpoint's)")
    p.add_argument("--out", default=None, help="also write the metrics as JSON to this file")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype (default float32)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.num_scenes < 1:
            raise GenerateError(f"--num_scenes must be >= 1, got {args.num_scenes}")
        if args.independent_grasps < 0:
            raise GenerateError(f"--independent_grasps must be >= 0 (0: one sequence per scene), got "
                                f"{args.independent_grasps}")
        if args.cell_temperature is not None and args.cell_temperature <= 0:
            raise GenerateError(f"--cell_temperature must be > 0, got {args.cell_temperature}; leave it out to "
                                f"sample the cells at --temperature")
        store = TokenStore.open(args.data)
        model, meta = load_checked(args.checkpoint, store, args.device, args.dtype)
        indices = select_indices(store, args.split, meta, args.val_fraction, args.split_seed)
        t0 = time.perf_counter()
        trained_on = (meta.get("training_config") or {}).get("dataset", {})
        metrics = evaluate(model, store, indices, args.num_scenes, args.seed, args.batch_size,
                           trained_on.get("loss_on", "all"),
                           train_grasps_per_object=trained_on.get("train_grasps_per_object", 0),
                           num_samples=args.num_samples, temperature=args.temperature, top_k=args.top_k,
                           unconstrained=not args.no_free, grounding=args.grounding,
                           cell_temperature=args.cell_temperature, independent=args.independent_grasps)
        metrics.update(split=args.split, checkpoint=str(args.checkpoint), data=str(args.data),
                       seconds=round(time.perf_counter() - t0, 2))
    except (GenerateError, StorageError, ModelInputError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    text = json.dumps(metrics)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
