"""The mesh part of the whole-pod flow, served by meshboot's discovery (the pods' agents run in proxy mode): requests
whose fate both Envoys' access logs tell (cluster, peer identity, TLS version), pod-a's Envoy learning pod-b from EDS,
and a STRICT PeerAuthentication created in the API server, which reaches pod-b's Envoy as a new inbound listener
with no restart.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from e2e.local.kubelet import PodRun, http_get
from meshboot import constants as C
from testing.netns import poll

# Run inside a pod's app container (kubectl exec): a GET, reporting what came back.
CLIENT = """\
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    body = r.read()
    print(json.dumps({"status": r.status, "bytes": len(body), "server": r.headers.get("Server", "")}))
"""


@dataclass
class Request:
    """One GET from a pod's app, and what each side logged about it (empty: nothing logged in time)."""

    url: str
    response: dict[str, Any] = field(default_factory=dict)    # {} when the request failed
    error: str = ""
    log_a: list[str] = field(default_factory=list)             # pod-a's Envoy: lines for the outbound cluster
    log_b: list[str] = field(default_factory=list)             # pod-b's Envoy: lines for the inbound cluster
    app_b: list[str] = field(default_factory=list)             # pod-b's app log lines for the request path


def _log_size(run: PodRun | None, container: str) -> int:
    return len(run.logs(container)) if run is not None else 0


def _new_lines(run: PodRun | None, container: str, since: int, needle: str, started: str = "") -> list[str]:
    """Lines holding `needle` logged after offset `since`; with `started` (an Envoy %START_TIME%), only access-log
    lines of connections that began at or after it: Envoy flushes about once a second, so a line of an earlier
    connection can land after the offset."""
    if run is None:
        return []
    lines = [line for line in run.logs(container)[since:].splitlines() if needle in line]
    return [line for line in lines if line[1:25] >= started] if started else lines


