"""Grasp quality within a time budget: train on the built-in synthetic data, then evaluate.

    python bench/quality.py --model gpt-mini --minutes 12 --out runs/quality/gpt-mini
    python bench/quality.py --model gpt2 --minutes 12 --out runs/quality/gpt2
    python bench/quality.py --model cpu_smoke --minutes 1 --num_scenes 4 --out /tmp/quality  # CPU, ~1 min
    python bench/quality.py --model lab --steps 300 --set dataset.loss_on=answer --out runs/lab/answer  # CPU lab
    python bench/quality.py --model lab --steps 300 --groundings gripper,fingers --out runs/lab/g  # decodings
    python bench/quality.py --model lab --steps 300 --independent_grasps 0,32 --out runs/lab/i  # sampling

The lab (configs/quality_lab.json: the quickstart's model and data on the coarse 0.03 m grid, more
validation scenes) is the fast proxy for research on grasp quality: --steps fixes the run length (no
calibration), so a run is a pure function of its settings and seed; --set SECTION.KEY=VALUE changes one
setting (JSON value, e.g. --set dataset.grasp_order='"random"' or plain --set dataset.grasp_order=random).

configs/quality_<model>.json holds the run (real 0.0075 m grid, grasp task, but for the lab). Steps:
  1. calibrate  a short run of the real trainer (one rank) measures seconds per optimizer step; the data
                set is generated here once (cached in $GRASPGPT_CACHE or ~/.cache/graspgpt)
  2. train      max_iters = minutes * 60 / (seconds per step), so the LR schedule ends on time;
                `--resume auto`, so an interrupted run continues from its last checkpoint. At the end of
                the warmup (LR independent of max_iters) it stops once, measures its own step time
                (under whatever then shares the GPU: the calibration run may not see it) and plans
                max_iters again from the budget left
  3. evaluate   the newest checkpoint on --num_scenes validation scenes at each --temperatures, each
                --cell_temperature, each --independent_grasps, each --base_rounding and each --groundings: constrained,
                grammar-only and (for sequences) unconstrained decoding and the random baseline
                (graspGPT.evaluation)
Calibration and training are skipped when OUT holds their result. --session_minutes M stops training
gracefully (checkpoint, exit) after M minutes of this invocation; run the same command again to go on.
--minutes is a hard limit on training's wall time (start-ups included): if the plan was still optimistic,
training stops at the budget short of its planned steps and the summary says where (budget_hit_at_step).
Prints one JSON line per result, then one "summary" line (the headline figures beside the random
baseline's, first temperature), and writes OUT/quality.json and the decoded grasps to OUT/predictions.json;
--log FILE appends the summary line there.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss ([0-9.naninf]+)")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_setting(text: str) -> tuple[str, str, object]:
    """"section.key=value" -> (section, key, value); the value is JSON, or else the plain string."""
    name, eq, raw = text.partition("=")
    section, dot, key = name.partition(".")
    if not eq or not dot or not section or not key:
        raise SystemExit(f"error: --set {text!r}: expected SECTION.KEY=VALUE, e.g. dataset.loss_on=answer")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return section, key, value


def run_config(base: Path, settings: list[str], out: Path) -> Path:
    """The run's config file: `base` with the --set changes, written to OUT/config.json and checked."""
    from graspGPT.config import ConfigError, config_from_dict

    data = json.loads(base.read_text())
    for text in settings:
        section, key, value = parse_setting(text)
        data.setdefault(section, {})[key] = value
    try:
        config_from_dict(data, str(base))
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    path = out / "config.json"
    if path.is_file() and json.loads(path.read_text()) != data:
        raise SystemExit(f"error: {out} holds a run with other settings; use a new --out")
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


UNPLANNED_STEPS = 10**6  # max_iters before the warmup re-plan when there is no calibration
PER_SCENE = ("predicted", "correct", "feasible", "objects", "covered", "baseline_correct")
HEADLINE = ("grasp_precision", "any_tag_precision", "grasp_validity", "grasp_coverage", "grasps_per_sequence")


