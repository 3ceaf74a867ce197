"""Client for Istio's CA protocol: `/istio.v1.auth.IstioCertificateService/CreateCertificate` (reference/agent.md §2).

The three message fields are encoded with protobuf's wire format by hand (the agent image carries no control-plane
code and no generated CA stubs): `IstioCertificateRequest{csr=1, validity_duration=3, metadata=4 (Struct)}` and
`IstioCertificateResponse{cert_chain=1 (repeated string)}`. The shell is a grpc.aio unary call over TLS verified
with the mesh root, bearer token re-read on every call, `ClusterID` header, and Istio's retry policy.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from meshboot import constants as C

from .config import AgentConfig
from .log import Log

log = Log("ca")


class CAError(RuntimeError):
    """The CA call failed (after retries) or answered something unusable."""


# ---- wire format (pure) -------------------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
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


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise CAError("truncated protobuf varint in CA response")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _ld(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _struct_of_strings(values: dict[str, str]) -> bytes:
    """google.protobuf.Struct{fields: map<string, Value{string_value=3}>} with string values only."""
    out = b""
    for k, v in values.items():
        value = _ld(3, v.encode())
        out += _ld(1, _ld(1, k.encode()) + _ld(2, value))
    return out


def encode_request(csr_pem: str, validity_seconds: int, cert_signer: str = "") -> bytes:
    return (_ld(1, csr_pem.encode()) + _varint(3 << 3 | 0) + _varint(validity_seconds)
            + _ld(4, _struct_of_strings({"CertSigner": cert_signer})))


def decode_response(data: bytes) -> list[str]:
    """`cert_chain` elements in order (leaf first, root last); unknown fields skipped."""
    chain: list[str] = []
    i = 0
    while i < len(data):
        tag, i = _read_varint(data, i)
        field, wt = tag >> 3, tag & 7
        if wt == 0:
            _, i = _read_varint(data, i)
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        elif wt == 2:
            n, i = _read_varint(data, i)
            if i + n > len(data):
                raise CAError("truncated protobuf field in CA response")
            if field == 1:
                chain.append(data[i:i + n].decode())
            i += n
        else:
            raise CAError(f"unsupported protobuf wire type {wt} in CA response")
    return chain


# ---- shell --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Issued:
    chain: list[str]          # PEM per element, leaf first, root last
    received: float           # time.time() when received


def read_token(path: str = C.TOKEN_PATH) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def call_metadata(cluster_id: str, token: str | None, extra: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """gRPC metadata keys are lowercase on the wire (HTTP/2), so `ClusterID` travels as `clusterid`."""
    md = [("clusterid", cluster_id)]
    if token:
        md.append(("authorization", f"Bearer {token}"))
    md += [(k.lower(), v) for k, v in extra]
    return tuple(md)


class CAClient:
    """Signs CSRs at `cfg.ca_addr`. The channel is dialled lazily and rebuilt after a final failure."""

    def __init__(self, cfg: AgentConfig, max_retries: int = 5, base_backoff: float = 0.1) -> None:
        self.cfg = cfg
        self.max_retries = max_retries
        self.base_backoff = base_backoff
        self._channel = None
        self._call = None

    def _dial(self):  # noqa: ANN202 — grpc types imported lazily
        import grpc  # noqa: PLC0415

        cfg = self.cfg
        options = [("grpc.keepalive_time_ms", 30000), ("grpc.keepalive_timeout_ms", 10000),
                   ("grpc.max_receive_message_length", 2**31 - 1), ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 2000), ("grpc.min_reconnect_backoff_ms", 100)]
        if cfg.ca_plaintext:
            ch = grpc.aio.insecure_channel(cfg.ca_addr, options=options)
        else:
            root = None
            if cfg.ca_root_file:
                with open(cfg.ca_root_file, "rb") as f:
                    root = f.read()
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            options.append(("grpc.ssl_target_name_override", cfg.ca_server_name))
            ch = grpc.aio.secure_channel(cfg.ca_addr, creds, options=options)
        self._channel = ch
        self._call = ch.unary_unary(C.CA_METHOD, request_serializer=None, response_deserializer=None)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._call = None

    async def sign(self, csr_pem: str, validity_seconds: int, timeout: float = 30.0) -> Issued:
        import grpc  # noqa: PLC0415

        retry = {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE}
        req = encode_request(csr_pem, validity_seconds, self.cfg.cert_signer)
        attempt = 0
        while True:
            if self._call is None:
                self._dial()
            md = call_metadata(self.cfg.cluster_id, read_token(), self.cfg.ca_headers)
            t0 = time.monotonic()
            try:
                resp = await self._call(req, metadata=md, timeout=timeout)
                break
            except grpc.aio.AioRpcError as e:
                if e.code() in retry and attempt < self.max_retries:
                    delay = self.base_backoff * (2 ** attempt) * (1 + random.uniform(-0.1, 0.1))
                    attempt += 1
                    log.debug("CA call failed, retrying", code=e.code().name, delay_ms=int(delay * 1000))
                    await asyncio.sleep(delay)
                    continue
                await self.close()
                raise CAError(f"CA {self.cfg.ca_addr}: {e.code().name}: {e.details()}") from None
        chain = decode_response(resp)
        if len(chain) <= 1:
            raise CAError(f"CA {self.cfg.ca_addr}: invalid empty CertChain")
        log.debug("certificate signed", ms=int((time.monotonic() - t0) * 1000))
        return Issued([c if c.endswith("\n") else c + "\n" for c in chain], time.time())
