"""The CA's shell: the grpc.aio IstioCertificateService over TLS, its serving certificate, and start/stop.

`serve(config)` loads the signing CA, writes `<ca-dir>/root-cert.pem`, binds the gRPC server in the caller's
asyncio loop, and (in a cluster) starts the root ConfigMap publisher. The request path stays in the loop: token
verification, CSR checks and signing take well under a millisecond, so a thread pool would only add latency.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from meshboot import constants as C

from . import ca_pb2, metrics, store
from .config import CAConfig
from .kube import api_client as make_client
from .kube import authentication_v1, core_v1
from .publisher import RootCertPublisher
from .signer import Authority, Code, Policy, Refused, issue_serving, sign
from .tokens import Authenticator, Chain, LocalVerifier, TokenReviewVerifier, bearer_token

if TYPE_CHECKING:
    from .service import ExtraService

log = logging.getLogger("meshboot.ca")

SERVING_TTL = dt.timedelta(days=90)
EXPIRY_CHECK_SECONDS = 3600.0


MAX_CONCURRENT_RPCS = 256          # in-flight CreateCertificate calls; beyond: RESOURCE_EXHAUSTED at once
MAX_METADATA_BYTES = 16 * 1024     # request headers (the token is one of them); beyond: RESOURCE_EXHAUSTED
HANDSHAKE_TIMEOUT_MS = 10_000      # a connection that does not finish TLS in 10 s is closed


class Undecodable:
    """What the request deserializer hands over for bytes that are not an IstioCertificateRequest: grpc would
    otherwise answer UNKNOWN with the protobuf exception's class name."""


UNDECODABLE = Undecodable()


def decode_request(data: bytes) -> ca_pb2.IstioCertificateRequest | Undecodable:
    """Parse a request; never raises (bad wire format, invalid UTF-8 in csr, nesting past protobuf's limit)."""
    try:
        return ca_pb2.IstioCertificateRequest.FromString(data)
    except Exception:  # noqa: BLE001 - DecodeError, RecursionError, ...: all mean "not a valid request"
        return UNDECODABLE


def _message_fields(request: ca_pb2.IstioCertificateRequest | Undecodable) -> tuple[str, int]:
    if isinstance(request, Undecodable):
        raise Refused(Code.INVALID_ARGUMENT, "malformed request: the message is not a valid "
                      "istio.v1.auth.IstioCertificateRequest (protobuf wire format, UTF-8 csr)", "request_malformed")
    return request.csr, request.validity_duration


class CertificateService:
    """CreateCertificate: authenticate the token, check the CSR against it, sign."""

    def __init__(self, authority: Authority, policy: Policy, authenticator: Authenticator) -> None:
        self.authority = authority
        self.policy = policy
        self.authenticator = authenticator

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register under Istio's exact names, with a request decoder that turns garbage into a refusal."""
        handler = grpc.unary_unary_rpc_method_handler(
            self.CreateCertificate, request_deserializer=decode_request,
            response_serializer=ca_pb2.IstioCertificateResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            C.CA_SERVICE, {C.CA_METHOD.rsplit("/", 1)[1]: handler}),))

    async def CreateCertificate(self, request: ca_pb2.IstioCertificateRequest | Undecodable,  # noqa: N802
                                context: grpc.aio.ServicerContext) -> ca_pb2.IstioCertificateResponse:
        start = time.perf_counter()
        try:
            csr, validity = _message_fields(request)
            token = bearer_token(context.invocation_metadata() or ())
            identity = await self.authenticator.authenticate(token)
            chain = sign(self.authority, self.policy, identity, csr, validity)
        except Refused as e:
            metrics.CSR_RESULTS.labels(e.reason).inc()
            log.info("CSR refused", extra={"peer": context.peer(), "code": e.code.value, "reason": e.message})
            await context.abort(grpc.StatusCode[e.code.value], e.message)
            raise AssertionError("unreachable") from None   # abort() raises
        except Exception:
            metrics.CSR_RESULTS.labels("internal_error").inc()
            log.exception("CSR signing failed", extra={"peer": context.peer()})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error while signing; see the CA's log")
            raise AssertionError("unreachable") from None
        metrics.SIGN_SECONDS.observe(time.perf_counter() - start)
        metrics.CSR_RESULTS.labels("issued").inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("certificate issued", extra={"peer": context.peer(), "identity": identity.spiffe(
                self.policy.trust_domain)})
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)


class ServingCert:
    """The CA's own TLS certificate, signed by the mesh CA for the control plane's names; renewed at half-life."""

    def __init__(self, authority: Authority, dns_names: tuple[str, ...], ips: tuple[str, ...]) -> None:
        self.authority, self.dns_names, self.ips = authority, dns_names, ips
        self.renew_at = 0.0
        self.pair = self._issue()

    def _issue(self) -> tuple[bytes, bytes]:
        leaf, key_pem, chain = issue_serving(self.authority, SERVING_TTL, self.dns_names, self.ips)
        start, end = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
        self.renew_at = start + (end - start) / 2
        return key_pem, chain

    def credentials(self) -> grpc.ServerCredentials:
        def fetch() -> grpc.ServerCertificateConfiguration | None:
            if time.time() < self.renew_at:
                return None
            self.pair = self._issue()
            log.info("CA serving certificate renewed")
            return grpc.ssl_server_certificate_configuration([self.pair])
        # grpc's fetcher may return None (keep the current certificate); grpc-stubs' Callable does not allow it.
        return grpc.dynamic_ssl_server_credentials(grpc.ssl_server_certificate_configuration([self.pair]),
                                                   fetch)  # type: ignore[arg-type]  # see the line above


