"""meshboot-webhook: the control plane process, like istiod — the injector and the workload CA in one asyncio loop.

Wiring only, so the parts stay apart: webhook/ and ca/ import meshboot/ and nothing of each other; this module puts
their flags on one parser, checks the CA's configuration before anything starts (one line on stderr, exit 2), starts
the CA with the injector, and makes the injector's serving certificate from the mesh CA (`--serving-cert=mesh-ca`)
with the mesh root patched in as the webhook configuration's caBundle. With Kubernetes API access (in a cluster, or
`--kubeconfig`) it also serves discovery (xDS) on the CA's gRPC port, authenticated by the CA's token verifier, as
istiod serves both on 15012; `--discovery=false` turns it off.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from ca import service as ca
from ca import webhook_cert
from discovery import service as discovery
from meshboot import logs, monitoring
from meshboot.syntax import parse_go_bool
from webhook import server

PROG = "meshboot-webhook"
log = logging.getLogger("meshboot.controlplane")


def build_parser() -> argparse.ArgumentParser:
    """The injector's flags, the CA's, and where a generated serving certificate comes from."""
    p = server.build_parser(prog=PROG, description=__doc__.split("\n")[0])
    ca.add_ca_arguments(p)
    webhook_cert.add_arguments(p)   # --serving-cert self-signed|mesh-ca, --serving-cert-ttl
    g = p.add_argument_group("discovery (xDS on the CA's port)")
    g.add_argument("--kubeconfig", default="", metavar="FILE",
                   help="the Kubernetes API to watch outside a cluster (pilot-discovery's flag); in a cluster the "
                        "in-cluster config is used")
    g.add_argument("--discovery", type=_go_bool, default=True, metavar="true|false",
                   help="serve xDS when the Kubernetes API is reachable (default true)")
    g.add_argument("--grpcAddr", dest="grpc_addr", default="", metavar="[HOST]:PORT",
                   help="also serve xDS in plaintext here, like istiod's 15010 (e.g. 127.0.0.1:15010; default off); "
                        "streams still need the bearer token, which then travels unencrypted")
    return p


def grpc_address(text: str) -> tuple[str, int]:
    """--grpcAddr as Go writes listen addresses: `host:port`, `[v6]:port`, or `:port` for every interface."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"--grpcAddr: {text[:100]!r} is not [HOST]:PORT (e.g. 127.0.0.1:15010 or :15010)")
    return host.removeprefix("[").removesuffix("]") or "::", int(port)


def _go_bool(text: str) -> bool:
    value = parse_go_bool(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true, false, 1, 0, ...)")
    return value


def discovery_enabled(args: argparse.Namespace) -> bool:
    """On with an API to watch (in a cluster, or --kubeconfig) and the CA's gRPC server to serve it on."""
    has_api = bool(args.kubeconfig) or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if args.discovery and has_api and not args.ca_port:
        log.warning("discovery off: it is served on the CA's gRPC port (--ca-port 0 disables both)")
    return bool(args.discovery and has_api and args.ca_port)


