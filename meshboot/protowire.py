"""Protobuf's wire format, the pieces every hand-framer here shares: the base-128 varint (the agent's codec,
agent/xds/wire.py, hand-written for its memory budget; discovery's response framing, discovery/ads.py, which joins
pre-serialized resources) and the one field reader (the agent's codec and the NDS table, meshboot/nds.py). Free of
imports: the agent loads it."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


class WireError(ValueError):
    """Malformed protobuf bytes; the message says how."""


def varint(n: int) -> bytes:
    """`n` as a varint; negative int32/int64 values as protobuf writes them (ten bytes, two's complement)."""
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
    """The varint at `buf[i]` and the index after it."""
    shift = result = 0
    while True:
        if i >= len(buf):
            raise WireError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each field, one at a time (a caller that stops at a bound never holds
    the rest); varints as int, length-delimited as bytes, fixed-width fields skipped."""
    i, n = 0, len(buf)
    while i < n:
        tag, i = read_varint(buf, i)
        num, wt = tag >> 3, tag & 7
        if num == 0:
            raise WireError("field number 0")
        if wt == 0:
            v, i = read_varint(buf, i)
            yield num, wt, v
        elif wt == 2:
            size, i = read_varint(buf, i)
            if size > n - i:
                raise WireError("length-delimited field runs past the end")
            yield num, wt, buf[i:i + size]
            i += size
        elif wt in (1, 5):
            i += 8 if wt == 1 else 4
            if i > n:
                raise WireError("truncated fixed-width field")
        else:
            raise WireError(f"unsupported wire type {wt}")
