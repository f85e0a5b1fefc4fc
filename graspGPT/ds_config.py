"""The DeepSpeed config of a run: deepspeed_config.json for what is DeepSpeed's own, the rest derived.

Which file owns which key (the guide's table says the same):
  deepspeed_config.json  zero_optimization (its stage may be replaced by --zero_stage), bf16, fp16, the
                         optimizer's "type" and the params the training config has no field for (eps,
                         torch_adam, ...), and anything else of DeepSpeed's own (steps_per_print, ...)
  training config        every key of DERIVED below, and the learning-rate schedule, which the trainer
                         runs itself (schedule.py, passed to DeepSpeed as its client scheduler)
A JSON written for an earlier version may still carry derived keys ("auto", or a value equal to the
training config's) and a "scheduler" section that agrees with the schedule: the run goes on and a
warning says to remove them. A value that disagrees is an error, never a silent choice.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, ConfigError, flag_of, read_json
from .schedule import Schedule

AUTO = "auto"
REPO_ROOT = Path(__file__).resolve().parent.parent
ADAM = ("adam", "adamw")

# JSON key -> what in the training config decides it. The optimizer's betas and weight_decay are derived
# for Adam; another optimizer gets them only where its JSON lists them.
DERIVED = {
    "train_batch_size": "trainer.batch_size, micro_batch_size and the world size (the batch plan)",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.batch_size, micro_batch_size and the world size (the batch plan)",
    "gradient_clipping": "trainer.grad_clip",
    "optimizer.params.lr": "trainer.learning_rate",
    "optimizer.params.betas": "trainer.betas",
    "optimizer.params.weight_decay": "trainer.weight_decay",
}
# An earlier version's "scheduler" section: the DeepSpeed type that matches each trainer.lr_schedule.
SCHEDULER_TYPES = {"cosine": "WarmupCosineLR", "linear": "WarmupDecayLR", "constant": "WarmupLR"}


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
    batch: BatchPlan
    zero_stage: int
    precision: str  # "bf16" | "fp16" | "fp32"
    source: str
    notes: list[str] = field(default_factory=list)  # choices made, for the log
    outdated: list[str] = field(default_factory=list)  # what the JSON should no longer carry, for a warning


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


def _same(a, b) -> bool:
    if isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        number = isinstance(a, (int, float)) and not isinstance(a, bool)
        return number and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
    return a == b


def _section(ds: dict, key: str, source: str) -> dict | None:
    value = ds.get(key)
    if value is not None and not isinstance(value, dict):
        raise DeepSpeedConfigError(f'{source}: "{key}" must be an object, got {_show(value)}')
    return value


def _autos(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _autos(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if node == AUTO else []


def _origin(key: str, cfg: Config, batch: BatchPlan) -> str:
    """Where a derived value comes from, and how to change it: 'trainer.micro_batch_size (--micro_batch_size)'."""
    owner = DERIVED[key]
    if "batch plan" in owner:
        t = cfg.trainer
        return (f"the batch plan from trainer.batch_size={t.batch_size}, micro_batch_size={t.micro_batch_size} and "
                f"{batch.world_size} rank(s)")
    flag = flag_of(owner)
    return f"{owner} ({flag})" if flag else owner


def derived_values(cfg: Config, batch: BatchPlan) -> dict[str, object]:
    """{JSON key: value} of everything the training config decides (the keys of DERIVED)."""
    t = cfg.trainer
    return {"train_batch_size": batch.global_batch, "train_micro_batch_size_per_gpu": batch.micro_batch_size,
            "gradient_accumulation_steps": batch.grad_accum, "gradient_clipping": t.grad_clip,
            "optimizer.params.lr": t.learning_rate, "optimizer.params.betas": list(t.betas),
            "optimizer.params.weight_decay": t.weight_decay}


def _fill_derived(ds: dict, cfg: Config, batch: BatchPlan, resolved: ResolvedDeepSpeed) -> list[str]:
    """Write the derived values into `ds`; the problems where the JSON holds another value."""
    problems, listed = [], []
    adam = ds["optimizer"]["type"].lower() in ADAM
    for key, value in derived_values(cfg, batch).items():
        *path, last = key.split(".")
        node = ds
        for part in path:
            node = node.setdefault(part, {})
        if last in node:
            listed.append(key)
            if node[last] != AUTO and not _same(node[last], value):
                problems.append(f"{key} is {_show(node[last])} but {_origin(key, cfg, batch)} is {_show(value)}")
        elif path == ["optimizer", "params"] and last != "lr" and not adam:
            continue  # not an argument every optimizer takes
        node[last] = value
    resolved.outdated += listed
    return problems


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


def _optimizer(ds: dict, device: str, source: str, notes: list[str]) -> None:
    """Check the optimizer section; on CPU, torch's AdamW rather than compiling DeepSpeed's."""
    opt = _section(ds, "optimizer", source)
    if opt is None or not isinstance(opt.get("type"), str):
        raise DeepSpeedConfigError(f'{source}: needs an "optimizer" section with a "type", e.g. '
                                   f'{{"type": "AdamW", "params": {{"eps": 1e-8}}}}')
    params = _section(opt, "params", f"{source} optimizer") or opt.setdefault("params", {})
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    adam = opt["type"].lower() in ADAM
    if device == "cpu" and adam and offload.get("device") not in ("cpu", "nvme") and "torch_adam" not in params:
        # DeepSpeed's own Adam would first JIT-compile a CPU extension.
        params["torch_adam"] = True
        notes.append("optimizer.params.torch_adam -> true on CPU "
                     "(torch.optim.AdamW instead of compiling DeepSpeed's Adam)")


def _one_rank(ds: dict, world_size: int, zero_stage: int, notes: list[str]) -> None:
    """On one rank, ZeRO 1/2's overlap_comm has no communication to overlap, but still synchronizes the GPU at
    the end of every backward, so the GPU idles while the host launches the next forward: turned off."""
    zero = ds.get("zero_optimization")
    if world_size == 1 and zero_stage in (1, 2) and zero.get("overlap_comm") is True:
        zero["overlap_comm"] = False
        notes.append("zero_optimization.overlap_comm -> false on one rank (nothing to overlap; it would "
                     "synchronize the GPU after every backward)")


def _old_scheduler(ds: dict, cfg: Config, source: str, resolved: ResolvedDeepSpeed) -> list[str]:
    """An earlier version's "scheduler" section: removed; the problems if it says other than the schedule run."""
    section = _section(ds, "scheduler", source)
    ds.pop("scheduler", None)
    if section is None:
        return []
    t = cfg.trainer
    wanted = {"type": SCHEDULER_TYPES[t.lr_schedule], "params.warmup_type": "linear",
              "params.warmup_num_steps": t.warmup_iters, "params.total_num_steps": t.max_iters,
              "params.cos_min_ratio": t.min_lr / t.learning_rate, "params.warmup_max_lr": t.learning_rate,
              "params.warmup_min_lr": 0.0, "params.warmup_min_ratio": 0.0}
    given = {"type": section.get("type", AUTO),
             **{f"params.{k}": v for k, v in (_section(section, "params", f"{source} scheduler") or {}).items()}}
    differ = [f"scheduler.{k} {_show(v)}" for k, v in given.items()
              if v != AUTO and (k not in wanted or not _same(v, wanted[k]))]
    schedule = f"{Schedule.of(t).describe()} (trainer.lr_schedule, learning_rate, min_lr, warmup_iters, max_iters)"
    if differ:
        return [f"the \"scheduler\" section says {', '.join(differ)}, but the trainer runs {schedule}; remove the "
                f"section and set those training keys"]
    resolved.outdated.append(f'a "scheduler" section (the trainer runs {Schedule.of(t).describe()})')
    return []


