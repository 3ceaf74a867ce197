"""Files the parts write and watch: one atomic writer, and change detection for mounted files without inotify.

kubelet updates a mounted volume by swapping the `..data` symlink, so the file behind a path gets a new inode; a
rewrite in place changes mtime or size. A stamp catches both, and costs one stat per file per poll.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable

Stamp = tuple[int, int, int] | None


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
