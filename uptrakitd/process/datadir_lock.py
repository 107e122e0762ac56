"""One daemon per data dir: an exclusive lock held for the process's life, naming the holder's PID."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path


class DataDirInUse(Exception):
    """Another process holds the data dir; the message names its PID."""


class DataDirLock:
    """An flock on `<data-dir>/uptrakitd.lock`; the kernel drops it when the process dies (kill -9 too)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "uptrakitd.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise DataDirInUse."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(f"data dir {self.path.parent} is in use by another uptrakitd (PID {holder}); "
                               "stop it first, or give this one another --data-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let go (once; later calls do nothing)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
