"""Writing files so that nothing already written is lost, and one clear error when a write fails.

Every file ddp_kit writes whole (checkpoints and their sidecars, exported weights, the config copy, the
requeue marker, converted HDF5 files) goes through `atomic_path`: written beside its destination under a
hidden temporary name, fsynced, renamed over the destination, and the directory fsynced, so a reader, a
crash or a full disk leaves the old file or the complete new one, never a partial one. Any OS-level failure
on the way (a full disk, a quota, a read-only or vanished file system) becomes a `WriteError` that names the
file, the reason in words, the space the write needed and the space its file system has free.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Optional

# Temporary files are hidden and end in .tmp, so no scan for results can mistake one for a result.
TEMP_NAME = re.compile(r"^\..+\.tmp$")


class WriteError(RuntimeError):
    """A file could not be written; the message says which, why, and how much space was needed and free."""


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `directory`."""
    stats = os.statvfs(_existing_ancestor(Path(directory)))
    return stats.f_bavail * stats.f_frsize


def _mount_point(path: Path) -> Path:
    path = _existing_ancestor(path)
    while not os.path.ismount(path):
        path = path.parent
    return path


def _errno_of(error: OSError) -> Optional[int]:
    if error.errno:
        return error.errno
    # HDF5 reports the C library's errno only in its message: "... errno = 28, error message = '...'".
    match = re.search(r"errno = (\d+)", str(error))
    return int(match.group(1)) if match else None


def _os_error_in(exc: BaseException) -> Optional[OSError]:
    """The OSError that caused `exc`, following its chain: torch.save reports a full disk as a RuntimeError
    from its zip writer raised while handling the OSError of the failed write."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_failure(path: str | os.PathLike, reason: str, needed_bytes: Optional[int] = None) -> str:
    """'could not write PATH: REASON; it needs about N and MOUNT (the file system holding it) has M free'."""
    path = Path(path)
    where = _mount_point(path.parent)
    needs = f"it needs about {_size(needed_bytes)} and " if needed_bytes else ""
    return (f"could not write {path}: {reason}; {needs}{where} (the file system holding it) has "
            f"{_size(free_bytes(path.parent))} free")


def _reason(error: OSError) -> str:
    code = _errno_of(error)
    if code is None:
        return str(error)
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


@contextlib.contextmanager
def write_errors(path: str | os.PathLike, needed_bytes: Optional[int] = None) -> Iterator[None]:
    """Turn an OS-level failure inside the block (however wrapped) into a WriteError about `path`."""
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        failure = _os_error_in(exc)
        if failure is None:
            raise
        raise WriteError(describe_failure(path, _reason(failure), needed_bytes)) from exc


def require_free_space(path: str | os.PathLike, needed_bytes: int) -> None:
    """Fail before writing `path` when its file system cannot hold `needed_bytes` more."""
    if free_bytes(Path(path).parent) < needed_bytes:
        raise WriteError(describe_failure(path, "not enough free space, so nothing was written", needed_bytes))


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some network and FUSE filesystems cannot fsync a directory; the rename is atomic there all the same.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, needed_bytes: Optional[int] = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write the new file to. When the block succeeds it is fsynced,
    renamed over `path` and the directory fsynced; when it fails it is removed and `path` is untouched.
    OS-level failures are raised as WriteError (`needed_bytes`, if known, goes into the message)."""
    path = Path(path)
    temp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    with write_errors(path, needed_bytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield temp
            with open(temp, "rb") as written:
                os.fsync(written.fileno())
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        _fsync_directory(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *,
                 verify: Optional[Callable[[Path], None]] = None, needed_bytes: Optional[int] = None) -> None:
    """Write `path` atomically by calling `write(stream)`; `verify(temporary_path)` may refuse the result
    (by raising) before it replaces anything."""
    with atomic_path(path, needed_bytes) as temp:
        # Mode "xb": a new file (never an existing one), with the umask's permissions.
        with open(temp, "xb") as stream:
            write(stream)
        if verify is not None:
            verify(temp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda stream: stream.write(text.encode()))
