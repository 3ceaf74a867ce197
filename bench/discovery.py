"""Discovery (issue 11): the ADS server pushing Istio-shaped xDS to 500 simulated proxies in separate processes.

One server process runs the control plane's discovery exactly as production wires it (discovery.service.Discovery:
the watcher's store → a Served per store version (adapt.build, generate.common, generate.for_proxy per proxy) →
service.classify → push.PushQueue with its 100 ms debounce → ads.AdsServer on a real loopback port, the node checked
against its token); only the informer threads are replaced: the bench lists 1,000 Services x 5 sidecar Pods (their
EndpointSlices, 10 Namespaces) into the store and writes each change as a watch event would (store.put). Client
processes run asyncio gRPC streams, one channel (TCP connection) per proxy, that speak SotW ADS as Envoy does: CDS
wildcard, EDS for the EDS clusters named in CDS, LDS, each response ACKed with its version and nonce (serialized as
Envoy does, fields in number order). Clients read only the names they need from the resources (a three-field
protobuf view) so that the server is what is measured; their CPU is printed. Figures:
1. start -> every proxy holds a full config (CDS, complete EDS and LDS ACKed), from the clients' go (processes
   already started; the first sync's build is before the clock, its time is printed too);
2. one endpoint changes (an endpoint turns unready in its EndpointSlice) -> every proxy has ACKed the EDS push,
   p50/p99 (istiod's convergence: includes the 100 ms debounce), and the server's CPU seconds per push; a full
   push (a Service's label changes) as well;
3. the server's RSS (and peak);
4. the floor: the same per-proxy responses (from a Served of the same objects, generated before the clock),
   serialized once (shared resources once, per-proxy ones per proxy) and written to the same streams by a trivial
   gRPC server (same options), to the same clients; the ratio ADS / floor.
Targets: full config <= 3 s, convergence p99 <= 500 ms, RSS <= 600 MB, <= 3x the floor. The server is pinned to
CPU 0 and the clients to the other CPUs (as bench/ca.py), so the server has one core, like istiod's 1 vCPU.

    .venv/bin/python bench/discovery.py [--services 1000] [--endpoints 5] [--proxies 500] [--procs 8]
                                        [--changes 30] [--profile FILE [--profile-from full|changes]]
                                        (quick: --services 100 --proxies 50)
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from discovery import protocol as P
from discovery.ads import SERVICE
from meshboot.protowire import varint

TARGET_FULL_S, TARGET_P99_MS, TARGET_RSS_MB, TARGET_RATIO = 3.0, 500.0, 600.0, 3.0
NAMESPACES = 100
TICK = os.sysconf("SC_CLK_TCK")
STDERR = tempfile.TemporaryFile()      # the children's stderr: shown after the run, minus gRPC's shutdown noise
PROFILE: list[cProfile.Profile | None] = [None]     # the server's profiler (--profile), for --profile-from
NOISE = ("CancelledError", "Traceback (most recent call last)", "_schedule_rpc_coro", "GOAWAY")


# ---- the synthetic mesh (server side): Kubernetes objects, as the watcher stores them ----------------------------
ROOT_NAMESPACE = "istio-system"         # meshConfig.rootNamespace's default: where mesh-wide policies live
ROOT_POLICIES = 4                       # mesh-wide policies (root namespace); the rest are spread over the namespaces
SIZE = {"namespaces": NAMESPACES}       # --namespaces, set by main() in every process


def ns_of(s: int) -> str:
    return f"ns-{s % SIZE['namespaces']}"


def _ip(base: int, j: int) -> str:
    return f"10.{base + (j >> 16)}.{(j >> 8) & 255}.{j & 255}"


def proxy_pod(p: int, services: int, endpoints: int, proxies: int) -> tuple[int, int]:
    """(service, endpoint) of proxy p: one pod of each Service first (so every namespace has proxies: Service s is in
    namespace s mod N), then each Service's next pod."""
    return p % services, (p // services) % endpoints


def proxy_node(p: int, services: int, endpoints: int, proxies: int) -> tuple[str, dict[str, str]]:
    """The node id and metadata an injected sidecar of that pod sends."""
    s, k = proxy_pod(p, services, endpoints, proxies)
    ns, ip = ns_of(s), _ip(1, s * endpoints + k)
    node_id = f"sidecar~{ip}~svc-{s}-{k}.{ns}~{ns}.svc.cluster.local"
    return node_id, {"NAMESPACE": ns, "SERVICE_ACCOUNT": f"sa-{s}", "INSTANCE_IPS": ip, "ISTIO_VERSION": "1.28.0"}


def slice_object(s: int, endpoints: int, unready: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Service s's EndpointSlice as the API server sends it (endpoint k unready when k is in `unready`)."""
    ns, name = ns_of(s), f"svc-{s}"
    return {"metadata": {"name": f"{name}-abcde", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [_ip(1, s * endpoints + k)], "conditions": {"ready": k not in unready},
                           "targetRef": {"kind": "Pod", "namespace": ns, "name": f"{name}-{k}"}}
                          for k in range(endpoints)]}


def service_object(s: int, generation: int = 0) -> dict[str, Any]:
    """Service s: http 80 -> the pods' named port http (8080); `generation` is a label a full push changes."""
    ns, name = ns_of(s), f"svc-{s}"
    return {"metadata": {"name": name, "namespace": ns, "labels": {"app": name, "bench-gen": str(generation)}},
            "spec": {"type": "ClusterIP", "clusterIP": _ip(96, s), "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def _policy(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def _root_policy(i: int, generation: int) -> dict[str, Any]:
    """Mesh-wide policies: DENY known-bad networks, DENY a quarantined namespace, AUDIT every identity; one root
    policy with a selector (it applies in every namespace to the workloads it matches: none here)."""
    bad = ["203.0.113.0/24", "198.51.100.0/24", *([f"192.0.2.{generation}/32"] if generation else [])]
    specs = [{"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": bad}}]}]},
             {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["quarantine", "ns-untrusted-*"]}}]}]},
             {"action": "AUDIT", "rules": [{"from": [{"source": {"principals": ["*"]}}]}]},
             {"selector": {"matchLabels": {"app": "prometheus"}}, "action": "ALLOW",
              "rules": [{"from": [{"source": {"namespaces": ["monitoring"]}}], "to": [{"operation": {
                  "ports": ["9090"]}}]}]}]
    return _policy(ROOT_NAMESPACE, f"mesh-{i}", specs[i % len(specs)])


