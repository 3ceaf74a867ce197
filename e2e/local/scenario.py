"""The whole-pod flow shared by `make demo` and the CI test: two plain pods, injected by the real webhook, run on the
local node, then the facts about them collected (printed by the demo, asserted by the test).

Flow: control plane up (injector + CA) → AdmissionReview for pod-a and pod-b → the kubelet runs istio-init, then
istio-proxy and the app → iptables and sockets inside the pods → both pods READY once 15021 answers 200 → a request
from pod-a's app to pod-b's app through both Envoys → the SPIFFE ID in the certificate pod-b serves. Alongside, the
API server holds the pods and the Service `server` (manifests/services.yaml), whose EndpointSlice lists pod-b once
ready, and a pod without a sidecar reaches pod-b's app through the Service's ClusterIP (kube-proxy's DNAT on the node).
The pods capture DNS (mesh config proxyMetadata ISTIO_META_DNS_CAPTURE): the kubelet's --cluster-dns is the node's
bridge address, where no DNS server runs, so pod-a resolving the Service's name is answered by its own agent (NDS).
"""
from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2e.local import mtls, observe
from e2e.local.cluster import LocalCluster
from e2e.local.controlplane import Admission
from e2e.local.kubelet import PodRun, http_get
from meshboot import constants as C
from testing.netns import poll

MANIFESTS = Path(__file__).parent / "manifests" / "pods.yaml"
SERVICES = Path(__file__).parent / "manifests" / "services.yaml"
SERVICE = "server"
PLAIN = "plain-client"
NAMESPACE = "demo"
APP_PORT = 8080
XDS_SUFFIX = C.XDS_SOCKET.removeprefix("./")
SDS_SUFFIX = C.WORKLOAD_SOCKET.removeprefix("./")

CLIENT = mtls.CLIENT
OUTBOUND_CLUSTER = f"outbound|80||{SERVICE}.{NAMESPACE}.svc.cluster.local"
INBOUND_CLUSTER = f"inbound|{APP_PORT}||"
CLIENT_SPIFFE_ID = C.spiffe_id(NAMESPACE, "client")
OTHER = "pod-c"                                  # a second mesh client (service account other-client)
# Every injected agent runs its DNS proxy, fed with the Services by discovery (NDS); istio-init captures port 53.
MESH = {"defaultConfig": {"proxyMetadata": {C.ENV_DNS_CAPTURE: "true"}}}
ETC_NETNS = Path("/etc/netns")
# Run in pod-a's app (kubectl exec): getaddrinfo of each name through the pod's resolv.conf, IPv4.
RESOLVE = """\
import json, socket, sys
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = sorted({a[4][0] for a in socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)})
    except OSError as e:
        out[name] = f"error: {e}"
print(json.dumps(out))
"""
AUTHZ_POLICY = mtls.authorization_policy(NAMESPACE, "server-allow-pod-a", {
    "selector": {"matchLabels": {"app": SERVICE}}, "action": "ALLOW",
    "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/{NAMESPACE}/sa/client"]}}]}]})


@dataclass
class PodFacts:
    """What was seen inside one pod."""

    name: str
    ip: str
    service_account: str
    init_containers: list[str]
    containers: list[str]
    init_exit_codes: dict[str, int]
    iptables_save: str
    chains: dict[str, list[str]]
    ss_xlp: str
    ss_xp: str
    ss_tnlp: str
    agent_pid: int
    agent_comm: str
    agent_uid: int
    envoy_pids: dict[int, str]
    envoy_uids: dict[int, int]
    xds: observe.SocketCheck
    sds: observe.SocketCheck
    tcp_listeners: dict[int, set[str]]
    ready: tuple[int, int] = (0, 0)
    readyz_status: int = 0


