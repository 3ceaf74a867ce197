"""The injector's HTTPS admission server (FastAPI under uvicorn).

Thin shell around `webhook.admission.review`: HTTP limits, TLS (hot-reloaded from files, or self-signed for the
service's DNS names), config files watched for changes, health, readiness and Prometheus metrics. Public entry points
for the process that runs it (`controlplane.main`, which adds the CA like istiod): `build_parser` and `run`, which
takes other services to start in the same loop and a maker for the serving certificate. `python -m webhook.server`
runs the injector alone.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import URL
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from meshboot import constants as C
from meshboot import logs, pki
from meshboot.durations import parse_duration
from meshboot.files import stamps, write_atomic
from meshboot.monitoring import start_monitoring
from webhook import metrics
from webhook.admission import FALLBACK_API_VERSION, INJECTED, SKIPPED, ReplicaCache, review_bytes
from webhook.cabundle import CABundlePatcher
from webhook.config import ConfigSource, parse_kubernetes_version
from webhook.config import load_mesh as load_mesh  # for the wiring: discovery reads the same mesh config
from webhook.errors import ConfigError
from webhook.serving import Bounds, ShellServer, StartupFailed, SwappableTLS, quiet_disconnects

log = logging.getLogger("meshboot.webhook")

DEFAULT_MAX_BODY = 3 * 1024 * 1024
MONITORING_PORT = C.MONITORING_PORT
JSON = "application/json"
_JSON_BYTES = JSON.encode()

# A service started in the injector's loop before it is ready (the CA, in the control plane): returns its stopper.
Service = Callable[[], Awaitable[Callable[[], Awaitable[None]]]]
# Makes the serving certificate when no --tls-cert is given and the caller has its own (the mesh CA's): the
# (cert, key) files, or None after it said why on one line.
ServingCert = Callable[[], "tuple[str, str] | None"]


@dataclass
class TLSFiles:
    """The serving cert/key on disk and the swappable TLS they are served with. A reload builds a new context and
    swaps it in only when the pair loads: a cert written before its key, or one that doesn't match it, is never seen
    by a client (retried every tick; logged once per version of the files)."""

    cert: str
    key: str
    serving: SwappableTLS | None = None
    stamp: tuple = ()
    failed: tuple = ()

    def current_stamp(self) -> tuple:
        return stamps((self.cert, self.key))

    def reload_if_changed(self) -> bool:
        stamp = self.current_stamp()
        if stamp == self.stamp or self.serving is None:
            return False
        try:
            self.serving.reload(self.cert, self.key)   # new handshakes get the new pair; open connections keep theirs
        except (OSError, ssl.SSLError) as e:
            if stamp != self.failed:
                self.failed = stamp
                metrics.CERT_RELOADS.labels("error").inc()
                log.warning("serving certificate reload failed; keeping the old one", extra={"error": str(e)})
            return False  # retried on the next tick (files may be mid-write)
        self.stamp = stamp
        metrics.CERT_RELOADS.labels("ok").inc()
        log.info("serving certificate reloaded", extra={"cert": self.cert})
        return True


# What else the injector waits for before it is ready: each says why not, or None (the caBundle patched once).
Gate = Callable[[], "str | None"]
_GATES: list[Gate] = []


@dataclass
class State:
    source: ConfigSource
    tls: TLSFiles | None = None
    max_body: int = DEFAULT_MAX_BODY
    poll_interval: float = 1.0
    services: tuple[Service, ...] = ()
    monitoring: tuple[str, int] | None = None
    floor_endpoint: bool = False
    cache: ReplicaCache | None = None
    ready: bool = False
    tasks: list[asyncio.Task] = field(default_factory=list)
    gates: tuple[Gate, ...] = ()


def not_ready_reason(state: State) -> str | None:
    """Why /readyz answers 503, or None when ready."""
    if not state.ready:
        return "not ready"
    for gate in state.gates:
        reason = gate()
        if reason:
            return f"not ready: {reason}"
    return None


def _plain(status: int, message: str) -> Response:
    return Response(content=message + "\n", status_code=status, media_type="text/plain")


_URL_PATH_ESCAPED = re.compile(r"[?#\\\t\r\n]")


def _request_path(scope: Scope) -> str:
    """What Starlette's `request.url.path` gives, without building the URL when it is the plain scope path."""
    path = scope["path"]
    if _URL_PATH_ESCAPED.search(path) is not None or not path.startswith("/"):
        return URL(scope=scope).path
    return path


