"""What a trained model is, for checkpoints and exports alike: the model record, the one compatibility
check, and the one loader.

The record (`ModelRecord`) is the model's full architecture, its vocabulary and the workspace of its
training data with the data's grasp-cell convention. The same three JSON keys hold it in a checkpoint's
`toolkit_state.json` and in an export's `graspgpt_meta.json`, so either one alone rebuilds the model and
turns its grasps into metres, with the training data deleted or moved:

    "model":     vocab_size, block_size, n_layer, n_head, n_embd, n_kv_head, rope_theta, rms_norm_eps,
                 coordinate_embedding (false in an export: the axis terms are folded into the table)
    "vocab":     dims, dynamic_tags, vocab_size, voxel_base, end_id
    "workspace": bbox_min, bbox_max, voxel_size, grasp_cells (null where unknown: see docs/FORMAT.md)

Checkpoints written before the record (layout 1) saved only the shape; `ModelRecord.of_state` reads them
too, taking the rest from their saved training config.

DeepSpeed shards are pickles: reading them can run code, so load only checkpoints from a trusted source.
Exported directories are safetensors and JSON only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from graspGPT import checkpoint
from graspGPT.data.storage import grasp_cells_of_meta
from graspGPT.data.vocab import SCENE_GRID, UPSTREAM_GRID, Vocab, VocabError, Workspace, check_grasp_cells
from graspGPT.model import AXIS_KEYS, GraspGPT, GraspGPTConfig, ModelConfigError, fold_axes

META_FILE = "graspgpt_meta.json"
WEIGHTS_FILE = "model.safetensors"
HF_FILES = ("config.json", WEIGHTS_FILE, META_FILE)
META_FORMAT, META_VERSION = "graspgpt-hf", 1
# The GraspGPTConfig fields that define what the weights compute (dropout etc. are training settings);
# with coordinate_embedding they are the record's "model".
ARCH_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "rope_theta", "rms_norm_eps")
# What weights must share with the model they go into: all of it but block_size (RoPE has no learned positions)
FIT_FIELDS = tuple(k for k in ARCH_FIELDS if k != "block_size") + ("coordinate_embedding",)
TIED = "lm_head.weight"  # the same tensor as model.embed_tokens.weight; stored once
TRUST_NOTE = "DeepSpeed shards are pickles: use only checkpoints from a trusted source"
DAMAGED = "the file is damaged or from another toolkit version"


class ArtifactError(checkpoint.CheckpointError):
    """A checkpoint or exported model that cannot be used, or does not fit; the message names the file and the fix."""


# -- the record -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRecord:
    """What a trained model is: enough to rebuild it and to read its output, with nothing else at hand."""

    model: GraspGPTConfig  # only the architecture is recorded; a record read back has training settings at defaults
    vocab: Vocab
    workspace: Workspace | None = None  # None: unknown (an export of a checkpoint from before it was recorded)
    grasp_cells: str | None = None  # how the data's grasp cells map to metres; None: unknown, as above

    def to_json(self) -> dict:
        """The "model", "vocab" and "workspace" keys of toolkit_state.json and graspgpt_meta.json."""
        model = {k: getattr(self.model, k) for k in ARCH_FIELDS}
        model["coordinate_embedding"] = self.model.voxel_grid is not None
        vocab = {**self.vocab.to_meta(), "voxel_base": self.vocab.voxel_base, "end_id": self.vocab.end}
        ws = self.workspace
        workspace = None if ws is None else {"bbox_min": list(ws.bbox_min), "bbox_max": list(ws.bbox_max),
                                             "voxel_size": ws.voxel_size, "grasp_cells": self.grasp_cells}
        return {"model": model, "vocab": vocab, "workspace": workspace}

    @classmethod
    def from_json(cls, d: dict, source: str | Path, fix: str = DAMAGED) -> ModelRecord:
        """The record held in `d` (a toolkit_state.json or graspgpt_meta.json), checked for consistency."""
        try:
            voc, m = d["vocab"], d["model"]
            vocab = Vocab(voc["dims"], voc["dynamic_tags"])
            # exports written before the record lack the key: their table is always a plain one
            grid = vocab.dims if m.get("coordinate_embedding", False) else None
            model = GraspGPTConfig(**{k: m[k] for k in ARCH_FIELDS}, voxel_grid=grid)
            if not voc["vocab_size"] == vocab.size == model.vocab_size:
                raise ValueError(f"vocab_size {voc['vocab_size']} / model {model.vocab_size} disagree with dims "
                                 f"{list(vocab.dims)} (V = {vocab.size})")
            workspace = grasp_cells = None
            if d.get("workspace") is not None:
                ws = d["workspace"]
                workspace = Workspace(tuple(ws["bbox_min"]), tuple(ws["bbox_max"]), float(ws["voxel_size"]))
                if workspace.dims != vocab.dims:
                    raise ValueError(f"workspace grid {workspace.dims} differs from the vocabulary's {vocab.dims}")
                if ws.get("grasp_cells") is not None:
                    grasp_cells = check_grasp_cells(ws["grasp_cells"])
        except (KeyError, TypeError, ValueError, VocabError, ModelConfigError) as exc:
            raise ArtifactError(f"{source}: incomplete or inconsistent model record ({exc!r}); {fix}") from exc
        return cls(model, vocab, workspace, grasp_cells)

    @classmethod
    def of_state(cls, state: dict, source: str | Path) -> ModelRecord:
        """The record of a checkpoint's toolkit_state.json, of either layout."""
        layout2 = isinstance(state.get("model"), dict) and "block_size" in state["model"]
        return cls.from_json(state if layout2 else _layout1(state, source), source,
                             fix="the checkpoint was written by another toolkit version or is damaged")

    def folded(self) -> ModelRecord:
        """The record of the weights as exported and loaded: the axis terms folded into a plain Qwen2 table."""
        return dataclasses.replace(self, model=dataclasses.replace(self.model, voxel_grid=None))

    def check_resume(self, path: Path, state: dict) -> None:
        """For `checkpoint.plan_resume`: the checkpoint at `path` must fit this run's model and data."""
        source = path / checkpoint.STATE_FILE
        check_compatible(ModelRecord.of_state(state, source), self, source, "the checkpoint", "this run",
                         "Resume with the same model and data, or start fresh in another --output_dir")


