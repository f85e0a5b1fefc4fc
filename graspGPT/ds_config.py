"""deepspeed_config.json: every "auto" filled from the training config, every contradiction caught.

The training config (config.py) is the source of truth. The JSON holds what only DeepSpeed needs
(ZeRO details, precision) and may repeat training values as "auto" or as equal numbers; an explicit
value that differs is an error, never a silent choice. The "scheduler" section is read here, not by
DeepSpeed: the trainer runs schedule.make_lr_scheduler as DeepSpeed's client scheduler.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError, read_json
from .schedule import Schedule

AUTO = "auto"
REPO_ROOT = Path(__file__).resolve().parent.parent

# DeepSpeed scheduler type -> toolkit schedule, and the params the toolkit reads for each.
SCHEDULER_TYPES = {"WarmupCosineLR": "cosine", "WarmupDecayLR": "linear", "WarmupLR": "constant"}
SCHEDULER_PARAMS = {
    "WarmupCosineLR": ("warmup_num_steps", "total_num_steps", "warmup_type", "cos_min_ratio", "warmup_min_ratio"),
    "WarmupDecayLR": ("warmup_num_steps", "total_num_steps", "warmup_type", "warmup_max_lr", "warmup_min_lr"),
    "WarmupLR": ("warmup_num_steps", "warmup_type", "warmup_max_lr", "warmup_min_lr"),
}
FIX = 'set it to "auto" or make them equal'


class DeepSpeedConfigError(ConfigError):
    """The DeepSpeed JSON is unreadable, invalid, or contradicts the training config."""


@dataclass(frozen=True)
class BatchPlan:
    """global_batch = micro_batch_size x grad_accum x world_size, as near `requested` as feasible."""

    micro_batch_size: int
    grad_accum: int
    world_size: int
    requested: int
    global_batch: int
    adjusted: bool
    message: str


def plan_batch(batch_size: int, micro_batch_size: int, world_size: int) -> BatchPlan:
    """The feasible global batch nearest to `batch_size` (pitfall 11).

    Accumulation is the integer >= 1 that brings micro x accumulation x world nearest to batch_size;
    a tie goes to the larger batch (never fewer samples per step than asked when equally near).
    """
    for name, value in (("batch_size", batch_size), ("micro_batch_size", micro_batch_size), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DeepSpeedConfigError(f"{name} must be an integer >= 1, got {value!r}; no batch plan is feasible")
    unit = micro_batch_size * world_size
    grad_accum = max(1, (2 * batch_size + unit) // (2 * unit))  # round(batch_size / unit), halves up
    global_batch = unit * grad_accum
    ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
    if global_batch == batch_size:
        message = f"global batch {batch_size} = micro {micro_batch_size} x accumulation {grad_accum} x {ranks}"
    elif batch_size < unit:
        message = (f"global batch {batch_size} is smaller than micro {micro_batch_size} x {ranks}; "
                   f"using {global_batch} (accumulation 1)")
    else:
        message = (f"global batch {batch_size} is not a multiple of micro {micro_batch_size} x {ranks}; "
                   f"using {global_batch} (accumulation {grad_accum})")
    return BatchPlan(micro_batch_size, grad_accum, world_size, batch_size, global_batch,
                     global_batch != batch_size, message)


@dataclass
class ResolvedDeepSpeed:
    config: dict  # for deepspeed.initialize: no "auto" left, no "scheduler" section
    scheduler: dict | None  # the resolved "scheduler" section, kept for the saved copy
    batch: BatchPlan
    zero_stage: int
    precision: str  # "bf16" | "fp16" | "fp32"
    lr_schedule: Schedule
    notes: list[str]  # human-readable adjustments, for the log
    source: str


def deepspeed_json_path(path: str | Path) -> Path:
    """`path` as given (relative to the CWD), else relative to the repo root."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    if (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    raise DeepSpeedConfigError(
        f"DeepSpeed config {path} not found (looked in {Path.cwd()} and {REPO_ROOT}); pass --deepspeed_config PATH")


def load_deepspeed_json(path: str | Path) -> dict:
    """The DeepSpeed JSON at `path` (see deepspeed_json_path) as a dict."""
    path = deepspeed_json_path(path)
    try:
        ds = read_json(path, "DeepSpeed config")
    except ConfigError as e:
        raise DeepSpeedConfigError(str(e)) from None
    if not isinstance(ds, dict):
        raise DeepSpeedConfigError(f"{path}: expected a JSON object of DeepSpeed settings, got {type(ds).__name__}")
    return ds