def _header(scope: Scope, name: bytes) -> str | None:
    """`request.headers.get(name)`: the first such header, latin-1."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _send(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    """What `Response(content=body, status_code=status, media_type=...)` sends."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode("latin-1")), (b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body})


async def _send_plain(send: Send, status: int, message: str) -> None:
    await _send(send, status, (message + "\n").encode("utf-8"), b"text/plain; charset=utf-8")


async def _read_asgi_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The body, or None when it exceeds `limit` (checked on Content-Length and while streaming); a client gone
    mid-body raises ClientDisconnect, as Starlette's `request.stream()` does."""
    length = _header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class FloorEndpoint:
    """Stricter benchmark floor (`--enable-bench-floor`, /bench/floor-raw): the same raw plumbing as /inject — read
    the body, answer `?size=` bytes of JSON — with no injection work."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bodies: dict[int, bytes] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _read_asgi_body(scope, receive, self.limit)
        query = dict(p.partition("=")[::2] for p in scope.get("query_string", b"").decode("latin-1").split("&"))
        await _send(send, 200, self.body(int(query["size"]) if query.get("size", "").isdigit() else 1024), _JSON_BYTES)

    def body(self, size: int) -> bytes:
        if size not in self.bodies:
            self.bodies[size] = b'{"x":"' + b"x" * max(size - 8, 0) + b'"}'
        return self.bodies[size]


class InjectEndpoint:
    """POST /inject[/...]: one AdmissionReview in, one out, as a raw ASGI app (the same answers as a FastAPI route
    with `Request` and `Response`, without their per-request machinery)."""

    # The answer to a bug in the injector: fixed text, so no exception detail or Python name reaches the API server.
    INTERNAL_ERROR = json.dumps({"apiVersion": FALLBACK_API_VERSION, "kind": "AdmissionReview", "response": {
        "allowed": False, "status": {"message": "failed to process pod: internal error in the injector (details "
                                                "are in its log); the request was not changed"}}}).encode()

    def __init__(self, state: State) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        metrics.REQUESTS.inc()
        ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if ctype != JSON:
            metrics.FAILURES.labels("content_type").inc()
            return await _send_plain(send, 415, f"invalid Content-Type {ctype or '(none)'!r}, want `{JSON}`")
        body = await _read_asgi_body(scope, receive, state.max_body)
        if body is None:
            metrics.FAILURES.labels("too_large").inc()
            return await _send_plain(send, 413, f"request body exceeds the {state.max_body} byte limit")
        if not body:
            metrics.FAILURES.labels("no_body").inc()
            return await _send_plain(send, 400, "no body found")
        start = time.perf_counter()
        try:
            payload, outcome = review_bytes(body, state.source.settings, _request_path(scope), state.cache)
        except Exception:
            log.exception("injection failed unexpectedly")
            metrics.FAILURES.labels("internal").inc()
            return await _send(send, 200, self.INTERNAL_ERROR, _JSON_BYTES)
        metrics.LATENCY.observe(time.perf_counter() - start)
        metrics.SUCCESS.inc()
        if outcome.result == INJECTED:
            metrics.INJECTED.inc()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("injected", extra={"pod": outcome.pod, "reason": outcome.reason})
        elif outcome.result == SKIPPED:
            metrics.SKIPS.labels(outcome.reason).inc()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("skipped", extra={"pod": outcome.pod, "reason": outcome.reason})
        else:
            metrics.FAILURES.labels("denied").inc()
            log.info("denied", extra={"pod": outcome.pod, "error": outcome.reason})
        await _send(send, 200, payload, _JSON_BYTES)


def create_app(state: State) -> Any:
    """The FastAPI app; everything it needs is in `state` (tests build it directly)."""
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        stoppers: list[Callable[[], Awaitable[None]]] = []
        monitor: asyncio.AbstractServer | None = None
        try:
            for start in state.services:
                try:
                    stoppers.append(await start())
                except Exception as e:  # noqa: BLE001 - one clear line, then fail startup (no traceback)
                    log.error("a service could not start", extra={"error": str(e) or type(e).__name__})
                    raise StartupFailed(str(e)) from None
            if state.monitoring and state.monitoring[1]:
                monitor = await start_monitoring(*state.monitoring, ready=lambda: not_ready_reason(state) is None)
            state.tasks.append(asyncio.create_task(_watch(state)))
            # Everything imported and built so far lives as long as the process: keep it out of the cyclic GC's
            # full collections, which otherwise walk it all and show up as latency spikes.
            gc.collect()
            gc.freeze()
            state.ready = True
            log.info("injector ready", extra={"config_generation": state.source.generation})
            yield
        finally:
            state.ready = False
            for t in state.tasks:
                t.cancel()
            if monitor is not None:
                monitor.close()
            for stop in reversed(stoppers):
                await stop()
            log.info("injector stopped")

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    # /inject is a raw ASGI endpoint on an ordinary route: FastAPI's Request, dependency solving and Response objects
    # cost more per AdmissionReview than the rest of the HTTP handling.
    endpoint = InjectEndpoint(state)
    app.router.routes.extend((Route("/inject", endpoint, methods=["POST"]),
                              Route("/inject/{rest:path}", endpoint, methods=["POST"])))

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(content=b"ok\n", media_type="text/plain")

    @app.get("/readyz")
    async def readyz() -> Response:
        reason = not_ready_reason(state)
        if reason is not None:
            return _plain(503, reason)
        return Response(content=b"ready\n", media_type="text/plain")

    @app.get("/metrics")
    async def prom() -> Response:
        return Response(content=generate_latest(), media_type=CONTENT_TYPE_LATEST)

    if state.floor_endpoint:
        raw = FloorEndpoint(state.max_body)
        app.router.routes.append(Route("/bench/floor-raw", raw, methods=["POST"]))

        @app.post("/bench/floor")
        async def floor(request: Request, size: int = 1024) -> Response:
            """The issue's floor: a trivial FastAPI endpoint reading the body and answering `size` bytes."""
            await request.body()
            return Response(content=raw.body(size), media_type=JSON)

    return app