def _show(value) -> str:
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"[{', '.join(map(repr, value[:3]))}, ... {len(value)} in all]"
    return json.dumps(value) if isinstance(value, bool) else str(value)


def check_compatible(saved: ModelRecord, ours: ModelRecord | Vocab, source: str | Path, saved_as: str,
                     ours_as: str, fix: str) -> None:
    """The one compatibility check: `saved` weights fit `ours` (a model record, or only a data set's
    vocabulary), else ArtifactError naming every mismatch with both values, on one line."""
    problems = []
    if isinstance(ours, ModelRecord):
        theirs_m, ours_m = saved.to_json()["model"], ours.to_json()["model"]
        problems += [f"model.{k} is {_show(theirs_m[k])} in {saved_as} but {_show(ours_m[k])} in {ours_as}"
                     for k in FIT_FIELDS if theirs_m[k] != ours_m[k]]
        ours = ours.vocab
    for key in ("dims", "dynamic_tags"):
        a, b = list(getattr(saved.vocab, key)), list(getattr(ours, key))
        if a != b:
            problems.append(f"vocabulary {key} is {_show(a)} in {saved_as} but {_show(b)} in {ours_as}")
    if problems:
        raise ArtifactError(f"{source}: {saved_as} does not fit {ours_as}: " + "; ".join(problems) + f". {fix}")


