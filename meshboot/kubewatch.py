"""Reading a Kubernetes watch stream: newline-separated JSON events, each bounded (shared by webhook/cabundle and
discovery/watch, which may not import each other)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK")


class StreamError(Exception):
    """The stream is unusable (an oversized or unparsable line, an ERROR event other than 410)."""


class Gone(Exception):
    """410: the resourceVersion is too old; only a relist recovers."""


def event(parsed: Any) -> tuple[str, dict[str, Any]]:
    """One parsed watch event as (type, object): Gone for an ERROR 410, StreamError for another ERROR or anything
    that is not an event of a known type with an object (pure)."""
    kind = parsed.get("type") if isinstance(parsed, dict) else None
    raw = parsed.get("object") if isinstance(parsed, dict) else None
    if kind == "ERROR":
        code = raw.get("code") if isinstance(raw, dict) else 0
        message = str(raw.get("message", ""))[:300] if isinstance(raw, dict) else ""
        if code == 410:
            raise Gone(message)
        raise StreamError(f"watch ERROR {code}: {message}")
    if kind not in EVENT_TYPES or not isinstance(raw, dict):
        raise StreamError(f"an unknown watch event {str(kind)[:40]!r}")
    return kind, raw


def lines(chunks: Iterable[bytes], cap: int) -> Iterator[bytes]:
    """Non-blank lines from a byte stream; StreamError for any line longer than `cap`, complete or still waiting
    for its newline, so neither the buffer nor a yielded line outgrows the cap (pure)."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            if end - start > cap:
                break
            line = bytes(buf[start:end])
            start = end + 1
            if line.strip():
                yield line
        del buf[:start]
        if len(buf) > cap:
            raise StreamError(f"a watch event longer than {cap} bytes")
    if buf.strip():
        yield bytes(buf)