def resolve_deepspeed_config(ds: dict, cfg: Config, world_size: int, device: str, bf16_supported: bool,
                             source: str = "deepspeed_config.json") -> ResolvedDeepSpeed:
    """The config for deepspeed.initialize: the JSON `ds` with every DERIVED key set from `cfg`.

    One error lists every value of the JSON that disagrees with the training config.
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    ds = copy.deepcopy(ds)
    notes: list[str] = []
    batch = plan_batch(cfg.trainer.batch_size, cfg.trainer.micro_batch_size, world_size)
    if batch.adjusted:
        notes.append(batch.message)
    zero_stage = _zero_stage(ds, cfg.deepspeed.zero_stage, source, notes)
    precision = _precision(ds, device, bf16_supported, source, notes)
    _optimizer(ds, device, source, notes)
    _one_rank(ds, world_size, zero_stage, notes)
    resolved = ResolvedDeepSpeed(ds, batch, zero_stage, precision, source, notes)
    problems = _fill_derived(ds, cfg, batch, resolved)
    problems += _old_scheduler(ds, cfg, source, resolved)
    if problems:
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise DeepSpeedConfigError(f"{source} contradicts the training config in {len(problems)} place(s): {listed}. "
                                   f"The training config owns these: remove them from {source} and set the "
                                   f"training values (--config file or flag)")
    left = _autos(ds)
    if left:
        raise DeepSpeedConfigError(f'{source}: {", ".join(left)} is "auto" but the toolkit has no value for it; '
                                   f"give a value")
    if cfg.trainer.warmup_iters >= cfg.trainer.max_iters:
        notes.append(f"trainer.warmup_iters {cfg.trainer.warmup_iters} >= max_iters {cfg.trainer.max_iters}: the "
                     f"whole run is warmup and the peak learning rate is never reached")
    return resolved


def outdated_warning(resolved: ResolvedDeepSpeed) -> str | None:
    """One line for the log when the JSON still carries what the training config decides."""
    if not resolved.outdated:
        return None
    return (f"{resolved.source} still holds what the training config owns: {', '.join(resolved.outdated)}; they "
            f"agree with it and are not read: remove them (the guide's table says which file owns which key)")


def save_resolved(resolved: ResolvedDeepSpeed, path: str | Path) -> None:
    """The DeepSpeed config as given to deepspeed.initialize, as JSON, for the run directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(resolved.config, indent=2) + "\n")
