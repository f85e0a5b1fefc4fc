"""Export a training checkpoint as a Hugging Face model directory.

    python -m graspGPT.export OUTPUT/checkpoint_iter_N --out DIR [--dtype bfloat16] [--overwrite]

DIR holds `config.json` (Qwen2ForCausalLM), `model.safetensors` (the tied lm_head is stored once, as
`model.embed_tokens.weight`), `generation_config.json` (eos = the `end` token) and `graspgpt_meta.json`
(the model record: architecture, vocabulary, workspace with the grasp-cell convention; and step, source,
training config), so `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it and the toolkit
can fine-tune from it (`--init_from DIR`). The checkpoint alone is enough: its training data may be gone.
Reading and loading either kind is `graspGPT/artifact.py`.

DeepSpeed shards are pickles: reading them can run code, so export only checkpoints from a trusted source.
Exported directories are safetensors and JSON only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from graspGPT import artifact, checkpoint
from graspGPT.artifact import META_FILE, TRUST_NOTE, WEIGHTS_FILE
from graspGPT.model import GraspGPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ExportError(artifact.ArtifactError):
    """An export that cannot be written; the message names the path and the fix."""


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
    if artifact.is_hf_dir(Path(ckpt_path)):
        raise ExportError(f"{ckpt_path} is already an exported model directory; give a toolkit checkpoint")
    meta, sd = artifact.read_checkpoint(ckpt_path)
    cfg = artifact.config_of(meta)
    with torch.device("meta"):  # shapes only, nothing allocated
        skeleton = GraspGPT(cfg)
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
        print("note: the workspace box of the training data is unknown (a checkpoint from before it was recorded, "
              f"its data set moved or upstream .pth); {META_FILE} records workspace: null", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
