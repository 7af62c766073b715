"""Seeing whether a file is opened at all, by anyone in this process, C libraries such as HDF5 included.

`Fifo`: a named pipe standing in for a file behind a link. Opening a FIFO for reading blocks until a writer
appears, like a file on a dead network mount. A helper process plays that writer the moment a reader
arrives, counts the open and hangs up, so a test that opens it fails instead of hanging (the reader sees an
empty file). A process, not a thread: HDF5 holds the GIL while it blocks in open(). `OpenWatch`: counts
opens of a regular file through Linux inotify.
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys
from pathlib import Path

IN_OPEN = 0x20
EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then len bytes of name)

# argv[1]: the FIFO. Each line on stdin asks for the count so far; end of stdin stops it. The count is
# answered between two attempts, so an open that already unblocked a reader is always in it.
ANSWER_READERS = """
import errno, os, select, sys
opens = 0
while True:
    if select.select([sys.stdin], [], [], 0.005)[0]:
        if not sys.stdin.readline():
            break
        print(opens, flush=True)
    try:
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK)  # fails with ENXIO unless a reader waits
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
        continue
    opens += 1
    os.close(fd)  # the reader now sees end of file
"""


class Fifo:
    """A FIFO at `path` for the duration of a `with` block; `opens` counts the readers that opened it."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> "Fifo":
        os.mkfifo(self.path)
        self._writer = subprocess.Popen([sys.executable, "-c", ANSWER_READERS, str(self.path)], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self

    def __exit__(self, *exc) -> None:
        self._writer.stdin.close()
        try:
            self._writer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._writer.kill()
            self._writer.wait()

    @property
    def opens(self) -> int:
        self._writer.stdin.write("?\n")
        self._writer.stdin.flush()
        return int(self._writer.stdout.readline())


class OpenWatch:
    """Counts opens of the existing file `path` (by this or any process) while the `with` block runs."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._libc = ctypes.CDLL(None, use_errno=True)

    def __enter__(self) -> "OpenWatch":
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0 or self._libc.inotify_add_watch(self._fd, os.fsencode(self.path), IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), f"inotify cannot watch {self.path}")
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)

    def opens(self) -> int:
        """Opens since the last call (inotify queues an event before the open returns)."""
        count = 0
        while True:
            try:
                data = os.read(self._fd, 4096)
            except BlockingIOError:
                return count
            offset = 0
            while offset < len(data):
                _, mask, _, name_len = EVENT_HEADER.unpack_from(data, offset)
                count += bool(mask & IN_OPEN)
                offset += EVENT_HEADER.size + name_len
