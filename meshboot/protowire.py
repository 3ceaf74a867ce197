"""Protobuf's base-128 varint, the one piece of the wire format both hand-framers need: the agent's codec
(agent/xds/wire.py, hand-written for its memory budget) and discovery's response framing (discovery/ads.py, which
joins pre-serialized resources). Free of imports: the agent loads it."""
from __future__ import annotations


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
