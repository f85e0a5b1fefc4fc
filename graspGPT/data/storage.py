"""The toolkit's on-disk data set: memory-mapped token ids, sample offsets and a meta.json.

    DIR/meta.json     format, geometry, vocabulary, counts, source (written last: it marks a complete set)
    DIR/tokens.u32    every sample's ids back to back, little-endian uint32
    DIR/offsets.i64   int64, num_samples + 1 entries; sample i is tokens[offsets[i]:offsets[i+1]]
    DIR/val.u8        optional explicit split: one byte per sample, 1 = validation

Readers map the tokens file, so taking one 13k-token sample touches only its own pages.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .grammar import validate
from .vocab import SCENE_GRID, UPSTREAM_GRID, Vocab, VocabError, Workspace, check_grasp_cells

FORMAT = "graspgpt-tokens"
FORMAT_VERSION = 1
META, TOKENS, OFFSETS, VAL = "meta.json", "tokens.u32", "offsets.i64", "val.u8"
TOKEN_DTYPE = np.dtype("<u4")
OFFSET_DTYPE = np.dtype("<i8")
_OWN_FILES = (META, TOKENS, OFFSETS, VAL)


class StorageError(ValueError):
    """A data set directory that cannot be written or read; the message names the file and the fix."""


class DataChangedError(StorageError):
    """The token file shrank under a reader that had opened it (truncated or rewritten in place)."""


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of range(n): round(n * val_fraction) validation samples (at least one when
    n >= 2 and val_fraction > 0, never all of them). Both index arrays are returned sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise StorageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if n >= 2 and val_fraction > 0:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty directory (or over a file) unless overwrite."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise StorageError(f"{out_dir} exists and is not a directory; choose another output path")
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        raise StorageError(f"{out_dir} is not empty; pass --overwrite (overwrite=True) to replace "
                           f"the data set there, or choose a new directory")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DatasetWriter:
    """Streams samples into a new data set directory; `close()` makes it complete.

    Ids are appended to disk as they come (nothing but the offsets is kept in memory). Files are
    written under temporary names and renamed, meta.json last, so an interrupted write never
    looks like a data set. `val_mask` (one bool per sample) records an explicit train/val split.
    """

    def __init__(self, out_dir: str | Path, vocab: Vocab, workspace: Workspace, source: str,
                 overwrite: bool = False, val_mask: np.ndarray | None = None, grasp_cells: str = SCENE_GRID):
        self.out_dir = Path(out_dir)
        if tuple(vocab.dims) != tuple(workspace.dims):
            raise StorageError(f"vocabulary dims {vocab.dims} do not match the workspace grid {workspace.dims}")
        try:
            self.grasp_cells = check_grasp_cells(grasp_cells)
        except VocabError as err:
            raise StorageError(str(err)) from None
        check_out_dir(self.out_dir, overwrite)
        for name in _OWN_FILES:  # meta.json first: an old data set stops counting as complete at once
            (self.out_dir / name).unlink(missing_ok=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.vocab, self.workspace, self.source = vocab, workspace, source
        self.val_mask = None if val_mask is None else np.asarray(val_mask, dtype=bool).reshape(-1)
        self._tmp_tokens = self.out_dir / (TOKENS + ".tmp")
        self._file = open(self._tmp_tokens, "wb")
        self._offsets = [0]
        self.closed = False

    @property
    def num_samples(self) -> int:
        return len(self._offsets) - 1

    def add(self, ids) -> None:
        """Append one sample (a 1-D sequence of integer ids inside the vocabulary)."""
        if self.closed:
            raise StorageError(f"{self.out_dir}: the writer is closed")
        ids = np.asarray(ids)
        n = self.num_samples
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise StorageError(f"sample {n}: expected a non-empty 1-D array of integer ids, "
                               f"got shape {ids.shape} dtype {ids.dtype}")
        try:
            self.vocab.check_ids(ids)
        except VocabError as err:
            raise StorageError(f"sample {n}: {err}") from None
        self._file.write(ids.astype(TOKEN_DTYPE, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + ids.size)

    def close(self) -> Path:
        """Finish the data set; returns its directory."""
        if self.closed:
            return self.out_dir
        self.closed = True
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        n = self.num_samples
        problem = None
        if n == 0:
            problem = "no samples were added; a data set needs at least one"
        elif self.val_mask is not None and len(self.val_mask) != n:
            problem = f"val_mask has {len(self.val_mask)} entries for {n} samples"
        if problem:
            self._tmp_tokens.unlink(missing_ok=True)
            raise StorageError(f"{self.out_dir}: {problem}")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dims": list(self.vocab.dims),
            "bbox_min": [float(v) for v in self.workspace.bbox_min],
            "bbox_max": [float(v) for v in self.workspace.bbox_max],
            "voxel_size": float(self.workspace.voxel_size),
            "grasp_cells": self.grasp_cells,
            "dynamic_tags": list(self.vocab.dynamic_tags),
            "vocab_size": self.vocab.size,
            "num_samples": n,
            "num_tokens": self._offsets[-1],
            "token_dtype": "uint32",
            "source": self.source,
        }
        os.replace(self._tmp_tokens, self.out_dir / TOKENS)
        _write_atomic(self.out_dir / OFFSETS, np.asarray(self._offsets, dtype=OFFSET_DTYPE).tobytes())
        if self.val_mask is not None:
            _write_atomic(self.out_dir / VAL, self.val_mask.astype(np.uint8).tobytes())
            meta["split"] = {"val": VAL, "num_val": int(self.val_mask.sum())}
        _write_atomic(self.out_dir / META, (json.dumps(meta, indent=2) + "\n").encode())
        return self.out_dir

    def abort(self) -> None:
        """Drop what was written; the directory holds no data set afterwards."""
        if not self.closed:
            self.closed = True
            self._file.close()
        self._tmp_tokens.unlink(missing_ok=True)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def grasp_cells_of_meta(meta: dict) -> str:
    """The grasp-cell convention of a data set's meta.json. Sets written before the field existed have
    none: an import wrote "upstream import of ..." as its `source` (always, since import existed), and
    its cells are the research code's; every other set is the toolkit's synthetic data, on the scene grid."""
    if "grasp_cells" in meta:
        return check_grasp_cells(meta["grasp_cells"])
    return UPSTREAM_GRID if str(meta.get("source", "")).startswith("upstream import") else SCENE_GRID


@dataclass
class VerifyReport:
    num_samples: int
    max_id: int
    valid: int | None = None         # samples passing grammar.validate(strict=False); None unless full
    valid_strict: int | None = None  # samples passing grammar.validate(strict=True); None unless full


class TokenStore:
    """A read-only, memory-mapped data set. `store[i]` is sample i as a uint32 view of the file."""

    def __init__(self, path: Path, meta: dict, vocab: Vocab, workspace: Workspace, tokens: np.ndarray,
                 offsets: np.ndarray, val_mask: np.ndarray | None):
        self.path, self.meta, self.vocab, self.workspace = path, meta, vocab, workspace
        self.tokens, self.offsets, self.val_mask = tokens, offsets, val_mask
        self.lengths = np.diff(offsets)
        self.grasp_cells = grasp_cells_of_meta(meta)  # how its grasp cells map to metres
        # The mapped file itself (not its path: a data set replaced by a rename leaves this one intact).
        # Reading a mapped page that a truncation removed kills the process with SIGBUS, so every read
        # first checks the size, which costs one fstat.
        self._file = open(path / TOKENS, "rb")
        self._size = int(offsets[-1]) * TOKEN_DTYPE.itemsize

    @classmethod
    def open(cls, path: str | Path) -> "TokenStore":
        path = Path(path)
        if not path.is_dir():
            raise StorageError(f"{path}: no such data set directory; make one with "
                               f"`python -m graspGPT.data synth` or `python -m graspGPT.data import`")
        meta_path = path / META
        if not meta_path.is_file():
            hint = (f"it holds upstream .pth files: import them with `python -m graspGPT.data import --src {path} --out DIR`"
                    if any(path.glob("*.pth")) else
                    "it is not a toolkit data set, or its write never finished (write it again)")
            raise StorageError(f"{meta_path} is missing: {hint}")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StorageError(f"{meta_path}: unreadable ({err}); write the data set again") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StorageError(f"{meta_path}: not a {FORMAT} meta file; write the data set again")
        if meta.get("format_version") != FORMAT_VERSION:
            raise StorageError(f"{meta_path}: format_version {meta.get('format_version')!r} is not supported "
                               f"(this toolkit reads version {FORMAT_VERSION}); regenerate the data set with this toolkit")
        required = ("dims", "bbox_min", "bbox_max", "voxel_size", "dynamic_tags", "vocab_size",
                    "num_samples", "num_tokens", "token_dtype")
        missing = [k for k in required if k not in meta]
        if missing:
            raise StorageError(f"{meta_path}: missing keys {missing}; write the data set again")
        if meta["token_dtype"] != "uint32":
            raise StorageError(f"{meta_path}: token_dtype {meta['token_dtype']!r} is not supported (expected 'uint32')")
        try:
            vocab = Vocab(meta["dims"], meta["dynamic_tags"])
            workspace = Workspace(tuple(meta["bbox_min"]), tuple(meta["bbox_max"]), float(meta["voxel_size"]))
            grasp_cells_of_meta(meta)
        except (VocabError, TypeError, ValueError) as err:
            raise StorageError(f"{meta_path}: bad geometry or vocabulary ({err})") from None
        if meta["vocab_size"] != vocab.size:
            raise StorageError(f"{meta_path}: vocab_size {meta['vocab_size']} does not match dims {vocab.dims} with "
                               f"{len(vocab.dynamic_tags)} dynamic tags (V = {vocab.size}); the file was edited or is "
                               f"corrupt: restore it, or write the data set again")
        if tuple(meta["dims"]) != workspace.dims:
            raise StorageError(f"{meta_path}: dims {tuple(meta['dims'])} disagree with bbox/voxel_size, "
                               f"which give {workspace.dims}")
        n = meta["num_samples"]
        if n < 1:
            raise StorageError(f"{meta_path}: the data set is empty (num_samples = {n}); write one with samples")

        offsets_path, tokens_path = path / OFFSETS, path / TOKENS
        for p in (tokens_path, offsets_path):
            if not p.is_file():
                raise StorageError(f"{p} is missing; the data set is incomplete, write it again")
        if offsets_path.stat().st_size != (n + 1) * OFFSET_DTYPE.itemsize:
            raise StorageError(f"{offsets_path}: {offsets_path.stat().st_size} bytes, expected {(n + 1) * 8} "
                               f"for {n} samples; the file is truncated or corrupt, write the data set again")
        offsets = np.fromfile(offsets_path, dtype=OFFSET_DTYPE).astype(np.int64)
        if offsets[0] != 0 or (np.diff(offsets) <= 0).any():
            raise StorageError(f"{offsets_path}: offsets must start at 0 and strictly increase; the file is corrupt, "
                               f"write the data set again")
        size = tokens_path.stat().st_size
        if size != offsets[-1] * TOKEN_DTYPE.itemsize or offsets[-1] != meta["num_tokens"]:
            raise StorageError(f"{tokens_path}: {size} bytes, but the offsets and meta.json promise "
                               f"{int(offsets[-1])} tokens ({int(offsets[-1]) * 4} bytes); the file is truncated or "
                               f"corrupt, write the data set again")
        tokens = np.memmap(tokens_path, dtype=TOKEN_DTYPE, mode="r")

        val_mask = None
        if meta.get("split") is not None:
            split = meta["split"]
            val_path = path / str(split.get("val", "")) if isinstance(split, dict) else None
            if val_path is None or not val_path.is_file():
                raise StorageError(f"{meta_path}: the recorded split file {val_path} is missing; write the data set again")
            val_mask = np.fromfile(val_path, dtype=np.uint8)
            if len(val_mask) != n or val_mask.max() > 1:
                raise StorageError(f"{val_path}: expected {n} bytes of 0/1 (one per sample); write the data set again")
            val_mask = val_mask.astype(bool)
        return cls(path, meta, vocab, workspace, tokens, offsets, val_mask)

    def __reduce__(self):
        # Pickling (e.g. into spawned worker processes) reopens the files instead of copying the tokens.
        return TokenStore.open, (self.path.resolve(),)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sample {i} is out of range for {n} samples")
        i %= n
        size = os.fstat(self._file.fileno()).st_size
        if size < self._size:
            raise DataChangedError(
                f"{self.path / TOKENS} shrank from {self._size} to {size} bytes while this run was reading it (truncated "
                f"or rewritten in place); restore the data set, or write a new one to another directory, then "
                f"--resume auto")
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def split(self, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) sorted sample indices.

        A split recorded in the data set (val.u8) always wins and the arguments are ignored;
        otherwise the seeded random split of `split_indices(len(self), val_fraction, seed)`.
        """
        if self.val_mask is not None:
            return np.flatnonzero(~self.val_mask), np.flatnonzero(self.val_mask)
        return split_indices(len(self), val_fraction, seed)

    def verify(self, full: bool = False, chunk: int = 1 << 24) -> VerifyReport:
        """Check every id is inside the vocabulary (chunk by chunk, never the whole file in memory);
        with `full`, also count grammar-valid samples."""
        V = self.vocab.size
        max_id = 0
        for lo in range(0, self.num_tokens, chunk):
            part = self.tokens[lo:lo + chunk]
            m = int(part.max())
            if m >= V:
                pos = lo + int(np.argmax(part >= V))
                i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
                raise StorageError(f"{self.path / TOKENS}: sample {i} has id {m} at token {pos - self.offsets[i]}, "
                                   f"outside the vocabulary (V = {V}); the file is corrupt, write the data set again")
            max_id = max(max_id, m)
        report = VerifyReport(len(self), max_id)
        if full:
            report.valid = report.valid_strict = 0
            for i in range(len(self)):
                ids = self[i]
                if validate(ids, self.vocab, strict=True) is None:
                    report.valid_strict += 1
                    report.valid += 1
                elif validate(ids, self.vocab, strict=False) is None:
                    report.valid += 1
        return report
