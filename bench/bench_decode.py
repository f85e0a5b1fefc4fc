"""Grasp decoding speed: tokens/s at the evaluation batch and one scene's latency at batch 1.

    python bench/bench_decode.py --model gpt-mini,gpt2 --scenes 8 --max_new 512    # GPU: bf16
    python bench/bench_decode.py --model gpt-nano --scenes 2 --max_new 64          # CPU smoke test

Untrained models (weights seeded) on built-in real-grid scenes (0.0075 m, V = 147,219), decoded the
way the quality evaluation does it: per scene one grounded row (grammar + gripper grounding), one
grammar-only row and one unconstrained row, `--scenes` scenes in one batch, every row writing
exactly --max_new tokens (`end` is masked so that all rows do the same work; an untrained model's
grasps are as costly to constrain as a trained one's). A warm-up call runs first (CUDA, compilation).
Prints one JSON line per case: new tokens per second, milliseconds per decoding step, and the
latency of one grounded row of one scene (batch 1). With --grasps N, also one scene's N grounded grasps
written one after another in one row (the sequence) against N rows of one grasp each (independent
sampling, `graspGPT.decoding.join_grasps`): seconds of each and the ratio. With --evaluation, --profile lists
the host functions that take longest and --device_profile the device's busy time against the wall time.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import graspGPT.decoding as dec
import graspGPT.evaluation
from graspGPT.data.synth import generate_scenes
from graspGPT.data.vocab import Vocab, Workspace
from graspGPT.model import GraspGPT, GraspGPTConfig


def no_end(vocab: Vocab):
    """Patch the grammar tables so `end` is never allowed after the prompt: every row runs to its cap."""
    original = dec._sample_tokens

    def sample(logits, states, *args, **kwargs):
        logits = logits.clone()
        logits[:, vocab.end] = float("-inf")
        return original(logits, states, *args, **kwargs)
    return sample


def run_case(model, prompts, vocab, voxel_size, rows_per_scene: int, max_new: int, seed: int) -> dict:
    kinds = ["gripper", "grammar", "free"][:rows_per_scene]
    extra = {}
    if "voxel_size" in inspect.signature(dec.decode_many).parameters:
        extra["voxel_size"] = voxel_size
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    outs = dec.decode_many(model, prompts, vocab, len(kinds), max_new, 1.0, None,
                           constrained=[k != "free" for k in kinds], seeds=[seed + i for i in range(len(prompts))],
                           grounded=[k == "gripper" for k in kinds], **extra)
    sync()
    seconds = time.perf_counter() - t0
    tokens = sum(o.new_tokens for o in outs)
    return {"rows": len(prompts) * len(kinds), "new_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "ms_per_step": round(1e3 * seconds / outs[0].forwards, 2)}


def grasp_latency(model, prompt, vocab, voxel_size: float, n: int) -> dict:
    """Seconds for one scene's n grounded grasps: one row writing them in turn, and n rows writing one each."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def seconds(cap: int, independent: int = 0) -> float:
        sync()
        t0 = time.perf_counter()
        dec.decode_many(model, [prompt], vocab, 1, cap, 1.0, None, seeds=[0], grounded=True, voxel_size=voxel_size,
                        independent=independent)
        sync()
        return time.perf_counter() - t0

    seconds(None, n)  # warm-up of the wide batch's shapes
    sequence, independent = seconds(n * dec.GRASP_TOKENS), seconds(None, n)
    return {"grasps": n, "sequence_s": round(sequence, 3), "independent_s": round(independent, 3),
            "speedup": round(sequence / independent, 1)}


# What decode_many spends its time on: its own step loop aside, these are where the host's time goes.
DECODE_PARTS = ("decode_many", "held_cells", "_sample_tokens", "allowed_masks", "forward_cached", "attend",
                "advance", "_row_uniforms", "prompt_state", "<method 'tolist' of 'torch._C.TensorBase' objects>",
                "_score")


def evaluation_case(model, scenes, vocab, voxel_size: float, grasps: int, cell_temperature: float,
                    profile: bool) -> dict:
    """The quality evaluation's decoding and scoring (evaluation.evaluate_batch, as evaluate_scenes batches it:
    `grasps` independent grounded rows and as many grammar-only rows per scene): decoded tokens/s, and with
    `profile` the host functions that take the most of its time (cProfile; time a function spends waiting
    for the GPU counts as its own)."""
    import cProfile
    import pstats

    from graspGPT.evaluation import INDEPENDENT_GRASPS_PER_BATCH, evaluate_batch
    per_batch = max(1, INDEPENDENT_GRASPS_PER_BATCH // grasps)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    tokens, decode_s, profiler = 0, 0.0, cProfile.Profile() if profile else None
    sync()
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    for lo in range(0, len(scenes), per_batch):
        batch = scenes[lo: lo + per_batch]
        for c, _, _ in evaluate_batch(model, batch, vocab, voxel_size, list(range(lo, lo + len(batch))),
                                      cell_temperature=cell_temperature, independent=grasps):
            tokens += int(c["new_tokens"])
            decode_s += c["decode_seconds"]
    sync()
    if profiler:
        profiler.disable()
    out = {"scenes": len(scenes), "grasps": grasps, "cell_temperature": cell_temperature, "new_tokens": tokens,
           "decode_s": round(decode_s, 3), "decode_tokens_per_s": round(tokens / decode_s, 1),
           "with_scoring_s": round(time.perf_counter() - t0, 3)}
    if profiler:
        stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, _, own seconds, cumulative, _)
        top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:15]
        out["host_top"] = [[f"{Path(f).name}:{line}:{name}", calls, round(own, 3), round(cum, 3)]
                           for (f, line, name), (calls, _, own, cum, _) in top]
        # decoding's parts, cumulative (a part that waits for the device counts the wait as its own)
        out["decode_parts"] = {name: round(sum(cum for (_, _, n), (_, _, _, cum, _) in stats.items() if n == name), 3)
                               for name in DECODE_PARTS}
    return out