async def _watch(state: State) -> None:
    """Poll the config files and the serving cert; swap in new versions without a restart."""
    while True:
        await asyncio.sleep(state.poll_interval)
        try:
            if state.source.reload_if_changed():
                metrics.CONFIG_RELOADS.labels("ok").inc()
                metrics.CONFIG_GENERATION.set(state.source.generation)
                log.info("injection config reloaded", extra={"config_generation": state.source.generation})
            elif state.source.last_error:
                metrics.CONFIG_RELOADS.labels("error").inc()
                log.warning("injection config reload failed; keeping the last good config",
                            extra={"error": state.source.last_error})
                state.source.last_error = None
            if state.tls is not None:
                state.tls.reload_if_changed()
        except Exception:
            log.exception("watcher error")


# ---- TLS material --------------------------------------------------------------------------------------------

def service_dns_names(service: str, namespace: str) -> list[str]:
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


def self_signed(service: str, namespace: str, out_dir: str, ca_bundle_out: str | None) -> tuple[str, str, bytes]:
    """Generate a CA and a serving cert for the service names (+ localhost); write key/cert and the CA bundle."""
    names = [*service_dns_names(service, namespace), "localhost"]
    ca_pem, pair = pki.self_signed_serving(names, ips=("127.0.0.1", "::1"))
    os.makedirs(out_dir, exist_ok=True)
    cert, key = os.path.join(out_dir, "tls.crt"), os.path.join(out_dir, "tls.key")
    write_atomic(key, pair.key_pem, 0o600)
    write_atomic(cert, pair.chain_pem)
    if ca_bundle_out:
        write_atomic(ca_bundle_out, ca_pem)
    return cert, key, ca_pem


