"""Generate grasps for one scene: grammar-constrained sampling with a KV cache.

    python -m graspGPT.generate --checkpoint CKPT --data DIR --index I [--num_samples K]
        [--temperature T] [--cell_temperature C] [--independent_grasps N] [--top_k K] [--max_new_tokens N]
        [--seed S] [--out OUTDIR]

CKPT is an exported model directory or a training checkpoint (OUTPUT/checkpoint_iter_N). The
prompt is the scene section of sample I followed by `detectgrasp` (for a completion or
segmentation sample, the scene alone: the model writes those sections, then the grasps). K
samples are decoded together in one KV cache with K rows, each row masked by its own
GrammarState, so every sequence is grammar-valid; the same is done once more without the mask
(files with the suffix _free) to see what the model learned on its own. With --independent_grasps N
each sample is N grasps drawn each on its own right after the scene (N rows of one grasp block, joined:
their distinct grasps; no free run).

OUTDIR gets tokens.json, grasps.json (per grasp: cells, metric finger points and base, and the
parallel-jaw gripper pose: centre, approach, closing, width, 4x4 transform, with the tolerance one
grasp cell leaves; cells become metres with the grasp-cell convention of the model's training data,
see graspGPT/grasp_pose.py), scene.ply (the scene's cells coloured by tag, predicted grasp points
in red) and scene.png (scene, ground-truth grippers dark, predicted grippers red), and the *_free
versions.
User errors print one `error: ...` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .data.grammar import Block, Sample, read_output
from .data.render import PREDICTED, render_sample, tag_colours
from .data.storage import StorageError, TokenStore
from .data.vocab import Vocab, Workspace
from .decoding import (Decoded, GenerateError, accepts, decode, default_device, default_max_new, grasp_list,
                       load_checked, prompt_state, task_of, task_prompt, truth_of)
from .grasp_metrics import GraspScore, correct_grasps, score_grasps
from .grasp_pose import pose_from_cells, tolerance
from .model import ModelInputError


# -- writing the outputs ----------------------------------------------------------------------

def _token_text(vocab: Vocab, ids: np.ndarray) -> list[str]:
    return [f"({t[0]},{t[1]},{t[2]})" if isinstance(t, tuple) else t for t in vocab.decode(ids)]


def write_ply(path: Path, workspace: Workspace, vocab: Vocab, scene: Sequence[Block], grasps: Sequence[Block],
              grasp_cells: str) -> None:
    """ASCII PLY point cloud: scene cell centres coloured by tag, predicted grasp points in red."""
    colours = tag_colours([b.tag for b in scene])
    points, rgb = [], []
    for b in scene:
        points.append(workspace.cell_center(vocab.cells_of(b.cells)))
        rgb.append(np.tile(colours[b.tag], (len(b.cells), 1)))
    for g in grasps:
        points.append(workspace.grasp_point(vocab.cells_of(g.cells), grasp_cells))
        rgb.append(np.tile(PREDICTED, (len(g.cells), 1)))
    points = np.concatenate(points) if points else np.zeros((0, 3))
    rgb = np.concatenate(rgb) if rgb else np.zeros((0, 3), int)
    header = ["ply", "format ascii 1.0", "comment GraspGPT scene (by tag) and predicted grasp points (red)",
              f"element vertex {len(points)}", "property float x", "property float y", "property float z",
              "property uchar red", "property uchar green", "property uchar blue", "end_header"]
    lines = [f"{x:.5f} {y:.5f} {z:.5f} {r} {g} {b}" for (x, y, z), (r, g, b) in zip(points.tolist(), rgb.tolist())]
    path.write_text("\n".join(header + lines) + "\n")


POSE_FRAME = ("metres in the workspace frame; transform = workspace <- gripper, columns: x = closing (left to "
              "right finger, orthogonal to approach), y = approach x closing, z = approach (base towards the "
              "fingers' midpoint), origin = centre (midpoint of the finger points); right-handed")


def _grasp_records(grasps: list[Block], truth: list[tuple[int, np.ndarray]] | None, vocab: Vocab,
                   workspace: Workspace, grasp_cells: str) -> list[dict]:
    listed = grasp_list(grasps, vocab)
    ok = correct_grasps(listed, truth) if truth else [None] * len(listed)
    tol = tolerance(workspace, grasp_cells)
    out = []
    for (tag, cells), good in zip(listed, ok):
        rec = pose_from_cells(cells, workspace, grasp_cells, tag).to_json(vocab, tol)
        rec["correct"] = None if good is None else bool(good)
        out.append(rec)
    return out


@dataclass(frozen=True)
class Frame:
    """Where cells become metres: the data set's box, and the grasp-cell conventions of the ground truth
    (the data set's) and of the predictions (the model's training data's)."""

    workspace: Workspace
    truth_cells: str
    predicted_cells: str


def write_outputs(out: Path, suffix: str, index: int, decoded: Decoded, truth_sample: Sample, vocab: Vocab,
                  frame: Frame, constrained: bool) -> dict:
    """tokens/grasps JSON, PLY and PNG of one decoding run; returns its summary."""
    workspace = frame.workspace
    truth = grasp_list(truth_sample.grasps, vocab) if truth_sample.grasps else None
    tokens, grasps_json, all_grasps = [], [], []
    valid = posed = 0
    score = GraspScore()
    start = prompt_state(decoded.prompt, vocab)
    for k, new in enumerate(decoded.new):
        ok = accepts(start, new)
        valid += ok
        got = read_output(np.concatenate([decoded.prompt, new]), vocab).grasps or []
        all_grasps += got
        if truth:
            score = score + score_grasps(grasp_list(got, vocab), truth)
        tokens.append({"sample": k, "ids": new.tolist(), "tokens": _token_text(vocab, new),
                       "ended": bool(decoded.ended[k]), "grammar_valid": bool(ok)})
        records = _grasp_records(got, truth, vocab, workspace, frame.predicted_cells)
        posed += sum(r["pose"] is not None for r in records)
        grasps_json.append({"sample": k, "grasps": records})
    (out / f"tokens{suffix}.json").write_text(json.dumps({
        "index": index, "constrained": constrained,
        "prompt": {"ids": decoded.prompt.tolist(), "tokens": _token_text(vocab, decoded.prompt)},
        "samples": tokens}) + "\n")
    (out / f"grasps{suffix}.json").write_text(json.dumps({
        "index": index, "constrained": constrained,
        "workspace": {"bbox_min": list(workspace.bbox_min), "bbox_max": list(workspace.bbox_max),
                      "voxel_size": workspace.voxel_size, "grasp_cells": frame.predicted_cells},
        "grasp_step_m": workspace.grasp_step(frame.predicted_cells).round(6).tolist(),
        "tolerance": tolerance(workspace, frame.predicted_cells).to_json(),
        "pose_frame": POSE_FRAME,
        "samples": grasps_json}, indent=1) + "\n")
    write_ply(out / f"scene{suffix}.ply", workspace, vocab, truth_sample.scene, all_grasps, frame.predicted_cells)
    mode = "constrained" if constrained else "unconstrained"
    summary = {"mode": mode, "samples": len(decoded.new), "grammar_valid": valid, "grasps": len(all_grasps),
               "poses": posed}
    title = f"sample {index}, {mode}: {len(all_grasps)} predicted grasps"
    if truth:
        summary.update(precision=round(score.precision, 4), coverage=round(score.coverage, 4))
        title += f", precision {score.precision:.2f}, coverage {score.coverage:.2f}"
    render_sample(truth_sample, vocab, out / f"scene{suffix}.png", title=title, predicted=all_grasps,
                  workspace=workspace, grasp_cells=frame.truth_cells, predicted_cells=frame.predicted_cells)
    return summary


def output_frame(meta: dict, store: TokenStore) -> tuple[Frame, str | None]:
    """The Frame for a model (its graspgpt meta) and a data set, and a note when their grasp cells differ:
    the model writes cells the way its training data did."""
    ws = meta.get("workspace") or {}
    model_cells = ws.get("grasp_cells")
    frame = Frame(store.workspace, store.grasp_cells, model_cells or store.grasp_cells)
    note = None
    if model_cells is None:
        note = (f"the checkpoint does not record its grasp cells' convention (its training data was moved); "
                f"reading its grasps as the data set's ({store.grasp_cells})")
    elif model_cells != store.grasp_cells:
        note = (f"the model was trained on {model_cells} grasp cells, the data set holds {store.grasp_cells} ones: "
                f"each is converted to metres with its own convention, but cell-level precision compares "
                f"different grids")
    return frame, note


# -- the command line -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m graspGPT.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="exported model directory or OUTPUT/checkpoint_iter_N")
    p.add_argument("--data", required=True, help="toolkit data set directory holding the scene")
    p.add_argument("--index", type=int, required=True, help="sample whose scene is the prompt")
    p.add_argument("--num_samples", type=int, default=4, help="sequences to sample (default 4)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy (default 1)")
    p.add_argument("--cell_temperature", type=float, default=None,
                   help="temperature of the cells (where grasps go) within the share of probability --temperature "
                        "gives them; the odds of a cell against a tag, another grasp or end stay at --temperature "
                        "(default: --temperature for all)")
    p.add_argument("--independent_grasps", type=int, default=0, metavar="N",
                   help="each sample is N grasps, each drawn on its own right after the scene (N rows at once: "
                        "fast, and no grasp copies the ones before); grasp samples only, no free run "
                        "(default 0: one sequence, each grasp after the ones before)")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="cap on generated tokens (default: twice the sample's own continuation + 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grounding", choices=("gripper", "fingers", "none"), default="gripper",
                   help="what constrained decoding holds each grasp to besides the grammar: gripper (default: the "
                        "two fingers on the object its tag names and the gripper's shape, so every grasp is "
                        "physically valid), fingers (the fingers only), none (the grammar alone)")
    p.add_argument("--no_grounding", dest="grounding", action="store_const", const="none",
                   help="the same as --grounding none")
    p.add_argument("--out", default="generated", help="output directory (default ./generated)")
    p.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype (default float32)")
    return p