# -- checkpoints from before the record (layout 1) -------------------------------------------------
def _layout1(state: dict, source: str | Path) -> dict:
    """A layout-1 toolkit_state.json as a record: its shape and vocabulary, block_size and rope_theta from its
    saved config, rms_norm_eps the only value the toolkit ever used, its workspace as found."""
    try:
        shape, cfg = state["model"], state["config"]
        model = {**{k: shape[k] for k in ("vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head")},
                 "block_size": cfg["dataset"]["max_sequence_length"], "rope_theta": cfg["model"]["rope_theta"],
                 "rms_norm_eps": GraspGPTConfig.rms_norm_eps,
                 "coordinate_embedding": shape.get("coordinate_embedding", False)}  # False before it existed
        vocab = Vocab(state["vocab"]["dims"], state["vocab"]["dynamic_tags"])
    except (KeyError, TypeError, ValueError, VocabError) as exc:
        raise ArtifactError(f"{source}: incomplete checkpoint state ({exc!r}); the checkpoint was written by another "
                            f"toolkit version or is damaged") from exc
    return {"model": model, "vocab": state["vocab"], "workspace": _layout1_workspace(state, vocab)}


def _layout1_grasp_cells(ds: dict) -> str | None:
    """The grasp-cell convention of the training data, for checkpoints written before it was recorded:
    the built-in set is on the scene grid; a data set says so (or its source does); a directory of
    upstream .pth files holds the research code's cells; None when the data can no longer be read."""
    if ds.get("data_path") is None:
        return SCENE_GRID
    path = Path(ds["data_path"]).expanduser()
    try:
        return grasp_cells_of_meta(json.loads((path / "meta.json").read_text()))
    except OSError:
        return UPSTREAM_GRID if path.is_dir() and any(path.glob("*.pth")) else None
    except (ValueError, TypeError, AttributeError):  # unreadable or edited meta.json
        return None


def _layout1_workspace(state: dict, vocab: Vocab) -> dict | None:
    """The workspace of a layout-1 checkpoint: recorded since the checkpoint format began, its grasp_cells
    since issue 13; before either, what the training data, if still there, tells."""
    ds = state["config"].get("dataset", {})
    if "workspace" in state:
        ws = dict(state["workspace"])
        if ws.get("grasp_cells") is None:
            ws["grasp_cells"] = _layout1_grasp_cells(ds)
        return ws
    if ds.get("data_path") is None:  # the built-in synthetic set: the real box at its voxel size
        ws = Workspace(voxel_size=ds["synthetic_voxel_size"])
    else:
        try:
            m = json.loads((Path(ds["data_path"]).expanduser() / "meta.json").read_text())
            ws = Workspace(tuple(m["bbox_min"]), tuple(m["bbox_max"]), float(m["voxel_size"]))
        except (OSError, ValueError, KeyError, TypeError):  # data moved, or upstream .pth files
            return None
    if ws.dims != vocab.dims:
        return None
    return {"bbox_min": list(ws.bbox_min), "bbox_max": list(ws.bbox_max), "voxel_size": ws.voxel_size,
            "grasp_cells": _layout1_grasp_cells(ds)}


# -- reading a toolkit checkpoint -------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """`OUTPUT/checkpoint_iter_N`, `OUTPUT/latest` or `OUTPUT` (with a latest file) -> a complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such file or directory; give OUTPUT/checkpoint_iter_N, OUTPUT/latest or OUTPUT")
    if path.is_dir() and not (path / checkpoint.LATEST).is_file() and not checkpoint.is_complete(path):
        if checkpoint.step_of(path) is not None or (path / checkpoint.STATE_FILE).is_file():
            raise ArtifactError(f"{path}: incomplete checkpoint (no {checkpoint.MARKER} marker: its save was "
                                f"interrupted); use an earlier complete checkpoint_iter_N")
        found = checkpoint.complete_checkpoints(path)
        hint = f"; the newest complete checkpoint here is {found[-1]}" if found else ""
        raise ArtifactError(f"{path}: neither a toolkit checkpoint (checkpoint_iter_N/ with {checkpoint.MARKER}, "
                            f"a latest file, or an output directory holding one) nor an exported model "
                            f"directory ({', '.join(HF_FILES)}){hint}")
    return checkpoint.resolve_resume(str(path), path)


