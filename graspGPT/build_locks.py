"""Build locks that a killed run left behind in torch's extensions cache.

DeepSpeed compiles its ops (FusedAdam on a GPU, CPUAdam with offload) just in time, under torch's
`FileBaton`: the first process creates `<extensions root>/[<python>_<accelerator>/]<op>/lock`, builds,
and deletes the file; every other process sleeps until the file is gone. A run killed during that
build (preemption, Ctrl-C, OOM) leaves the file, and every later run on the node would wait for it
forever, silently. A live builder keeps the file open, so a lock that no process on this host holds
is an orphan. An orphan older than ORPHAN_AGE_S is removed (with a warning); a younger one may
belong to a build on another node sharing this cache (a home directory on NFS), so it is only
reported. Called before the ranks meet, when no rank of this run can be building yet.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

ORPHAN_AGE_S = 300.0  # a build takes ~1 min; no live build of another node holds its lock this long


def extensions_root() -> Path:
    """Where torch builds extensions: TORCH_EXTENSIONS_DIR, else its per-user cache folder."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def build_locks(root: Path) -> list[Path]:
    """The lock files under `root`: <op>/lock, and <python>_<accelerator>/<op>/lock (the default layout)."""
    return sorted(p for pattern in ("*/lock", "*/*/lock") for p in root.glob(pattern) if p.is_file())


def open_files() -> set[str]:
    """The files that the processes of this host we may inspect hold open (their /proc/PID/fd links)."""
    held = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    held.add(os.readlink(fd))
                except OSError:
                    pass
        except OSError:  # the process ended, or is another user's
            pass
    return held


def clear_orphaned_locks(root: Path | None = None, warn=print) -> list[Path]:
    """Remove the orphaned build locks under `root` (default: extensions_root()); returns those removed.

    Warns once for each lock it removes and for each young orphan it leaves."""
    root = extensions_root() if root is None else root
    locks = build_locks(root) if root.is_dir() else []
    if not locks:
        return []
    held = open_files()
    removed = []
    for lock in locks:
        if str(lock.resolve()) in held:
            continue  # a build is running on this host: torch waits for it, as it should
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue  # its build just finished
        if age >= ORPHAN_AGE_S:
            try:
                lock.unlink(missing_ok=True)
            except OSError as err:  # not ours to remove (permissions): the user must
                warn(f"warning: {lock} is a build lock left by a killed build {age / 60:.0f} min ago and could not "
                     f"be removed ({err.strerror}); this run will wait for it until it is deleted")
                continue
            removed.append(lock)
            warn(f"warning: removed {lock}, a build lock left by a killed build {age / 60:.0f} min ago "
                 f"(it would have kept this run waiting forever)")
        else:
            warn(f"warning: {lock} is a build lock that no process on this host holds ({age:.0f} s old); "
                 f"if this run stalls while building a DeepSpeed op and no other node is building it, "
                 f"remove that file")
    return removed
