"""istiod's debug endpoints for discovery: /debug/syncz, /debug/config_dump?proxyID=, /debug/connections,
/debug/authorizationz.

The pure part turns the ADS server's rows (`AdsServer.sync_status()`) and one proxy's last-sent resources
(`ads.sent_config`) into istiod's JSON; `handle(ads, target)` is the thin shell the monitoring port (15014, where
istiod serves them and istioctl reads them) calls. The query is hostile: a proxyID is bounded and checked, an unknown
one is a 404 naming it, and a dump is bounded in resources and bytes, rendered off the event loop so that xDS keeps
being served meanwhile.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from envoy.admin.v3 import config_dump_pb2, config_dump_shared_pb2
from google.protobuf import any_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message

from . import ads, authz
from . import protocol as P

MAX_PROXY_ID_CHARS = 253 + 1 + 63          # <pod>.<namespace>: a pod name and a namespace at their Kubernetes bounds
MAX_DUMP_RESOURCES = 50_000                # one proxy's dump: refused above this before any rendering
MAX_DUMP_BYTES = 64 * 1024 * 1024          # ... and above this once rendered
MAX_QUERY_CHARS = 2048
_PROXY_ID = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")   # DNS-1123 subdomain characters: pod names and namespaces
NOT_FOUND = (b"not found: /debug/syncz, /debug/config_dump?proxyID=<pod>.<namespace>, /debug/connections, "
             b"/debug/authorizationz\n")
MAX_LISTED_POLICIES = 10_000               # /debug/authorizationz lists at most this many (and says how many more)
AUTHZ_KIND = "AuthorizationPolicy"
Authorization = tuple[authz.Policies, tuple[str, ...]]   # the served snapshot's policies and every watched problem
_DUMPING = threading.Lock()                # one dump rendered at a time (each is CPU-bound, in a thread); others 429

# istiod's SyncStatus fields per type: <field>_sent / <field>_acked carry nonces.
_SYNC_FIELDS = {P.CDS: "cluster", P.LDS: "listener", P.RDS: "route", P.EDS: "endpoint"}
_DUMPS_BY_TYPE = {P.CDS: "ClustersConfigDump", P.EDS: "EndpointsConfigDump", P.LDS: "ListenersConfigDump",
                  P.RDS: "RoutesConfigDump"}


class DebugError(Exception):
    """An answer other than 200: `status` is the HTTP status line, the message says what to do."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _rfc3339(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if seconds else ""


def syncz(rows: Iterable[Mapping[str, Any]], istiod: str = "") -> list[dict[str, Any]]:
    """istiod's /debug/syncz: one SyncStatus per connected proxy (sent/acked nonces per type, `resources` by type URL),
    plus what meshboot adds for proxy-status: each type's word, the versions sent, the connection and its time."""
    out = []
    for row in rows:
        status: dict[str, Any] = {"cluster_id": row["cluster_id"], "proxy": row["proxy"],
                                  "proxy_type": row["proxy_type"], "istio_version": row["istio_version"]}
        resources = row["resources"]
        for type_url, name in _SYNC_FIELDS.items():
            if type_url in resources:
                status[f"{name}_sent"] = resources[type_url]["sent"]
                status[f"{name}_acked"] = resources[type_url]["acked"]
        status["resources"] = {t: {"sent": r["sent"], "acked": r["acked"], "sentTime": _rfc3339(r["sentTime"]),
                                   "sentVersion": row["sent_versions"].get(t, ""),
                                   "ackedVersion": r["ackedVersion"], "lastError": r["lastError"]}
                               for t, r in resources.items()}
        status.update({"sync_status": row["status"], "connection_id": row["connection_id"],
                       "connected_at": _rfc3339(row["connected_at"]), "delta": row["delta"], "istiod": istiod})
        out.append(status)
    return out


