"""The training configuration: every default lives here, once, and so does every command-line flag.

Precedence: dataclass defaults < ``--config FILE`` (JSON, merged per section) < command-line flags.
Types and choices are checked as values arrive; cross-field rules once, on the final result.
A field declared with `flag(...)` has a flag (`--NAME`, the field's name unless given); its help and
default in `--help` come from the field.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints


MAX_SYNTH_VOXEL = 0.035  # graspGPT.data.synth.MAX_VOXEL_SIZE; checked here so every rank stops before any collective


class ConfigError(ValueError):
    """A user error in the configuration (file, flags or values); the message says how to fix it."""


def choice(default: str, *options: str):
    """A string field restricted to `options`."""
    return field(default=default, metadata={"choices": (default, *options)})


def flag(default, help: str, name: str | None = None):
    """A field with a command-line flag `--name` (default: the field's name). A bool field's flag sets
    the opposite of its default (wandb.enabled: `--no_wandb`)."""
    return field(default=default, metadata={"flag": name, "help": help})


@dataclass(frozen=True)
class ModelConfig:
    """The model as a user chooses it: a preset or a shape, and a few settings. The trainer turns it,
    with the data's vocabulary, into the full `model.GraspGPTConfig`."""

    # a preset of model.py, or None for the custom shape below
    model_type: str | None = flag("gpt2", "model preset (replaces a custom shape from --config)")
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    n_kv_head: int | None = None  # None: the model's default for the shape
    dropout: float = 0.0
    rope_theta: float = 1_000_000.0
    activation_checkpointing: bool = False
    # voxel embeddings = own vector + learned x, y and z vectors (model.TokenEmbedding); export folds
    # them into a plain Qwen2 embedding
    coordinate_embedding: bool = True
    # how voxel embeddings start: "sinusoidal", their position alone (waves of x, y and z in the axis
    # vectors, own vectors 0): better on fine grids; "normal", noise like every weight: better on the
    # coarse 0.03 m grid (the quickstart's). docs/QUALITY_LAB.md compares them.
    coordinate_init: str = choice("sinusoidal", "normal")


@dataclass(frozen=True)
class TrainerConfig:
    batch_size: int = flag(24, "global batch (samples per optimizer step, all ranks)")
    micro_batch_size: int = flag(6, "samples per rank and forward pass")
    learning_rate: float = flag(2e-4, "peak learning rate")
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    grad_clip: float = 2.0
    warmup_iters: int = 500
    lr_schedule: str = choice("cosine", "linear", "constant")
    max_iters: int = flag(20000, "optimizer steps to train")  # like every other count here
    log_every: int = flag(100, "log every N optimizer steps")
    save_every: int = flag(3000, "checkpoint every N optimizer steps")
    eval_every: int = flag(1000, "evaluate every N optimizer steps")
    eval_iters: int = 20  # validation micro-batches per rank for the validation loss
    eval_scenes: int = 16  # validation scenes decoded for grasp metrics at each evaluation; 0 turns it off
    eval_temperature: float = 1.0  # sampling temperature of that decoding; 0 is greedy
    eval_cell_temperature: float | None = None  # temperature of the cells within their share; None: as the rest
    eval_independent_grasps: int = 0  # N > 0: N grasps each sampled on its own after the scene; 0: one sequence
    keep_last: int = 3
    max_nonfinite_steps: int = 10
    resume: str | None = flag(None, "checkpoint directory to resume from, OUTPUT/latest, or auto")
    init_from: str | None = flag(None, "start from these model weights (fresh optimizer and step)")


@dataclass(frozen=True)
class DatasetConfig:
    data_path: str | None = flag(None, "data set directory (none: the built-in synthetic data set)")
    max_sequence_length: int = flag(13000, "longest sequence in tokens")
    overlong: str = choice("cut", "drop")
    val_fraction: float = 0.02
    real_filter_mode: str = choice("allow_all", "no_amodal_unseg", "amodal_only", "unseg_only", "skip")
    shuffle_blocks: bool = True
    drop_cell_prob: float = 0.05
    max_grasps_per_object: int = 100
    # each training sample keeps at most this many grasps of each object, a new random pick each epoch (the
    # data set and the evaluation's ground truth keep all of them; validation caps its samples the same way);
    # 0: as many as max_grasps_per_object. 8: with a hundred grasps of an object before it, a model learns to
    # copy its neighbours instead of finding a grasp from the scene (real grid 0.503 -> 0.617, docs/QUALITY_LAB.md)
    train_grasps_per_object: int = 8
    # random: a new order per sample and epoch (what grounded decoding needs to cover every object,
    # docs/QUALITY_LAB.md); sorted: by first cell, as the format stores grasps
    grasp_order: str = choice("random", "sorted")
    # all: every token is a target; answer: only what follows the scene (the scene is context, as a
    # prompt is in instruction tuning)
    loss_on: str = choice("all", "answer")
    amodal_prob: float = 0.0
    unseg_prob: float = 0.0
    # 0: one sample per row, padded to the longest of its micro-batch. N: whole samples packed into rows
    # of N positions (at least max_sequence_length - 1; a multiple of 128 suits the GPU kernels), each
    # attending to itself only (data/packing.py); trainer.batch_size and micro_batch_size then count rows
    pack_length: int = 0
    synthetic_scenes: int = 2000
    synthetic_voxel_size: float = 0.0075
    synthetic_task_mix: str = "grasp"


@dataclass(frozen=True)
class SystemConfig:
    output_dir: str = flag("output", "where runs, logs and checkpoints go")
    seed: int = flag(42, "random seed")
    deterministic: bool = False
    # minutes any collective waits for the other ranks before the run stops with an error (a rank that
    # hangs); null: DEEPSPEED_TIMEOUT if set, else 15 (distributed.py)
    collective_timeout_min: float | None = None


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = flag(True, "disable wandb logging", name="no_wandb")
    mode: str = choice("online", "offline", "disabled")
    project: str = flag("graspGPT", "wandb project name", name="wandb_project")
    entity: str | None = None
    run_name: str | None = None


@dataclass(frozen=True)
class DeepSpeedConfig:
    config: str = flag("deepspeed_config.json", "DeepSpeed JSON config", name="deepspeed_config")
    zero_stage: int | None = flag(None, "ZeRO stage 0-3 (none: the DeepSpeed JSON's stage)")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def to_dict(self) -> dict:
        """Plain JSON-serializable dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


# --------------------------------------------------------------------------- values

def _type_name(hint) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if get_origin(hint) is tuple:
        return f"a list of {len(get_args(hint))} numbers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


_BAD = object()  # _convert's "does not fit the type"


def _convert(value: Any, hint) -> Any:
    """`value` as type `hint`, or _BAD. Ints are accepted for floats, lists for tuples."""
    if get_origin(hint) in (Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return _convert(value, inner)
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return _BAD
        items = tuple(_convert(v, a) for v, a in zip(value, args))
        return _BAD if any(i is _BAD for i in items) else items
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is float:
        return float(value) if number and math.isfinite(value) else _BAD
    if hint is int:
        return value if number and isinstance(value, int) else _BAD
    return value if isinstance(value, hint) else _BAD  # bool, str


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else f"valid: {', '.join(valid)}"


def _apply(cfg: Config, updates: dict, source: str) -> Config:
    """`cfg` with `updates` ({section: {key: value}}) merged in, keys and types checked."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: expected a JSON object of sections ({', '.join(SECTIONS)})")
    sections = {}
    for section, values in updates.items():
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section in {source}; {_suggest(section, list(SECTIONS))}")
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected an object of settings in {source}, "
                              f"got {json.dumps(values, default=repr)}")
        current = getattr(cfg, section)
        hints = get_type_hints(type(current))
        fields = {f.name: f for f in dataclasses.fields(current)}
        changes = {}
        for key, value in values.items():
            name = f"{section}.{key}"
            if key not in fields:
                valid = [f"{section}.{k}" for k in fields]
                raise ConfigError(f"{name}: unknown key in {source}; {_suggest(name, valid)}")
            value = _convert(value, hints[key])
            if value is _BAD:
                raise ConfigError(f"{name}: expected {_type_name(hints[key])}, "
                                  f"got {json.dumps(values[key], default=repr)} in {source}")
            choices = fields[key].metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)} (in {source})")
            changes[key] = value
        sections[section] = dataclasses.replace(current, **changes)
    return dataclasses.replace(cfg, **sections)