def _show(value) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _same(explicit, value) -> bool:
    if isinstance(value, tuple):
        return isinstance(explicit, (list, tuple)) and len(explicit) == len(value) and all(map(_same, explicit, value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = isinstance(explicit, (int, float)) and not isinstance(explicit, bool)
        return number and math.isclose(explicit, value, rel_tol=1e-9, abs_tol=1e-15)
    return explicit == value


def _section(ds: dict, key: str, source: str) -> dict | None:
    value = ds.get(key)
    if value is not None and not isinstance(value, dict):
        raise DeepSpeedConfigError(f'{source}: "{key}" must be an object, got {_show(value)}')
    return value


def _autos(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _autos(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if node == AUTO else []


def _zero_stage(ds: dict, flag: int | None, source: str, notes: list[str]) -> int:
    """The ZeRO stage: deepspeed.zero_stage (--zero_stage) if set, else the JSON's ("auto": 2)."""
    zero = _section(ds, "zero_optimization", source)
    if zero is None:  # no section: DeepSpeed's own default, stage 0
        if flag is None:
            return 0
        zero = ds["zero_optimization"] = {}
    stage = zero.get("stage", 0)
    if stage != AUTO and (type(stage) is not int or stage not in (0, 1, 2, 3)):
        raise DeepSpeedConfigError(
            f'{source}: zero_optimization.stage must be 0, 1, 2, 3 or "auto", got {_show(stage)}')
    if flag is not None and stage not in (AUTO, flag):
        notes.append(f"ZeRO stage {flag} from --zero_stage (deepspeed.zero_stage) replaces stage {stage} of {source}")
    zero["stage"] = flag if flag is not None else 2 if stage == AUTO else stage
    return zero["stage"]


def _precision(ds: dict, device: str, bf16_supported: bool, source: str, notes: list[str]) -> str:
    """Settle fp16/bf16 "enabled": bf16 "auto" means bf16 where the GPU has it; fp16 only when asked for."""
    sections = {name: _section(ds, name, source) for name in ("fp16", "bf16")}
    enabled = {}
    for name, section in sections.items():
        enabled[name] = False if section is None else section.get("enabled", False)
        if not (isinstance(enabled[name], bool) or enabled[name] == AUTO):
            raise DeepSpeedConfigError(
                f'{source}: {name}.enabled must be true, false or "auto", got {_show(enabled[name])}')
    fp16 = enabled["fp16"] is True
    if fp16 and device == "cpu":
        raise DeepSpeedConfigError(f"{source}: fp16.enabled is true, but fp16 is not supported on CPU; "
                                   f"set it to false (bf16 or fp32 run on CPU)")
    if enabled["bf16"] == AUTO:
        bf16 = device == "cuda" and bf16_supported and not fp16
        why = ("fp16 is enabled" if fp16 else "this GPU supports it" if bf16 else
               "this GPU lacks bf16" if device == "cuda" else "running on CPU")
        notes.append(f'bf16.enabled "auto" -> {str(bf16).lower()} ({why})')
    else:
        bf16 = enabled["bf16"]
        if bf16 and fp16:
            raise DeepSpeedConfigError(f"{source}: fp16.enabled and bf16.enabled are both true; enable at most one")
        if bf16 and device == "cuda" and not bf16_supported:
            raise DeepSpeedConfigError(f'{source}: bf16.enabled is true but this GPU does not support bf16; '
                                       f'set it to "auto" or false')
    for name, on in (("fp16", fp16), ("bf16", bf16)):
        if sections[name] is not None:
            sections[name]["enabled"] = on
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def resolve_deepspeed_config(ds: dict, cfg: Config, world_size: int, device: str, bf16_supported: bool,
                             source: str = "deepspeed_config.json") -> ResolvedDeepSpeed:
    """Fill every "auto" of the DeepSpeed JSON `ds` from `cfg`; one error lists every contradiction."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    ds = copy.deepcopy(ds)
    t = cfg.trainer
    notes: list[str] = []
    problems: list[str] = []

    def settle(section: dict, key: str, label: str, value, origin: str) -> None:
        """Missing or "auto" -> `value`; an explicit different value is a problem."""
        current = section.get(key, AUTO)
        if current == AUTO:
            section[key] = list(value) if isinstance(value, tuple) else value  # plain JSON
        elif not _same(current, value):
            problems.append(f"{label} is {_show(current)} but {origin} is {_show(value)}; {FIX}")

    # Batch (pitfall 11).
    batch = plan_batch(t.batch_size, t.micro_batch_size, world_size)
    if batch.adjusted:
        notes.append(batch.message)
    settle(ds, "train_batch_size", "train_batch_size", batch.global_batch,
           f"the global batch planned from trainer.batch_size={t.batch_size}")
    settle(ds, "train_micro_batch_size_per_gpu", "train_micro_batch_size_per_gpu", t.micro_batch_size,
           "trainer.micro_batch_size")
    settle(ds, "gradient_accumulation_steps", "gradient_accumulation_steps", batch.grad_accum,
           f"the accumulation planned from trainer.batch_size={t.batch_size}, "
           f"micro_batch_size={t.micro_batch_size} and {world_size} rank(s)")
    settle(ds, "gradient_clipping", "gradient_clipping", t.grad_clip, "trainer.grad_clip")

    zero_stage = _zero_stage(ds, cfg.deepspeed.zero_stage, source, notes)
    precision = _precision(ds, device, bf16_supported, source, notes)

    # Optimizer: DeepSpeed builds it from this section and the trainer's parameter groups.
    opt = _section(ds, "optimizer", source)
    if opt is None or not isinstance(opt.get("type"), str):
        raise DeepSpeedConfigError(
            f'{source}: needs an "optimizer" section with a "type", e.g. {{"type": "AdamW", '
            f'"params": {{"lr": "auto", "betas": "auto", "weight_decay": "auto"}}}}')
    params = _section(opt, "params", f"{source} optimizer") or opt.setdefault("params", {})
    adam = opt["type"].lower() in ("adam", "adamw")
    settle(params, "lr", "optimizer.params.lr", t.learning_rate, "trainer.learning_rate")
    if adam or params.get("betas") == AUTO:
        settle(params, "betas", "optimizer.params.betas", t.betas, "trainer.betas")
    if adam or params.get("weight_decay") == AUTO:
        settle(params, "weight_decay", "optimizer.params.weight_decay", t.weight_decay, "trainer.weight_decay")
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if device == "cpu" and adam and offload.get("device") not in ("cpu", "nvme") and "torch_adam" not in params:
        # DeepSpeed's own Adam would first JIT-compile a CPU extension.
        params["torch_adam"] = True
        notes.append("optimizer.params.torch_adam -> true on CPU "
                     "(torch.optim.AdamW instead of compiling DeepSpeed's Adam)")

    # Scheduler: read here, removed from what DeepSpeed sees.
    scheduler = _section(ds, "scheduler", source)
    ds.pop("scheduler", None)
    if scheduler is not None:
        type_of = {v: k for k, v in SCHEDULER_TYPES.items()}
        kind = scheduler.get("type", AUTO)
        if kind != AUTO and kind not in SCHEDULER_TYPES:
            raise DeepSpeedConfigError(
                f'{source}: scheduler.type {_show(kind)} is not supported; the toolkit runs its own schedule: use '
                f'{", ".join(f"{k} ({v})" for k, v in SCHEDULER_TYPES.items())} or "auto", or remove the section')
        settle(scheduler, "type", "scheduler.type", type_of[t.lr_schedule],
               f"the type for trainer.lr_schedule={t.lr_schedule!r}")
        kind = scheduler["type"]
        sp = _section(scheduler, "params", f"{source} scheduler") or scheduler.setdefault("params", {})
        for key in sp:
            if key not in SCHEDULER_PARAMS[kind]:
                problems.append(f"scheduler.params.{key} is not read by the toolkit for {kind}; remove it "
                                f"(read: {', '.join(SCHEDULER_PARAMS[kind])})")
        wanted = {
            "warmup_num_steps": (t.warmup_iters, "trainer.warmup_iters"),
            "total_num_steps": (t.max_iters, "trainer.max_iters"),
            "cos_min_ratio": (t.min_lr / t.learning_rate, "trainer.min_lr / trainer.learning_rate"),
            "warmup_max_lr": (t.learning_rate, "trainer.learning_rate"),
            "warmup_min_lr": (0.0, "the toolkit's warmup start (it ramps up from 0)"),
            "warmup_min_ratio": (0.0, "the toolkit's warmup start (it ramps up from 0)"),
        }
        for key in SCHEDULER_PARAMS[kind]:
            if key in wanted:
                settle(sp, key, f"scheduler.params.{key}", *wanted[key])
        warmup_type = sp.get("warmup_type", AUTO)
        if warmup_type == AUTO:
            sp["warmup_type"] = "linear"
        elif warmup_type != "linear":
            problems.append(
                f"scheduler.params.warmup_type is {_show(warmup_type)} but the toolkit warms up linearly "
                f"(lr*(step+1)/warmup_iters; a config that said one schedule while another ran was upstream's "
                f'pitfall 5); set it to "linear" or "auto"')
    if t.warmup_iters >= t.max_iters:
        notes.append(f"trainer.warmup_iters {t.warmup_iters} >= max_iters {t.max_iters}: the whole run is warmup "
                     f"and the peak learning rate is never reached")

    if problems:
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise DeepSpeedConfigError(f"{source} contradicts the training config in {len(problems)} place(s): {listed}")
    left = _autos(ds) + [f"scheduler.{p}" for p in _autos(scheduler or {})]
    if left:
        raise DeepSpeedConfigError(f'{source}: {", ".join(left)} is "auto" but the toolkit has no value for it; '
                                   f"give a value")
    return ResolvedDeepSpeed(ds, scheduler, batch, zero_stage, precision, Schedule.of(t), notes, source)


def save_resolved(resolved: ResolvedDeepSpeed, path: str | Path) -> None:
    """The DeepSpeed config as resolved (scheduler section included) as JSON, for the run directory."""
    data = dict(resolved.config)
    if resolved.scheduler is not None:
        data["scheduler"] = resolved.scheduler
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