def policy_object(i: int, generation: int = 0) -> dict[str, Any]:
    """AuthorizationPolicy i: the first ROOT_POLICIES mesh-wide; then, with j = i - ROOT_POLICIES, namespace
    ns-(j mod N) gets, for m = j div N: m = 0 a namespace-wide DENY (some namespaces and a sandbox account, on the
    app port); m >= 1 a workload ALLOW selecting svc-(n + N(m-1)) (a Service of that namespace): principals of two
    clients on 8080, its namespace and the root namespace on 8080/15090, and a trusted network. `generation` > 0
    adds a value (a policy change)."""
    if i < ROOT_POLICIES:
        return _root_policy(i, generation)
    n_ns = SIZE["namespaces"]
    n, m = (i - ROOT_POLICIES) % n_ns, (i - ROOT_POLICIES) // n_ns
    ns, extra = f"ns-{n}", [f"cluster.local/ns/ns-{n}/sa/bench-gen-{generation}"] if generation else []
    if m == 0:
        return _policy(ns, "deny-untrusted", {"action": "DENY", "rules": [
            {"from": [{"source": {"namespaces": ["sandbox", f"ns-{(n + 1) % n_ns}-dev",
                                                 *([f"gen-{generation}"] if generation else [])]}}],
             "to": [{"operation": {"ports": ["8080"]}}]},
            {"from": [{"source": {"principals": [f"cluster.local/ns/{ns}/sa/sandbox"]}}]}]})
    s = n + n_ns * (m - 1)
    clients = [f"cluster.local/ns/ns-{(n + 1) % n_ns}/sa/sa-{(s + 1) % 1000}", f"cluster.local/ns/{ns}/sa/sa-{s}"]
    return _policy(ns, f"allow-svc-{s}", {"selector": {"matchLabels": {"app": f"svc-{s}"}}, "action": "ALLOW",
                                         "rules": [
        {"from": [{"source": {"principals": [*clients, *extra]}}], "to": [{"operation": {"ports": ["8080"]}}]},
        {"from": [{"source": {"namespaces": [ns, ROOT_NAMESPACE]}}], "to": [{"operation": {
            "ports": ["8080", "15090"]}}]},
        {"from": [{"source": {"ipBlocks": ["10.200.0.0/16"],
                               "notPrincipals": [f"cluster.local/ns/{ns}/sa/sandbox"]}}]}]})


def policy_change(c: int) -> int:
    """The policy change number c rewrites: alternately a workload ALLOW (one selecting a Service that has a proxy)
    and a namespace-wide DENY, in namespace 7c mod N."""
    n_ns = SIZE["namespaces"]
    n = (7 * c) % n_ns
    return ROOT_POLICIES + n + n_ns * (1 + c % 4 if c % 2 == 0 else 0)


def mesh_objects(services: int, endpoints: int, policies: int = 0) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    """Every watched kind: the Namespaces (and the root one), `services` Services with one EndpointSlice each,
    `endpoints` ready sidecar Pods per Service, `policies` AuthorizationPolicies (policy_object), no
    PeerAuthentication (PERMISSIVE); each object cut by discovery.kinds.keep."""
    from discovery import kinds
    raw: list[tuple[str, dict[str, Any]]] = [
        ("Namespace", {"metadata": {"name": name, "labels": {"istio-injection": "enabled"}},
                       "status": {"phase": "Active"}})
        for name in [ROOT_NAMESPACE, *(f"ns-{n}" for n in range(SIZE["namespaces"]))]]
    raw += [("AuthorizationPolicy", policy_object(i)) for i in range(policies)]
    for s in range(services):
        ns, name = ns_of(s), f"svc-{s}"
        raw += [("Service", service_object(s)), ("EndpointSlice", slice_object(s, endpoints))]
        raw += [("Pod", {"metadata": {"name": f"{name}-{k}", "namespace": ns,
                                      "labels": {"app": name, "security.istio.io/tlsMode": "istio"}},
                         "spec": {"serviceAccountName": f"sa-{s}", "nodeName": "node-1", "containers": [
                             {"name": "app", "ports": [{"name": "http", "containerPort": 8080}]},
                             {"name": "istio-proxy", "ports": [{"name": "http-envoy-prom", "containerPort": 15090}]}]},
                         "status": {"phase": "Running", "podIP": _ip(1, s * endpoints + k),
                                    "podIPs": [{"ip": _ip(1, s * endpoints + k)}],
                                    "conditions": [{"type": "Ready", "status": "True"}]}})
                for k in range(endpoints)]
    out: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in kinds.KINDS}
    for kind, obj in raw:
        kept = kinds.keep(kind, obj)
        out[kind][kinds.key_of(kept)] = kept
    return out