@dataclass
class Facts:
    """Everything the demo prints and the test asserts."""

    injected: dict[str, Any]                 # pod-a as stored after admission
    kubernetes_version: str                  # what the webhook was told (>= 1.33: native sidecars)
    patch_ops: int
    pods: dict[str, PodFacts] = field(default_factory=dict)
    response: dict[str, Any] = field(default_factory=dict)
    request_path: str = ""
    app_b_log_lines: list[str] = field(default_factory=list)
    cluster_ip: str = ""                                     # Service `server`'s, which pod-a's app dials
    endpoint_in_eds: bool = False                            # pod-a's Envoy had pod-b in its outbound cluster
    a_to_b: mtls.Request | None = None                       # with both Envoys' access log lines
    served: observe.ServedCert | None = None
    expected_spiffe_id: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    netns_names: list[str] = field(default_factory=list)     # every namespace the run made
    pids: dict[int, str] = field(default_factory=dict)       # every process it started (pid -> comm)
    workdir: Path | None = None
    services: ServiceFacts | None = None
    strict: StrictFacts | None = None
    authz: AuthzFacts | None = None
    dns: DnsFacts | None = None


@dataclass
class DnsFacts:
    """pod-a's app resolving Service `server`'s names: what getaddrinfo returned, how many queries pod-a's agent
    counted meanwhile (istio_agent_dns_requests_total), the pod's resolv.conf."""

    answers: dict[str, Any]
    agent_requests: float
    resolv_conf: str


@dataclass
class ServiceFacts:
    """What the API server holds, the Service's slice and ClusterIP, and the request from the pod without a sidecar."""

    api_url: str
    kubeconfig: Path
    api_pods: dict[str, dict[str, Any]]            # name -> the pod as the API server holds it
    api_services: dict[str, dict[str, Any]]
    cluster_ip: str
    port: int
    slice_endpoints: list[dict[str, Any]]          # the Service's EndpointSlice endpoints
    proxy_rules: str = ""
    response: dict[str, Any] = field(default_factory=dict)
    request_path: str = ""
    app_b_log_lines: list[str] = field(default_factory=list)
    log_b: list[str] = field(default_factory=list)            # pod-b's Envoy access log line (plaintext: no peer)


@dataclass
class StrictFacts:
    """A STRICT PeerAuthentication for the namespace, created live: pod-b's inbound chains before and after, how long
    the push took to reach pod-b's Envoy, and the two clients afterwards."""

    chains_before: list[str]
    chains_after: list[str]
    seconds: float
    plain: mtls.Request
    a_to_b: mtls.Request


@dataclass
class AuthzFacts:
    """An AuthorizationPolicy allowing only pod-a's identity on pod-b, created live: pod-b's RBAC filters before and
    after, how long the push took to reach pod-b's Envoy, pod-c (another identity) and pod-a afterwards, and pod-b's
    Envoy's count of denied connections."""

    rbac_before: list[tuple[str, tuple[str, ...]]]
    rbac_after: list[tuple[str, tuple[str, ...]]]
    seconds: float
    other: mtls.Request
    a_to_b: mtls.Request
    denied: int


def load_pods() -> list[dict[str, Any]]:
    return load(MANIFESTS, "Pod")


def load(path: Path, kind: str) -> list[dict[str, Any]]:
    """The objects of one kind in a manifest file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == kind]


def _containers(pod: dict[str, Any]) -> tuple[list[str], list[str]]:
    spec = pod["spec"]
    return [c["name"] for c in spec.get("initContainers") or []], [c["name"] for c in spec.get("containers") or []]


def _pod_facts(run: PodRun) -> PodFacts:
    """iptables, sockets and listeners inside one running pod, plus who owns them."""
    inits, conts = _containers(run.pod)
    save = run.nsenter(["iptables-save"]).stdout
    agent_pid = run.pid(C.PROXY_CONTAINER)
    envoys = {pid: comm for pid, comm in observe.descendants(agent_pid).items() if comm.startswith("envoy")}
    ss_all = run.nsenter(["ss", "-xap"]).stdout
    socks = observe.parse_ss_unix(ss_all)
    ss_tnlp = run.nsenter(["ss", "-tnlp"]).stdout
    ours = [line for line in ss_all.splitlines()
            if "ESTAB" in line and (XDS_SUFFIX in line or SDS_SUFFIX in line or "envoy" in line)]
    return PodFacts(
        name=run.name, ip=run.ip, service_account=run.pod["spec"]["serviceAccountName"],
        init_containers=inits, containers=conts, init_exit_codes=dict(run.init_exit_codes),
        iptables_save=save, chains=observe.nat_chains(save),
        ss_xlp=run.nsenter(["ss", "-xlp"]).stdout, ss_xp="\n".join(ours), ss_tnlp=ss_tnlp,
        agent_pid=agent_pid, agent_comm=observe.comm_of(agent_pid), agent_uid=observe.process_uid(agent_pid),
        envoy_pids=envoys, envoy_uids={p: observe.process_uid(p) for p in envoys},
        xds=observe.socket_check(socks, XDS_SUFFIX), sds=observe.socket_check(socks, SDS_SUFFIX),
        tcp_listeners=observe.tcp_listeners(ss_tnlp))


def _stats(run: PodRun) -> dict[str, int]:
    res = run.call(http_get, "127.0.0.1", C.ENVOY_ADMIN_PORT, "/stats", 3.0)
    return observe.parse_stats(res.body.decode())


class _Clock:
    """Seconds since the flow started, recorded per step (Facts.timings)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}

    def mark(self, name: str) -> float:
        self.timings[name] = round(time.monotonic() - self.t0, 2)
        return self.timings[name]


