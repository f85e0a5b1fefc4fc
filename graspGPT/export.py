"""Export a training checkpoint as a Hugging Face model directory, and load either kind for use.

    python -m graspGPT.export OUTPUT/checkpoint_iter_N --out DIR [--dtype bfloat16] [--overwrite]

DIR holds `config.json` (Qwen2ForCausalLM), `model.safetensors` (the tied lm_head is stored once, as
`model.embed_tokens.weight`), `generation_config.json` (eos = the `end` token) and `graspgpt_meta.json`
(vocabulary, workspace with the grasp-cell convention, model shape, step, source), so `transformers.AutoModelForCausalLM.from_pretrained(DIR)`
loads it and the toolkit can fine-tune from it (`--init_from DIR`, see `load_hf_weights`).

DeepSpeed shards are pickles: reading them can run code, so export only checkpoints from a trusted source.
Exported directories are safetensors and JSON only.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from graspGPT import checkpoint
from graspGPT.data.storage import grasp_cells_of_meta
from graspGPT.data.vocab import SCENE_GRID, UPSTREAM_GRID, Vocab, VocabError, Workspace
from graspGPT.model import AXIS_KEYS, GraspGPT, GraspGPTConfig, ModelConfigError, fold_axes

META_FILE = "graspgpt_meta.json"
WEIGHTS_FILE = "model.safetensors"
HF_FILES = ("config.json", WEIGHTS_FILE, META_FILE)
META_FORMAT, META_VERSION = "graspgpt-hf", 1
# GraspGPTConfig fields that define what the weights compute (dropout etc. are training settings)
ARCH_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "rope_theta", "rms_norm_eps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TIED = "lm_head.weight"  # the same tensor as model.embed_tokens.weight; stored once
TRUST_NOTE = "DeepSpeed shards are pickles: use only checkpoints from a trusted source"


class ExportError(checkpoint.CheckpointError):
    """A checkpoint or exported model that cannot be used; the message names the file and the fix."""


# -- reading a toolkit checkpoint -------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """`OUTPUT/checkpoint_iter_N`, `OUTPUT/latest` or `OUTPUT` (with a latest file) -> a complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory; give OUTPUT/checkpoint_iter_N, OUTPUT/latest or OUTPUT")
    if path.is_dir() and not (path / checkpoint.LATEST).is_file() and not checkpoint.is_complete(path):
        if checkpoint.step_of(path) is not None or (path / checkpoint.STATE_FILE).is_file():
            raise ExportError(f"{path}: incomplete checkpoint (no {checkpoint.MARKER} marker: its save was "
                              f"interrupted); use an earlier complete checkpoint_iter_N")
        found = checkpoint.complete_checkpoints(path)
        hint = f"; the newest complete checkpoint here is {found[-1]}" if found else ""
        raise ExportError(f"{path}: neither a toolkit checkpoint (checkpoint_iter_N/ with {checkpoint.MARKER}, "
                          f"a latest file, or an output directory holding one) nor an exported model "
                          f"directory ({', '.join(HF_FILES)}){hint}")
    return checkpoint.resolve_resume(str(path), path)


def _grasp_cells(ds: dict) -> str | None:
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


def _workspace(state: dict, vocab: Vocab) -> dict | None:
    """The workspace box of the training data and how its grasp cells map to metres (`grasp_cells`),
    if the checkpoint or its data set still tells it."""
    ds = state["config"].get("dataset", {})
    if "workspace" in state:
        ws = dict(state["workspace"])
        ws.setdefault("grasp_cells", _grasp_cells(ds))  # recorded since issue 13
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
            "grasp_cells": _grasp_cells(ds)}


def checkpoint_meta(ckpt: Path) -> dict:
    """The graspgpt_meta.json contents for a complete checkpoint directory."""
    state = checkpoint.read_state(ckpt)
    try:
        cfg, shape, voc = state["config"], state["model"], state["vocab"]
        vocab = Vocab(voc["dims"], voc["dynamic_tags"])
        if not vocab.size == voc["vocab_size"] == shape["vocab_size"]:
            raise ValueError(f"vocab_size {voc['vocab_size']} / model {shape['vocab_size']} disagree with dims "
                             f"{list(vocab.dims)} (V = {vocab.size})")
        model = {"vocab_size": vocab.size, "block_size": cfg["dataset"]["max_sequence_length"],
                 **{k: shape[k] for k in ("n_layer", "n_head", "n_embd", "n_kv_head")},
                 "rope_theta": cfg["model"]["rope_theta"], "rms_norm_eps": GraspGPTConfig.rms_norm_eps}
        meta = {"format": META_FORMAT, "format_version": META_VERSION,
                "vocab": {**vocab.to_meta(), "voxel_base": vocab.voxel_base, "end_id": vocab.end},
                "workspace": _workspace(state, vocab), "model": model, "step": state["step"],
                "zero_stage": state.get("zero_stage"), "source_checkpoint": str(ckpt.resolve()),
                "training_config": cfg}
    except (KeyError, TypeError, ValueError, VocabError) as exc:
        raise ExportError(f"{ckpt / checkpoint.STATE_FILE}: incomplete or inconsistent ({exc!r}); the checkpoint "
                          f"was written by another toolkit version or is damaged") from exc
    model_config(meta, ckpt)
    return meta