def device_profile(run, top: int = 12) -> dict:
    """`run()` under torch.profiler: the wall seconds, the seconds the device computed (the sum of its
    operations' own device time; on the CPU, of their own CPU time), the heaviest operations, and the
    operations that take the most host time (a wait for the device shows as its synchronizing call). Busy
    far below wall: the host sets the pace."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as p:
        t0 = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = p.key_averages()
    # An operator's own device time is its kernels' time again: the device's events alone add up to its busy time.
    work = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU] if cuda else list(events)
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    busy = sum(own(e) for e in work) / 1e6
    heaviest = sorted(work, key=own, reverse=True)[:top]
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"wall_s": round(wall, 3), "device_busy_s": round(busy, 3), "busy_fraction": round(busy / wall, 3),
            "device": "cuda" if cuda else "cpu (own CPU time of torch operations)",
            "heaviest": [[e.key[:80], round(own(e) / 1e6, 4), e.count] for e in heaviest],
            "host_heaviest": [[e.key[:80], round(e.self_cpu_time_total / 1e6, 4), e.count] for e in host]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt-mini,gpt2", help="model presets, comma-separated")
    ap.add_argument("--scenes", type=int, default=8, help="scenes per batch (the evaluation decodes up to 16 together)")
    ap.add_argument("--max_new", type=int, default=512, help="tokens each row writes")
    ap.add_argument("--voxel_size", type=float, default=0.0075)
    ap.add_argument("--grasps", type=int, default=0,
                    help="also time one scene's N grasps, in one sequence and as N independent rows")
    ap.add_argument("--label", default="", help="a name for this code version in the output")
    ap.add_argument("--evaluation", type=int, default=0,
                    help="also decode and score the --scenes as the quality evaluation does, N independent grasps "
                         "a scene (grounded and grammar-only rows), at --cell_temperature")
    ap.add_argument("--cell_temperature", type=float, default=0.3)
    ap.add_argument("--grasps_per_batch", type=int, default=0,
                    help="with --evaluation: decode this many grasps of each decoding at once (default: the "
                         "evaluation's INDEPENDENT_GRASPS_PER_BATCH)")
    ap.add_argument("--profile", action="store_true", help="with --evaluation: the host functions that take longest")
    ap.add_argument("--device_profile", action="store_true",
                    help="with --evaluation: run it once more under torch.profiler; the device's busy time against "
                         "the wall time, and the heaviest device operations")
    args = ap.parse_args()
    if args.grasps_per_batch:
        graspGPT.evaluation.INDEPENDENT_GRASPS_PER_BATCH = args.grasps_per_batch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ws = Workspace(voxel_size=args.voxel_size)
    vocab = Vocab.for_workspace(ws)
    scenes = list(generate_scenes(args.scenes, seed=11, workspace=ws, task_mix="grasp", max_grasps_per_object=4))
    prompts = [dec.task_prompt(ids, vocab, "grasp") for ids in scenes]
    sample_as_written = dec._sample_tokens
    dec._sample_tokens = no_end(vocab)
    for name in args.model.split(","):
        torch.manual_seed(0)
        block = max(len(p) for p in prompts) + args.max_new + 1
        model = GraspGPT(GraspGPTConfig.from_shape(model_type=name, vocab_size=vocab.size, block_size=block)).to(device)
        if device == "cuda":
            model = model.to(torch.bfloat16)
        # warm-up (CUDA loads a kernel on its first use): one row, and three rows sharing a prompt
        run_case(model, prompts[:1], vocab, args.voxel_size, 1, 8, 0)
        run_case(model, prompts[:2], vocab, args.voxel_size, 3, 8, 0)
        batch = run_case(model, prompts, vocab, args.voxel_size, 3, args.max_new, 0)
        one = run_case(model, prompts[:1], vocab, args.voxel_size, 1, args.max_new, 0)
        grasps = {"grasps": grasp_latency(model, prompts[0], vocab, args.voxel_size, args.grasps)} \
            if args.grasps else {}
        if args.evaluation:
            dec._sample_tokens = sample_as_written  # the evaluation lets rows end
            grasps["evaluation"] = evaluation_case(model, scenes, vocab, args.voxel_size, args.evaluation,
                                                   args.cell_temperature, args.profile)
            if args.device_profile:
                grasps["device_profile"] = device_profile(lambda: evaluation_case(
                    model, scenes, vocab, args.voxel_size, args.evaluation, args.cell_temperature, False))
            dec._sample_tokens = no_end(vocab)
        print(json.dumps({"label": args.label, "model": name, "device": torch.cuda.get_device_name() if device == "cuda"
                          else "cpu", "scenes": args.scenes, "max_new": args.max_new,
                          "grasps_per_batch": graspGPT.evaluation.INDEPENDENT_GRASPS_PER_BATCH, "batch": batch,
                          "batch1_grounded": one, **grasps}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
