"""Change detection for mounted files (ConfigMaps, Secrets, certificates) without inotify.

kubelet updates a mounted volume by swapping the `..data` symlink, so the file behind a path gets a new inode; a
rewrite in place changes mtime or size. A stamp catches both, and costs one stat per file per poll.
"""
from __future__ import annotations

import os
from typing import Iterable

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
