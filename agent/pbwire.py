"""Protobuf wire format, by hand, for the few small messages the agent exchanges (CA, SDS, ADS framing).

Why not generated classes: importing protobuf and the Envoy message modules costs the agent ~5 MB RSS and ~50 ms
of start-up in every pod, for messages of a handful of scalar and bytes fields. Tests check every message against
the real generated classes (xds-protos, Istio's ca.proto) both ways.
"""
from __future__ import annotations

from typing import Iterator


class WireError(ValueError):
    """Malformed protobuf bytes."""


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
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
            raise WireError("varint too long")


def ld(field: int, payload: bytes | str) -> bytes:
    """A length-delimited field (string, bytes, message); empty values are omitted, as proto3 does."""
    if isinstance(payload, str):
        payload = payload.encode()
    if not payload:
        return b""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def ld_always(field: int, payload: bytes) -> bytes:
    """A length-delimited field written even when empty (an empty sub-message that must be present)."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def vint(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value) if value else b""


def fields(buf: bytes) -> Iterator[tuple[int, int, "int | bytes"]]:
    """(field number, wire type, value) for each field; varints as int, length-delimited as bytes."""
    i = 0
    n = len(buf)
    while i < n:
        tag, i = read_varint(buf, i)
        field, wt = tag >> 3, tag & 7
        if wt == 0:
            v, i = read_varint(buf, i)
            yield field, wt, v
        elif wt == 2:
            size, i = read_varint(buf, i)
            if i + size > n:
                raise WireError("truncated length-delimited field")
            yield field, wt, buf[i:i + size]
            i += size
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        else:
            raise WireError(f"unsupported wire type {wt}")
        if i > n:
            raise WireError("truncated fixed-width field")