def _validate(cfg: Config) -> Config:
    """Cross-field rules on the final configuration."""
    m, t, d = cfg.model, cfg.trainer, cfg.dataset
    shape = {"n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd}
    given = [k for k, v in shape.items() if v is not None]
    if m.model_type is not None and given:
        raise ConfigError(
            f"model: model_type={m.model_type!r} and {', '.join(given)} are both set; give either a preset "
            f'or a custom shape: set "model_type": null in the config file to use n_layer/n_head/n_embd')
    if m.model_type is None and len(given) < 3:
        missing = ", ".join(k for k in shape if k not in given)
        raise ConfigError(f"model: model_type is null, so n_layer, n_head and n_embd are all needed; missing {missing}")
    rules = [
        (all(v is None or v >= 1 for v in (*shape.values(), m.n_kv_head)),
         "model: n_layer, n_head, n_embd and n_kv_head must be >= 1"),
        (0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}"),
        (m.rope_theta > 0, f"model.rope_theta must be > 0, got {m.rope_theta}"),
        (t.batch_size >= 1, f"trainer.batch_size must be >= 1, got {t.batch_size}"),
        (t.micro_batch_size >= 1, f"trainer.micro_batch_size must be >= 1, got {t.micro_batch_size}"),
        (t.learning_rate > 0, f"trainer.learning_rate must be > 0, got {t.learning_rate}"),
        (0 <= t.min_lr <= t.learning_rate,
         f"trainer.min_lr must be in [0, learning_rate={t.learning_rate}], got {t.min_lr}; "
         f"lower min_lr or raise learning_rate"),
        (all(0.0 <= b < 1.0 for b in t.betas), f"trainer.betas must be in [0, 1), got {list(t.betas)}"),
        (t.weight_decay >= 0, f"trainer.weight_decay must be >= 0, got {t.weight_decay}"),
        (t.grad_clip >= 0, f"trainer.grad_clip must be >= 0 (0 disables clipping), got {t.grad_clip}"),
        (t.warmup_iters >= 0, f"trainer.warmup_iters must be >= 0, got {t.warmup_iters}"),
        (t.max_iters >= 1, f"trainer.max_iters must be >= 1, got {t.max_iters}"),
        (d.max_sequence_length >= 16, f"dataset.max_sequence_length must be >= 16, got {d.max_sequence_length}"),
        (0.0 <= d.val_fraction < 1.0, f"dataset.val_fraction must be in [0, 1), got {d.val_fraction}"),
        (d.pack_length >= 0, f"dataset.pack_length must be >= 0 (0: no packing), got {d.pack_length}"),
        (d.max_grasps_per_object >= 1, f"dataset.max_grasps_per_object must be >= 1, got {d.max_grasps_per_object}"),
        (d.train_grasps_per_object >= 0,
         f"dataset.train_grasps_per_object must be >= 0 (0: no cap of its own), got {d.train_grasps_per_object}"),
        (d.synthetic_scenes >= 1, f"dataset.synthetic_scenes must be >= 1, got {d.synthetic_scenes}"),
        (d.synthetic_voxel_size > 0, f"dataset.synthetic_voxel_size must be > 0, got {d.synthetic_voxel_size}"),
        (d.synthetic_voxel_size <= MAX_SYNTH_VOXEL,
         f"dataset.synthetic_voxel_size {d.synthetic_voxel_size:g} is too coarse for synthetic scenes; use at most "
         f"{MAX_SYNTH_VOXEL} m"),
        (cfg.deepspeed.zero_stage in (None, 0, 1, 2, 3),
         f"deepspeed.zero_stage must be 0, 1, 2 or 3 (or null for the JSON's stage), got {cfg.deepspeed.zero_stage}"),
        (t.eval_scenes >= 0, f"trainer.eval_scenes must be >= 0 (0 turns grasp metrics off), got {t.eval_scenes}"),
        (t.eval_temperature >= 0, f"trainer.eval_temperature must be >= 0 (0 is greedy), got {t.eval_temperature}"),
        (t.eval_cell_temperature is None or t.eval_cell_temperature > 0,
         f"trainer.eval_cell_temperature must be > 0 (or null: the eval_temperature), got {t.eval_cell_temperature}"),
        (t.eval_independent_grasps >= 0, f"trainer.eval_independent_grasps must be >= 0 (0: one sequence per scene), "
                                         f"got {t.eval_independent_grasps}"),
        (cfg.system.collective_timeout_min is None or cfg.system.collective_timeout_min > 0,
         f"system.collective_timeout_min must be > 0 minutes (or null), got {cfg.system.collective_timeout_min}"),
    ]
    for key in ("log_every", "save_every", "eval_every", "eval_iters", "keep_last", "max_nonfinite_steps"):
        rules.append((getattr(t, key) >= 1, f"trainer.{key} must be >= 1, got {getattr(t, key)}"))
    for key in ("drop_cell_prob", "amodal_prob", "unseg_prob"):
        rules.append((0.0 <= getattr(d, key) <= 1.0, f"dataset.{key} must be in [0, 1], got {getattr(d, key)}"))
    if d.pack_length:
        rules += [
            (d.pack_length >= d.max_sequence_length - 1,
             f"dataset.pack_length {d.pack_length} is shorter than the longest sample (max_sequence_length "
             f"{d.max_sequence_length} tokens take {d.max_sequence_length - 1} positions); set it to at least "
             f"{d.max_sequence_length - 1}, or 0 to turn packing off"),
            (m.dropout == 0, f"dataset.pack_length needs model.dropout 0 (packed attention has no dropout), got "
                             f"{m.dropout}; set dropout to 0 or pack_length to 0"),
        ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
    return cfg


def config_from_dict(d: dict, source: str = "config dict") -> Config:
    """A validated Config from a (possibly partial) nested dict, e.g. the config saved with a run."""
    return _validate(_apply(Config(), d, source))


def read_json(path: str | Path, what: str = "config file") -> Any:
    """Parsed JSON of `path`, with errors that name the file (and line/column)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found; check the path") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


# --------------------------------------------------------------------------- flags

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we raise
        raise ConfigError(f"command line: {message}; see --help")


def flags() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """{flag name: (dotted config key, field, type)} for every field declared with `flag(...)`."""
    out = {}
    for section in dataclasses.fields(Config):
        hints = get_type_hints(section.default_factory)
        for f in dataclasses.fields(section.default_factory):
            if "help" in f.metadata:
                out[f.metadata["flag"] or f.name] = (f"{section.name}.{f.name}", f, hints[f.name])
    return out


def flag_of(dotted: str) -> str | None:
    """The command-line flag that sets config key `dotted` ("trainer.batch_size" -> "--batch_size"), if any."""
    return next((f"--{name}" for name, (key, *_) in flags().items() if key == dotted), None)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: a flag for each field declared with `flag(...)`, its default from the field."""
    p = _Parser(description="Train GraspGPT with DeepSpeed.", allow_abbrev=False,
                argument_default=argparse.SUPPRESS)  # only flags actually given override the file
    p.add_argument("--config", metavar="FILE", help="JSON config file, merged over the defaults per section")
    for name, (dotted, f, hint) in flags().items():
        text = f"{f.metadata['help']} [{dotted}, default: {json.dumps(f.default)}]"
        if hint is bool:
            p.add_argument(f"--{name}", action="store_const", const=not f.default, help=text)
            continue
        if get_origin(hint) in (Union, types.UnionType):
            (hint,) = [a for a in get_args(hint) if a is not type(None)]
        p.add_argument(f"--{name}", type=hint, help=text)
    p.add_argument("--local_rank", type=int, help="set by the deepspeed launcher; ignored")
    return p


def _flag_suggestion(arg: str, parser: argparse.ArgumentParser) -> str:
    name = arg.split("=", 1)[0]
    valid = [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    if not name.startswith("-"):
        return f"command line: unexpected argument {arg!r}; flags look like --name VALUE, see --help"
    return f"command line: unknown flag {name}; {_suggest(name, valid)}"


def load_config(argv: list[str] | None = None) -> Config:
    """defaults < --config FILE < flags; `argv` defaults to sys.argv[1:]."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise ConfigError(_flag_suggestion(extra[0], parser))
    given = vars(args)
    cfg = Config()
    if "config" in given:
        cfg = _apply(cfg, read_json(given["config"]), given["config"])
    updates: dict[str, dict] = {}
    for name, (dotted, *_) in flags().items():
        if name in given:
            section, key = dotted.split(".")
            updates.setdefault(section, {})[key] = given[name]
    if "model_type" in given:  # a preset on the command line replaces a custom shape from the file
        updates["model"].update(n_layer=None, n_head=None, n_embd=None)
    return _validate(_apply(cfg, updates, "command line"))