def add_ready_gate(gate: Gate) -> None:
    """Another part's readiness in the same process (the control plane's discovery, until its first sync): /readyz
    answers 503 with `gate()`'s reason while it gives one. Register before `run`."""
    _GATES.append(gate)


def watch_webhook_ca_bundle(api_client: Any, name: str, bundle: Callable[[], bytes]) -> CABundlePatcher:
    """Keep caBundle = `bundle()` on every webhook of configuration `name` (watched, re-patched on any drift, retried
    with back-off); the injector is not ready until it was right once (webhook/cabundle.py)."""
    patcher = CABundlePatcher(api_client, name, bundle).start()
    add_ready_gate(patcher.not_ready_reason)
    return patcher


def watch_webhook_ca_bundles(api_client: Any, names: str, bundle: Callable[[], bytes]) -> list[CABundlePatcher]:
    """--webhook-config-name is a comma list: a revision's configuration and its tags' (istio-revision-tag-<tag>)
    all call this injector, so each keeps the same caBundle."""
    return [watch_webhook_ca_bundle(api_client, n.strip(), bundle) for n in names.split(",") if n.strip()]


def detect_kubernetes_version(api_client: Any) -> str | None:
    """For native sidecars in `auto` mode: the oldest kubelet among the nodes (Istio wants every node >= 1.33).

    No nodes: the API server's own version. None when neither is known.
    """
    from kubernetes import client  # noqa: PLC0415 - kubernetes only in a cluster, for native sidecars' auto mode
    oldest: tuple[int, int] | None = None
    for node in client.CoreV1Api(api_client).list_node().items or []:
        info = node.status.node_info if node.status else None
        try:
            v = parse_kubernetes_version(info.kubelet_version if info else None)
        except ConfigError:
            v = None
        if v is not None and (oldest is None or v < oldest):
            oldest = v
    if oldest is None:
        code = client.VersionApi(api_client).get_code()
        oldest = (int(code.major.rstrip("+")), int(code.minor.rstrip("+"))) if code.major and code.minor else None
    return f"{oldest[0]}.{oldest[1]}" if oldest else None


def _in_cluster_client() -> Any:
    from kubernetes import client, config  # noqa: PLC0415 - kubernetes only when running in a cluster
    cfg = client.Configuration()
    config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(cfg)


# ---- command line ----------------------------------------------------------------------------------------------