def config_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags as one line naming the flag, or None; checked before anything is started (an
    error found inside uvicorn's start-up would come with its lifespan traceback)."""
    if args.tls_cert and args.serving_cert == "mesh-ca":
        return "--serving-cert=mesh-ca and --tls-cert/--tls-key: choose one"
    try:
        ca.CAConfig.from_args(args)
    except ca.ConfigError as e:
        return str(e)
    try:
        if args.grpc_addr:
            grpc_address(args.grpc_addr)
    except ValueError as e:
        return str(e)
    if args.kubeconfig and not os.path.isfile(args.kubeconfig):
        return f"--kubeconfig: {args.kubeconfig[:200]!r} is not a file"
    try:
        discovery.Mesh(trust_domain=args.trust_domain)
    except discovery.ModelError as e:
        return f"--trust-domain: {e}"
    try:
        discovery_mesh(args)
    except (discovery.ModelError, ValueError) as e:    # webhook's ConfigError is a ValueError
        return f"--mesh-config: {e}"
    return None


def discovery_mesh(args: argparse.Namespace) -> discovery.Mesh:
    """Discovery's mesh settings: --trust-domain, and from the mesh config (the injector's, one file as istiod reads
    one `mesh`) accessLogFile, accessLogFormat, outboundTrafficPolicy.mode and rootNamespace. Unset (absent, null or
    "") means Istio's default (ALLOW_ANY, istio-system); anything else is checked by `Mesh` — `mode: 0`, which Istio
    would read as REGISTRY_ONLY, is refused rather than guessed."""
    mesh = server.load_mesh(args.mesh_config) if args.mesh_config else {}
    policy = mesh.get("outboundTrafficPolicy")
    if policy is not None and not isinstance(policy, dict):
        raise discovery.ModelError("mesh config: outboundTrafficPolicy is not a mapping ({mode: ALLOW_ANY} or "
                                   "{mode: REGISTRY_ONLY})")
    given = {"outbound_traffic_policy": (policy or {}).get("mode"), "root_namespace": mesh.get("rootNamespace")}
    return discovery.Mesh(trust_domain=args.trust_domain, access_log_file=mesh.get("accessLogFile") or "",
                          access_log_format=mesh.get("accessLogFormat") or "",
                          **{k: v for k, v in given.items() if v not in (None, "")})


def kube_client(kubeconfig: str) -> Any:
    """The API client discovery watches with: --kubeconfig when given, else the in-cluster configuration."""
    from kubernetes import client, config  # noqa: PLC0415 - the kubernetes client only when discovery runs

    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(cfg)


def ca_service(args: argparse.Namespace, started: list[discovery.Discovery] | None = None,
               ) -> Callable[[], Awaitable[Callable[[], Awaitable[None]]]]:
    """The CA as a service of the injector's loop (`--ca-port 0`: a stopper that does nothing), with discovery on
    its gRPC server when enabled (started after the CA, stopped before it; appended to `started`)."""
    async def start() -> Callable[[], Awaitable[None]]:
        found: discovery.Discovery | None = None
        extra: tuple[ca.ExtraService, ...] = ()
        if discovery_enabled(args):
            api = await asyncio.to_thread(kube_client, args.kubeconfig)
            mesh = discovery_mesh(args)
            found = discovery.Discovery(api, mesh, root_namespace=mesh.root_namespace)
            extra = (ca.ExtraService(found.add_to, max_rpcs=discovery.MAX_PROXIES),)
        stop_ca = await ca.start_ca(args, extra)
        if found is None:
            return stop_ca
        running = found
        await running.start()
        if started is not None:
            started.append(running)
        unregister = monitoring.add_debug(running.debug)    # /debug/syncz, /debug/config_dump on 15014

        async def stop() -> None:
            unregister()
            await running.stop()
            await stop_ca()
        if args.grpc_addr:
            try:
                await running.serve_plaintext(*grpc_address(args.grpc_addr))
            except OSError:
                await stop()                # start-up fails: leave nothing running behind it
                raise
        return stop
    return start


def mesh_ca_serving_cert(args: argparse.Namespace) -> tuple[str, str] | None:
    """--serving-cert=mesh-ca: a certificate signed by the mesh CA (renewed at half-life), caBundle = the mesh root,
    so every replica patches the same value. None (after one line on stderr) when it cannot be made."""
    out_dir = args.self_signed_dir or tempfile.mkdtemp(prefix="meshboot-webhook-")
    try:
        mesh = webhook_cert.prepare(args, out_dir)
    except Exception as e:  # noqa: BLE001 - bad flags, bad CA material, no API: one line, no traceback
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print(f"{PROG}: --serving-cert=mesh-ca: {detail}", file=sys.stderr)
        return None
    mesh.start()
    if args.webhook_config_name:
        if mesh.api_client is None:
            log.warning("--webhook-config-name ignored: no Kubernetes API")
        else:
            # watched and re-patched whenever it drifts; every replica patches the same root
            server.watch_webhook_ca_bundles(mesh.api_client, args.webhook_config_name, lambda: mesh.bundle)
    return mesh.cert, mesh.key


def main(argv: list[str] | None = None) -> int:
    """Parse, check, then serve injector + CA until drained; a configuration error is one line and exit 2."""
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    problem = config_error(args)
    if problem is not None:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return 2
    make_cert = (lambda: mesh_ca_serving_cert(args)) if args.serving_cert == "mesh-ca" else None
    started: list[discovery.Discovery] = []
    if discovery_enabled(args):   # istiod is not ready until its caches synced: nor is the injector until discovery
        server.add_ready_gate(lambda: None if started and started[0].ready else
                              "discovery has not synced with the Kubernetes API yet")
    services = (ca_service(args, started),) if args.ca_port else ()
    return server.run(args, prog=PROG, serving_cert=make_cert, services=services)


if __name__ == "__main__":
    sys.exit(main())
