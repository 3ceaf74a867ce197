"""Client for Istio's CA protocol: `/istio.v1.auth.IstioCertificateService/CreateCertificate` (reference/agent.md §2).

The three message fields are encoded with protobuf's wire format by hand (xds/wire.py; the agent image carries no
control-plane code and no generated CA stubs):
`IstioCertificateRequest{csr=1, validity_duration=3, metadata=4 (Struct)}` and
`IstioCertificateResponse{cert_chain=1 (repeated string)}`. The shell is a grpc.aio unary call over TLS verified
with the mesh root, bearer token re-read on every call, `ClusterID` header, and Istio's retry policy.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import grpc

from meshboot import constants as C

from ..config import AgentConfig
from ..log import Log
from ..xds.wire import WireError, fields, ld, ld_always, vint

log = Log("ca")


class CAError(RuntimeError):
    """The CA call failed (after retries) or answered something unusable."""


# ---- wire format (pure) -------------------------------------------------------------------------------------------

def _struct_of_strings(values: dict[str, str]) -> bytes:
    """google.protobuf.Struct{fields: map<string, Value{string_value=3}>} with string values only."""
    return b"".join(ld_always(1, ld(1, k) + ld_always(2, ld_always(3, v.encode()))) for k, v in values.items())


def encode_request(csr_pem: str, validity_seconds: int, cert_signer: str = "") -> bytes:
    return (ld(1, csr_pem) + vint(3, validity_seconds)
            + ld_always(4, _struct_of_strings({"CertSigner": cert_signer})))


def decode_response(data: bytes) -> list[str]:
    """`cert_chain` elements in order (leaf first, root last); unknown fields skipped."""
    try:
        return [v.decode() for f, _, v in fields(data) if f == 1 and isinstance(v, bytes)]
    except (WireError, UnicodeDecodeError) as e:
        raise CAError(f"malformed CA response: {str(e)[:100]}") from None


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


def call_metadata(cluster_id: str, token: str | None,
                  extra: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
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
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] | None = None

    def _dial(self) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        cfg = self.cfg
        options: list[tuple[str, int | str]] = [
            ("grpc.keepalive_time_ms", 30000), ("grpc.keepalive_timeout_ms", 10000),
            ("grpc.max_receive_message_length", 1 << 20), ("grpc.initial_reconnect_backoff_ms", 100),
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
        return self._call

    def warm(self) -> None:
        """Start connecting (TCP + TLS) now, while the key is being generated: the first CSR then goes out at once."""
        if self._call is None:
            self._dial()
        if self._channel is not None:     # always, once dialled
            self._channel.get_state(try_to_connect=True)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
        self._channel = self._call = None

    async def sign(self, csr_pem: str, validity_seconds: int, timeout: float = 30.0) -> Issued:
        retry = {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE}
        req = encode_request(csr_pem, validity_seconds, self.cfg.cert_signer)
        attempt = 0
        while True:
            call = self._call if self._call is not None else self._dial()
            md = call_metadata(self.cfg.cluster_id, read_token(), self.cfg.ca_headers)
            t0 = time.monotonic()
            try:
                resp = await call(req, metadata=md, timeout=timeout)
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
