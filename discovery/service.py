"""The discovery service, assembled (the shell): informers → store notes on the control plane's loop → what kind
of push → the debounced push queue → the ADS server, which serves `Served` snapshots built from the store.

istiod's flow (`pilot/pkg/xds/discovery.go`, `eds.go`): a change that only touches EndpointSlices is an EDS push of
just the clusters of the Services they belong to — unless it changes what clients check (the Service's SPIFFE
identities, carried in CDS), or the Service is headless (its listeners are per endpoint) or has no selector (its
endpoints decide a pod's inbound ports): those are full pushes. A change of AuthorizationPolicies alone is a push of
LDS only (they are rendered into listeners alone; istiod scopes it the same way); every other change is a full push
of every type. The configuration is built once per store version and only when a push or a proxy asks for it
(`generate.common`), and once per proxy per version (`generate.for_proxy`) when it is asked for clusters or
listeners (EDS is the shared endpoints, so an endpoint push generates nothing per proxy), so a burst of changes
costs one build, not one per change.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import cached_property
from typing import Any

import grpc
from google.protobuf.message import Message
from prometheus_client import Gauge

from . import adapt, debug, generate, nds
from . import protocol as P
from .ads import MAX_STREAMS, AdsServer, Authenticate, new_grpc_server
from .debug import Authorization
from .model import Mesh, Model, ModelError, Proxy, Service
from .peerauth import DEFAULT_ROOT_NAMESPACE
from .push import DEBOUNCE_AFTER, DEBOUNCE_MAX, PushQueue, PushRequest, settle_heap
from .snapshot import layered, push_version
from .store import Changed, Key
from .store import Snapshot as StoreSnapshot
from .watch import Watcher

__all__ = ["MAX_PROXIES", "Discovery", "Mesh", "ModelError", "Served", "classify"]

log = logging.getLogger("meshboot.discovery")

MAX_PROXIES = MAX_STREAMS   # connected proxies: the gRPC server's concurrent-call bound grows by this much

SYNC_WAIT = 30.0            # a proxy that connects before the first full list waits this long, then UNAVAILABLE
MAX_PROXIES_CACHED = 8192   # per-proxy resources kept per snapshot (more connected proxies: rebuilt on demand)
IGNORED = Gauge("meshboot_discovery_ignored_objects",
                "Watched objects left out of the last pushed configuration (see the log for why)")
PROBLEMS = Gauge("meshboot_discovery_object_problems",
                 "Watched objects left out or not fully applied in the last pushed configuration, by kind", ["kind"])
PROBLEM_KINDS = ("Service", "Pod", "EndpointSlice", "PeerAuthentication", "AuthorizationPolicy")


class Served:
    """The ADS server's `Snapshot` for one store version: the model and shared resources built on first use.

    Given the `previous` Served, an EndpointSlice-only change is derived from the newest earlier one whose resources
    were built (`adapt.with_slices`): when the changed Services' clusters and listeners cannot differ
    (`_endpoints_only`, the rule that makes the push EDS-only), the clusters, listeners and the proxies' own
    resources are that Served's objects (but a proxy's on an address whose endpoint ports moved:
    `_moved_addresses`) and only the changed ClusterLoadAssignments are generated. At 1,000
    services x 5 endpoints an endpoint change cost 0.6 s of CPU (adapt.build and generate.common) before this."""

    def __init__(self, objects: StoreSnapshot, mesh: Mesh, root_namespace: str = DEFAULT_ROOT_NAMESPACE,
                 previous: Served | None = None) -> None:
        self.objects, self.mesh, self.root_namespace = objects, mesh, root_namespace
        self._version = push_version()
        self._proxies: dict[tuple[str, ...], dict[str, Mapping[str, Message]]] = {}
        self._ips: dict[tuple[str, ...], tuple[str, ...]] = {}     # the IPs each cached proxy was generated for
        # The Served to derive from: never a chain (an anchor's own anchor is dropped once its resources exist).
        self._anchor: Served | None = previous
        if previous is not None and "shared" not in previous.__dict__:
            self._anchor = previous._anchor
        self._touched: frozenset[Key] | None = None

    @property
    def version(self) -> str:
        return self._version

    @cached_property
    def built(self) -> adapt.Built:
        anchor = self._anchor
        if anchor is not None and anchor.mesh == self.mesh and anchor.root_namespace == self.root_namespace:
            derived = adapt.with_slices(anchor.built, anchor.objects.objects, self.objects.objects)
            if derived is not None:
                built, self._touched = derived
                return built
        return adapt.build(self.objects.objects, self.mesh, self.root_namespace)

    @cached_property
    def shared(self) -> generate.Common:
        built, anchor, touched = self.built, self._anchor, self._touched
        self._anchor = None
        if anchor is None or touched is None or not all(_endpoints_only(anchor, self, s) for s in touched):
            return generate.common(built.model)
        fresh = {e.cluster_name: e for e in generate.endpoints(built.model, only=touched)}
        old = anchor.shared
        endpoints = tuple(fresh.pop(e.cluster_name, e) for e in old.endpoints)
        # Their clusters and listeners are unchanged (EDS is ours), but for a proxy on an address whose endpoints'
        # ports moved: its inbound ports come from them too (generate.inbound_ports).
        moved = _moved_addresses(anchor.built.model, built.model, touched)
        self._ips = {k: ips for k, ips in anchor._ips.items() if moved.isdisjoint(ips)}
        self._proxies = {k: r for k, r in anchor._proxies.items() if k in self._ips}
        return generate.Common(old.clusters, (*endpoints, *fresh.values()), old.listeners)

    @cached_property
    def services(self) -> Mapping[Key, Service]:
        return {s.key: s for s in self.built.model.services}

    @cached_property
    def endpoints(self) -> Mapping[str, Message]:
        """Every proxy's EDS: the shared ClusterLoadAssignments (`generate.for_proxy` adds none of its own)."""
        return {e.cluster_name: e for e in self.shared.endpoints}

    @cached_property
    def name_table(self) -> Mapping[str, Message]:
        """Every proxy's NDS (nds.py): the same table for all, built once per snapshot when first asked for."""
        return nds.resources(self.built.model)

    def resources_for(self, proxy: P.Proxy, type_url: str) -> Mapping[str, Message]:
        key = (proxy.id, proxy.namespace, proxy.service_account, proxy.metadata.get("INSTANCE_IPS", ""))
        endpoints = self.endpoints
        resources = self._proxies.get(key)
        if type_url in (P.EDS, P.NDS):
            # An endpoint push asks every proxy for EDS only: no need to generate its clusters and listeners.
            known = bool(resources) if resources is not None else self._mine(proxy) is not None
            return (endpoints if type_url == P.EDS else self.name_table) if known else {}
        if resources is None:
            mine = self._mine(proxy)
            resources = {} if mine is None else self._generate(mine)
            if len(self._proxies) >= MAX_PROXIES_CACHED:
                self._proxies.clear()
                self._ips.clear()
            self._proxies[key], self._ips[key] = resources, (() if mine is None else mine.ips)
        return resources.get(type_url, {})

    @cached_property
    def _by_name(self) -> dict[str, dict[str, Message]]:
        shared = self.shared
        return {P.CDS: {c.name: c for c in shared.clusters}, P.LDS: {x.name: x for x in shared.listeners}}

    def _generate(self, mine: Proxy) -> dict[str, Mapping[str, Message]]:
        """The proxy's CDS and LDS (`generate.for_proxy`) as layers over the shared ones (snapshot.Layered)."""
        res, shared, by_name = generate.for_proxy(self.built.model, self.shared, mine), self.shared, self._by_name
        return {P.CDS: layered(by_name[P.CDS], shared.clusters, res.clusters, _name),
                P.LDS: layered(by_name[P.LDS], shared.listeners, res.listeners, _name)}

    def _mine(self, proxy: P.Proxy) -> Proxy | None:
        """The generator's view of the connected node; None (logged) when the model refuses it."""
        try:
            return adapt.proxy_for(self.built, proxy)
        except ModelError as e:
            log.warning("no configuration for proxy", extra={"proxy": proxy.id[:200], "error": str(e)})
            return None