def token_identity(token: str) -> tuple[str, str]:
    """The bench's token verifier: a client's token is `<namespace>/<service account>` (the CA's JWT check is not
    what is measured here; the node-against-token check that follows it is)."""
    namespace, _, sa = token.partition("/")
    return namespace, sa


def say(*parts: object) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def bench_watcher(objects: Mapping[str, Mapping[tuple[str, str], dict[str, Any]]]) -> Any:
    """discovery.watch.Watcher without its informer threads: its store listed with `objects`; the bench then
    writes changes into the store as the informers would (store.put of a kinds.keep'd object)."""
    from discovery.watch import Watcher

    class BenchWatcher(Watcher):
        def start(self) -> Watcher:
            return self

    watcher = BenchWatcher(None)
    for kind, objs in objects.items():
        watcher.store.replace(kind, objs)
    return watcher


def toggle(store: Any, i: int, services: int, endpoints: int, unready: set[int]) -> None:
    """Endpoint i (of services x endpoints) flips ready: its Service's EndpointSlice, kept and put as a watch event."""
    from discovery import kinds
    s, k = divmod(i % (services * endpoints), endpoints)
    unready ^= {s * endpoints + k}
    obj = kinds.keep("EndpointSlice", slice_object(s, endpoints, frozenset(
        j - s * endpoints for j in unready if j // endpoints == s)))
    store.put("EndpointSlice", kinds.key_of(obj), obj)


async def served_version(disco: Any) -> str:
    """The version of the Served the control plane moved to after the last store change (its note runs on the
    loop, call_soon_threadsafe)."""
    while disco.served.objects.version != disco.watcher.store.version:
        await asyncio.sleep(0)
    return str(disco.served.version)


def generation_cost(disco: Any, args: argparse.Namespace) -> tuple[float, float, float, float]:
    """After the timed runs, for the breakdown: adapt.build, generate.common, 500 generate.for_proxy, and 500
    authz.for_workload (part of for_proxy; its per-policy rendering cache warm from for_proxy), timed once more on a
    fresh Served of the same objects (seconds)."""
    from google.protobuf import struct_pb2

    from discovery import adapt, authz, generate
    from discovery.service import Served
    fresh = Served(disco.served.objects, disco.mesh, disco.root_namespace)
    t0 = time.perf_counter()
    built = fresh.built
    t1 = time.perf_counter()
    shared = fresh.shared
    t2 = time.perf_counter()
    for p in range(args.proxies):
        node_id, meta = proxy_node(p, args.services, args.endpoints, args.proxies)
        node = P.parse_node(node_id, struct_pb2.Struct(fields={k: struct_pb2.Value(string_value=v)
                                                               for k, v in meta.items()}))
        generate.for_proxy(built.model, shared, adapt.proxy_for(built, node))
    t3 = time.perf_counter()
    for p in range(args.proxies):
        s = proxy_pod(p, args.services, args.endpoints, args.proxies)[0]
        authz.for_workload(built.model.authz, ns_of(s), {"app": f"svc-{s}", "security.istio.io/tlsMode": "istio"},
                           disco.mesh.trust_domain)
    return t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3


class GcPauses:
    """The server's garbage-collector pauses (gc.callbacks): a full collection walks every tracked object, and the
    control plane holds hundreds of thousands; a pause during a push lands in the convergence figures."""

    def __init__(self) -> None:
        self.started, self.pauses = 0.0, [0.0, 0.0, 0.0]
        self.longest, self.counts = [0.0, 0.0, 0.0], [0, 0, 0]
        gc.callbacks.append(self.callback)

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        took, g = time.perf_counter() - self.started, info["generation"]
        self.pauses[g] += took
        self.counts[g] += 1
        self.longest[g] = max(self.longest[g], took)

    def words(self) -> list[str]:
        """Per generation: collections, total seconds, longest seconds."""
        return [f"{self.counts[g]}/{self.pauses[g]:.3f}/{self.longest[g]:.3f}" for g in range(3)]


async def run_server(args: argparse.Namespace) -> None:
    """The control plane's discovery (discovery.service.Discovery: store → Served → classify → PushQueue →
    AdsServer) on a watcher whose store the bench writes; obeys `change N`, `full`, `gen`, `quit` on stdin."""
    from discovery import ads, kinds
    from discovery.service import Discovery
    gc_pauses = GcPauses()
    t = time.perf_counter()
    watcher = bench_watcher(mesh_objects(args.services, args.endpoints, args.policies))
    objects_s = time.perf_counter() - t
    disco = Discovery(None, watcher=watcher, authenticate=token_identity)
    server = ads.new_grpc_server()
    disco.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    t = time.perf_counter()
    await disco.start()
    while not disco.ready:
        await asyncio.sleep(0.01)
    disco.served.shared          # noqa: B018 - built at the first proxy's request otherwise; timed apart
    build_s = time.perf_counter() - t
    pushed = disco.ads.push

    async def push(req: Any) -> None:
        say("push", req.snapshot.version, f"{time.monotonic():.6f}")
        await pushed(req)
    disco.ads.push = push   # type: ignore[method-assign]  # observation only: when the debounce let it go
    say("ready", json.dumps({"port": port, "objects_s": round(objects_s, 3), "build_s": round(build_s, 3)},
                           separators=(",", ":")))
    reader, unready, generation = await stdin_lines(), set[int](), 0
    while line := (await reader.readline()).decode().split():
        if line[0] in ("change", "full"):
            t0 = time.monotonic()
            if line[0] == "change":
                if PROFILE[0] is not None and args.profile_from == "changes" and line[1] == "0":
                    PROFILE[0].enable()
                toggle(watcher.store, int(line[1]) * 7919, args.services, args.endpoints, unready)
            else:
                generation += 1
                obj = kinds.keep("Service", service_object(0, generation))
                watcher.store.put("Service", kinds.key_of(obj), obj)
            say("changed", await served_version(disco), f"{t0:.6f}")
        elif line[0] == "policy":
            t0 = time.monotonic()
            obj = kinds.keep("AuthorizationPolicy", policy_object(policy_change(int(line[1])), int(line[1]) + 1))
            watcher.store.put("AuthorizationPolicy", kinds.key_of(obj), obj)
            say("changed", await served_version(disco), f"{t0:.6f}")
        elif line[0] == "gc":
            say("gc", *gc_pauses.words())
        elif line[0] == "gen":
            gcs = gc_pauses.words()
            say("gen", *(f"{x:.3f}" for x in generation_cost(disco, args)), disco.ads.encoder.encoded, *gcs)
        else:
            break
    await disco.stop()
    await server.stop(0)


# ---- the floor: serialize once, write to every stream -------------------------------------------------------------

class FloorBodies:
    """Response bodies of the resources the control plane serves (the same Served, generated before the clock),
    each resource serialized once (ads.Encoder's entries) and the shared run of each type joined once."""

    def __init__(self, args: argparse.Namespace) -> None:
        from google.protobuf import struct_pb2

        from discovery import ads
        from discovery.model import Mesh
        from discovery.service import Served
        objects = mesh_objects(args.services, args.endpoints, args.policies)
        self.served = Served(bench_watcher(objects).store.snapshot(), Mesh())
        self.encoder = ads.Encoder()
        self.shared = {P.CDS: self.served.shared.clusters, P.EDS: self.served.shared.endpoints,
                       P.LDS: self.served.shared.listeners}
        self.mine: dict[tuple[str, str], tuple[Any, ...]] = {}
        for p in range(args.proxies):        # per-proxy generation is not part of the floor: done before the clock
            node_id, meta = proxy_node(p, args.services, args.endpoints, args.proxies)
            node = P.parse_node(node_id, struct_pb2.Struct(fields={k: struct_pb2.Value(string_value=v)
                                                                   for k, v in meta.items()}))
            for type_url in self.shared:
                self.mine[(meta["INSTANCE_IPS"], type_url)] = tuple(self.served.resources_for(node, type_url).values())
        self._joined: dict[str, bytes] = {}

    def body(self, ip: str, type_url: str) -> bytes:
        shared, mine = self.shared[type_url], self.mine[(ip, type_url)]
        entry = self.encoder.entry
        if mine[:len(shared)] != shared:
            return b"".join(entry(type_url, m) for m in mine)
        if type_url not in self._joined:
            self._joined[type_url] = b"".join(entry(type_url, m) for m in shared)
        return self._joined[type_url] + b"".join(entry(type_url, m) for m in mine[len(shared):])


async def run_floor(args: argparse.Namespace) -> None:
    """The trivial server: answers each first request of a type with the prepared bytes, ignores ACKs."""
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2 as dpb

    from discovery import ads
    bodies = FloorBodies(args)

    async def stream(requests: Any, context: grpc.aio.ServicerContext) -> None:
        ip, n = "", 0
        async for raw in requests:
            req = dpb.DiscoveryRequest.FromString(raw)
            if req.HasField("node"):
                ip = req.node.metadata.fields["INSTANCE_IPS"].string_value
            if req.response_nonce:
                continue
            n += 1
            head = dpb.DiscoveryResponse(version_info="floor/1", type_url=req.type_url, nonce=str(n))
            await context.write(head.SerializeToString() + bodies.body(ip, req.type_url))

    server = ads.new_grpc_server()
    handler = grpc.stream_stream_rpc_method_handler(stream)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ads.SERVICE, {
        "StreamAggregatedResources": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    say("ready", json.dumps({"port": port}, separators=(",", ":")))
    reader = await stdin_lines()
    await reader.readline()
    await server.stop(0)


# ---- a client process: many proxies, one gRPC channel each --------------------------------------------------------
def lite_cluster() -> Any:
    """A view of envoy Cluster with only name (1), type (2) and eds_cluster_config.service_name (3.2)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="benchlite.proto", package="benchlite", syntax="proto3")
    eds = fdp.message_type.add(name="Eds")
    eds.field.add(name="service_name", number=2, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    cl = fdp.message_type.add(name="Cluster")
    cl.field.add(name="name", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    cl.field.add(name="type", number=2, type=f.TYPE_INT32, label=f.LABEL_OPTIONAL)
    cl.field.add(name="eds_cluster_config", number=3, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL,
                 type_name=".benchlite.Eds")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("benchlite.Cluster"))


def request_bytes(request: Any) -> bytes:
    return request if isinstance(request, bytes) else bytes(request.SerializeToString())


def ack(resp: Any, names_block: bytes) -> bytes:
    """The ACK of `resp` as Envoy serializes it (fields in number order), its resource_names the block serialized
    once per name list: making 1,000 strings into a message per EDS ACK was ~90 µs of a client's CPU per proxy."""
    def field(number: int, value: str) -> bytes:
        data = value.encode()
        return varint(number << 3 | 2) + varint(len(data)) + data if data else b""
    return field(1, resp.version_info) + names_block + field(4, resp.type_url) + field(5, resp.nonce)


async def run_proxy(p: int, args: argparse.Namespace, lite: Any) -> None:
    """One Envoy-like SotW ADS stream: report `A p type t version` per ACK and `F p t` once CDS+EDS+LDS are ACKed."""
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2 as dpb
    from google.protobuf import struct_pb2
    node_id, meta = proxy_node(p, args.services, args.endpoints, args.proxies)
    node = dpb.DiscoveryRequest().node
    node.id = node_id
    node.metadata.CopyFrom(struct_pb2.Struct(fields={k: struct_pb2.Value(string_value=v) for k, v in meta.items()}))
    out: asyncio.Queue[Any] = asyncio.Queue()

    async def requests() -> Any:
        while True:
            yield await out.get()

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{args.port}", options=[
        ("grpc.max_receive_message_length", 512 * 1024 * 1024), ("grpc.use_local_subchannel_pool", 1)])
    token = f"Bearer {meta['NAMESPACE']}/{meta['SERVICE_ACCOUNT']}"
    stream = channel.stream_stream(f"/{SERVICE}/StreamAggregatedResources", request_serializer=request_bytes,
                                   response_deserializer=dpb.DiscoveryResponse.FromString)
    call = stream(requests(), metadata=(("authorization", token),))
    out.put_nowait(dpb.DiscoveryRequest(node=node, type_url=P.CDS))
    eds_names: list[str] | None = None
    eds_block = b""
    acked: set[str] = set()
    full = False
    async for resp in call:
        if resp.type_url == P.CDS:
            want = sorted(c.eds_cluster_config.service_name or c.name for c in map(lite.FromString, (
                r.value for r in resp.resources)) if c.type == 3)
            if want != eds_names:
                out.put_nowait(dpb.DiscoveryRequest(type_url=P.EDS, resource_names=want))
                eds_names, eds_block = want, dpb.DiscoveryRequest(resource_names=want).SerializeToString()
        out.put_nowait(ack(resp, eds_block if resp.type_url == P.EDS else b""))
        if resp.type_url == P.CDS and P.LDS not in acked and "lds-asked" not in acked:
            out.put_nowait(dpb.DiscoveryRequest(type_url=P.LDS))
            acked.add("lds-asked")
        if resp.type_url != P.EDS or len(resp.resources) == len(eds_names or ()):
            acked.add(resp.type_url)
        say("A", p, P.short_type(resp.type_url), f"{time.monotonic():.6f}", resp.version_info)
        if not full and {P.CDS, P.EDS, P.LDS} <= acked:
            full = True
            say("F", p, f"{time.monotonic():.6f}")


async def guarded(p: int, args: argparse.Namespace, lite: Any) -> None:
    """A proxy whose stream fails says so (the parent stops waiting for it and reports the error)."""
    try:
        await run_proxy(p, args, lite)
        say("E", p, "stream ended")
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the run
        say("E", p, repr(e)[:300].replace("\n", " "))


async def run_clients(args: argparse.Namespace) -> None:
    lite = lite_cluster()
    say("ready")
    reader = await stdin_lines()
    await reader.readline()                   # go
    tasks = [asyncio.create_task(guarded(p, args, lite)) for p in range(args.lo, args.hi)]
    await reader.readline()                   # quit (or EOF)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---- the parent: start the processes, collect their lines, time ---------------------------------------------------
def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


class Board:
    """What the children said: proxies with a full config, ACK times by (type, version), the server's lines."""

    def __init__(self) -> None:
        self.full: dict[int, float] = {}
        self.acks: dict[tuple[str, str], dict[int, float]] = {}
        self.pushed: dict[str, float] = {}
        self.ready = 0
        self.errors: list[str] = []
        self.server: asyncio.Queue[list[str]] = asyncio.Queue()
        self.changed = asyncio.Event()

    def client_line(self, w: list[str]) -> None:
        if w[0] == "A":
            self.acks.setdefault((w[2], w[4]), {})[int(w[1])] = float(w[3])
        elif w[0] == "F":
            self.full[int(w[1])] = float(w[2])
        elif w[0] == "ready":
            self.ready += 1
        elif w[0] == "E":
            self.errors.append(" ".join(w))
        self.changed.set()

    def server_line(self, w: list[str]) -> None:
        if w[0] == "push":
            self.pushed[w[1]] = float(w[2])
        else:
            self.server.put_nowait(w)

    async def until(self, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self.errors:
                raise SystemExit(f"{what}: a proxy failed: {self.errors[0]}")
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise SystemExit(f"{what}: not done after {timeout} s")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass


async def spawn(argv: list[str], cpus: set[int], on_line: Any) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO,
        stderr=STDERR, env={**os.environ, "GRPC_VERBOSITY": "ERROR"}, preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        limit=1 << 20)

    async def read() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            if words := line.decode().split():
                on_line(words)
    asyncio.get_running_loop().create_task(read())
    return proc


def tell(proc: asyncio.subprocess.Process, line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line.encode() + b"\n")


def size_args(args: argparse.Namespace) -> list[str]:
    return ["--services", str(args.services), "--endpoints", str(args.endpoints), "--proxies", str(args.proxies),
            "--namespaces", str(args.namespaces), "--policies", str(args.policies)]


async def start(role: str, args: argparse.Namespace, board: Board) -> tuple[Any, list[Any], dict[str, Any]]:
    """The server (CPU 0) and the client processes (the other CPUs), all started and ready, not yet connected."""
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, client_cpus = ({cpus[0]}, set(cpus[1:])) if len(cpus) > 1 and args.pin else (set(cpus), set(cpus))
    extra = ["--profile", args.profile, "--profile-from", args.profile_from] if args.profile and role == "server" \
        else []
    server = await spawn(["--role", role, *size_args(args), *extra], server_cpus, board.server_line)
    word = await asyncio.wait_for(board.server.get(), 300)
    info = json.loads(word[1])
    per = -(-args.proxies // args.procs)
    clients = [await spawn(["--role", "clients", *size_args(args), "--port", str(info["port"]), "--lo", str(lo),
                            "--hi", str(min(lo + per, args.proxies))], client_cpus, board.client_line)
               for lo in range(0, args.proxies, per)]
    await board.until(lambda: board.ready == len(clients), 120, "client start")
    return server, clients, info


async def full_config(server: Any, clients: list[Any], board: Board, n: int) -> tuple[float, float]:
    """Go → every proxy holds CDS+EDS+LDS ACKed: seconds, and the server's CPU seconds over that time."""
    cpu0, t0 = cpu_s(server.pid), time.monotonic()
    for c in clients:
        tell(c, "go")
    await board.until(lambda: len(board.full) == n, 300, "full config")
    took = max(board.full.values()) - t0
    await asyncio.sleep(0.3)      # the last ACKs reach the server
    return took, cpu_s(server.pid) - cpu0


def selected_proxies(c: int, args: argparse.Namespace) -> set[int]:
    """The proxies policy change c's policy selects (authz.compile and authz.selected on it alone)."""
    from discovery import authz, kinds
    obj = kinds.keep("AuthorizationPolicy", policy_object(policy_change(c), c + 1))
    policies, _ = authz.compile([obj], ROOT_NAMESPACE)
    out = set()
    for p in range(args.proxies):
        s = proxy_pod(p, args.services, args.endpoints, args.proxies)[0]
        if authz.selected(policies, ns_of(s), {"app": f"svc-{s}", "security.istio.io/tlsMode": "istio"}):
            out.add(p)
    return out


async def one_push(server: Any, clients: list[Any], board: Board, n: int, command: str,
                   types: tuple[str, ...], selected: set[int] | None = None) -> dict[str, float]:
    """A change → every proxy ACKed the version it made (of every type in `types`); server and clients' CPU;
    `selected`: also when those proxies had ACKed their LDS (a policy change: the proxies it selects). With no
    `types` (a policy change, pushed only to the proxies whose listeners changed), until the selected ACKed, and the
    CPU until the server is idle again (it checks the other proxies after the selected ones may have ACKed)."""
    cpu0, client0 = cpu_s(server.pid), sum(cpu_s(c.pid) for c in clients)
    tell(server, command)
    word = await asyncio.wait_for(board.server.get(), 60)
    version, changed = word[1], float(word[2])
    await board.until(lambda: all(len(board.acks.get((t, version), ())) == n for t in types)
                      and all(p in board.acks.get(("lds", version), {}) for p in selected or ()), 60, command)
    mine = max((board.acks[("lds", version)][p] for p in selected or ()), default=changed)
    last = max((max(board.acks[(t, version)].values()) for t in types), default=mine)
    await asyncio.sleep(0.05)
    if not types:
        before = cpu_s(server.pid)
        while True:                 # the server's CPU stops growing: every proxy checked
            await asyncio.sleep(0.25)
            now = cpu_s(server.pid)
            if now - before < 0.02:
                break
            before = now
    return {"converge_ms": (last - changed) * 1000, "after_debounce_ms": (last - board.pushed[version]) * 1000,
            "selected_lds_ms": (mine - changed) * 1000, "selected": len(selected or ()),
            "lds_sent": len(board.acks.get(("lds", version), ())),
            "cpu_s": cpu_s(server.pid) - cpu0, "clients_cpu_s": sum(cpu_s(c.pid) for c in clients) - client0}


async def stop(server: Any, clients: list[Any]) -> None:
    """Clients first (their streams end), then the server."""
    for proc in clients:
        tell(proc, "quit")
    for proc in [*clients, server]:
        if proc is server:
            tell(server, "quit")
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def gc_during(before: str, after: str) -> dict[str, float]:
    """Full (generation 2) collections between two `count/total/longest` words; longest is the run's."""
    (n0, t0, _), (n1, t1, longest) = (w.split("/") for w in (before, after))
    return {"count": int(n1) - int(n0), "total_s": round(float(t1) - float(t0), 3), "longest_s": float(longest)}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure_ads(args: argparse.Namespace) -> dict[str, Any]:
    """The ADS server: full config, endpoint convergence (args.changes times), one full push, RSS."""
    board = Board()
    load_before = os.getloadavg()[0]
    server, clients, info = await start("server", args, board)
    try:
        client_cpu0 = sum(cpu_s(c.pid) for c in clients)
        full_s, full_cpu = await full_config(server, clients, board, args.proxies)
        client_cpu = sum(cpu_s(c.pid) for c in clients) - client_cpu0
        rss_full, hwm_full = rss_mb(server.pid)
        tell(server, "gc")
        gc_before = await asyncio.wait_for(board.server.get(), 30)
        pushes = [await one_push(server, clients, board, args.proxies, f"change {i}", ("eds",))
                  for i in range(args.changes)]
        tell(server, "gc")
        gc_pushes = await asyncio.wait_for(board.server.get(), 30)
        full_push = await one_push(server, clients, board, args.proxies, "full", ("cds", "eds", "lds"))
        policy = [await one_push(server, clients, board, args.proxies, f"policy {c}", (),
                                 selected_proxies(c, args)) for c in range(args.policy_changes)]
        rss, hwm = rss_mb(server.pid)
        tell(server, "gen")
        gen = await asyncio.wait_for(board.server.get(), 120)
    finally:
        await stop(server, clients)
    conv = [p["converge_ms"] for p in pushes]
    after = [p["after_debounce_ms"] for p in pushes]
    return {"full_config_s": round(full_s, 3), "full_config_server_cpu_s": round(full_cpu, 3),
            "full_config_clients_cpu_s": round(client_cpu, 3), "objects_s": info["objects_s"],
            "first_build_s": info["build_s"], "adapt_build_s": float(gen[1]), "common_s": float(gen[2]),
            "per_proxy_generate_s": float(gen[3]), "authz_for_workload_s": float(gen[4]),
            "resources_encoded_last_push": int(gen[5]),
            "gc_full_collections_in_endpoint_pushes": gc_during(gc_before[3], gc_pushes[3]),
            "gc_full_collections_in_full_pushes": gc_during(gc_pushes[3], gen[8]),
            "converge_p50_ms": round(pct(conv, 0.5), 1), "converge_p99_ms": round(pct(conv, 0.99), 1),
            "after_debounce_p50_ms": round(pct(after, 0.5), 1), "after_debounce_p99_ms": round(pct(after, 0.99), 1),
            "cpu_s_per_endpoint_push": round(statistics.mean(p["cpu_s"] for p in pushes), 4),
            "clients_cpu_s_per_endpoint_push": round(statistics.mean(p["clients_cpu_s"] for p in pushes), 4),
            "full_push_ms": round(full_push["converge_ms"], 1), "full_push_cpu_s": round(full_push["cpu_s"], 3),
            "full_push_clients_cpu_s": round(full_push["clients_cpu_s"], 3), **policy_figures(policy),
            "rss_mb_after_full_config": round(rss_full, 1),
            "rss_peak_mb_after_full_config": round(hwm_full, 1), "rss_mb": round(rss, 1), "rss_peak_mb": round(hwm, 1),
            "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2)}


def policy_figures(pushes: list[dict[str, float]]) -> dict[str, Any]:
    """A policy change (an LDS-only push to the proxies whose listeners changed) → the selected proxies ACKed LDS;
    how many proxies were sent LDS; the server's CPU until idle."""
    if not pushes:
        return {"policy_changes": 0}
    mine = [p["selected_lds_ms"] for p in pushes]
    return {"policy_changes": len(pushes), "policy_selected_proxies": [int(p["selected"]) for p in pushes],
            "policy_selected_lds_p50_ms": round(pct(mine, 0.5), 1),
            "policy_selected_lds_p99_ms": round(pct(mine, 0.99), 1),
            "policy_lds_sent": [int(p["lds_sent"]) for p in pushes],
            "cpu_s_per_policy_push": round(statistics.mean(p["cpu_s"] for p in pushes), 3),
            "clients_cpu_s_per_policy_push": round(statistics.mean(p["clients_cpu_s"] for p in pushes), 3)}


async def measure_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The floor server to the same clients: go → every proxy holds its (identical) responses, ACKed."""
    board = Board()
    server, clients, _ = await start("floor", args, board)
    try:
        full_s, full_cpu = await full_config(server, clients, board, args.proxies)
        rss = rss_mb(server.pid)[0]
    finally:
        await stop(server, clients)
    return {"full_config_s": round(full_s, 3), "server_cpu_s": round(full_cpu, 3), "rss_mb": round(rss, 1)}


def report(args: argparse.Namespace, ads: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """Print the figures against the targets and the floor; the JSON summary."""
    a = ads
    ratio_t = a["full_config_s"] / floor["full_config_s"]
    ratio_cpu = a["full_config_server_cpu_s"] / max(floor["server_cpu_s"], 1e-3)
    ok = {"full_config": a["full_config_s"] <= TARGET_FULL_S, "converge_p99": a["converge_p99_ms"] <= TARGET_P99_MS,
          "rss": a["rss_peak_mb"] <= TARGET_RSS_MB, "floor_ratio": ratio_t <= TARGET_RATIO}
    word = {True: "met", False: "MISSED"}
    print(f"mesh: {args.services} services x {args.endpoints} endpoints in {args.namespaces} namespaces, "
          f"{args.policies} AuthorizationPolicies; {args.proxies} proxies in {args.procs} client "
          f"processes (one gRPC channel each, SotW ADS, real ACKs); {os.cpu_count()} CPUs, shared machine; server "
          f"{'pinned to one CPU, clients on the other' if args.pin else 'not pinned'}; load average (1 min) "
          f"{a['load_1min_before']} before, {a['load_1min_after']} after")
    print(f"  objects made {a['objects_s']} s; first sync (adapt.build + push + generate.common) {a['first_build_s']}"
          f" s (before the clock); timed again after the run: adapt.build {a['adapt_build_s']} s, generate.common "
          f"{a['common_s']} s, generate.for_proxy x {args.proxies} {a['per_proxy_generate_s']} s (of which "
          f"authz.for_workload {a['authz_for_workload_s']} s)")
    print(f"full config to every proxy: {a['full_config_s']:.3f} s (target {TARGET_FULL_S} s: "
          f"{word[ok['full_config']]}); server CPU {a['full_config_server_cpu_s']} s, clients CPU "
          f"{a['full_config_clients_cpu_s']} s")
    print(f"  floor (serialize once + write to {args.proxies} streams, same clients): {floor['full_config_s']:.3f} s, "
          f"server CPU {floor['server_cpu_s']} s -> ratio {ratio_t:.2f}x time (target <= {TARGET_RATIO}x: "
          f"{word[ok['floor_ratio']]}), {ratio_cpu:.2f}x server CPU")
    print(f"one endpoint changes -> every proxy ACKed ({args.changes} changes): p50 {a['converge_p50_ms']} ms, "
          f"p99 {a['converge_p99_ms']} ms (target {TARGET_P99_MS:.0f} ms: {word[ok['converge_p99']]}); after the 100 ms"
          f" debounce: p50 {a['after_debounce_p50_ms']} ms, p99 {a['after_debounce_p99_ms']} ms")
    print(f"  server CPU per endpoint push: {a['cpu_s_per_endpoint_push']} s (clients: "
          f"{a['clients_cpu_s_per_endpoint_push']} s); a full push (all types, regenerated): "
          f"{a['full_push_ms']} ms to every ACK, {a['full_push_cpu_s']} CPU s (clients "
          f"{a['full_push_clients_cpu_s']} s)")
    g, h = a["gc_full_collections_in_endpoint_pushes"], a["gc_full_collections_in_full_pushes"]
    print(f"  full garbage collections (pauses): {g['count']} taking {g['total_s']} s during the endpoint pushes, "
          f"{h['count']} taking {h['total_s']} s during the full and policy pushes (the run's longest "
          f"{h['longest_s']} s)")
    if a["policy_changes"]:
        print(f"one AuthorizationPolicy changes ({a['policy_changes']} changes, each an LDS-only push; selecting "
              f"{min(a['policy_selected_proxies'])}-{max(a['policy_selected_proxies'])} proxies) -> every selected "
              f"proxy ACKed its LDS: p50 {a['policy_selected_lds_p50_ms']} ms, p99 {a['policy_selected_lds_p99_ms']} "
              f"ms; LDS sent to {min(a['policy_lds_sent'])}-{max(a['policy_lds_sent'])} proxies; server CPU "
              f"{a['cpu_s_per_policy_push']} s per push (clients "
              f"{a['clients_cpu_s_per_policy_push']} s; until the server is idle)")
    print(f"server RSS: {a['rss_mb_after_full_config']} MB after full config (peak so far "
          f"{a['rss_peak_mb_after_full_config']} MB), {a['rss_mb']} MB after the pushes, peak "
          f"{a['rss_peak_mb']} MB (target {TARGET_RSS_MB:.0f} MB: {word[ok['rss']]}); Istio publishes 1 vCPU and "
          f"1.5 GB for istiod at 1,000 services and 2,000 sidecars")
    return {"bench": "discovery", "services": args.services, "endpoints": args.endpoints, "proxies": args.proxies,
            "namespaces": args.namespaces, "policies": args.policies,
            "client_procs": args.procs, "cpus": os.cpu_count(), "server_cpus": 1 if args.pin else os.cpu_count(),
            "figures": ads, "floor": floor,
            "targets": {"full_config_s": TARGET_FULL_S, "converge_p99_ms": TARGET_P99_MS, "rss_mb": TARGET_RSS_MB,
                        "floor_ratio": TARGET_RATIO},
            "ratio": {"full_config_vs_floor": round(ratio_t, 2), "server_cpu_vs_floor": round(ratio_cpu, 2),
                      "full_config_vs_target": round(a["full_config_s"] / TARGET_FULL_S, 2),
                      "converge_p99_vs_target": round(a["converge_p99_ms"] / TARGET_P99_MS, 2),
                      "rss_vs_target": round(a["rss_peak_mb"] / TARGET_RSS_MB, 2)},
            "met": ok}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=5)
    ap.add_argument("--proxies", type=int, default=500)
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--changes", type=int, default=30)
    ap.add_argument("--namespaces", type=int, default=NAMESPACES)
    ap.add_argument("--policies", type=int, default=1000, help="AuthorizationPolicies (0: none)")
    ap.add_argument("--policy-changes", type=int, default=10)
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    ap.add_argument("--profile", default="", help="cProfile the ADS server into this file; the top is printed")
    ap.add_argument("--profile-from", choices=("full", "changes"), default="full",
                    help="profile the whole run, or from the first endpoint change on")
    ap.add_argument("--role", choices=("main", "server", "floor", "clients"), default="main")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--lo", type=int, default=0)
    ap.add_argument("--hi", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 < args.proxies <= args.services * args.endpoints:
        ap.error("--proxies must be 1 .. services x endpoints (a proxy is one of the pods)")
    if args.policies == 0:
        args.policy_changes = 0
    elif args.policy_changes and args.policies < ROOT_POLICIES + 5 * args.namespaces:
        ap.error("--policies: the policy changes rewrite policies up to ROOT_POLICIES + 5 x namespaces (or "
                 "--policy-changes 0)")
    return args


def main() -> int:
    args = parse()
    SIZE["namespaces"] = args.namespaces
    if args.role in ("server", "floor", "clients"):
        run = {"server": run_server, "floor": run_floor, "clients": run_clients}[args.role]
        profile = PROFILE[0] = cProfile.Profile() if args.profile else None
        if profile and args.profile_from == "full":
            profile.enable()
        asyncio.run(run(args))
        if profile:
            profile.disable()
            profile.dump_stats(args.profile)
        return 0
    ads = asyncio.run(measure_ads(args))
    floor = asyncio.run(measure_floor(args))
    summary = report(args, ads, floor)
    STDERR.seek(0)
    for line in STDERR.read().decode(errors="replace").splitlines():
        if not any(n in line for n in NOISE):
            print("child stderr:", line)
    if args.profile:
        import pstats
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