def run_flow(prefix: str = "mbd", say: Callable[[str], None] = lambda _s: None,
             kubernetes_version: str = "1.34", hold: Callable[[LocalCluster, Facts], None] | None = None) -> Facts:
    """Run the whole flow once, cleaning up everything it made before returning (or raising); `hold`, if given, runs
    last with everything still up (`make demo KEEP=1` waits there until `make demo-down`)."""
    clock = _Clock()
    with LocalCluster.up(prefix=prefix, kubernetes_version=kubernetes_version, mesh=MESH) as cluster:
        cluster.kubelet.cluster_dns = cluster.node.gateway       # pods' nameserver; no DNS server runs there
        cp = cluster.control_plane
        say(f"== node {cluster.node.ns.name}: bridge {cluster.node.bridge} {cluster.node.gateway}/"
            f"{cluster.node.network.prefixlen}; meshboot-webhook (injector :{cp.webhook_port} + CA :{cp.ca_port}) "
            f"up in {clock.mark('control plane up'):.1f}s")
        cluster.create_namespace(NAMESPACE, {C.LABEL_INJECTION_NS: "enabled"})
        for svc in load(SERVICES, "Service"):
            cluster.create_service(svc)
        admitted = [cluster.admit(p) for p in load_pods()]
        plain = [cluster.admit(p).pod for p in load(SERVICES, "Pod")]
        clock.mark("admitted")
        facts = _admission_facts(admitted, kubernetes_version, say)
        runs = _run_pods(cluster, admitted, facts, clock, say, plain)
        by_name = {r.name: r for r in runs}
        pa, pb = by_name["pod-a"], by_name["pod-b"]
        _say_inside_pod_a(facts, pa, say)
        _request_a_to_b(facts, cluster, pa, pb, say)
        clock.mark("traffic")
        _dns(facts, pa, say)
        clock.mark("dns")
        _served_certificate(facts, cluster, pb, say)
        clock.mark("spiffe")
        _services(facts, cluster, by_name[PLAIN], pb, say)
        clock.mark("services")
        _strict(facts, cluster, by_name[PLAIN], pa, pb, say)
        clock.mark("strict")
        _authz(facts, cluster, by_name[OTHER], pa, pb, say)
        clock.mark("authz")
        if hold is not None:
            facts.timings = clock.timings
            hold(cluster, facts)
    clock.mark("cleaned up")
    facts.timings = clock.timings
    return facts


def _admission_facts(admitted: list[Admission], kubernetes_version: str, say: Callable[[str], None]) -> Facts:
    """Facts start with pod-a as the webhook's patch left it."""
    a = admitted[0]
    facts = Facts(injected=a.pod, kubernetes_version=kubernetes_version, patch_ops=len(a.patch or []))
    inits, conts = _containers(a.pod)
    say(f"\n== AdmissionReview → {a.pod['metadata']['name']}: JSONPatch of {facts.patch_ops} ops; "
        f"initContainers {inits}, containers {conts}")
    say(yaml.safe_dump(a.pod, sort_keys=False, width=120).rstrip())
    return facts