def checkpoint_meta(ckpt: Path) -> dict:
    """The graspgpt_meta.json contents for a complete checkpoint directory: the record of its weights as
    exported, where they came from, and the training config."""
    state = checkpoint.read_state(ckpt)
    record = ModelRecord.of_state(state, ckpt / checkpoint.STATE_FILE).folded()
    try:
        provenance = {"step": state["step"], "zero_stage": state.get("zero_stage"),
                      "source_checkpoint": str(ckpt.resolve()), "training_config": state["config"]}
    except KeyError as exc:
        raise ArtifactError(f"{ckpt / checkpoint.STATE_FILE}: incomplete ({exc!r}); the checkpoint was written by "
                            f"another toolkit version or is damaged") from exc
    return {"format": META_FORMAT, "format_version": META_VERSION, **record.to_json(), **provenance}


def fp32_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of any ZeRO stage, keyed like GraspGPT/Qwen2 but without the tied lm_head,
    the axis terms of a coordinate embedding folded into the table."""
    try:
        if list(ckpt.glob("*_optim_states.pt")):  # ZeRO 1-3 (and bf16 stage 0): fp32 master partitions
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its chatter
                sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        else:  # stage 0 without a ZeRO optimizer: the module's own weights, loadable without pickle
            sd = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    except Exception as exc:  # DeepSpeed raises many kinds on missing or foreign shards
        raise ArtifactError(f"{ckpt}: cannot read the DeepSpeed shards ({type(exc).__name__}: {exc}); "
                            f"the checkpoint is damaged or from another DeepSpeed layout") from exc
    embed = sd.get("model.embed_tokens.weight")
    if TIED in sd and embed is not None and not torch.equal(sd[TIED], embed):
        raise ArtifactError(f"{ckpt}: lm_head.weight differs from model.embed_tokens.weight, but GraspGPT ties "
                            f"them; this is not a GraspGPT checkpoint")
    return fold_axes({k: v.float() for k, v in sd.items() if k != TIED})


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A toolkit checkpoint -> (its graspgpt meta, its fp32 weights as exported), the weights checked to be
    exactly those of the recorded architecture."""
    ckpt = resolve_checkpoint(path)
    meta = checkpoint_meta(ckpt)
    sd = fp32_state_dict(ckpt)
    with torch.device("meta"):  # shapes only, nothing allocated
        skeleton = GraspGPT(config_of(meta))
    _check_tensors(skeleton, {k: tuple(v.shape) for k, v in sd.items()}, ckpt)
    return meta, sd


# -- reading an exported directory ----------------------------------------------------------
def config_of(meta: dict, source: str | Path = META_FILE) -> GraspGPTConfig:
    """The model a graspgpt meta describes, ready to build."""
    return ModelRecord.from_json(meta, source, fix="export the checkpoint again").model


def read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable ({exc}); export the checkpoint again") from exc
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or meta.get("format_version") != META_VERSION:
        raise ArtifactError(f"{path}: not a {META_FORMAT} v{META_VERSION} file; export with this toolkit's "
                            f"`python -m graspGPT.export`")
    config_of(meta, path)
    return meta


def is_hf_dir(path: Path) -> bool:
    # not config.json alone: a training output directory has one too
    return path.is_dir() and any((path / f).exists() for f in (WEIGHTS_FILE, META_FILE))