def envoy_now() -> str:
    """Now, written as Envoy's default %START_TIME% (UTC, milliseconds), which the access-log lines begin with."""
    now = dt.datetime.now(dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def request(client: PodRun, url: str, path: str, pb: PodRun, pa: PodRun | None, outbound: str, inbound: str,
            wait: float = 10.0, expect_b: str = "") -> Request:
    """GET `url` from `client`'s app; then wait (bounded) for pod-b's Envoy access log line holding `expect_b` (and
    pod-a's, when the client is pod-a) and pod-b's app line. Envoy flushes its access log about once a second, so a
    line of an earlier connection (e.g. a TLS check) may arrive first: `expect_b` tells this request's line apart.
    The wait ends as soon as the lines are there, so its bound is generous: on a loaded machine (CI's two cores
    running the whole suite) a flush second plus a slow admin read can pass 3 s. A caller expecting no line (a
    refused request) passes a short `wait`."""
    since_a, since_b = _log_size(pa, C.PROXY_CONTAINER), _log_size(pb, C.PROXY_CONTAINER)
    since_app = _log_size(pb, "app")
    started = envoy_now()
    res = client.exec("app", ["python3", "-c", CLIENT, url], timeout=15)
    out = Request(url=url)
    if res.returncode == 0:
        out.response = json.loads(res.stdout)
    else:
        out.error = (res.stderr.strip().splitlines() or ["failed"])[-1]

    def seen() -> Request:
        out.log_a = _new_lines(pa, C.PROXY_CONTAINER, since_a, f" {outbound} ", started)
        out.log_b = _new_lines(pb, C.PROXY_CONTAINER, since_b, f" {inbound} ", started)
        out.app_b = _new_lines(pb, "app", since_app, path)
        return out

    def done(o: Request) -> bool:
        return (any(expect_b in line for line in o.log_b) and (pa is None or bool(o.log_a))
                and (bool(o.app_b) or not o.response))

    return poll(seen, done, wait)


def wait_for_endpoint(run: PodRun, cluster: str, address: str, timeout: float = 10.0) -> bool:
    """Poll the pod's Envoy `/clusters` until `cluster` has the endpoint `address` (EDS arrived)."""
    needle = f"{cluster}::{address}::"
    body = poll(lambda: run.call(http_get, "127.0.0.1", C.ENVOY_ADMIN_PORT, "/clusters", 2.0).body.decode(),
                lambda b: needle in b, timeout)
    return needle in body


def inbound_transports(run: PodRun, port: int) -> list[str]:
    """The transport protocols of the pod's Envoy's active virtualInbound chains for `port` (`0.0.0.0_<port>`)."""
    res = run.call(http_get, "127.0.0.1", C.ENVOY_ADMIN_PORT, "/config_dump?resource=dynamic_listeners", 3.0)
    for item in json.loads(res.body).get("configs") or []:
        listener = (item.get("active_state") or {}).get("listener") or {}
        if listener.get("name") == C.VIRTUAL_INBOUND:
            return [(ch.get("filter_chain_match") or {}).get("transport_protocol", "")
                    for ch in listener.get("filter_chains") or [] if ch.get("name") == f"0.0.0.0_{port}"]
    return []


def wait_for_transports(run: PodRun, port: int, want: list[str], timeout: float = 10.0) -> list[str]:
    """Poll until the inbound chains of `port` are `want` (a new listener from a push); the last seen."""
    return poll(lambda: inbound_transports(run, port), lambda seen: seen == want, timeout)


def strict_peer_authentication(namespace: str) -> dict[str, Any]:
    """`kubectl apply` of a namespace-wide STRICT PeerAuthentication."""
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": namespace}, "spec": {"mtls": {"mode": "STRICT"}}}


def peer_authentication(namespace: str, name: str, mode: str, selector: dict[str, str] | None = None,
                        ports: dict[int, str] | None = None) -> dict[str, Any]:
    """A PeerAuthentication as `kubectl apply` sends it: mesh-wide in the root namespace, namespace-wide, or for the
    workloads `selector` matches, with `portLevelMtls` keyed by the workload's target port (mode "" = no `mtls`)."""
    spec: dict[str, Any] = {"mtls": {"mode": mode} if mode else {}}
    if selector:
        spec["selector"] = {"matchLabels": dict(selector)}
    if ports:
        spec["portLevelMtls"] = {str(p): {"mode": m} for p, m in ports.items()}
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def _config_dump(run: PodRun, query: str) -> list[dict[str, Any]]:
    res = run.call(http_get, "127.0.0.1", C.ENVOY_ADMIN_PORT, f"/config_dump?{query}", 3.0)
    configs: list[dict[str, Any]] = json.loads(res.body).get("configs") or []
    return configs


def outbound_socket_matches(run: PodRun, cluster: str) -> list[str] | None:
    """The transport socket matches of the pod's Envoy's active cluster `cluster` (Istio's auto-mTLS: `tlsMode-istio`,
    `tlsMode-disabled`; [] = plaintext to every endpoint); None when Envoy has no such cluster."""
    for item in _config_dump(run, "resource=dynamic_active_clusters"):
        c = item.get("cluster") or {}
        if c.get("name") == cluster:
            return [m.get("name", "") for m in c.get("transport_socket_matches") or []]
    return None


def endpoint_tls_modes(run: PodRun, cluster: str) -> dict[str, str]:
    """`address:port` → the `tlsMode` metadata of each endpoint the pod's Envoy has for `cluster` from EDS ("" when
    absent: the endpoint gets plaintext)."""
    out: dict[str, str] = {}
    for item in _config_dump(run, "resource=dynamic_endpoint_configs&include_eds"):
        cfg = item.get("endpoint_config") or {}
        if cfg.get("cluster_name") != cluster:
            continue
        for group in cfg.get("endpoints") or []:
            for lb in group.get("lb_endpoints") or []:
                sa = ((lb.get("endpoint") or {}).get("address") or {}).get("socket_address") or {}
                meta = ((lb.get("metadata") or {}).get("filter_metadata") or {}).get("envoy.transport_socket_match")
                out[f"{sa.get('address')}:{sa.get('port_value')}"] = str((meta or {}).get("tlsMode", ""))
    return out


# ---- AuthorizationPolicy ------------------------------------------------------------------------------------------
def authorization_policy(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """An AuthorizationPolicy as `kubectl apply` sends it (`spec` as written: `{}` is Istio's allow-nothing)."""
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def virtual_inbound(run: PodRun) -> dict[str, Any]:
    """The pod's Envoy's active virtualInbound as its admin `/config_dump` shows it (`listener`, `last_updated`,
    `version_info`); {} when it has none."""
    for item in _config_dump(run, "resource=dynamic_listeners"):
        state = item.get("active_state") or {}
        if (state.get("listener") or {}).get("name") == C.VIRTUAL_INBOUND:
            return dict(state)
    return {}


def inbound_rbac(run: PodRun, port: int) -> list[tuple[str, tuple[str, ...]]]:
    """(action, RBAC policy names) of each RBAC network filter in the first virtualInbound chain of `port`, in chain
    order ([] = no AuthorizationPolicy applies): what the server's Envoy enforces now."""
    listener = virtual_inbound(run).get("listener") or {}
    for chain in listener.get("filter_chains") or []:
        if chain.get("name") == f"0.0.0.0_{port}":
            return [(str((f["typed_config"].get("rules") or {}).get("action", "ALLOW")),
                     tuple(sorted((f["typed_config"].get("rules") or {}).get("policies") or {})))
                    for f in chain.get("filters") or [] if f.get("name") == "envoy.filters.network.rbac"]
    return []


def envoy_stats(run: PodRun, needle: str) -> dict[str, int]:
    """The pod's Envoy's counters whose name holds `needle` (admin `/stats`, not the Prometheus inclusion list)."""
    res = run.call(http_get, "127.0.0.1", C.ENVOY_ADMIN_PORT, f"/stats?filter={needle}", 3.0)
    out: dict[str, int] = {}
    for line in res.body.decode().splitlines():
        name, _, value = line.partition(": ")
        if needle in name and value.strip().isdigit():
            out[name] = int(value)
    return out
