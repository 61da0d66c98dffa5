"""One job per output file: an exclusive lock file beside the output.

`OutputLock(output)` holds `<output>.lock` with `fcntl.flock` for as long as the job runs; the
file holds the holder's `pid@host` so a refused job can name it. flock is released by the kernel
when its holder dies (even by SIGKILL), so a lock file left by a killed job is free: the next job
takes it over and warns, naming the dead holder. A job on a different output (another shard of a
multi-host job) locks a different file and is never blocked.

Limit: flock is only as good as the filesystem's support for it. Local filesystems and NFSv4
honour it; some FUSE mounts accept it without excluding processes on other hosts.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Callable

from jaxprefill.infer.job_files import JobError, warn_stderr


class OutputLockedError(JobError):
    """Another live job holds the output's lock."""


def lock_path(output: str | os.PathLike) -> Path:
    """`<output>.lock`."""
    return Path(f"{os.fspath(output)}.lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class OutputLock:
    """Exclusive lock on one job output; a context manager (`with OutputLock(out): ...`).

    `acquire` raises OutputLockedError ("... in use by pid@host") while another process holds
    it, and takes over (with a warning) a lock file whose holder is gone.
    """

    def __init__(self, output: str | os.PathLike,
                 warn: Callable[[str], None] = warn_stderr) -> None:
        self.output = Path(output)
        self.path = lock_path(output)
        self.warn = warn
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "OutputLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this OutputLock")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise JobError(f"cannot create the lock file {self.path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd, retry=True)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OutputLockedError(
                        f"{self.output} is in use by another job ({holder or 'holder unknown'}); "
                        f"wait for it to finish (lock file {self.path})") from None
                raise JobError(f"cannot lock {self.path}: {e.strerror}") from None
            # The previous holder unlinks the file on release: if that happened between our
            # open and flock, we locked an orphaned inode; start over on the current path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd, retry=False)
        if previous:
            self.warn(f"took over the lock on {self.output} left by {previous}"
                      f"{_holder_state(previous)}; its finished results are kept")
        me = f"{os.getpid()}@{socket.gethostname()}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked, so nobody takes a file about to vanish
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int, retry: bool) -> str:
    """The `pid@host` in a lock file; a new holder writes it just after locking, so a reader
    that finds it empty waits a moment once."""
    for attempt in range(2 if retry else 1):
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
        if text:
            return text
        if attempt == 0 and retry:
            time.sleep(0.1)
    return ""


def _holder_state(holder: str) -> str:
    pid, _, host = holder.partition("@")
    if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
        return " (that process is no longer running)"
    return " (it no longer holds the lock)"