def summary(results: list[dict]) -> dict:
    """The headline figures of the first evaluation (first grounding, first temperature): constrained
    decoding (grammar and grounding), the grammar alone (grammar_*), and the random baseline's."""
    r = results[0]
    keys = (*HEADLINE, *("grammar_" + k for k in HEADLINE), "baseline_precision", "baseline_any_tag_precision",
            "baseline_validity", "baseline_coverage", "prefix_precision", "val_loss", "valid_rate")
    return {"step": r["step"], "grounding": r.get("grounding"), "temperature": r["temperature"],
            "cell_temperature": r.get("cell_temperature"), "independent_grasps": r.get("independent_grasps"),
            "base_rounding": r.get("base_rounding"), **{k: r.get(k) for k in keys}}


def run_trainer(config: Path, output_dir: Path, flags: list[str], session_s: float | None = None,
                stop_step: int | None = None) -> tuple[int, dict[int, float], dict[int, float]]:
    """One rank of the real trainer, stopped gracefully (checkpoint, exit) after session_s seconds or once it
    logs step stop_step. Returns (exit status, {step: arrival time}, {step: loss}) from its log lines."""
    cmd = ["bash", str(ROOT / "run_deepspeed_training.sh"), "1", "--master_port", str(free_port()),
           "--config", str(config), "--output_dir", str(output_dir), "--no_wandb", *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRASPGPT_NO_PROGRESS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0, arrived, losses, stopping = time.perf_counter(), {}, {}, False
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        m = STEP_LINE.match(line.strip())
        if m:
            arrived[int(m.group(1))] = time.perf_counter()
            losses[int(m.group(1))] = float(m.group(3))
        stopping = stopping or line.startswith("done: ")  # finished: a signal now would only kill the exit
        late = session_s is not None and time.perf_counter() - t0 > session_s
        if not stopping and (late or (m and stop_step is not None and int(m.group(1)) >= stop_step)):
            proc.send_signal(signal.SIGTERM)  # the launcher script hands it to the rank: it saves and exits
            stopping = True
    status = proc.wait()
    if status != 0:
        sys.stderr.write("".join(tail))
    return status, arrived, losses


def calibrate(config: Path, out: Path, steps: int) -> float:
    """Seconds per optimizer step: the median gap between consecutive step lines after the first quarter.
    The median, not the mean: a recompilation for a new sequence length stalls a few steps for seconds,
    which a mean would spread over the whole planned run."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh run every time: what an earlier attempt left is stale
    status, arrived, _ = run_trainer(config, out, ["--max_iters", str(steps), "--log_every", "1",
                                                   "--save_every", str(10 * steps), "--eval_every", str(10 * steps)])
    if status != 0 or steps not in arrived:
        raise SystemExit(f"error: the calibration run failed (exit {status}); see the output above")
    return step_seconds(arrived, steps)


def step_seconds(arrived: dict[int, float], last: int) -> float:
    """The median gap between consecutive step lines up to step `last`, after the first quarter."""
    first = min(arrived) + max(1, (last - min(arrived)) // 4)
    gaps = sorted(arrived[i + 1] - arrived[i] for i in range(first, last) if i in arrived and i + 1 in arrived)
    return gaps[len(gaps) // 2]


def latest_step(train_dir: Path) -> int:
    from graspGPT import checkpoint

    found = checkpoint.complete_checkpoints(train_dir) if train_dir.is_dir() else []
    return checkpoint.step_of(found[-1]) if found else 0


def evaluate(cfg, train_dir: Path, num_scenes: int, temperatures: list[float], groundings: list[str],
             device: str, cell_temperatures: list[float | None], independents: list[int],
             sequence_scenes: int | None = None, base_roundings: list[float] | None = None) -> tuple[list[dict], list[dict]]:
    import torch

    import graspGPT.decoding as decoding

    from graspGPT.data.source import resolve_data_dir
    from graspGPT.data.storage import TokenStore
    from graspGPT.evaluation import checkpoint_metrics, evaluate_scenes, evaluation_scenes, summarize
    from graspGPT.artifact import load_model

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this run was given (taskset)
    model, meta = load_model(train_dir, device=device, dtype=torch.bfloat16 if device.startswith("cuda") else None)
    store = TokenStore.open(resolve_data_dir(cfg.dataset, cfg.system.seed))
    _, val = store.split(cfg.dataset.val_fraction, cfg.system.seed)
    results, predictions = [], []
    # The loss and the teacher-forced figures depend on the scenes (and the prefix precision on the temperature),
    # not on the decoding: computed once for each, however many decodings are evaluated.
    per_checkpoint: dict[tuple, dict] = {}
    default_rounding = decoding.BASE_ROUNDING
    for grounding, t, cell_temperature, independent, base_rounding in itertools.product(
            groundings, temperatures, cell_temperatures, independents, base_roundings or [default_rounding]):
        decoding.BASE_ROUNDING = base_rounding  # the gripper grounding's base shell for this decoding
        t0 = time.perf_counter()
        scenes: list = []
        chosen = evaluation_scenes(store, val, num_scenes if independent or sequence_scenes is None else
                                   sequence_scenes, 0, model.cfg.block_size, independent)
        counts, _ = evaluate_scenes(model, store, chosen, 0, per_scene=scenes, temperature=t, grounding=grounding,
                                    cell_temperature=cell_temperature, independent=independent)
        key = (tuple(chosen), t)
        if key not in per_checkpoint:
            per_checkpoint[key] = checkpoint_metrics(model, store, chosen, cfg.dataset.loss_on, temperature=t,
                                                     train_grasps_per_object=cfg.dataset.train_grasps_per_object)
        m = {k: round(v, 4) if isinstance(v, float) else v for k, v in {**summarize(counts), **per_checkpoint[key]}.items()}
        # Each scene's own counts: runs evaluated on different numbers of scenes compare on the ones
        # they share (the choice is nested).
        m["per_scene"] = [{"index": i, **{k: int(c[k]) for k in PER_SCENE}} for i, c, _ in scenes]
        seconds = round(time.perf_counter() - t0, 1)
        settings = {"step": meta["step"], "grounding": grounding, "temperature": t, "cell_temperature": cell_temperature,
                    "independent_grasps": independent, "base_rounding": round(base_rounding, 4)}
        results.append({**settings, **m, "eval_seconds": seconds})
        # The grasps themselves (tag id and voxel ids of each, per scene), for looking into them offline.
        predictions.append({**settings, "grasps": {i: [[b.tag, *map(int, b.cells)] for b in g] for i, _, g in scenes}})
    decoding.BASE_ROUNDING = default_rounding
    return results, predictions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt-mini",
                    help="configs/quality_<model>.json (lab, gpt-mini, gpt2, cpu_smoke)")
    ap.add_argument("--minutes", type=float, default=12.0, help="training wall-clock budget (default 12)")
    ap.add_argument("--out", required=True, help="run directory")
    ap.add_argument("--num_scenes", type=int, default=50, help="validation scenes to evaluate (default 50)")
    ap.add_argument("--sequence_scenes", type=int, default=None,
                    help="validation scenes for the one-sequence decodings (--independent_grasps 0), which are "
                         "several times slower (default: --num_scenes); the choice is nested, so they are the "
                         "first of the others")
    ap.add_argument("--temperatures", default=None,
                    help="sampling temperatures to evaluate, e.g. 1.0,0.5 (default: the config's trainer.eval_temperature)")
    ap.add_argument("--cell_temperature", default=None,
                    help="temperatures of the cells within their share of the probability, each evaluated at "
                         "every temperature, e.g. 0.3,0.1; none: as the rest (default: the config's "
                         "trainer.eval_cell_temperature)")
    ap.add_argument("--independent_grasps", default=None,
                    help="grasps sampled each on its own after the scene, per scene, each count evaluated, e.g. 0,64 "
                         "(0: one sequence; default: the config's trainer.eval_independent_grasps)")
    ap.add_argument("--groundings", default="gripper",
                    help="constrained decodings to evaluate, each at every temperature (gripper, fingers, none; "
                         "default gripper)")
    ap.add_argument("--base_rounding", default=None,
                    help="voxels the gripper grounding lets rounding bend the gripper's shape where it puts a base, "
                         "each evaluated, e.g. 1.732,0.866 (the worst case, which validity allows; half of it) "
                         "(default: graspGPT.decoding.BASE_ROUNDING)")
    ap.add_argument("--calibration_steps", type=int, default=40,
                    help="steps of the calibration run; 0: none, the re-plan at the end of the warmup sets the "
                         "steps (saves a start-up and the calibration)")
    ap.add_argument("--session_minutes", type=float, default=None,
                    help="stop training after this long in this invocation (checkpoint; rerun to continue)")
    ap.add_argument("--device", default=None, help="evaluation device (default: cuda if present)")
    ap.add_argument("--steps", type=int, default=None,
                    help="train exactly this many optimizer steps (no calibration; --minutes is then ignored)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="change one setting of the config (repeatable)")
    ap.add_argument("--log", default=None, help="append the summary line to this JSON-lines file")
    args = ap.parse_args()

    import torch

    from graspGPT.config import load_config

    base = ROOT / "configs" / f"quality_{args.model}.json"
    if not base.is_file():
        names = sorted(p.stem.removeprefix("quality_") for p in (ROOT / "configs").glob("quality_*.json"))
        raise SystemExit(f"error: {base} not found; --model takes one of {', '.join(names)}")
    from graspGPT.evaluation import GROUNDINGS

    unknown = sorted(set(args.groundings.split(",")) - set(GROUNDINGS))
    if unknown:
        raise SystemExit(f"error: --groundings {args.groundings}: unknown {', '.join(unknown)}; use {', '.join(GROUNDINGS)}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"error: --steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = run_config(base, args.set, out)
    cfg = load_config(["--config", str(config)])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        temperatures = [float(t) for t in (args.temperatures or str(cfg.trainer.eval_temperature)).split(",")]
        cell_temperatures = ([cfg.trainer.eval_cell_temperature] if args.cell_temperature is None else
                             [None if c.strip().lower() == "none" else float(c) for c in args.cell_temperature.split(",")])
        independents = ([cfg.trainer.eval_independent_grasps] if args.independent_grasps is None else
                        [int(n) for n in args.independent_grasps.split(",")])
        base_roundings = None if args.base_rounding is None else [float(r) for r in args.base_rounding.split(",")]
    except ValueError as err:
        raise SystemExit(f"error: --temperatures / --cell_temperature / --independent_grasps / --base_rounding take "
                         f"numbers (cell: or none): {err}") from None
    if base_roundings is not None and min(base_roundings) <= 0:
        raise SystemExit(f"error: --base_rounding takes voxels > 0, got {args.base_rounding}")
    if min(independents) < 0:
        raise SystemExit(f"error: --independent_grasps takes counts >= 0, got {args.independent_grasps}")

    plan_file = out / "plan.json"
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
    elif args.steps is not None:
        plan = {"model": args.model, "steps": args.steps, "max_iters": args.steps, "train_wall_s": 0.0}
        plan_file.write_text(json.dumps(plan, indent=1) + "\n")
    elif args.calibration_steps > 0:
        step_s = calibrate(config, out / "calibrate", args.calibration_steps)
        max_iters = max(args.calibration_steps, int(args.minutes * 60 / step_s))
        plan = {"model": args.model, "minutes": args.minutes, "seconds_per_step": round(step_s, 4),
                "max_iters": max_iters, "train_wall_s": 0.0}
        plan_file.write_text(json.dumps(plan, indent=1) + "\n")
    else:  # no calibration: the steps are planned at the end of the warmup, until then only the budget bounds them
        plan = {"model": args.model, "minutes": args.minutes, "max_iters": UNPLANNED_STEPS, "train_wall_s": 0.0}
        plan_file.write_text(json.dumps(plan, indent=1) + "\n")
    emit({"plan": plan})

    train_dir = out / "train"
    max_iters = plan["max_iters"]
    # The budget is a hard limit on training's wall time (start-ups included): when the calibration was
    # optimistic (e.g. runs sharing a GPU) training stops at the budget, short of max_iters, and says so.
    budget_left = None if "minutes" not in plan else plan["minutes"] * 60 - plan["train_wall_s"]
    # A budgeted run first trains to the end of the warmup, measures its step time there (under whatever
    # shares the GPU and the cores by then, unlike the calibration run) and plans its steps again: the LR
    # schedule does not depend on max_iters during the warmup, so the new plan changes no step taken.
    replan_at = max(cfg.trainer.warmup_iters, 20)
    session_t0 = time.perf_counter()
    while latest_step(train_dir) < max_iters and (budget_left is None or budget_left > 30):  # < 30 s: a start-up
        replan = ("minutes" in plan and "replanned_at_step" not in plan and latest_step(train_dir) < replan_at
                  and replan_at < max_iters)
        every = max(1, max_iters // 8)  # a checkpoint every ~1/8 of the run bounds the loss of an interruption
        session_left = None if args.session_minutes is None else \
            args.session_minutes * 60 - (time.perf_counter() - session_t0)
        limits = [x for x in (budget_left, session_left) if x is not None]
        t0, first_step = time.perf_counter(), latest_step(train_dir)
        status, arrived, losses = run_trainer(
            config, train_dir, ["--max_iters", str(max_iters), "--save_every", str(every), "--eval_every", str(every),
                                "--resume", "auto", *(["--log_every", "1"] if replan else [])],
            min(limits) if limits else None, stop_step=replan_at if replan else None)
        if status != 0 and latest_step(train_dir) < max_iters:
            raise SystemExit(f"error: training failed (exit {status}); see the output above")
        t1 = time.perf_counter()
        plan["train_wall_s"] = round(plan["train_wall_s"] + t1 - t0, 1)  # start-up included
        done = latest_step(train_dir)
        budget_left = None if "minutes" not in plan else plan["minutes"] * 60 - plan["train_wall_s"]
        replanned = replan and done >= replan_at and len(arrived) >= 8
        if replanned:
            step_s = step_seconds(arrived, max(arrived))
            start_up = max(0.0, min(arrived.values()) - t0 - step_s * (min(arrived) - first_step))
            stop = max(0.0, t1 - max(arrived.values()))  # the stop's checkpoint and exit
            # What is not steps: the next start-up, the run's 8 checkpoints with validation and its end, each
            # counted as a stop: on the safe side (the CPU smoke run ended at 88% of its budget; with none of
            # it counted, at 107%, cut short), since a schedule cut short ends at a high LR.
            max_iters = max(done + 1, done + int((budget_left - start_up - 9 * stop) / step_s))
            plan.update(replanned_at_step=done, replanned_seconds_per_step=round(step_s, 4), max_iters=max_iters)
            emit({"replan": {"at_step": done, "seconds_per_step": round(step_s, 4), "max_iters": max_iters}})
        plan_file.write_text(json.dumps(plan, indent=1) + "\n")
        emit({"train": {"steps_now": done, "max_iters": max_iters, "train_wall_s": plan["train_wall_s"],
                        "last_loss": losses[max(losses)] if losses else None}})
        session_over = args.session_minutes is not None and \
            time.perf_counter() - session_t0 > args.session_minutes * 60 - 30
        if replanned and not session_over:
            continue  # on to the end under the new plan
        if done < max_iters and (budget_left is None or budget_left > 30):
            emit({"note": f"stopped at step {done} of {max_iters}; run the same command again to continue"})
            return 0
        break
    if latest_step(train_dir) == 0:
        why = (f"the {plan['minutes']}-minute budget ran out first (start-ups and calibration took it); raise "
               f"--minutes or give --steps") if "minutes" in plan else f"see {train_dir}"
        raise SystemExit(f"error: training left no checkpoint to evaluate: {why}")
    if latest_step(train_dir) < max_iters:
        plan["budget_hit_at_step"] = latest_step(train_dir)
        emit({"note": f"the {plan['minutes']}-minute budget ran out at step {plan['budget_hit_at_step']} of "
                      f"{max_iters}; evaluating that checkpoint"})

    results, predictions = evaluate(cfg, train_dir, args.num_scenes, temperatures, args.groundings.split(","),
                                    device, cell_temperatures, independents, args.sequence_scenes, base_roundings)
    for r in results:
        budget = {"train_steps": plan["steps"]} if "steps" in plan else {"train_minutes": plan["minutes"]}
        emit({"model": args.model, **budget, "train_wall_s": plan["train_wall_s"], **r})
    (out / "quality.json").write_text(json.dumps({"plan": plan, "results": results}, indent=1) + "\n")
    (out / "predictions.json").write_text(json.dumps(predictions) + "\n")
    line = {"summary": str(out), "model": args.model, "settings": args.set, "train_wall_s": plan["train_wall_s"],
            "max_iters": max_iters, "budget_hit_at_step": plan.get("budget_hit_at_step"),
            **summary(results)}
    emit(line)
    if args.log:
        with open(args.log, "a") as f:
            f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
