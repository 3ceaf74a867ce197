"""Files the parts read, write and watch: one bounded reader, one atomic writer, and change detection for mounted
files without inotify.

kubelet updates a mounted volume by swapping the `..data` symlink, so the file behind a path gets a new inode; a
rewrite in place changes mtime or size. A stamp catches both, and costs one stat per file per poll.
"""
from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterable

Stamp = tuple[int, int, int] | None


def read_regular(path: str, limit: int) -> bytes:
    """A regular file of at most `limit` bytes, opened non-blocking: a path someone else chose (XDS config's SDS
    names, a tenant's ProxyConfig) must not hang the reader on a FIFO or fill it from /dev/zero. ValueError names
    the path (cut to 200 characters) and why not."""
    shown = path if len(path) <= 200 else path[:200] + "…"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as e:
        raise ValueError(f"{shown}: {getattr(e, 'strerror', None) or 'invalid path'}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{shown}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ValueError(f"{shown}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{shown}: larger than {limit} bytes")
    return data


def stamp(path: str) -> Stamp:
    """(inode, mtime ns, size) of what `path` points at now; None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def stamps(paths: Iterable[str]) -> tuple[Stamp, ...]:
    return tuple(stamp(p) for p in paths)


def write_atomic(path: str, data: bytes, mode: int = 0o644, *, skip_if_same: bool = False) -> bool:
    """Write through a temp file in the same directory and rename it over `path`, so a reader (or a crash) never sees
    half a file. With `skip_if_same`, an identical file is left alone (no new inode, no spurious reload). Returns
    whether it wrote."""
    if skip_if_same:
        try:
            with open(path, "rb") as f:
                if f.read(len(data) + 1) == data:
                    return False
        except OSError:
            pass
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    # No tempfile module: istio-init's start-up is a measured budget. O_EXCL makes the name ours alone.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{time.monotonic_ns()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True