def build_parser(prog: str = "python -m webhook.server", description: str = __doc__.split("\n")[0],
                 ) -> argparse.ArgumentParser:
    """The injector's flags; the control plane adds the CA's to the same parser."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--listen-address", default="0.0.0.0")
    p.add_argument("--port", type=int, default=C.WEBHOOK_PORT, help="HTTPS admission port")
    p.add_argument("--tls-cert", help="serving certificate (PEM); reloaded when the file changes")
    p.add_argument("--tls-key", help="serving key (PEM); reloaded when the file changes")
    p.add_argument("--service-name", default="meshboot-webhook", help="Service name for the self-signed cert")
    p.add_argument("--service-namespace", default=C.ISTIO_NAMESPACE)
    p.add_argument("--ca-bundle-out", help="where to write the self-signed CA bundle (PEM)")
    p.add_argument("--self-signed-dir", help="where to keep the self-signed cert/key (default: a temp dir)")
    p.add_argument("--webhook-config-name", help="MutatingWebhookConfigurations whose caBundle to patch (in "
                                                  "cluster), comma-separated: the revision's and its tags'")
    p.add_argument("--values", help="Istio injector values (the `values` key of istio-sidecar-injector)")
    p.add_argument("--mesh-config", help="MeshConfig YAML (with defaultConfig)")
    p.add_argument("--injector-config", help="injector config: policy, alwaysInjectSelector, neverInjectSelector")
    p.add_argument("--kubernetes-version", help="MAJOR.MINOR; decides native sidecars in auto mode (>= 1.33)")
    p.add_argument("--native-sidecars", choices=("auto", "true", "false"),
                   help="default: $ENABLE_NATIVE_SIDECARS or auto")
    p.add_argument("--monitoring-port", type=int, default=MONITORING_PORT, help="plain HTTP /metrics; 0 disables")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    p.add_argument("--replica-cache-size", type=int, default=256,
                   help="answers kept for identical pods (a ReplicaSet's replicas); 0 disables")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between config/cert file checks")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    _add_serving_arguments(p)
    p.add_argument("--enable-bench-floor", action="store_true", help=argparse.SUPPRESS)
    return p


def _duration(minimum: float) -> Callable[[str], float]:
    """argparse type: a Go duration in [minimum, 1h]; argparse names the flag in its one-line refusal."""
    def parse(text: str) -> float:
        try:
            seconds = parse_duration(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not minimum <= seconds <= 3600:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range ({minimum:g}s to 1h)")
        return seconds
    return parse


def _connections(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a count from 1 to 100000")
    return int(text)


def _add_serving_arguments(p: argparse.ArgumentParser) -> None:
    """Drain and connection bounds (Go duration syntax, as Istio's flags)."""
    d = Bounds()
    p.add_argument("--drain-duration", type=_duration(0), default=5.0,
                   help="after SIGTERM: not ready, still serving, for this long; then stop (default 5s)")
    p.add_argument("--tls-handshake-timeout", type=_duration(0.1), default=d.tls_handshake,
                   help="accept -> TLS handshake done (default 10s)")
    p.add_argument("--http-read-header-timeout", type=_duration(0.1), default=d.read_header,
                   help="a request's first byte (or the accept) -> end of its header (default 10s)")
    p.add_argument("--http-read-timeout", type=_duration(0.1), default=d.read,
                   help="end of a request's header -> end of its body (default 30s)")
    p.add_argument("--http-idle-timeout", type=_duration(0.1), default=d.idle,
                   help="keep-alive idle between requests; keep above the API server's 90s (default 2m)")
    p.add_argument("--max-connections", type=_connections, default=d.max_connections,
                   help="open HTTPS connections; more are closed at once (default 1000)")


def main(argv: list[str] | None = None) -> int:
    """The injector alone (no CA): `python -m webhook.server`. `meshboot-webhook` is controlplane.main."""
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    return run(args, prog="webhook")


def run(args: argparse.Namespace, *, prog: str = "meshboot-webhook", serving_cert: ServingCert | None = None,
        services: tuple[Service, ...] = ()) -> int:
    """Serve the injector from parsed flags until drained; configuration errors are one line on stderr and 2.

    `serving_cert`: used instead of the self-signed certificate when no --tls-cert is given; `services`: started in
    the same loop before the injector is ready, stopped after it."""
    if bool(args.tls_cert) != bool(args.tls_key):
        print(f"{prog}: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if in_cluster and not args.kubernetes_version and (args.native_sidecars or "auto") == "auto":
        args.kubernetes_version = _detected_kubernetes_version()
    try:
        source = ConfigSource(args.values, args.mesh_config, args.injector_config,
                              native_sidecars=args.native_sidecars, kubernetes_version=args.kubernetes_version)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    metrics.CONFIG_GENERATION.set(source.generation)
    pair = (args.tls_cert, args.tls_key) if args.tls_cert else serving_cert() if serving_cert else _self_signed(args)
    if pair is None:
        return 2
    cert, key = pair
    tls = TLSFiles(cert, key)
    state = State(source=source, tls=tls, max_body=args.max_body_bytes,
                  poll_interval=args.poll_interval, services=services,
                  monitoring=(args.listen_address, args.monitoring_port) if args.monitoring_port else None,
                  floor_endpoint=args.enable_bench_floor, gates=tuple(_GATES),
                  cache=ReplicaCache(args.replica_cache_size) if args.replica_cache_size > 0 else None)
    try:
        serving = SwappableTLS(cert, key)
    except (OSError, ssl.SSLError) as e:
        print(f"{prog}: cannot load TLS cert/key ({cert}, {key}): {e}", file=sys.stderr)
        return 2
    tls.serving, tls.stamp = serving, tls.current_stamp()
    return _serve(state, args, serving)


def _detected_kubernetes_version() -> str | None:
    """The nodes' version for native sidecars in auto mode; None (said once) without RBAC or API."""
    try:
        version = detect_kubernetes_version(_in_cluster_client())
    except Exception as e:  # noqa: BLE001 - no RBAC or no API: classic sidecars, said once
        log.warning("could not detect the Kubernetes version; native sidecars off (set --kubernetes-version)",
                    extra={"error": str(e)})
        return None
    log.info("detected the nodes' Kubernetes version", extra={"version": version})
    return version


def _self_signed(args: argparse.Namespace) -> tuple[str, str]:
    """A self-signed serving pair for the Service's names; its CA patched in as the caBundle when asked (in cluster)."""
    out_dir = args.self_signed_dir or tempfile.mkdtemp(prefix="meshboot-webhook-")
    cert, key, ca_pem = self_signed(args.service_name, args.service_namespace, out_dir, args.ca_bundle_out)
    log.info("generated a self-signed serving certificate",
             extra={"dns_names": service_dns_names(args.service_name, args.service_namespace),
                    "ca_bundle": args.ca_bundle_out})
    if not args.webhook_config_name:
        return cert, key
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        log.warning("--webhook-config-name ignored: not running in a cluster")
        return cert, key
    try:
        api = _in_cluster_client()
    except Exception as e:  # noqa: BLE001 - report, keep serving (the operator can patch it)
        log.error("could not patch caBundle", extra={"webhook_config": args.webhook_config_name, "error": str(e)})
        return cert, key
    watch_webhook_ca_bundles(api, args.webhook_config_name, lambda: ca_pem)
    return cert, key


def _serve(state: State, args: argparse.Namespace, serving: SwappableTLS) -> int:
    """Run uvicorn with our listener and drain until the drain (or a second signal) ends it."""
    bounds = Bounds(tls_handshake=args.tls_handshake_timeout, read_header=args.http_read_header_timeout,
                    read=args.http_read_timeout, idle=args.http_idle_timeout, max_connections=args.max_connections)
    # ws="none": no WebSocket endpoint, so uvicorn never looks for the websockets package.
    config = uvicorn.Config(quiet_disconnects(create_app(state)), host=args.listen_address, port=args.port,
                            log_level="warning", access_log=False, lifespan="on", log_config=None, ws="none",
                            server_header=False, date_header=False, timeout_graceful_shutdown=30,
                            # uvicorn hands it to call_later, a float is fine; its annotation says int
                            timeout_keep_alive=bounds.idle)  # type: ignore[arg-type]  # see the line above
    config.load()

    def on_drain() -> None:
        state.ready = False
        metrics.DRAINING.set(1)

    server = ShellServer(config, tls=serving, bounds=bounds, drain_seconds=args.drain_duration, on_drain=on_drain)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