@dataclass
class RunningCA:
    """A started CA: where it listens and what it signs with. Awaiting it (`await running()`) stops it."""

    port: int
    address: str
    authority: Authority
    source: str
    root_file: Path | None
    server: grpc.aio.Server | None = None
    serving: ServingCert | None = None
    publisher: RootCertPublisher | None = None
    api_client: Any = None
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def root_pem(self) -> str:
        return self.authority.root_pem

    async def __call__(self, grace: float = 2.0) -> None:
        for t in self.tasks:
            t.cancel()
        if self.server is not None:
            await self.server.stop(grace)
        if self.publisher is not None:
            await asyncio.to_thread(self.publisher.stop)
        if self.api_client is not None:
            with contextlib.suppress(Exception):
                self.api_client.close()


def load_authority(cfg: CAConfig, api_client: Any) -> store.Loaded:
    """Plug-in certs win when present; else the Secret (in a cluster) or the CA directory, created on first start."""
    if cfg.plugin_certs is not None:
        loaded = store.load_plugin(cfg.plugin_certs)
        if loaded is not None:
            return loaded
    if cfg.ca_secret:
        return store.load_or_create_secret(core_v1(api_client), cfg.ca_namespace, cfg.ca_secret, cfg.ca_key_type,
                                           cfg.trust_domain)
    return store.load_or_create_dir(cfg.ca_dir, cfg.ca_key_type, cfg.trust_domain)


def build_authenticator(cfg: CAConfig, api_client: Any) -> Authenticator:
    verifiers: list[Authenticator] = []
    if cfg.jwks or cfg.issuer_pem:
        verifiers.append(LocalVerifier(cfg.audiences, cfg.issuer, cfg.jwks, cfg.issuer_pem))
    if cfg.token_review:
        verifiers.append(TokenReviewVerifier(authentication_v1(api_client), cfg.audiences))
    return verifiers[0] if len(verifiers) == 1 else Chain(verifiers)


def write_root(cfg: CAConfig, authority: Authority) -> Path | None:
    path = cfg.ca_dir / C.CA_ROOT_FILE
    try:
        if not path.is_file() or path.read_text() != authority.root_pem:
            store.write_file_atomic(path, authority.root_pem.encode())
    except OSError as e:
        if cfg.ca_secret:          # in a cluster the Secret is the source of truth; the file is a convenience
            log.warning("cannot write the root certificate file", extra={"path": str(path), "error": str(e)})
            return None
        raise
    return path


def new_grpc_server(extra_rpcs: int = 0) -> grpc.aio.Server:
    """The gRPC server with its bounds set: message and header size, in-flight calls, TLS handshake time. (No
    per-connection stream limit: grpc clients open streams before they see it and get UNAVAILABLE.)"""
    return grpc.aio.server(maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS + extra_rpcs, options=[
        ("grpc.max_receive_message_length", C.CA_MAX_REQUEST_BYTES),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ])


def verifier(authenticator: Authenticator) -> Callable[[str], Awaitable[tuple[str, str]]]:
    """The token check other services on this server use: (namespace, service account) of a valid token."""
    async def verify(token: str) -> tuple[str, str]:
        identity = await authenticator.authenticate(token)
        return identity.namespace, identity.service_account
    return verify


async def serve(cfg: CAConfig, api_client: Any = None, extra: Sequence[ExtraService] = ()) -> RunningCA:
    """Start the CA in the running loop; `cfg.port` 0 binds an ephemeral port (the CLI maps 0 to "disabled").
    `extra` services are registered on the same server before it starts, with the CA's token verifier."""
    if api_client is None and cfg.uses_kubernetes:
        api_client = await asyncio.to_thread(make_client)
    loaded = await asyncio.to_thread(load_authority, cfg, api_client)
    authority = loaded.authority
    root_file = await asyncio.to_thread(write_root, cfg, authority)
    authenticator = await asyncio.to_thread(build_authenticator, cfg, api_client)
    policy = Policy(cfg.trust_domain, cfg.max_cert_ttl, cfg.default_cert_ttl, cfg.min_cert_ttl)
    service = CertificateService(authority, policy, authenticator)
    serving = ServingCert(authority, cfg.dns_names, cfg.ip_sans)
    server = new_grpc_server(sum(e.max_rpcs for e in extra))
    service.add_to(server)
    for e in extra:
        e.register(server, verifier(authenticator))
    host = f"[{cfg.address}]" if ":" in cfg.address else cfg.address
    try:
        port = server.add_secure_port(f"{host}:{cfg.port}", serving.credentials())
    except RuntimeError as e:
        raise OSError(f"CA: cannot listen on {host}:{cfg.port} ({e})") from None
    await server.start()
    running = RunningCA(port=port, address=cfg.address, authority=authority, source=loaded.source,
                        root_file=root_file, server=server, serving=serving, api_client=api_client)
    metrics.expose(authority)
    running.tasks.append(asyncio.create_task(_watch_expiry(authority, policy)))
    if cfg.publish_root_cert:
        running.publisher = RootCertPublisher(core_v1(api_client), authority.root_pem)
        running.publisher.start()
    log.info("CA serving", extra={"address": f"{host}:{port}", "source": loaded.source,
                                  "root": str(root_file) if root_file else None})
    return running


async def _watch_expiry(authority: Authority, policy: Policy) -> None:
    while True:
        metrics.log_expiry(authority, policy)
        await asyncio.sleep(metrics.check_interval(authority, policy, time.time(), EXPIRY_CHECK_SECONDS))