def _run_pods(cluster: LocalCluster, admitted: list[Admission], facts: Facts, clock: _Clock,
              say: Callable[[str], None], plain: list[dict[str, Any]]) -> list[PodRun]:
    """The kubelet runs the injected pods (and the plain ones beside them); once ready, what is inside each injected
    one, and every namespace and process made."""
    every = cluster.run([x.pod for x in admitted] + plain)
    runs = every[:len(admitted)]
    clock.mark("pods started")
    say("\n== kubelet: " + "; ".join(
        f"{r.name} {r.ip} netns {r.netns.name}, " + ", ".join(f"{n} exited {c}" for n, c in r.init_exit_codes.items())
        + f", started {', '.join(r.counted())}" for r in runs) + f"  [workdir {cluster.workdir}]")
    for r in every:
        r.wait_ready(timeout=30)
    clock.mark("pods ready")
    for r in runs:
        facts.pods[r.name] = _pod_facts(r)
        facts.pods[r.name].ready = (len(r.ready_containers()), len(r.counted()))
        facts.pods[r.name].readyz_status = cluster.node.call(
            http_get, r.ip, C.ENVOY_STATUS_PORT, "/healthz/ready", 2.0).status
    facts.netns_names = [cluster.node.ns.name, *(r.netns.name for r in every)]
    facts.workdir = cluster.workdir
    facts.pids = {cluster.control_plane.proc.pid: "meshboot-webhook"}
    for r in every:
        for c in r.containers.values():
            if c.proc is not None:
                facts.pids[c.proc.pid] = c.name
        if r.name in facts.pods:
            facts.pids.update(facts.pods[r.name].envoy_pids)
    return every


def _say_inside_pod_a(facts: Facts, pa: PodRun, say: Callable[[str], None]) -> None:
    """The demo's view of pod-a's inside (iptables, sockets, listeners) and of both pods' readiness."""
    fa = facts.pods["pod-a"]
    say(f"\n== pod-a ({pa.ip}, netns {pa.netns.name}): iptables-save (ISTIO_* chains), installed by istio-init "
        f"(exit {fa.init_exit_codes.get(C.INIT_CONTAINER)})")
    say(observe.istio_lines(fa.iptables_save))
    say("\n== pod-a: ss -xlp (the agent listens on XDS and SDS)")
    say(fa.ss_xlp.rstrip())
    say("\n== pod-a: ss -xp (Envoy connected to them)")
    say(fa.ss_xp)
    say("\n== pod-a: ss -tnlp")
    say(fa.ss_tnlp.rstrip())
    say("")
    for name, pf in facts.pods.items():
        say(f"{name} {pf.ready[0]}/{pf.ready[1]} READY   (GET {pf.ip}:{C.ENVOY_STATUS_PORT}/healthz/ready → "
            f"{pf.readyz_status})")


def _request_a_to_b(facts: Facts, cluster: LocalCluster, pa: PodRun, pb: PodRun, say: Callable[[str], None]) -> None:
    """pod-a's app → Service `server`'s ClusterIP: pod-a's Envoy sends it to `outbound|80||server…` (pod-b from
    EDS) in Istio mTLS, pod-b's Envoy terminates it on `inbound|8080||`; both access logs name the peer."""
    svc = cluster.apiserver.api.get("services", NAMESPACE, SERVICE)
    facts.cluster_ip = svc["spec"]["clusterIP"]
    facts.endpoint_in_eds = mtls.wait_for_endpoint(pa, OUTBOUND_CLUSTER, f"{pb.ip}:{APP_PORT}")
    facts.request_path = f"/?from=pod-a&id={uuid.uuid4().hex[:8]}"
    url = f"http://{facts.cluster_ip}:80{facts.request_path}"
    r = facts.a_to_b = mtls.request(pa, url, facts.request_path, pb, pa, OUTBOUND_CLUSTER, INBOUND_CLUSTER,
                                    expect_b="downstream_peer=spiffe://")
    if not r.response:
        raise RuntimeError(f"request from pod-a to {url} failed: {r.error}")
    facts.response, facts.app_b_log_lines = r.response, r.app_b
    say(f"\n== kubectl exec pod-a -c app -- GET {url}   (Service {SERVICE}'s ClusterIP; pod-a's Envoy has "
        f"{OUTBOUND_CLUSTER} → {pb.ip}:{APP_PORT} from meshboot's discovery: {facts.endpoint_in_eds})\n"
        f"   → HTTP {r.response['status']}, {r.response['bytes']} bytes")
    say("   pod-a envoy access log: " + " | ".join(r.log_a))
    say("   pod-b envoy access log: " + " | ".join(r.log_b))
    say("   pod-b app log: " + " | ".join(r.app_b))


