"""One istio-init run at a time per network namespace.

iptables' own xtables lock is held per command only, so two runs in one pod (a restarted init container racing its
predecessor, the CNI and an init container) would both read "no rules", both write, and the loser would fail on
"Chain already exists" — or roll its tables back over the winner's. The whole read-decide-write-routes sequence is
therefore serialized; the loser then reads the winner's rules and finds them "already in place".

The lock is an abstract-namespace Unix socket: its name lives in the network namespace itself (not in a file system
that two containers may not share), and the kernel frees it when the holder exits, even on SIGKILL: no stale locks.
"""
from __future__ import annotations

import _socket  # the C module: `socket` costs start-up time (see netinfo)
import time

LOCK_NAME = b"\0meshboot-iptables.lock"
WAIT_SECONDS = 30.0  # as long as iptables' own --wait=30
EADDRINUSE = 98


class LockTimeout(RuntimeError):
    """Another run held the namespace's lock for longer than the wait."""


def acquire(wait: float = WAIT_SECONDS, name: bytes = LOCK_NAME) -> _socket.socket:
    """Block until this process holds the netns lock (back-off 5 ms .. 100 ms); close the socket to release it."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    deadline = time.monotonic() + wait
    delay = 0.005
    while True:
        try:
            s.bind(name)
            return s
        except OSError as e:
            if e.errno != EADDRINUSE or time.monotonic() >= deadline:
                s.close()
                if e.errno == EADDRINUSE:
                    raise LockTimeout(f"another istio-iptables run in this network namespace held its lock for more "
                                      f"than {wait:g}s; nothing was changed") from None
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
