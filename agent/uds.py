"""Unix-domain gRPC sockets for Envoy: stale file removed, parent 0750, socket 0666 (Envoy runs as uid 1337)."""
from __future__ import annotations

import contextlib
import os


def prepare(path: str) -> str:
    """Make the parent directory (0750) and remove a stale socket; returns the `unix:` target for grpc."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o750, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    rel = path[2:] if path.startswith("./") else path
    return f"unix:{rel}" if not rel.startswith("/") else f"unix://{rel}"


def publish(path: str) -> None:
    """Envoy (uid 1337) must be able to connect whatever uid the agent has."""
    os.chmod(path, 0o666)


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
