"""One run per output directory: rank 0 holds `OUTPUT/.lock` for the life of the run.

The lock is an `flock` on that file. The kernel drops it when the holding process ends, however it
ends (exit, SIGKILL, the OOM killer), so a crashed run never leaves the directory stuck. The file
also records the holder (host, pid, start time), which a refused run names in its error.

Shared file systems: on NFS, Linux implements flock with byte-range locks that the server
arbitrates (NFSv4, and NFSv3 with lockd: the default mounts), so runs on different nodes exclude
each other. Mounted with `nolock` or `local_lock=flock|all` (NFS), or `localflock` (Lustre), the
lock is seen on one node only: two runs on two nodes would both be accepted, so do not start a run
twice there. Where the file system refuses flock altogether (Lustre without `-o flock`: ENOSYS,
ENOLCK, EOPNOTSUPP), the record decides: a holder on this host is alive while its pid runs with the
same start time; a holder on another host cannot be checked from here, so it holds the directory
until it removes the file itself, or an operator does.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"
UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class OutputLockError(RuntimeError):
    """The output directory is held by another run, or cannot be written; the message names it."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): tells a live
    holder from a later process that reuses its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # the command name may hold spaces; fields after it do not


def _record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "proc_start": _proc_start(os.getpid())}


def read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')}")


def holder_alive(holder: dict) -> bool:
    """Whether the recorded holder may still run. Only a holder on this host can be checked."""
    if holder.get("host") != socket.gethostname():
        return bool(holder)  # another host (or an unreadable record): assume it runs
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    start = _proc_start(pid)
    if start is None:
        try:
            os.kill(pid, 0)  # no /proc: fall back to "some process has this pid"
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return holder.get("proc_start") in (None, start)


class OutputLock:
    """`OutputLock.acquire(out)`: hold `out` or raise OutputLockError; `release()` when done."""

    def __init__(self, path: Path, fd: int, created_dir: bool):
        self.path, self.fd, self.created_dir = path, fd, created_dir

    @classmethod
    def acquire(cls, output_dir: Path) -> "OutputLock":
        output_dir = Path(output_dir)
        path = output_dir / LOCK_FILE
        created = not output_dir.exists()
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                lock = cls(path, fd, created)
                if lock._take():
                    return lock
                os.close(fd)  # the file was replaced while we waited for it: try the new one
        except OSError as exc:
            raise OutputLockError(f"--output_dir {output_dir}: cannot be written ({exc.strerror or exc}); choose a "
                                  f"writable directory") from None

    def _take(self) -> bool:
        """True once this process holds the file that is at `path` now; raises if someone else does."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._refuse(read_holder(self.path))
        except OSError as exc:
            if exc.errno not in UNSUPPORTED:
                raise
            holder = read_holder(self.path)  # no flock here: the record decides
            if holder and holder_alive(holder):
                self._refuse(holder)
        try:
            if os.fstat(self.fd).st_ino != os.stat(self.path).st_ino:
                return False  # the previous holder removed the file as we opened it
        except FileNotFoundError:
            return False
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(_record()).encode(), 0)
        return True

    def _refuse(self, holder: dict) -> None:
        os.close(self.fd)
        raise OutputLockError(f"--output_dir {self.path.parent} is in use by another run ({describe(holder)}); "
                              f"wait for it to end or stop it, or choose another --output_dir")

    def release(self) -> None:
        """Remove the file while still holding it (a waiting run then retries on a fresh file), then the
        directory if this run created it and left nothing in it (a refused start)."""
        if self.fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = -1
        if self.created_dir:
            try:
                self.path.parent.rmdir()
            except OSError:  # the run wrote files there: keep it
                pass