def agent_dns_requests(run: PodRun) -> float:
    """pilot-agent's istio_agent_dns_requests_total on the pod's merged metrics (15020): the queries its DNS proxy
    took, which tells an answer from the agent apart from one by a nameserver."""
    body = run.call(http_get, "127.0.0.1", C.STATUS_PORT, "/stats/prometheus", 5.0).body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("istio_agent_dns_requests_total"))


def _dns(facts: Facts, pa: PodRun, say: Callable[[str], None]) -> None:
    """pod-a's app resolves Service `server` by its short, namespaced and full names: istio-init sends the query to
    pod-a's agent, which answers from the name table discovery sent it (there is no DNS server at the nameserver)."""
    names = (SERVICE, f"{SERVICE}.{NAMESPACE}", f"{SERVICE}.{NAMESPACE}.svc.cluster.local")
    before = agent_dns_requests(pa)

    def resolve() -> dict[str, Any]:
        res = pa.exec("app", ["python3", "-c", RESOLVE, *names], timeout=30)
        return json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr.strip()[-200:]}
    answers = poll(resolve, lambda r: all(r.get(n) == [facts.cluster_ip] for n in names), 10.0)
    conf = pa.exec("app", ["cat", "/etc/resolv.conf"]).stdout
    facts.dns = DnsFacts(answers=answers, agent_requests=agent_dns_requests(pa) - before, resolv_conf=conf)
    say(f"\n== kubectl exec pod-a -c app -- getaddrinfo {' '.join(names)}   (resolv.conf: "
        + "; ".join(line for line in conf.splitlines() if line) + ")")
    say("   → " + ", ".join(f"{n} {a}" for n, a in answers.items())
        + f"; pod-a's agent answered ({facts.dns.agent_requests:.0f} queries in istio_agent_dns_requests_total)")


