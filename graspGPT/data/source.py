"""Where a run's data comes from: a toolkit data set, a directory of upstream .pth files, or the
built-in synthetic data set (generated once and cached)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .storage import DatasetWriter
from .vocab import SCENE_GRID, Vocab, Workspace

SYNTH_FORMAT = 1  # bump when the generator changes what a seed produces, so caches are rebuilt


class DataSourceError(ValueError):
    """A data path that cannot be used; the message says what to do."""


def cache_root() -> Path:
    """`$GRASPGPT_CACHE`, else `~/.cache/graspgpt`."""
    return Path(os.environ.get("GRASPGPT_CACHE") or Path.home() / ".cache" / "graspgpt")


def synth_workers(num_scenes: int) -> int:
    """Processes for generating scenes: every core for a large set (starting one costs seconds)."""
    return min(os.cpu_count() or 1, 32) if num_scenes >= 2000 else 1


def builtin_dataset(num_scenes: int, seed: int, voxel_size: float, task_mix: str, max_grasps_per_object: int,
                    root: Path | None = None, progress: bool = False) -> Path:
    """The synthetic data set for these settings, generated on first use and reused afterwards.

    Safe to call from several processes at once: each writes a private temporary directory
    and renames it into place; whoever loses the race uses the winner's copy.
    """
    from .synth import generate_scenes

    key = json.dumps([SYNTH_FORMAT, num_scenes, seed, voxel_size, task_mix, max_grasps_per_object])
    name = f"synthetic-{num_scenes}x-seed{seed}-vox{voxel_size:g}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    root = root or cache_root()
    final = root / name
    if (final / "meta.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    workspace = Workspace(voxel_size=voxel_size)
    vocab = Vocab.for_workspace(workspace)
    with DatasetWriter(tmp, vocab, workspace, source=f"graspGPT built-in synthetic data ({key})",
                       grasp_cells=SCENE_GRID) as writer:  # synth puts grasp points in scene voxels
        for ids in generate_scenes(num_scenes, seed, workspace, task_mix=task_mix,
                                   max_grasps_per_object=max_grasps_per_object, progress=progress,
                                   workers=synth_workers(num_scenes)):
            writer.add(ids)
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_data_dir(dataset_cfg, seed: int, progress: bool = False) -> Path:
    """The toolkit data set directory for `dataset.data_path` (None -> the built-in one)."""
    if dataset_cfg.data_path is None:
        return builtin_dataset(dataset_cfg.synthetic_scenes, seed, dataset_cfg.synthetic_voxel_size,
                               dataset_cfg.synthetic_task_mix, dataset_cfg.max_grasps_per_object, progress=progress)
    path = Path(dataset_cfg.data_path).expanduser()
    if not path.exists():
        raise DataSourceError(f"--data_path {path}: no such file or directory; give a toolkit data set "
                              f"(made by `python -m graspGPT.data synth/import`) or a directory of upstream .pth files")
    if path.is_file() and path.suffix != ".pth":
        raise DataSourceError(f"--data_path {path}: a file, not a data set; give a toolkit data set directory, a "
                              f"directory of upstream .pth files, or one .pth file")
    if (path / "meta.json").is_file():
        return path
    from .upstream import ensure_toolkit_dataset
    return ensure_toolkit_dataset(path, cache_root() / "imported", dataset_cfg.real_filter_mode)