def _name(resource: Any) -> str:
    return str(resource.name)


def _moved_addresses(old: Model, new: Model, services: frozenset[Key]) -> set[str]:
    """The addresses whose endpoints of `services` differ in service, port name or port between two models."""
    def ports(model: Model) -> set[tuple[str, Key, str, int]]:
        return {(e.address, e.service, e.port_name, e.port) for s in services
                for e in model.endpoints_by_service.get(s, ())}
    return {address for address, *_ in ports(old) ^ ports(new)}


def _sliced_services(old: Served, new: Served, slices: frozenset[Key]) -> set[Key]:
    """The Services the changed EndpointSlices belong to (a deleted slice is read from the older snapshot)."""
    out = set()
    for ns, name in slices:
        for snap in (new.objects, old.objects):
            obj = snap.get("EndpointSlice", ns, name)
            label = obj.get("metadata", {}).get("labels", {}).get(adapt.SERVICE_NAME_LABEL) if obj else None
            if label:
                out.add((ns, label))
    return out


def _endpoints_only(old: Served, new: Served, key: Key) -> bool:
    """An endpoint change of this Service needs no CDS/LDS: same Service, has a selector, not headless, same SANs."""
    a, b = old.services.get(key), new.services.get(key)
    if a is None or b is None:
        return a is None and b is None
    if a != b or b.headless or not b.selector:
        return False
    return generate.service_sans(old.built.model, a) == generate.service_sans(new.built.model, b)


