"""Build locks a killed DeepSpeed op build left behind: removed before the ranks meet, live ones kept.
(That a launched run starts past one: tests/test_train.py, test_launcher_script_from_another_directory.)"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from torch.utils.file_baton import FileBaton

from graspGPT.build_locks import ORPHAN_AGE_S, clear_orphaned_locks


def make_lock(path, age_s: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_old_orphans_are_removed_and_torch_no_longer_waits(tmp_path):
    flat = make_lock(tmp_path / "fused_adam" / "lock", 3600)  # the TORCH_EXTENSIONS_DIR layout
    nested = make_lock(tmp_path / "py311_cpu" / "cpu_adam" / "lock", ORPHAN_AGE_S + 5)  # the default layout
    said = []
    assert clear_orphaned_locks(tmp_path, warn=said.append) == sorted([flat, nested])
    assert not flat.exists() and not nested.exists()
    assert FileBaton(str(flat)).try_acquire()  # what torch's build does first: it builds instead of waiting
    assert len(said) == 2 and all("removed" in s and "killed build" in s for s in said)


def test_a_lock_a_live_build_holds_is_kept(tmp_path):
    lock = make_lock(tmp_path / "fused_adam" / "lock", 3600)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1]); print(1, flush=True); "
                               "sys.stdin.read()", str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"  # it holds the file open, as torch's FileBaton does
        said = []
        assert clear_orphaned_locks(tmp_path, warn=said.append) == [] and lock.exists() and said == []
    finally:
        holder.communicate("")
    assert clear_orphaned_locks(tmp_path, warn=lambda _: None) == [lock]  # its holder gone: an orphan


def test_a_young_orphan_is_reported_not_removed(tmp_path):
    """It may be a build on another node that shares this cache (an NFS home): only say where it is."""
    lock = make_lock(tmp_path / "py311_cu130" / "fused_adam" / "lock", 20)
    said = []
    assert clear_orphaned_locks(tmp_path, warn=said.append) == [] and lock.exists()
    assert len(said) == 1 and str(lock) in said[0] and "remove that file" in said[0]
    assert clear_orphaned_locks(tmp_path / "missing", warn=said.append) == []  # no cache yet: nothing to do