def fp32_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of any ZeRO stage, keyed like GraspGPT/Qwen2 but without the tied lm_head."""
    try:
        if list(ckpt.glob("*_optim_states.pt")):  # ZeRO 1-3 (and bf16 stage 0): fp32 master partitions
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its chatter
                sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        else:  # stage 0 without a ZeRO optimizer: the module's own weights, loadable without pickle
            sd = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    except Exception as exc:  # DeepSpeed raises many kinds on missing or foreign shards
        raise ExportError(f"{ckpt}: cannot read the DeepSpeed shards ({type(exc).__name__}: {exc}); "
                          f"the checkpoint is damaged or from another DeepSpeed layout") from exc
    embed = sd.get("model.embed_tokens.weight")
    if TIED in sd and embed is not None and not torch.equal(sd[TIED], embed):
        raise ExportError(f"{ckpt}: lm_head.weight differs from model.embed_tokens.weight, but GraspGPT ties them; "
                          f"this is not a GraspGPT checkpoint")
    # trained with coordinate embedding: its axis terms folded in give the plain Qwen2 table
    return fold_axes({k: v.float() for k, v in sd.items() if k != TIED})


# -- meta and model construction ----------------------------------------------------------
def model_config(meta: dict, source: Path) -> GraspGPTConfig:
    try:
        return GraspGPTConfig(**{k: meta["model"][k] for k in ARCH_FIELDS})
    except (KeyError, TypeError, ModelConfigError) as exc:
        raise ExportError(f"{source}: bad model shape in the metadata ({exc!r}); export the checkpoint again") from exc


def read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: unreadable ({exc}); export the checkpoint again") from exc
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or meta.get("format_version") != META_VERSION:
        raise ExportError(f"{path}: not a {META_FORMAT} v{META_VERSION} file; export with this toolkit's "
                          f"`python -m graspGPT.export`")
    model_config(meta, path)
    return meta


def _check_against(model: GraspGPT, meta: dict, vocab_meta: dict | None, source: Path) -> None:
    """Same architecture (and vocabulary, when given) as the model we load into, or one error naming both values."""
    problems = []
    for key in ARCH_FIELDS:
        theirs, ours = meta["model"].get(key), getattr(model.cfg, key)
        if key != "block_size" and theirs != ours:  # RoPE has no learned positions: any length works
            problems.append(f"{key} is {theirs} in {source} but {ours} in this model")
    for key in ("dims", "dynamic_tags", "vocab_size") if vocab_meta is not None else ():
        theirs, ours = meta["vocab"].get(key), vocab_meta.get(key)
        if theirs != ours:
            problems.append(f"vocabulary {key} is {theirs} in {source} but {ours} in this run's data")
    if problems:
        raise ExportError("weights do not fit: " + "; ".join(problems)
                          + ". Use the model shape and data set the weights were trained with")


def _check_tensors(model: GraspGPT, shapes: dict[str, tuple], source: Path) -> None:
    """Strict: every parameter present with its full shape, nothing else (ZeRO-3 params report ds_shape)."""
    ours = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    missing, extra = sorted(set(ours) - set(shapes)), sorted(set(shapes) - set(ours))
    if missing or extra:
        raise ExportError(f"{source}: weight names do not match this model (missing {len(missing)}: "
                          f"{missing[:3]}; unexpected {len(extra)}: {extra[:3]}); it holds another model size")
    wrong = [f"{n} is {tuple(shapes[n])} there but {ours[n]} here" for n in ours if tuple(shapes[n]) != ours[n]]
    if wrong:
        raise ExportError(f"{source}: weight shapes do not match this model: {'; '.join(wrong[:3])}")


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


# -- public API ---------------------------------------------------------------------------
def load_hf_weights(model: GraspGPT, directory: str | Path, vocab_meta: dict | None = None) -> None:
    """Fill a freshly built toolkit model with an exported directory's weights (strict names and shapes).

    `vocab_meta` (`Vocab.to_meta()` of the run's data) also checks the vocabulary: the same V can come
    from different grids. Under ZeRO-3 (model built inside `deepspeed.zero.Init`) every rank must call
    this, after `deepspeed.init_distributed()` and before `deepspeed.initialize`.
    """
    from safetensors import safe_open

    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        raise ExportError(f"{directory}: no {WEIGHTS_FILE}; give a directory written by `python -m graspGPT.export`")
    _check_against(model, read_meta(directory), vocab_meta, directory)
    try:
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            axes = {}
            if model.cfg.voxel_grid is not None:  # the exported table already holds the axis terms: start them at 0
                axes = {k: torch.zeros(n, model.cfg.n_embd) for k, n in zip(AXIS_KEYS, model.cfg.voxel_grid)}
                shapes.update({k: tuple(v.shape) for k, v in axes.items()})
            _check_tensors(model, shapes, directory / WEIGHTS_FILE)
            _copy_into(model, lambda name: axes[name] if name in axes else f.get_tensor(name))
    except ExportError:
        raise
    except Exception as exc:  # safetensors reports a damaged file as several exception types
        raise ExportError(f"{directory / WEIGHTS_FILE}: unreadable ({exc}); export the checkpoint again") from exc


def is_hf_dir(path: Path) -> bool:
    # not config.json alone: a training output directory has one too
    return path.is_dir() and any((path / f).exists() for f in (WEIGHTS_FILE, META_FILE))


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[GraspGPT, dict]:
    """An exported directory or a toolkit checkpoint -> (GraspGPT in eval mode, graspgpt_meta dict).

    dtype None keeps fp32. A checkpoint is read through DeepSpeed's shards (pickles: trusted sources only).
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory; give a directory written by "
                          f"`python -m graspGPT.export`, or a toolkit checkpoint")
    if is_hf_dir(path):
        missing = [f for f in HF_FILES if not (path / f).is_file()]
        if missing:
            raise ExportError(f"{path}: exported model directory lacks {', '.join(missing)}; export it again")
        meta = read_meta(path)
        model = GraspGPT(model_config(meta, path))
        load_hf_weights(model, path)
    else:
        ckpt = resolve_checkpoint(path)
        meta = checkpoint_meta(ckpt)
        sd = fp32_state_dict(ckpt)
        model = GraspGPT(model_config(meta, ckpt))
        _check_tensors(model, {k: tuple(v.shape) for k, v in sd.items()}, ckpt)
        _copy_into(model, sd.__getitem__)
    return model.to(device=device, dtype=dtype or torch.float32).eval(), meta


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary name, so an interrupted export never leaves a half file under the real name."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def export(ckpt_path: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write the Hugging Face directory `out` for a toolkit checkpoint; returns its meta."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} is not empty; choose another directory or pass --overwrite")
    if is_hf_dir(Path(ckpt_path)):
        raise ExportError(f"{ckpt_path} is already an exported model directory; give a toolkit checkpoint")
    ckpt = resolve_checkpoint(ckpt_path)
    meta = checkpoint_meta(ckpt)
    sd = fp32_state_dict(ckpt)
    cfg = model_config(meta, ckpt)
    with torch.device("meta"):  # shapes only, nothing allocated
        skeleton = GraspGPT(cfg)
    _check_tensors(skeleton, {k: tuple(v.shape) for k, v in sd.items()}, ckpt)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in sd.items()}
    hf = skeleton.to_hf_config(dtype=dtype)
    hf.update(eos_token_id=meta["vocab"]["end_id"], bos_token_id=None, pad_token_id=None, use_cache=True)
    generation = {"eos_token_id": meta["vocab"]["end_id"], "max_length": cfg.block_size}
    out.mkdir(parents=True, exist_ok=True)
    _write(out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _write(out / "config.json", lambda p: p.write_text(json.dumps(hf, indent=2) + "\n"))
    _write(out / "generation_config.json", lambda p: p.write_text(json.dumps(generation, indent=2) + "\n"))
    _write(out / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))
    return meta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m graspGPT.export",
        description="Write a Hugging Face model directory (config.json, model.safetensors, graspgpt_meta.json) "
                    f"from a toolkit checkpoint of any ZeRO stage. {TRUST_NOTE}.")
    parser.add_argument("checkpoint", help="OUTPUT/checkpoint_iter_N, OUTPUT/latest, or OUTPUT (uses its latest)")
    parser.add_argument("--out", required=True, help="directory to write (must be empty unless --overwrite)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weight dtype (default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace the exported files in a non-empty --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"note: {TRUST_NOTE}", file=sys.stderr)
    try:
        meta = export(args.checkpoint, args.out, args.dtype, args.overwrite)
    except (checkpoint.CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = meta["model"]
    print(f"exported step {meta['step']} of {meta['source_checkpoint']} to {args.out} ({args.dtype}; "
          f"{m['n_layer']} layers x {m['n_embd']}, V={m['vocab_size']})")
    if meta["workspace"] is None:
        print("note: the workspace box of the training data is unknown (data set moved or upstream .pth); "
              f"{META_FILE} records workspace: null", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
