"""`python -m graspGPT.data {synth,import,inspect}`: make, import and look at data sets.

    synth    generate the built-in synthetic tabletop data set
    import   convert upstream *.pth files into a toolkit data set
    inspect  print what a data set holds (and render one sample to a PNG)

User errors print one `error: ...` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from . import synth
from .grammar import GrammarError
from .source import synth_workers
from .storage import DatasetWriter, StorageError, TokenStore, split_indices
from .synth import SynthError
from .upstream import REAL_FILTER_MODES, UpstreamError, import_upstream
from .vocab import Vocab, VocabError, Workspace

USER_ERRORS = (StorageError, UpstreamError, SynthError, VocabError, GrammarError, OSError)
SHOW_TOKENS = 48  # tokens printed per sample by inspect


class CLIError(ValueError):
    """A bad command-line value."""


def cmd_synth(args) -> None:
    if args.num_scenes < 1:
        raise CLIError(f"--num_scenes must be at least 1, got {args.num_scenes}")
    if args.workers < 0:
        raise CLIError(f"--workers must be 0 (automatic) or more, got {args.workers}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if not args.voxel_size > 0:
        raise CLIError(f"--voxel_size must be positive, got {args.voxel_size}")
    if args.max_grasps_per_object < 1:
        raise CLIError(f"--max_grasps_per_object must be at least 1, got {args.max_grasps_per_object}")
    if not 0 <= args.val_fraction < 1:
        raise CLIError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    synth.parse_task_mix(args.task_mix)  # fail before the output directory is made
    workspace = Workspace(voxel_size=args.voxel_size)
    vocab = Vocab.for_workspace(workspace)
    val_mask = None
    if args.val_fraction > 0:
        _, val = split_indices(args.num_scenes, args.val_fraction, args.seed)
        val_mask = np.zeros(args.num_scenes, dtype=bool)
        val_mask[val] = True
    source = (f"graspGPT synth: num_scenes={args.num_scenes} seed={args.seed} voxel_size={args.voxel_size:g} "
              f"task_mix={args.task_mix} max_grasps_per_object={args.max_grasps_per_object} "
              f"val_fraction={args.val_fraction:g}")
    scenes = synth.generate_scenes(args.num_scenes, args.seed, workspace, task_mix=args.task_mix,
                                   max_grasps_per_object=args.max_grasps_per_object,
                                   progress=args.num_scenes >= 100 and sys.stderr.isatty(),
                                   workers=args.workers or synth_workers(args.num_scenes))
    with DatasetWriter(args.out, vocab, workspace, source, overwrite=args.overwrite, val_mask=val_mask) as writer:
        for ids in scenes:
            writer.add(ids)
    store = TokenStore.open(args.out)
    split = f", {int(val_mask.sum())} of them validation" if val_mask is not None else ""
    print(f"wrote {len(store)} samples{split}, {store.num_tokens} tokens to {args.out} "
          f"(dims {vocab.dims}, V = {vocab.size})")


def cmd_import(args) -> None:
    report = import_upstream(args.src, args.out, args.real_filter_mode, drop_invalid=args.drop_invalid,
                             categories=args.categories, progress=sys.stderr.isatty(), overwrite=args.overwrite)
    print(report.summary())


def _layout(ids: np.ndarray, vocab: Vocab) -> str:
    amodal, unseg = bool((ids == vocab.amodal).any()), bool((ids == vocab.segment).any())
    return {(False, False): "grasp", (True, False): "amodal", (False, True): "unseg"}.get((amodal, unseg), "amodal+unseg")


def _readable(ids: np.ndarray, vocab: Vocab, limit: int = SHOW_TOKENS) -> str:
    words = [t if isinstance(t, str) else "({},{},{})".format(*t) for t in vocab.decode(ids[:limit])]
    if len(ids) > limit:
        words.append(f"... ({len(ids) - limit} more)")
    return " ".join(words)


def inspect_store(store: TokenStore, samples: int, render_path: Path | None, index: int) -> None:
    meta, vocab = store.meta, store.vocab
    X, Y, Z = vocab.dims
    lengths = store.lengths
    pcts = np.percentile(lengths, [0, 50, 90, 99, 100], method="nearest")
    layouts = Counter(_layout(store[i], vocab) for i in range(len(store)))
    report = store.verify(full=True)
    print(f"data set     {store.path} ({meta['format']} v{meta['format_version']})")
    print(f"source       {meta.get('source', '')}")
    print(f"dims         {X} x {Y} x {Z} ({vocab.num_cells} cells)")
    print(f"bbox         {meta['bbox_min']} .. {meta['bbox_max']} m")
    print(f"voxel size   {meta['voxel_size']:g} m")
    recorded = "" if "grasp_cells" in meta else " (not recorded: decided from the source)"
    print(f"grasp cells  {store.grasp_cells}{recorded}")
    print(f"vocabulary   V = {vocab.size} ({len(vocab.dynamic_tags)} dynamic tags)")
    print(f"samples      {len(store)}")
    print(f"tokens       {store.num_tokens}")
    print("length       " + "  ".join(f"p{p} {int(v)}" for p, v in zip((0, 50, 90, 99, 100), pcts)))
    extra = "".join(f"  {k} {v}" for k, v in layouts.items() if k == "amodal+unseg")
    print(f"tasks        grasp {layouts['grasp']}  amodal {layouts['amodal']}  unseg {layouts['unseg']}{extra}")
    print(f"grammar      valid {report.valid} / {len(store)} (strict {report.valid_strict})")
    if store.val_mask is not None:
        print(f"split        recorded: {int(store.val_mask.sum())} val, {int((~store.val_mask).sum())} train")
    else:
        print("split        none recorded (the trainer splits by val_fraction and seed)")
    for i in range(min(samples, len(store))):
        print(f"sample {i} ({lengths[i]} tokens): {_readable(store[i], vocab)}")
    if render_path is not None:
        if not -len(store) <= index < len(store):
            raise CLIError(f"--index {index} is out of range for {len(store)} samples")
        from .render import render_tokens

        render_tokens(np.asarray(store[index], dtype=np.int64), vocab, render_path, workspace=store.workspace,
                      grasp_cells=store.grasp_cells)
        print(f"rendered sample {index % len(store)} to {render_path}")


def cmd_inspect(args) -> None:
    path = Path(args.dir)
    if args.samples < 0:
        raise CLIError(f"--samples must be >= 0, got {args.samples}")
    upstream = path.is_file() or (path.is_dir() and not (path / "meta.json").exists() and any(path.glob("*.pth")))
    if not upstream:
        inspect_store(TokenStore.open(path), args.samples, args.render, args.index)
        return
    with tempfile.TemporaryDirectory(prefix="graspgpt-inspect-") as tmp:  # upstream .pth files
        report = import_upstream(path, Path(tmp) / "data", progress=sys.stderr.isatty())
        print(report.summary())
        inspect_store(TokenStore.open(report.out_dir), args.samples, args.render, args.index)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m graspGPT.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate the built-in synthetic data set")
    s.add_argument("--out", required=True, type=Path, help="output directory (new or empty)")
    s.add_argument("--num_scenes", required=True, type=int)
    s.add_argument("--seed", required=True, type=int)
    s.add_argument("--voxel_size", type=float, default=0.0075, help="metres (default 0.0075: dims 80x54x34)")
    s.add_argument("--task_mix", default="grasp", help="task layouts and weights, e.g. grasp or grasp=0.6,amodal=0.2,unseg=0.2")
    s.add_argument("--max_grasps_per_object", type=int, default=100)
    s.add_argument("--val_fraction", type=float, default=0.02,
                   help="record a seeded validation split of this fraction (0: record none)")
    s.add_argument("--workers", type=int, default=0,
                   help="processes generating scenes (default 0: every core for 2000+ scenes); same bytes for any number")
    s.add_argument("--overwrite", action="store_true", help="replace the data set in --out")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("import", help="convert upstream *.pth files into a toolkit data set")
    s.add_argument("--src", required=True, type=Path, help="directory of upstream .pth files (top level), or one file")
    s.add_argument("--out", required=True, type=Path, help="output directory (new or empty)")
    s.add_argument("--real_filter_mode", default="allow_all", choices=REAL_FILTER_MODES,
                   help="which samples of files named *real* to keep")
    s.add_argument("--drop_invalid", action="store_true", help="drop grammar-invalid samples (default: keep and count)")
    s.add_argument("--categories", type=Path, help="JSON vocabulary file with the dynamic tags the data was made with")
    s.add_argument("--overwrite", action="store_true", help="replace the data set in --out")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("inspect", help="print what a data set holds")
    s.add_argument("dir", type=Path, help="toolkit data set, or a directory of upstream .pth files")
    s.add_argument("--render", type=Path, metavar="OUT.png", help="write a picture of sample --index")
    s.add_argument("--index", type=int, default=0, help="sample to render (default 0)")
    s.add_argument("--samples", type=int, default=2, help="samples to print as tokens (default 2)")
    s.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, *USER_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
