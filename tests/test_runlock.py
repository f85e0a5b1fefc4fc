"""The output-directory lock: one holder, named in the refusal; a killed holder leaves nothing stuck."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import hold_output_dir
from graspGPT import runlock
from graspGPT.runlock import LOCK_FILE, OutputLock, OutputLockError

def test_second_holder_is_refused_with_the_holders_name(tmp_path):
    out = tmp_path / "out"
    child = hold_output_dir(out)
    try:
        with pytest.raises(OutputLockError) as err:
            OutputLock.acquire(out)
        message = str(err.value)
        assert f"--output_dir {out} is in use by another run" in message and "\n" not in message
        assert f"host {socket.gethostname()}, pid {child.pid}, started 20" in message
    finally:
        child.kill()
        child.wait()


def test_a_killed_holder_leaves_the_directory_free(tmp_path):
    out = tmp_path / "out"
    child = hold_output_dir(out)
    child.kill()  # SIGKILL: no clean-up runs; the kernel drops the lock
    child.wait()
    assert (out / LOCK_FILE).exists()  # the stale record is still there ...
    lock = OutputLock.acquire(out)  # ... and does not matter
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_release_removes_the_file_and_a_directory_it_created_if_empty(tmp_path):
    fresh = tmp_path / "a" / "fresh"
    OutputLock.acquire(fresh).release()
    assert not fresh.exists()  # a refused start leaves no trace
    used = tmp_path / "used"
    lock = OutputLock.acquire(used)
    (used / "config.json").write_text("{}")
    lock.release()
    assert sorted(p.name for p in used.iterdir()) == ["config.json"]
    existing = tmp_path / "existing"
    existing.mkdir()
    OutputLock.acquire(existing).release()
    assert existing.is_dir() and not list(existing.iterdir())


def test_unwritable_output_dir_is_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputLockError, match=f"--output_dir {blocker / 'out'}: cannot be written"):
        OutputLock.acquire(blocker / "out")


@pytest.fixture
def no_flock(monkeypatch):
    """A file system that refuses flock (Lustre without -o flock)."""
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(runlock.fcntl, "flock", refuse)


def test_without_flock_a_live_holder_on_this_host_is_refused(tmp_path, no_flock):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        time.sleep(0.2)
        out.mkdir()
        (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "started": "then",
                                                 "proc_start": runlock._proc_start(sleeper.pid)}))
        with pytest.raises(OutputLockError, match=f"pid {sleeper.pid}, started then"):
            OutputLock.acquire(out)
    finally:
        sleeper.kill()
        sleeper.wait()
    OutputLock.acquire(out).release()  # the same record, its process gone: taken over


def test_without_flock_a_reused_pid_or_another_host(tmp_path, no_flock):
    out = tmp_path / "out"
    out.mkdir()
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": "then", "proc_start": "1"}
    (out / LOCK_FILE).write_text(json.dumps(record))  # our pid, but another process's start time
    OutputLock.acquire(out).release()
    (out / LOCK_FILE).write_text(json.dumps({**record, "host": "elsewhere"}))  # cannot be checked from here
    with pytest.raises(OutputLockError, match="host elsewhere"):
        OutputLock.acquire(out)
