"""Discovery (issue 11): the ADS server pushing Istio-shaped xDS to 500 simulated proxies in separate processes.

One server process (the committed discovery.ads.AdsServer on a real loopback port, fed by a Snapshot over a synthetic
discovery.model.Model of 1,000 services x 5 sidecar endpoints, pushes through discovery.push.PushQueue with its
100 ms debounce) and client processes of asyncio gRPC streams, one channel (TCP connection) per proxy, that speak
SotW ADS as Envoy does: CDS wildcard, EDS for the EDS clusters named in CDS, LDS, each response ACKed with its
version and nonce. Clients read only the names they need from the resources (a three-field protobuf view), so the
two cores go to the server. Figures:
1. start -> every proxy holds a full config (CDS, complete EDS and LDS ACKed), from the clients' go (processes
   already started; the model and the shared resources are built before, their time is printed too);
2. one endpoint changes (an endpoint turns unready) -> every proxy has ACKed the EDS push, p50/p99 (istiod's
   convergence: includes the 100 ms debounce), and the server's CPU seconds per push; a full push as well;
3. the server's RSS (and peak);
4. the floor: the same per-proxy responses serialized once (shared resources once, per-proxy ones per proxy) and
   written to the same streams by a trivial gRPC server, to the same clients; the ratio ADS / floor.
Targets: full config <= 3 s, convergence p99 <= 500 ms, RSS <= 600 MB, <= 3x the floor. The server is pinned to
CPU 0 and the clients to the other CPUs (as bench/ca.py), so the server has one core, like istiod's 1 vCPU.

    .venv/bin/python bench/discovery.py [--services 1000] [--endpoints 5] [--proxies 500] [--procs 8]
                                        [--changes 30] [--profile FILE]      (quick: --services 100 --proxies 50)
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
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
from meshboot.protowire import varint

TARGET_FULL_S, TARGET_P99_MS, TARGET_RSS_MB, TARGET_RATIO = 3.0, 500.0, 600.0, 3.0
NAMESPACES = 10
TICK = os.sysconf("SC_CLK_TCK")
STDERR = tempfile.TemporaryFile()      # the children's stderr: shown after the run, minus gRPC's shutdown noise
NOISE = ("CancelledError", "Traceback (most recent call last)", "_schedule_rpc_coro", "GOAWAY")


# ---- the synthetic mesh (server side) ----------------------------------------------------------------------------
def _ip(base: int, j: int) -> str:
    return f"10.{base + (j >> 16)}.{(j >> 8) & 255}.{j & 255}"


def proxy_pod(p: int, services: int, endpoints: int, proxies: int) -> tuple[int, int]:
    """(service, endpoint) of proxy p: spread evenly over the mesh's pods."""
    j = p * (services * endpoints // proxies)
    return j // endpoints, j % endpoints


def proxy_node(p: int, services: int, endpoints: int, proxies: int) -> tuple[str, dict[str, str]]:
    """The node id and metadata an injected sidecar of that pod sends."""
    s, k = proxy_pod(p, services, endpoints, proxies)
    ns, ip = f"ns-{s % NAMESPACES}", _ip(1, s * endpoints + k)
    node_id = f"sidecar~{ip}~svc-{s}-{k}.{ns}~{ns}.svc.cluster.local"
    return node_id, {"NAMESPACE": ns, "SERVICE_ACCOUNT": f"sa-{s}", "INSTANCE_IPS": ip, "ISTIO_VERSION": "1.28.0"}


def build_model(services: int, endpoints: int) -> Any:
    """1 port per service (http 80 -> 8080), `endpoints` ready sidecar pods each, 10 namespaces, PERMISSIVE."""
    from discovery.model import Endpoint, Model, Service, ServicePort, Workload
    svcs, eps = [], []
    for s in range(services):
        ns, name = f"ns-{s % NAMESPACES}", f"svc-{s}"
        svcs.append(Service(name=name, namespace=ns, cluster_ip=_ip(96, s), selector={"app": name},
                            ports=(ServicePort(name="http", port=80, target_port=8080),)))
        for k in range(endpoints):
            w = Workload(name=f"{name}-{k}", namespace=ns, ip=_ip(1, s * endpoints + k), service_account=f"sa-{s}",
                         labels={"app": name, "security.istio.io/tlsMode": "istio"}, workload_name=name)
            eps.append(Endpoint(service=(ns, name), port_name="http", address=w.ip, port=8080, workload=w))
    return Model(services=tuple(svcs), endpoints=tuple(eps))


class BenchSnapshot:
    """A Snapshot over a Model: shared resources computed once per push (`generate.common`), each proxy's part on
    first request and kept across endpoint-only pushes (which replace just the changed EDS entries)."""

    def __init__(self, model: Any, shared: Any, version: str, per_proxy: dict[str, Any] | None = None,
                 eds: dict[str, Any] | None = None) -> None:
        self.model, self.shared, self._version = model, shared, version
        self._eds = eds if eds is not None else {e.cluster_name: e for e in shared.endpoints}
        self._per_proxy = per_proxy if per_proxy is not None else {}
        self.generate_s = 0.0

    @classmethod
    def build(cls, model: Any) -> BenchSnapshot:
        from discovery import generate
        from discovery.snapshot import push_version
        return cls(model, generate.common(model), push_version())

    @property
    def version(self) -> str:
        return self._version

    def with_endpoints(self, model: Any, changed: list[Any]) -> BenchSnapshot:
        """The next snapshot of an endpoint-only change: CDS/LDS objects kept (same objects: encoded once)."""
        from discovery.snapshot import push_version
        eds = dict(self._eds)
        eds.update({cla.cluster_name: cla for cla in changed})
        return BenchSnapshot(model, self.shared, push_version(), self._per_proxy, eds)

    def resources_for(self, proxy: P.Proxy, type_url: str) -> Mapping[str, Any]:
        if type_url == P.EDS:
            return self._eds
        if type_url not in (P.CDS, P.LDS):
            return {}
        mine = self._per_proxy.get(proxy.id)
        if mine is None:
            start = time.perf_counter()
            mine = self._per_proxy[proxy.id] = self._generate(proxy)
            self.generate_s += time.perf_counter() - start
        return mine[type_url]

    def _generate(self, proxy: P.Proxy) -> dict[str, dict[str, Any]]:
        from discovery import generate
        from discovery.model import Proxy
        w = self.model.endpoints_by_address[proxy.ip][0].workload
        mp = Proxy(node_id=proxy.id, pod_name=w.name, namespace=proxy.namespace, ips=(proxy.ip,),
                   service_account=w.service_account, labels=w.labels, named_ports=w.named_ports)
        return generate.for_proxy(self.model, self.shared, mp).by_type()


def toggle_endpoint(model: Any, i: int) -> tuple[Any, list[Any]]:
    """Endpoint i flips ready; the new model and the changed ClusterLoadAssignment."""
    from discovery import generate
    eps = list(model.endpoints)
    eps[i] = dataclasses.replace(eps[i], ready=not eps[i].ready)
    new = dataclasses.replace(model, endpoints=tuple(eps))      # a fresh Model: its indexes are rebuilt
    svc = next(s for s in new.services if s.key == eps[i].service)
    return new, [generate.load_assignment(new, svc, svc.ports[0])]


def say(*parts: object) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run_server(args: argparse.Namespace) -> None:
    """The ADS server process: build, serve, then obey `change N`, `full`, `quit` on stdin."""
    from discovery import ads
    from discovery.push import PushQueue, PushRequest
    t = time.perf_counter()
    model = build_model(args.services, args.endpoints)
    model_s = time.perf_counter() - t
    snap = BenchSnapshot.build(model)
    common_s = time.perf_counter() - t - model_s
    server_ads = ads.AdsServer(snap)
    server = ads.new_grpc_server()
    server_ads.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def push(req: PushRequest) -> None:
        say("push", req.snapshot.version, f"{time.monotonic():.6f}")
        await server_ads.push(req)

    queue = PushQueue(push)
    queue.start()
    say("ready", json.dumps({"port": port, "model_s": round(model_s, 3), "common_s": round(common_s, 3)},
                           separators=(",", ":")))
    reader = await stdin_lines()
    while line := (await reader.readline()).decode().split():
        if line[0] == "change":
            model, changed = toggle_endpoint(model, int(line[1]) * 7919 % len(model.endpoints))
            snap = snap.with_endpoints(model, changed)
            say("changed", snap.version, f"{time.monotonic():.6f}")
            queue.enqueue(PushRequest(snap, full=False, endpoints=frozenset(c.cluster_name for c in changed)))
        elif line[0] == "full":
            t0 = time.monotonic()
            snap = BenchSnapshot.build(model)
            say("changed", snap.version, f"{t0:.6f}")
            queue.enqueue(PushRequest(snap, full=True))
        elif line[0] == "gen":
            say("gen", f"{snap.generate_s:.3f}", server_ads.encoder.encoded)
        else:
            break
    await queue.stop()
    await server.stop(0)


# ---- the floor: serialize once, write to every stream -------------------------------------------------------------

class FloorBodies:
    """Response bodies built from resources serialized once: DiscoveryResponse.resources entries (field 2) joined,
    the shared run of each type joined once."""

    def __init__(self, model: Any, proxies: int, args: argparse.Namespace) -> None:
        from discovery import generate
        from discovery.model import Proxy
        self.shared = generate.common(model)
        self.mine: dict[str, Any] = {}
        for p in range(proxies):           # per-proxy generation is not part of the floor: done before the clock
            node_id, meta = proxy_node(p, args.services, args.endpoints, proxies)
            w = model.endpoints_by_address[meta["INSTANCE_IPS"]][0].workload
            self.mine[meta["INSTANCE_IPS"]] = generate.for_proxy(model, self.shared, Proxy(
                node_id=node_id, pod_name=w.name, namespace=w.namespace, ips=(w.ip,), service_account=w.service_account,
                labels=w.labels, named_ports=w.named_ports))
        self._entries: dict[int, bytes] = {}
        self._joined: dict[str, bytes] = {}

    def _entry(self, type_url: str, msg: Any) -> bytes:
        from google.protobuf import any_pb2
        hit = self._entries.get(id(msg))
        if hit is None:
            packed = any_pb2.Any(type_url=type_url, value=msg.SerializeToString(deterministic=True)).SerializeToString()
            hit = self._entries[id(msg)] = b"\x12" + varint(len(packed)) + packed
        return hit

    def _join(self, type_url: str, shared: tuple[Any, ...], mine: tuple[Any, ...]) -> bytes:
        if mine[:len(shared)] != shared:
            return b"".join(self._entry(type_url, m) for m in mine)
        if type_url not in self._joined:
            self._joined[type_url] = b"".join(self._entry(type_url, m) for m in shared)
        return self._joined[type_url] + b"".join(self._entry(type_url, m) for m in mine[len(shared):])

    def body(self, ip: str, type_url: str) -> bytes:
        res = self.mine[ip]
        if type_url == P.CDS:
            return self._join(type_url, self.shared.clusters, res.clusters)
        if type_url == P.EDS:
            return self._join(type_url, self.shared.endpoints, res.endpoints)
        return self._join(type_url, self.shared.listeners, res.listeners)


async def run_floor(args: argparse.Namespace) -> None:
    """The trivial server: answers each first request of a type with the prepared bytes, ignores ACKs."""
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2 as dpb

    from discovery import ads
    bodies = FloorBodies(build_model(args.services, args.endpoints), args.proxies, args)

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


async def run_proxy(p: int, args: argparse.Namespace, lite: Any) -> None:
    """One Envoy-like SotW ADS stream: report `A p type t version` per ACK and `F p t` once CDS+EDS+LDS are ACKed."""
    import grpc
    from envoy.service.discovery.v3 import ads_pb2_grpc
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
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(requests())
    out.put_nowait(dpb.DiscoveryRequest(node=node, type_url=P.CDS))
    eds_names: list[str] | None = None
    acked: set[str] = set()
    full = False
    async for resp in call:
        names: list[str] = []
        if resp.type_url == P.CDS:
            want = sorted(c.eds_cluster_config.service_name or c.name for c in map(lite.FromString, (
                r.value for r in resp.resources)) if c.type == 3)
            if want != eds_names:
                out.put_nowait(dpb.DiscoveryRequest(type_url=P.EDS, resource_names=want))
                eds_names = want
        elif resp.type_url == P.EDS:
            names = eds_names or []
        out.put_nowait(dpb.DiscoveryRequest(type_url=resp.type_url, version_info=resp.version_info,
                                            response_nonce=resp.nonce, resource_names=names))
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
    return ["--services", str(args.services), "--endpoints", str(args.endpoints), "--proxies", str(args.proxies)]


async def start(role: str, args: argparse.Namespace, board: Board) -> tuple[Any, list[Any], dict[str, Any]]:
    """The server (CPU 0) and the client processes (the other CPUs), all started and ready, not yet connected."""
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, client_cpus = ({cpus[0]}, set(cpus[1:])) if len(cpus) > 1 and args.pin else (set(cpus), set(cpus))
    extra = ["--profile", args.profile] if args.profile and role == "server" else []
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


async def one_push(server: Any, board: Board, n: int, command: str, types: tuple[str, ...]) -> dict[str, float]:
    """A change → every proxy ACKed the version it made (of every type in `types`)."""
    cpu0 = cpu_s(server.pid)
    tell(server, command)
    word = await asyncio.wait_for(board.server.get(), 60)
    version, changed = word[1], float(word[2])
    await board.until(lambda: all(len(board.acks.get((t, version), ())) == n for t in types), 60, command)
    last = max(max(board.acks[(t, version)].values()) for t in types)
    await asyncio.sleep(0.05)
    return {"converge_ms": (last - changed) * 1000, "after_debounce_ms": (last - board.pushed[version]) * 1000,
            "cpu_s": cpu_s(server.pid) - cpu0}


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


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure_ads(args: argparse.Namespace) -> dict[str, Any]:
    """The ADS server: full config, endpoint convergence (args.changes times), one full push, RSS."""
    board = Board()
    server, clients, info = await start("server", args, board)
    try:
        client_cpu0 = sum(cpu_s(c.pid) for c in clients)
        full_s, full_cpu = await full_config(server, clients, board, args.proxies)
        client_cpu = sum(cpu_s(c.pid) for c in clients) - client_cpu0
        rss_full, hwm_full = rss_mb(server.pid)
        tell(server, "gen")
        gen = await asyncio.wait_for(board.server.get(), 30)
        pushes = [await one_push(server, board, args.proxies, f"change {i}", ("eds",)) for i in range(args.changes)]
        full_push = await one_push(server, board, args.proxies, "full", ("cds", "eds", "lds"))
        rss, hwm = rss_mb(server.pid)
    finally:
        await stop(server, clients)
    conv = [p["converge_ms"] for p in pushes]
    after = [p["after_debounce_ms"] for p in pushes]
    return {"full_config_s": round(full_s, 3), "full_config_server_cpu_s": round(full_cpu, 3),
            "full_config_clients_cpu_s": round(client_cpu, 3), "model_s": info["model_s"],
            "common_s": info["common_s"], "per_proxy_generate_s": float(gen[1]), "resources_encoded": int(gen[2]),
            "converge_p50_ms": round(pct(conv, 0.5), 1), "converge_p99_ms": round(pct(conv, 0.99), 1),
            "after_debounce_p50_ms": round(pct(after, 0.5), 1), "after_debounce_p99_ms": round(pct(after, 0.99), 1),
            "cpu_s_per_endpoint_push": round(statistics.mean(p["cpu_s"] for p in pushes), 4),
            "full_push_ms": round(full_push["converge_ms"], 1), "full_push_cpu_s": round(full_push["cpu_s"], 3),
            "rss_mb_after_full_config": round(rss_full, 1),
            "rss_peak_mb_after_full_config": round(hwm_full, 1), "rss_mb": round(rss, 1), "rss_peak_mb": round(hwm, 1)}


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
    print(f"mesh: {args.services} services x {args.endpoints} endpoints, {args.proxies} proxies in {args.procs} client "
          f"processes (one gRPC channel each, SotW ADS, real ACKs); {os.cpu_count()} CPUs, shared machine; server "
          f"{'pinned to one CPU, clients on the other' if args.pin else 'not pinned'}")
    print(f"  model built {a['model_s']} s, shared resources generated {a['common_s']} s (before the clock)")
    print(f"full config to every proxy: {a['full_config_s']:.3f} s (target {TARGET_FULL_S} s: "
          f"{word[ok['full_config']]}); server CPU {a['full_config_server_cpu_s']} s of which per-proxy generation "
          f"{a['per_proxy_generate_s']} s;"
          f" clients CPU {a['full_config_clients_cpu_s']} s; {a['resources_encoded']} resources encoded")
    print(f"  floor (serialize once + write to {args.proxies} streams, same clients): {floor['full_config_s']:.3f} s, "
          f"server CPU {floor['server_cpu_s']} s -> ratio {ratio_t:.2f}x time (target <= {TARGET_RATIO}x: "
          f"{word[ok['floor_ratio']]}), {ratio_cpu:.2f}x server CPU")
    print(f"one endpoint changes -> every proxy ACKed ({args.changes} changes): p50 {a['converge_p50_ms']} ms, "
          f"p99 {a['converge_p99_ms']} ms (target {TARGET_P99_MS:.0f} ms: {word[ok['converge_p99']]}); after the 100 ms"
          f" debounce: p50 {a['after_debounce_p50_ms']} ms, p99 {a['after_debounce_p99_ms']} ms")
    print(f"  server CPU per endpoint push: {a['cpu_s_per_endpoint_push']} s; a full push (all types, regenerated): "
          f"{a['full_push_ms']} ms to every ACK, {a['full_push_cpu_s']} CPU s")
    print(f"server RSS: {a['rss_mb_after_full_config']} MB after full config (peak so far "
          f"{a['rss_peak_mb_after_full_config']} MB), {a['rss_mb']} MB after the pushes, peak "
          f"{a['rss_peak_mb']} MB (target {TARGET_RSS_MB:.0f} MB: {word[ok['rss']]}); Istio publishes 1 vCPU and "
          f"1.5 GB for istiod at 1,000 services and 2,000 sidecars")
    return {"bench": "discovery", "services": args.services, "endpoints": args.endpoints, "proxies": args.proxies,
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
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    ap.add_argument("--profile", default="", help="cProfile the ADS server into this file; the top is printed")
    ap.add_argument("--role", choices=("main", "server", "floor", "clients"), default="main")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--lo", type=int, default=0)
    ap.add_argument("--hi", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 < args.proxies <= args.services * args.endpoints:
        ap.error("--proxies must be 1 .. services x endpoints (a proxy is one of the pods)")
    return args


def main() -> int:
    args = parse()
    if args.role in ("server", "floor", "clients"):
        run = {"server": run_server, "floor": run_floor, "clients": run_clients}[args.role]
        profile = cProfile.Profile() if args.profile else None
        if profile:
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
