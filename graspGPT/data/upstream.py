"""Import upstream GraspGPT *.pth files into a toolkit data set.

Upstream files are pickles (torch.save of a list of dicts). They are read with
`torch.load(weights_only=True)` and only the numpy types their metadata needs allowed, so a
crafted file is refused instead of run.

Token ids are copied unchanged, except for three forms that the research code's parser reads
without error although they break the format's `scene ... end` frame. Import writes them as that
code's own parser + serializer would (`canonical_ids`), so every sequence it accepts is imported
as a valid one, and the report counts each change:
  * no leading `scene` (its "legacy format"): `scene` is put in front;
  * tokens after the first `end` (it stops reading there): they are dropped;
  * no `end` at all (it reads to the end of the list): `end` is appended.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .grammar import validate
from .storage import DatasetWriter, check_out_dir
from .vocab import UPSTREAM_GRID, Vocab, VocabError, Workspace

REAL_FILTER_MODES = ("allow_all", "no_amodal_unseg", "amodal_only", "unseg_only", "skip")
REQUIRED_KEYS = ("raw_tokens", "volume_dims", "bbox_min", "bbox_max", "voxel_size")


class UpstreamError(ValueError):
    """An upstream file or directory that cannot be imported; the message names the file and the fix."""


def _numpy_safe_globals() -> list:
    """Exactly what unpickling numpy arrays, dtypes and scalars needs, under numpy 2 and numpy 1 names."""
    import numpy.dtypes as dt
    from numpy._core import multiarray

    return [
        np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar,
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),  # files written under numpy 1.x
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        # Rebuilding a dtype calls its __setstate__, which is checked against its class.
        dt.Int64DType, dt.Int32DType, dt.Float64DType, dt.Float32DType,
    ]


def load_pth(path: Path):
    """torch.load with the restricted unpickler; refuses anything but plain data."""
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or ["no detail"]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
        detail = detail.replace("WeightsUnpickler error:", "").split(" Please use")[0].strip()
        raise UpstreamError(f"{path}: not a plain data file, refused by the restricted loader ({detail}); it is "
                            f"corrupt or may try to run code. Only load .pth files from trusted sources") from None
    except Exception as err:  # torch raises RuntimeError/EOFError/... for files that are not torch saves at all
        raise UpstreamError(f"{path}: cannot read as a torch .pth file ({type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no detail'})") from None


def list_upstream_files(src: str | Path) -> list[Path]:
    """The .pth files of `src`: the file itself, or the top level of a directory sorted by name."""
    src = Path(src).expanduser()
    if not src.exists():
        raise UpstreamError(f"{src}: no such file or directory; give the directory that holds the upstream .pth files "
                            f"(or one .pth file)")
    if src.is_file():
        return [src]
    files = sorted(p for p in src.iterdir() if p.suffix == ".pth" and p.is_file())
    if not files:
        nested = sorted({p.parent.name for p in src.glob("*/*.pth")})
        hint = (f"; subdirectories {nested[:5]} hold some: point the data path at one of them"
                if nested else "; point the data path at the folder that directly holds the .pth files")
        raise UpstreamError(f"{src}: no *.pth files at its top level (subdirectories are not read){hint}")
    return files


def _floats(value, what: str) -> tuple[float, ...]:
    """Floats written at their own precision's shortest form, so float32 0.3 reads back as 0.3 and the
    grid arithmetic matches the float64 the data was generated with."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{what} must be numbers, got {arr.dtype}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    return tuple(float(np.format_float_positional(x, unique=True, trim="0")) for x in arr.reshape(-1))