def run(args) -> list[dict]:
    if args.cell_temperature is not None and args.cell_temperature <= 0:
        raise GenerateError(f"--cell_temperature must be > 0, got {args.cell_temperature}; leave it out to sample "
                            f"the cells at --temperature")
    if args.independent_grasps < 0:
        raise GenerateError(f"--independent_grasps must be >= 0 (0: one sequence), got {args.independent_grasps}")
    store = TokenStore.open(args.data)
    if not 0 <= args.index < len(store):
        raise GenerateError(f"--index {args.index} is out of range: {args.data} has {len(store)} samples "
                            f"(valid indices 0..{len(store) - 1})")
    model, meta = load_checked(args.checkpoint, store, args.device, args.dtype)
    frame, note = output_frame(meta, store)
    if note:
        print(f"note: {note}", file=sys.stderr)
    vocab = store.vocab
    ids = np.asarray(store[args.index], dtype=np.int64)
    truth = truth_of(ids, vocab)
    prompt = task_prompt(ids, vocab, task_of(truth))
    max_new = args.max_new_tokens if args.max_new_tokens is not None else default_max_new(ids, prompt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for constrained, suffix in ((True, ""),) + (((False, "_free"),) if not args.independent_grasps else ()):
        decoded = decode(model, prompt, vocab, args.num_samples, max_new, args.temperature, args.top_k,
                         constrained=constrained, seed=args.seed, grounded=args.grounding != "none",
                         voxel_size=store.workspace.voxel_size if args.grounding == "gripper" else None,
                         cell_temperature=args.cell_temperature, independent=args.independent_grasps)
        s = write_outputs(out, suffix, args.index, decoded, truth, vocab, frame, constrained)
        s["tokens_per_s"] = round(decoded.new_tokens / max(decoded.seconds, 1e-9), 1)
        summaries.append(s)
        line = (f"{s['mode']:>13}: grammar-valid {s['grammar_valid']}/{s['samples']}, {s['grasps']} grasps "
                f"({s['poses']} with a gripper pose)")
        if "precision" in s:
            line += f", precision {s['precision']:.3f}, coverage {s['coverage']:.3f}"
        print(line + f", {s['tokens_per_s']:.0f} tokens/s")
    print(f"wrote {out}/tokens.json grasps.json scene.ply scene.png" + ("" if args.independent_grasps else " (and *_free)"))
    return summaries


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (GenerateError, StorageError, ModelInputError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