def problem_counts(problems: tuple[str, ...]) -> dict[str, int]:
    """Problem lines per kind (each line starts with its kind); a bounded label set: anything else is "other"."""
    counts = dict.fromkeys((*PROBLEM_KINDS, "other"), 0)
    for problem in problems:
        kind = problem.split(" ", 1)[0]
        counts[kind if kind in PROBLEM_KINDS else "other"] += 1
    return counts


def classify(old: Served, new: Served, keys: Mapping[str, frozenset[Key]]) -> PushRequest | None:
    """The push a store change needs: EDS-only for EndpointSlice changes that allow it; LDS-only when only
    AuthorizationPolicies changed (they are rendered into virtualInbound alone, so clusters and endpoints cannot
    differ: istiod scopes such a push the same way); else full; None when the changed slices belong to no routed
    Service."""
    if set(keys) == {"AuthorizationPolicy"}:
        return PushRequest(new, full=True, types=frozenset({P.LDS}), reasons=frozenset({"authorizationpolicy"}))
    if set(keys) != {"EndpointSlice"}:
        return PushRequest(new, full=True, reasons=frozenset(k.lower() for k in keys))
    services = _sliced_services(old, new, keys["EndpointSlice"])
    if not all(_endpoints_only(old, new, s) for s in services):
        return PushRequest(new, full=True, reasons=frozenset({"endpoint-identity"}))
    names = adapt.eds_clusters(new.built, services)
    return PushRequest(new, full=False, endpoints=names, reasons=frozenset({"endpoint"})) if names else None