@dataclass(frozen=True)
class Geometry:
    dims: tuple[int, int, int]
    bbox_min: tuple[float, float, float]
    bbox_max: tuple[float, float, float]
    voxel_size: float

    @classmethod
    def of_sample(cls, s: dict) -> "Geometry":
        dims = np.asarray(s["volume_dims"]).reshape(-1)
        if dims.shape != (3,) or dims.dtype.kind not in "iu":
            raise ValueError(f"volume_dims must be 3 integers, got {s['volume_dims']!r}")
        lo, hi, vox = _floats(s["bbox_min"], "bbox_min"), _floats(s["bbox_max"], "bbox_max"), _floats(s["voxel_size"], "voxel_size")
        if len(lo) != 3 or len(hi) != 3 or len(vox) != 1:
            raise ValueError(f"bbox_min/bbox_max must hold 3 numbers and voxel_size one, got {len(lo)}, {len(hi)}, {len(vox)}")
        vox = vox[0]
        if not vox > 0 or any(b <= a for a, b in zip(lo, hi)):
            raise ValueError(f"need voxel_size > 0 and bbox_max > bbox_min, got voxel_size {vox}, bbox {lo}..{hi}")
        geo = cls(tuple(int(d) for d in dims), lo, hi, vox)
        if geo.dims != geo.workspace.dims:
            raise ValueError(f"volume_dims {geo.dims} disagree with bbox {lo}..{hi} and voxel_size {vox}, which give "
                             f"ceil(extent / voxel_size) = {geo.workspace.dims}")
        return geo

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.bbox_min, self.bbox_max, self.voxel_size)

    def same(self, other: "Geometry") -> bool:
        mine = self.bbox_min + self.bbox_max + (self.voxel_size,)
        theirs = other.bbox_min + other.bbox_max + (other.voxel_size,)
        return self.dims == other.dims and np.allclose(mine, theirs, rtol=1e-6, atol=1e-9)

    def describe(self) -> str:
        return f"dims {self.dims}, bbox {self.bbox_min}..{self.bbox_max}, voxel_size {self.voxel_size}"


def _token_array(raw, where: str) -> np.ndarray:
    if hasattr(raw, "numpy"):  # an int tensor
        raw = raw.detach().cpu().numpy()
    ids = np.asarray(raw)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise UpstreamError(f"{where}: raw_tokens must be a non-empty list (or 1-D tensor) of ints, "
                            f"got {type(raw).__name__} of dtype {ids.dtype} and shape {ids.shape}")
    return ids.astype(np.int64, copy=False)


def keep_sample(ids: np.ndarray, vocab: Vocab, mode: str) -> bool:
    """Upstream's real_filter_mode for one sample of a `real` file ('skip' drops files before this)."""
    if mode == "allow_all":
        return True
    amodal, unseg = bool((ids == vocab.amodal).any()), bool((ids == vocab.segment).any())
    return {"no_amodal_unseg": not amodal and not unseg, "amodal_only": amodal, "unseg_only": unseg}[mode]


def canonical_ids(ids: np.ndarray, vocab: Vocab) -> tuple[np.ndarray, list[str]]:
    """`ids` in the form the research parser + serializer give it, and what was changed (see the module doc)."""
    changes = []
    ends = np.flatnonzero(ids == vocab.end)
    if ends.size and ends[0] != len(ids) - 1:
        ids = ids[: ends[0] + 1]
        changes.append("tokens after 'end' dropped")
    if ids[0] != vocab.scene:
        ids = np.concatenate([[vocab.scene], ids])
        changes.append("'scene' added in front")
    if not ends.size:
        ids = np.append(ids, vocab.end)
        changes.append("'end' appended")
    return ids.astype(np.int64, copy=False), changes


def _canonical_or_raise(ids: np.ndarray, vocab: Vocab, where: str, hint: str) -> tuple[np.ndarray, list[str]]:
    """canonical_ids when that is a valid sequence; else `ids` unchanged if it ends in `end` (counted
    grammar-invalid later), else an UpstreamError: what a truncated file or another vocabulary looks like
    (with dynamic tags every command id shifts, so `end` is read as something else)."""
    fixed, changes = canonical_ids(ids, vocab)
    if not changes or validate(fixed, vocab, strict=False) is None:
        return fixed, changes
    if ids[-1] != vocab.end:
        raise UpstreamError(f"{where}the last token is '{vocab.token_of(ids[-1])}', not 'end' (id {vocab.end}), and "
                            f"the sequence does not parse even read as the research parser reads it; the file is "
                            f"truncated or was made with another vocabulary{hint}")
    return ids, []