# -- filling a model ----------------------------------------------------------------------------
def _check_tensors(model: GraspGPT, shapes: dict[str, tuple], source: Path) -> None:
    """Strict: every parameter present with its full shape, nothing else (ZeRO-3 params report ds_shape)."""
    ours = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    missing, extra = sorted(set(ours) - set(shapes)), sorted(set(shapes) - set(ours))
    if missing or extra:
        raise ArtifactError(f"{source}: weight names do not match this model (missing {len(missing)}: "
                            f"{missing[:3]}; unexpected {len(extra)}: {extra[:3]}); it holds another model size")
    wrong = [f"{n} is {tuple(shapes[n])} there but {ours[n]} here" for n in ours if tuple(shapes[n]) != ours[n]]
    if wrong:
        raise ArtifactError(f"{source}: weight shapes do not match this model: {'; '.join(wrong[:3])}")


@torch.no_grad()
def _copy_into(model: GraspGPT, get: Callable[[str], torch.Tensor]) -> None:
    """Copy every parameter from get(name); under ZeRO-3 one parameter at a time is gathered, rank 0 fills it
    and DeepSpeed re-partitions it on exit, so no rank ever holds the whole model."""
    params = dict(model.named_parameters())  # the tied embedding once
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed
        import torch.distributed as dist
        rank = dist.get_rank()
        for name, p in params.items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.copy_(get(name))
    else:
        for name, p in params.items():
            p.copy_(get(name))


def load_hf_weights(model: GraspGPT, directory: str | Path, vocab: Vocab | None = None) -> None:
    """Fill a freshly built toolkit model with an exported directory's weights (strict names and shapes).

    `vocab` (the run's data) is checked too: the same V can come from different grids. Under ZeRO-3
    (model built inside `deepspeed.zero.Init`) every rank must call this, after
    `deepspeed.init_distributed()` and before `deepspeed.initialize`.
    """
    from safetensors import safe_open

    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        raise ArtifactError(f"{directory}: no {WEIGHTS_FILE}; give a directory written by `python -m graspGPT.export`")
    saved = ModelRecord.from_json(read_meta(directory), directory / META_FILE, fix="export the checkpoint again")
    # a model with axis terms starts them at 0 on the export's table: it reads the export as a plain table
    ours = ModelRecord(model.cfg, vocab if vocab is not None else saved.vocab).folded()
    check_compatible(saved, ours, directory, "the export", "this model",
                     "Use the model shape and data set the weights were trained with")
    try:
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            axes = {}
            if model.cfg.voxel_grid is not None:  # the exported table already holds the axis terms: start them at 0
                axes = {k: torch.zeros(n, model.cfg.n_embd) for k, n in zip(AXIS_KEYS, model.cfg.voxel_grid)}
                shapes.update({k: tuple(v.shape) for k, v in axes.items()})
            _check_tensors(model, shapes, directory / WEIGHTS_FILE)
            _copy_into(model, lambda name: axes[name] if name in axes else f.get_tensor(name))
    except ArtifactError:
        raise
    except Exception as exc:  # safetensors reports a damaged file as several exception types
        raise ArtifactError(f"{directory / WEIGHTS_FILE}: unreadable ({exc}); export the checkpoint again") from exc


# -- the one loader -------------------------------------------------------------------------------
def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[GraspGPT, dict]:
    """An exported directory or a toolkit checkpoint -> (GraspGPT in eval mode, graspgpt meta dict).

    The meta of either holds the record (`ModelRecord.from_json(meta, ...)`) and the training config;
    nothing else is read, the training data least of all. dtype None keeps fp32. A checkpoint is read
    through DeepSpeed's shards (pickles: trusted sources only).
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such file or directory; give a directory written by "
                            f"`python -m graspGPT.export`, or a toolkit checkpoint")
    if is_hf_dir(path):
        missing = [f for f in HF_FILES if not (path / f).is_file()]
        if missing:
            raise ArtifactError(f"{path}: exported model directory lacks {', '.join(missing)}; export it again")
        meta = read_meta(path)
        model = GraspGPT(config_of(meta, path))
        load_hf_weights(model, path)
    else:
        meta, sd = read_checkpoint(path)
        model = GraspGPT(config_of(meta, path))
        _copy_into(model, sd.__getitem__)
    return model.to(device=device, dtype=dtype or torch.float32).eval(), meta