def connections(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """istiod's /debug/connections (AdsClients): how many, and each stream's id, peer, time and watched types."""
    clients = [{"connectionId": r["connection_id"], "connectedAt": _rfc3339(r["connected_at"]),
                "address": r["address"], "proxy": r["proxy"], "watches": sorted(r["resources"])} for r in rows]
    return {"totalClients": len(clients), "clients": clients}


def _scope(policy: authz.Policy) -> str:
    if policy.mesh_wide:
        return "mesh"
    return "namespace" if policy.selectors is None else "workload"


def authorizationz(policies: authz.Policies, problems: Iterable[str]) -> dict[str, Any]:
    """istiod's /debug/authorizationz, meshboot's shape: every compiled AuthorizationPolicy (scope, the action enforced
    — a refused policy's fail-closed form — and its problem) and every AuthorizationPolicy problem, so a policy that
    cannot be applied is visible where proxy-status looks, not only in the log."""
    every = [*policies.mesh, *(p for ns in sorted(policies.namespaces) for p in policies.namespaces[ns]
                               if not p.mesh_wide)]
    listed = [{"namespace": p.namespace, "name": p.name, "scope": _scope(p), "action": p.action,
               "rules": len(p.rules), "dry_run": p.dry_run, "problem": p.problem}
              for p in every[:MAX_LISTED_POLICIES]]
    found = [p for p in problems if p.startswith(AUTHZ_KIND + " ")]
    return {"root_namespace": policies.root_namespace, "total": len(every), "policies": listed,
            "not_listed": len(every) - len(listed), "problems": found[:MAX_LISTED_POLICIES],
            "problems_not_listed": max(0, len(found) - MAX_LISTED_POLICIES)}


def proxy_id(query: str) -> str:
    """The `proxyID` parameter (`<pod>.<namespace>`), checked; DebugError 400 naming the parameter otherwise."""
    if len(query) > MAX_QUERY_CHARS:
        raise DebugError("400 Bad Request", f"query longer than {MAX_QUERY_CHARS} characters")
    values = parse_qs(query, keep_blank_values=True).get("proxyID", [])
    if len(values) != 1 or not values[0]:
        raise DebugError("400 Bad Request", "proxyID: give exactly one, as <pod>.<namespace> "
                         "(e.g. /debug/config_dump?proxyID=web-1.default)")
    value = values[0]
    if len(value) > MAX_PROXY_ID_CHARS:
        raise DebugError("400 Bad Request", f"proxyID: longer than {MAX_PROXY_ID_CHARS} characters")
    if not _PROXY_ID.fullmatch(value) or "." not in value:
        raise DebugError("400 Bad Request", "proxyID: must be <pod>.<namespace> (lower-case letters, digits, "
                         "'-' and '.')")
    return value


def _packed(msg: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


def _type_dump(sent: ads.Sent) -> Message:
    """One type's Envoy admin dump (ClustersConfigDump, ...) of what was sent, each resource stamped with the
    version and time of the response that carried it."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(sent.sent_at * 1e9))
    shared = config_dump_shared_pb2
    if sent.type_url == P.CDS:
        return shared.ClustersConfigDump(version_info=sent.version, dynamic_active_clusters=[
            shared.ClustersConfigDump.DynamicCluster(version_info=sent.version, cluster=_packed(m), last_updated=stamp)
            for m in sent.resources.values()])
    if sent.type_url == P.EDS:
        return shared.EndpointsConfigDump(dynamic_endpoint_configs=[
            shared.EndpointsConfigDump.DynamicEndpointConfig(version_info=sent.version, endpoint_config=_packed(m),
                                                              last_updated=stamp) for m in sent.resources.values()])
    if sent.type_url == P.LDS:
        state = shared.ListenersConfigDump.DynamicListenerState
        return shared.ListenersConfigDump(version_info=sent.version, dynamic_listeners=[
            shared.ListenersConfigDump.DynamicListener(name=n, active_state=state(
                version_info=sent.version, listener=_packed(m), last_updated=stamp))
            for n, m in sent.resources.items()])
    return shared.RoutesConfigDump(dynamic_route_configs=[
        shared.RoutesConfigDump.DynamicRouteConfig(version_info=sent.version, route_config=_packed(m),
                                                   last_updated=stamp) for m in sent.resources.values()])


def config_dump(proxy: str, sent: list[ads.Sent]) -> bytes:
    """What was last sent to one proxy as Envoy's /config_dump JSON (snake_case, as Envoy's admin prints it), in
    Envoy's order; DebugError 413 when it is over the bounds."""
    total = sum(len(s.resources) for s in sent)
    if total > MAX_DUMP_RESOURCES:
        raise DebugError("413 Content Too Large", f"config dump of {proxy}: {total} resources, over the bound of "
                         f"{MAX_DUMP_RESOURCES}")
    dump = config_dump_pb2.ConfigDump(configs=[_packed(_type_dump(s)) for s in sent if s.type_url in _DUMPS_BY_TYPE])
    body = json.dumps(json_format.MessageToDict(dump, preserving_proto_field_name=True), indent=1).encode()
    if len(body) > MAX_DUMP_BYTES:
        raise DebugError("413 Content Too Large", f"config dump of {proxy}: {len(body)} bytes, over the bound of "
                         f"{MAX_DUMP_BYTES}")
    return body


def _json(value: Any) -> tuple[str, str, bytes]:
    return "200 OK", "application/json", json.dumps(value, indent=1).encode() + b"\n"


async def handle(server: ads.AdsServer, target: str, istiod: str = "",
                 authorization: Callable[[], Authorization] | None = None) -> tuple[str, str, bytes]:
    """Answer one GET of /debug/...: (status line, content type, body). Never raises. `authorization` gives the served
    snapshot's policies and problems (None: /debug/authorizationz is not served)."""
    parts = urlsplit(target[:MAX_QUERY_CHARS * 2])
    try:
        if parts.path == "/debug/authorizationz" and authorization is not None:
            return _json(authorizationz(*authorization()))
        if parts.path == "/debug/syncz":
            return _json(syncz(server.sync_status(), istiod or socket.gethostname()))
        if parts.path == "/debug/connections":
            return _json(connections(server.sync_status()))
        if parts.path == "/debug/config_dump":
            return await _config_dump(server, proxy_id(parts.query))
        return "404 Not Found", "text/plain", NOT_FOUND
    except DebugError as e:
        return e.status, "text/plain", e.message.encode() + b"\n"


async def _config_dump(server: ads.AdsServer, proxy: str) -> tuple[str, str, bytes]:
    conns = server.connections(proxy)
    if not conns:
        raise DebugError("404 Not Found", f"proxyID: no proxy {proxy} is connected to this control plane (see "
                         "/debug/syncz for the connected ones)")
    if not _DUMPING.acquire(blocking=False):  # waiting for it would park a thread of the loop's default executor
        raise DebugError("429 Too Many Requests", "a config dump is being rendered (one at a time); retry shortly")
    try:
        sent = ads.sent_config(conns[-1])   # the newest stream: an older one of the same pod is on its way out
        body = await asyncio.to_thread(config_dump, proxy, sent)
    finally:
        _DUMPING.release()
    return "200 OK", "application/json", body + b"\n"