@dataclass
class FileReport:
    name: str
    samples: int = 0          # in the file
    kept: int = 0             # written to the data set
    filtered: int = 0         # removed by real_filter_mode
    invalid: int = 0          # grammar-invalid (strict=False) among the samples that passed the filter
    normalised: int = 0       # kept samples rewritten by canonical_ids
    first_normalised: str = ""  # its first change, for the report
    skipped: bool = False     # the whole file, by real_filter_mode=skip
    first_invalid: str = ""   # the first grammar error, for the report


@dataclass
class ImportReport:
    out_dir: Path
    vocab: Vocab | None  # None until the first sample is read
    real_filter_mode: str
    drop_invalid: bool
    files: list[FileReport] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(f.kept for f in self.files)

    @property
    def num_invalid(self) -> int:
        return sum(f.invalid for f in self.files)

    def summary(self) -> str:
        lines = []
        for f in self.files:
            if f.skipped:
                lines.append(f"  {f.name}: skipped (real_filter_mode=skip)")
                continue
            line = f"  {f.name}: {f.samples} samples, kept {f.kept}, filtered {f.filtered}"
            if f.normalised:
                line += f", {f.normalised} normalised (first: {f.first_normalised})"
            if f.invalid:
                line += (f", {f.invalid} grammar-invalid ({'dropped' if self.drop_invalid else 'kept'}; "
                         f"first: {f.first_invalid})")
            lines.append(line)
        total = sum(f.samples for f in self.files)
        invalid = (f"{self.num_invalid} grammar-invalid samples "
                   f"{'dropped' if self.drop_invalid else 'kept (pass --drop_invalid to drop them)'}")
        normalised = sum(f.normalised for f in self.files)
        if normalised:
            lines.append(f"{normalised} samples normalised to the scene ... end frame, as the research parser reads them")
        lines.append(f"imported {self.num_samples} of {total} samples from {len(self.files)} files into "
                     f"{self.out_dir} (V = {self.vocab.size}, real_filter_mode={self.real_filter_mode}); {invalid}")
        return "\n".join(lines)


def _read_samples(path: Path) -> list:
    samples = load_pth(path)
    if not isinstance(samples, (list, tuple)):
        raise UpstreamError(f"{path}: expected a list of sample dicts (the upstream format), got {type(samples).__name__}")
    if not samples:
        raise UpstreamError(f"{path}: holds no samples (an empty list); remove the file or regenerate it")
    return samples


