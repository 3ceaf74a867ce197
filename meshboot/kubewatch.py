"""Reading a Kubernetes watch stream: newline-separated JSON events, each bounded (shared by webhook/cabundle and
discovery/watch, which may not import each other)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator


class StreamError(Exception):
    """The stream is unusable (an oversized or unparsable line, an ERROR event other than 410)."""


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