def _served_certificate(facts: Facts, cluster: LocalCluster, pb: PodRun, say: Callable[[str], None]) -> None:
    """The certificate pod-b's Envoy serves to a peer sidecar, verified against the mesh root."""
    root = cluster.control_plane.root_cert()
    facts.served = cluster.node.call(observe.served_certificate, pb.ip, APP_PORT, root)
    facts.expected_spiffe_id = C.spiffe_id(NAMESPACE, pb.pod["spec"]["serviceAccountName"])
    say(f"\n== TLS handshake with pod-b {pb.ip}:{APP_PORT} (captured to its Envoy's 15006), as a peer sidecar "
        f"would (ALPN istio): the certificate verifies against the mesh root")
    say(f"   URI SAN: {', '.join(facts.served.spiffe_ids)}")
    say(f"   issuer: {facts.served.leaf.issuer.rfc4514_string()}; valid until "
        f"{facts.served.leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def _service_facts(cluster: LocalCluster, pb: PodRun, timeout: float = 10.0) -> ServiceFacts:
    """The API server's pods and Services, once the Service's slice lists pod-b ready and the node DNATs to it."""
    api = cluster.apiserver.api
    deadline = time.monotonic() + timeout
    while True:
        svc = api.get("services", NAMESPACE, SERVICE)
        eps = [ep for s in api.list("endpointslices", NAMESPACE)
               if s["metadata"]["labels"].get("kubernetes.io/service-name") == SERVICE for ep in s["endpoints"]]
        rules = cluster.controllers.proxy.dump()
        ready = [ep for ep in eps if ep["conditions"]["ready"] and ep["targetRef"]["name"] == pb.name]
        if (ready and f"--to-destination {pb.ip}:" in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return ServiceFacts(
        api_url=cluster.apiserver.url, kubeconfig=cluster.apiserver.kubeconfig,
        api_pods={p["metadata"]["name"]: p for p in api.list("pods", NAMESPACE)},
        api_services={x["metadata"]["name"]: x for x in api.list("services", NAMESPACE)},
        cluster_ip=svc["spec"]["clusterIP"], port=int(svc["spec"]["ports"][0]["port"]), slice_endpoints=eps,
        proxy_rules=rules)


def _ready_condition(pod: dict[str, Any]) -> str:
    conds = (pod.get("status") or {}).get("conditions") or []
    return next((c["status"] for c in conds if c.get("type") == "Ready"), "-")


def _services(facts: Facts, cluster: LocalCluster, plain: PodRun, pb: PodRun, say: Callable[[str], None]) -> None:
    """What the API server holds, the Service's EndpointSlice and DNAT, and a request from the pod without a
    sidecar to the Service's ClusterIP, answered by pod-b's app."""
    sf = facts.services = _service_facts(cluster, pb)
    say(f"\n== API server {sf.api_url} (kubeconfig {sf.kubeconfig}): pods "
        + ", ".join(f"{n} {(p.get('status') or {}).get('podIP', '-')} Ready={_ready_condition(p)}"
                    for n, p in sf.api_pods.items())
        + "; services " + ", ".join(f"{n} {x['spec']['clusterIP']}" for n, x in sf.api_services.items()))
    say(f"   EndpointSlice for {SERVICE}: " + ", ".join(
        f"{ep['targetRef']['name']} {','.join(ep['addresses'])} ready={ep['conditions']['ready']}"
        for ep in sf.slice_endpoints))
    say("   kube-proxy on the node: " + " | ".join(line for line in sf.proxy_rules.splitlines() if "DNAT" in line))
    sf.request_path = f"/?from={PLAIN}&id={uuid.uuid4().hex[:8]}"
    url = f"http://{sf.cluster_ip}:{sf.port}{sf.request_path}"
    r = mtls.request(plain, url, sf.request_path, pb, None, OUTBOUND_CLUSTER, INBOUND_CLUSTER, expect_b="tls=- ")
    if not r.response:
        raise RuntimeError(f"request from {PLAIN} to the ClusterIP failed: {r.error}")
    sf.response, sf.app_b_log_lines, sf.log_b = r.response, r.app_b, r.log_b
    say(f"\n== kubectl exec {PLAIN} -c app (no sidecar) -- GET {url}   (PERMISSIVE)\n   → HTTP "
        f"{sf.response['status']}; pod-b envoy access log: "
        + " | ".join(line for line in r.log_b if "tls=- " in line)
        + "\n   pod-b app log: " + " | ".join(sf.app_b_log_lines))


def _strict(facts: Facts, cluster: LocalCluster, plain: PodRun, pa: PodRun, pb: PodRun,
            say: Callable[[str], None]) -> None:
    """A STRICT PeerAuthentication for the namespace, created in the API server while everything runs: once pod-b's
    Envoy has the new inbound listener (TLS only), the client without a sidecar is refused and pod-a still served."""
    before = mtls.inbound_transports(pb, APP_PORT)
    t0 = time.monotonic()
    cluster.apiserver.api.create("peerauthentications", mtls.strict_peer_authentication(NAMESPACE))
    after = mtls.wait_for_transports(pb, APP_PORT, ["tls"])
    seconds = round(time.monotonic() - t0, 2)
    say(f"\n== kubectl apply PeerAuthentication {NAMESPACE}/default (mtls.mode STRICT), no restart: pod-b's Envoy "
        f"virtualInbound chains for 0.0.0.0_{APP_PORT} {before} → {after} in {seconds:.1f}s")
    path = f"/?from={PLAIN}&id={uuid.uuid4().hex[:8]}"
    plain_r = mtls.request(plain, f"http://{facts.cluster_ip}:80{path}", path, pb, None, OUTBOUND_CLUSTER,
                           INBOUND_CLUSTER, wait=0.5)
    say(f"   kubectl exec {PLAIN} -- GET http://{facts.cluster_ip}:80{path}\n   → "
        + (f"HTTP {plain_r.response.get('status')}" if plain_r.response else f"refused: {plain_r.error}"))
    path = f"/?from=pod-a&id={uuid.uuid4().hex[:8]}"
    a_r = mtls.request(pa, f"http://{facts.cluster_ip}:80{path}", path, pb, pa, OUTBOUND_CLUSTER, INBOUND_CLUSTER,
                       expect_b="downstream_peer=spiffe://")
    say(f"   kubectl exec pod-a -- GET http://{facts.cluster_ip}:80{path}\n   → "
        + (f"HTTP {a_r.response.get('status')}" if a_r.response else f"failed: {a_r.error}")
        + "; pod-b envoy access log: " + " | ".join(a_r.log_b))
    facts.strict = StrictFacts(chains_before=before, chains_after=after, seconds=seconds, plain=plain_r, a_to_b=a_r)


def _authz(facts: Facts, cluster: LocalCluster, pc: PodRun, pa: PodRun, pb: PodRun,
           say: Callable[[str], None]) -> None:
    """An AuthorizationPolicy on pod-b allowing only pod-a's identity, created in the API server while everything
    runs: once pod-b's Envoy has the RBAC filter, pod-c (a mesh pod with another service account) is refused by
    pod-b's Envoy and pod-a is still served."""
    before = mtls.inbound_rbac(pb, APP_PORT)
    t0 = time.monotonic()
    cluster.apiserver.api.create("authorizationpolicies", AUTHZ_POLICY)
    after = poll(lambda: mtls.inbound_rbac(pb, APP_PORT), bool, 10.0)
    seconds = round(time.monotonic() - t0, 2)
    say(f"\n== kubectl apply AuthorizationPolicy {NAMESPACE}/{AUTHZ_POLICY['metadata']['name']} (ALLOW from "
        f"principal cluster.local/ns/{NAMESPACE}/sa/client on app={SERVICE}), no restart: pod-b's Envoy RBAC filters "
        f"for 0.0.0.0_{APP_PORT} {before} → {after} in {seconds:.1f}s")
    url = f"http://{facts.cluster_ip}:80"
    path = f"/?from={OTHER}&id={uuid.uuid4().hex[:8]}"
    other = mtls.request(pc, url + path, path, pb, None, OUTBOUND_CLUSTER, INBOUND_CLUSTER, wait=0.5)
    say(f"   kubectl exec {OTHER} (sa other-client) -- GET {url}{path}\n   → "
        + (f"HTTP {other.response.get('status')}" if other.response else f"refused: {other.error}"))
    path = f"/?from=pod-a&id={uuid.uuid4().hex[:8]}"
    a_r = mtls.request(pa, url + path, path, pb, pa, OUTBOUND_CLUSTER, INBOUND_CLUSTER,
                       expect_b="downstream_peer=spiffe://")
    say(f"   kubectl exec pod-a (sa client) -- GET {url}{path}\n   → "
        + (f"HTTP {a_r.response.get('status')}" if a_r.response else f"failed: {a_r.error}"))
    denied = mtls.envoy_stats(pb, "rbac.denied").get("tcp.rbac.denied", 0)
    say(f"   pod-b envoy: tcp.rbac.denied {denied}")
    facts.authz = AuthzFacts(rbac_before=before, rbac_after=after, seconds=seconds, other=other, a_to_b=a_r,
                             denied=denied)


def leftovers(facts: Facts) -> list[str]:
    """What the run left behind: namespaces, processes, the temp dir (empty after a clean run)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    left = [f"netns {n}" for n in facts.netns_names if n in out]
    for pid, what in facts.pids.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] == "Z":
            continue      # dead; reaping orphans is PID 1's job
        left.append(f"process {pid} ({what})")
    left += [f"dir {ETC_NETNS / n}" for n in facts.netns_names if (ETC_NETNS / n).exists()]
    if facts.workdir is not None and facts.workdir.exists():
        left.append(f"dir {facts.workdir}")
    return left