class Discovery:
    """The running discovery service: `add_to(grpc_server)` before the server starts, then `await start()` in its
    loop, `await stop()` at the end. `authenticate(token) -> (namespace, service_account)` is the CA's verifier."""

    def __init__(self, api_client: Any, mesh: Mesh | None = None, *, authenticate: Authenticate | None = None,
                 root_namespace: str = DEFAULT_ROOT_NAMESPACE, watcher: Watcher | None = None,
                 debounce: tuple[float, float] = (DEBOUNCE_AFTER, DEBOUNCE_MAX), sync_wait: float = SYNC_WAIT) -> None:
        self.watcher = watcher if watcher is not None else Watcher(api_client)
        self.mesh, self.root_namespace = mesh or Mesh(), root_namespace
        self._verify, self._debounce, self._sync_wait = authenticate, debounce, sync_wait
        self.served = Served(self.watcher.store.snapshot(), self.mesh, root_namespace)
        self.ads = AdsServer(self.served, self._authenticate)
        self._ready: asyncio.Event | None = None
        self._queue: PushQueue | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._reported: frozenset[str] = frozenset()
        self._plaintext: grpc.aio.Server | None = None

    def add_to(self, server: grpc.aio.Server, authenticate: Authenticate | None = None) -> None:
        """Serve ADS on `server` (the CA's, like istiod's 15012); `authenticate` replaces the constructor's."""
        if authenticate is not None:
            self._verify = authenticate
        self.ads.add_to(server)

    async def serve_plaintext(self, host: str, port: int) -> int:
        """Also serve ADS without TLS (istiod's --grpcAddr, 15010); returns the bound port. Unlike istiod's 15010,
        streams here still need the bearer token: the node's identity is checked the same way on both ports."""
        server = new_grpc_server()
        self.ads.add_to(server)
        try:
            port = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        except RuntimeError as e:
            raise OSError(f"--grpcAddr: cannot listen on {host}:{port} ({e})") from None
        await server.start()
        self._plaintext = server
        log.info("discovery serving plaintext xDS", extra={"address": f"{host}:{port}"})
        return port

    async def debug(self, target: str) -> tuple[str, str, bytes]:
        """istiod's /debug/syncz, /debug/config_dump?proxyID=, /debug/connections, /debug/authorizationz (debug.py),
        for the monitoring port."""
        return await debug.handle(self.ads, target, authorization=self._authorization)

    def _authorization(self) -> Authorization:
        built = self.served.built
        return built.model.authz, built.problems

    async def start(self) -> None:
        """Start the informers; the first full push happens once every kind is listed."""
        loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._queue = PushQueue(self._push, *self._debounce)
        self._queue.start()
        self._unsubscribe = self.watcher.subscribe_on_loop(loop, self._on_change)
        self.watcher.start()
        self._tasks.append(loop.create_task(self._first_sync(), name="discovery-first-sync"))

    async def stop(self) -> None:
        if self._plaintext is not None:
            await self._plaintext.stop(1.0)
        if self._unsubscribe is not None:
            self._unsubscribe()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._queue is not None:
            await self._queue.stop()
        await asyncio.to_thread(self.watcher.stop)

    @property
    def ready(self) -> bool:
        return self._ready is not None and self._ready.is_set()

    async def _first_sync(self) -> None:
        await self.watcher.wait_synced()
        self.served = Served(self.watcher.store.snapshot(), self.mesh, self.root_namespace)
        await self._push(PushRequest(self.served, full=True, reasons=frozenset({"sync"})))
        assert self._ready is not None and self._queue is not None
        self._ready.set()
        if self.watcher.store.version != self.served.objects.version:      # changed while the push was queued
            self._on_change(Changed(self.watcher.store.version, {"sync": frozenset()}))
        log.info("discovery synced with the Kubernetes API", extra={"store_version": self.served.objects.version})

    def _on_change(self, note: Changed) -> None:
        """On the loop, in version order: move to the newest store snapshot and queue the push this note needs."""
        if not self.ready or self._queue is None:
            return                    # the first sync pushes everything listed so far
        snap = self.watcher.store.snapshot()
        old = self.served
        new = old if snap.version == old.objects.version else Served(snap, self.mesh, self.root_namespace, old)
        request = classify(old, new, note.keys)
        self.served = new
        if request is not None:
            self._queue.enqueue(request)

    async def _push(self, request: PushRequest) -> None:
        served = request.snapshot
        if isinstance(served, Served):
            self._report(served.built.problems)
            if request.full:
                settle_heap()
        await self.ads.push(request)

    def _report(self, problems: tuple[str, ...]) -> None:
        """Log each object left out once (until it is fixed), and count them."""
        IGNORED.set(len(problems))
        for kind, count in problem_counts(problems).items():
            PROBLEMS.labels(kind).set(count)
        for problem in problems:
            if problem not in self._reported:
                log.warning("watched object ignored", extra={"problem": problem[:500]})
        self._reported = frozenset(problems)

    async def _authenticate(self, token: str) -> tuple[str, str]:
        """Wait (bounded) for the first sync — a proxy served before it would get an empty mesh — then verify."""
        if self._ready is None:
            raise P.Refused("UNAVAILABLE", "discovery is not started")
        try:
            await asyncio.wait_for(self._ready.wait(), self._sync_wait)
        except TimeoutError:
            raise P.Refused("UNAVAILABLE", "discovery has not synced with the Kubernetes API yet; retry") from None
        if self._verify is None:
            raise P.Refused("UNAUTHENTICATED", "no token verifier is configured for discovery")
        result = self._verify(token)
        return await result if isinstance(result, Awaitable) else result