def _unpack(s, where: str) -> tuple[Geometry, np.ndarray]:
    """A sample's geometry and ids, or an UpstreamError saying what is wrong with it."""
    if not isinstance(s, dict):
        raise UpstreamError(f"{where}: expected a dict, got {type(s).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in s]
    if missing:
        raise UpstreamError(f"{where}: missing keys {missing} (an upstream sample has {list(REQUIRED_KEYS)})")
    try:
        geo = Geometry.of_sample(s)
    except ValueError as err:
        raise UpstreamError(f"{where}: {err}") from None
    return geo, _token_array(s["raw_tokens"], where)


def import_upstream(src: str | Path, out_dir: str | Path, real_filter_mode: str = "allow_all",
                    drop_invalid: bool = False, categories: str | Path | None = None,
                    progress: bool = False, overwrite: bool = False) -> ImportReport:
    """Convert upstream .pth file(s) at `src` into a toolkit data set at `out_dir`.

    Every sample is checked (dict with the upstream keys, geometry agreeing across all files and
    with dims = ceil(extent / voxel_size), ids inside the vocabulary); a failure raises UpstreamError
    naming the file and sample. Sequences are written in their canonical form (`canonical_ids`). Grammar-invalid samples are counted and kept
    unless `drop_invalid`. `categories` is the JSON vocabulary file of dynamic tags, if the data used one.
    """
    if real_filter_mode not in REAL_FILTER_MODES:
        raise UpstreamError(f"real_filter_mode {real_filter_mode!r} is not one of {', '.join(REAL_FILTER_MODES)}")
    files = list_upstream_files(src)
    try:
        dynamic_tags = Vocab.read_categories(categories) if categories is not None else []
    except VocabError as err:
        raise UpstreamError(str(err)) from None
    hint = "" if dynamic_tags else " (pass --categories with the vocabulary file if the data was made with one)"
    check_out_dir(out_dir, overwrite)  # before the slow part
    report = ImportReport(Path(out_dir), None, real_filter_mode, drop_invalid)
    first: tuple[Geometry, str] | None = None  # the geometry every sample must share, and where it came from
    writer: DatasetWriter | None = None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(files), unit="file", desc="import", dynamic_ncols=True)
    try:
        for path in files:
            rep = FileReport(path.name)
            report.files.append(rep)
            real = "real" in path.name
            if real and real_filter_mode == "skip":
                rep.skipped = True
                continue
            samples = _read_samples(path)
            rep.samples = len(samples)
            for i, s in enumerate(samples):
                where = f"{path}: sample {i}"
                geo, ids = _unpack(s, where)
                if first is None:
                    first = geo, where
                    report.vocab = vocab = Vocab(geo.dims, dynamic_tags)
                    writer = DatasetWriter(out_dir, vocab, geo.workspace, source="", overwrite=overwrite,
                                           grasp_cells=UPSTREAM_GRID)  # the research code's grasp encoder
                elif not geo.same(first[0]):
                    raise UpstreamError(f"{where}: {geo.describe()} disagrees with {first[1]} ({first[0].describe()}); "
                                        f"all files of a data set must share one grid")
                try:
                    vocab.check_ids(ids)
                except VocabError as err:
                    raise UpstreamError(f"{where}: {err}{hint}") from None
                ids, changes = _canonical_or_raise(ids, vocab, f"{where}: ", hint)
                if real and not keep_sample(ids, vocab, real_filter_mode):
                    rep.filtered += 1
                    continue
                err = validate(ids, vocab, strict=False)
                if err is not None:
                    rep.invalid += 1
                    rep.first_invalid = rep.first_invalid or f"sample {i}: {err}"
                    if drop_invalid:
                        continue
                writer.add(ids)
                rep.kept += 1
                if changes:
                    rep.normalised += 1
                    rep.first_normalised = rep.first_normalised or f"sample {i}: {', '.join(changes)}"
            if bar is not None:
                bar.update()
        if writer is None or writer.num_samples == 0:
            raise UpstreamError(f"{src}: no samples left to import (real_filter_mode={real_filter_mode}"
                                f"{', drop_invalid' if drop_invalid else ''}); choose another filter mode")
        writer.source = (f"upstream import of {Path(src).expanduser().resolve()} ({len(files)} files, "
                         f"real_filter_mode={real_filter_mode}, drop_invalid={drop_invalid}): kept "
                         f"{report.num_samples} samples, {report.num_invalid} grammar-invalid")
        writer.close()
        return report
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()


def _cache_key(files: list[Path], src: Path, real_filter_mode: str, categories: Path | None) -> str:
    h = hashlib.sha256()
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    cats = hashlib.sha256(categories.read_bytes()).hexdigest() if categories is not None else None
    h.update(json.dumps([str(src), stats, real_filter_mode, cats]).encode())
    return f"{src.name}-{real_filter_mode}-{h.hexdigest()[:16]}"


def ensure_toolkit_dataset(path: str | Path, cache_root: str | Path, real_filter_mode: str = "allow_all",
                           categories: str | Path | None = None, progress: bool = False) -> Path:
    """A toolkit data set for `path`: `path` itself if it is one, else an import of its .pth files,
    cached under `cache_root` by (absolute path, file names, sizes, mtimes, filter mode, categories).

    Safe for several ranks at once: each imports into a private temporary directory and renames it
    into place; a rank that loses the race removes its copy and uses the winner's.
    """
    path = Path(path).expanduser()
    if (path / "meta.json").is_file():
        return path
    files = list_upstream_files(path)
    categories = Path(categories).expanduser() if categories is not None else None
    if categories is not None and not categories.is_file():
        raise UpstreamError(f"{categories}: no such vocabulary file; give the JSON file with the `categories` list")
    final = Path(cache_root) / _cache_key(files, path.resolve(), real_filter_mode, categories)
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        import_upstream(path, tmp, real_filter_mode, categories=categories, progress=progress)
        os.rename(tmp, final)
    except OSError:
        if not (final / "meta.json").is_file():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

