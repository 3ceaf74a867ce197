"""Issue 11's traffic acceptance on the local cluster, through meshboot's real control plane (`meshboot-webhook`:
injector + CA + discovery xDS on 15012) and real Envoys: a Service scaled 1 → 3 → 1 and the client's Envoy follows
(EDS), every request in Istio mTLS (the backend's Envoy names the client's SPIFFE ID); the Service deleted and its old
ClusterIP falls back to PassthroughCluster; and under MeshConfig `outboundTrafficPolicy.mode: REGISTRY_ONLY` an
address outside the registry goes to BlackHoleCluster and fails while a registered Service still works.

Two clusters (prefixes mbtr, mbtr2), one per outbound policy and one at a time, each ~30 s. The tests of a cluster
run in file order: each starts from the state the previous one left (as a user's kubectl session would).
"""
from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from e2e.local import testkit
from e2e.local.cluster import LocalCluster
from e2e.local.kubelet import PodRun, http_get
from e2e.local.testkit import eventually
from meshboot import constants as C

NS = "traffic"                 # labelled for injection: every pod in it gets istio-init + istio-proxy
EXT = "ext"                    # not labelled: a plain pod that no Service selects, outside the registry
OUTBOUND = f"outbound|80||web.{NS}.svc.cluster.local"
INBOUND = "inbound|8080||"
CLIENT_ID = C.spiffe_id(NS, "client")
WEB_ID = C.spiffe_id(NS, "web")
# Run in the client's app container: n GETs of the URL, each a new connection; who answered, or the error.
GETS = """\
import json, sys, urllib.request
out = []
for _ in range(int(sys.argv[2])):
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[3])) as r:
            out.append(r.read().decode())
    except Exception as e:
        out.append(f"error: {type(e).__name__}: {e}")
print(json.dumps(out))
"""
ACCESS_LINE = re.compile(r"^\[(\S+)\] (\S+) ")   # e2e/local/cluster.ACCESS_LOG_FORMAT: [time] cluster ...


def _pod(name: str, ns: str, sa: str, app: str, serve: bool = True) -> dict[str, Any]:
    return testkit.web_pod(name, ns, app, sa, serve)


@dataclass
class Mesh:
    """One cluster and what the tests act on."""
    cluster: LocalCluster
    runs: dict[str, PodRun]
    cluster_ip: str

    def start(self, *pods: dict[str, Any]) -> list[PodRun]:
        """`kubectl apply` of pods: admitted (injected in NS), run, named, ready."""
        runs = self.cluster.run([self.cluster.admit(p).pod for p in pods])
        for r in runs:
            if any(c["name"] == "app" and c.get("ports") for c in r.pod["spec"]["containers"]):
                (r.containers["app"].cwd / "name").write_text(r.name)
        for r in runs:
            r.wait_ready(timeout=30)
            self.runs[r.name] = r
        return runs

    def gets(self, url: str, n: int, timeout: float = 3.0) -> list[str]:
        res = self.runs["client"].exec("app", ["python3", "-c", GETS, url, str(n), str(timeout)],
                                       timeout=30 + n * timeout)
        assert res.returncode == 0, res.stderr
        answers: list[str] = json.loads(res.stdout)
        return answers

    def service_gets(self, n: int) -> list[str]:
        return self.gets(f"http://{self.cluster_ip}:80/name", n)


def _up(prefix: str, mesh: dict[str, Any] | None) -> Iterator[Mesh]:
    testkit.require_root("mesh traffic")
    with LocalCluster.up(prefix=prefix, mesh=mesh) as c:
        c.create_namespace(NS, {C.LABEL_INJECTION_NS: "enabled"})
        c.create_namespace(EXT)
        svc = c.create_service({"metadata": {"name": "web", "namespace": NS},
                                "spec": {"selector": {"app": "web"},
                                         "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
        m = Mesh(cluster=c, runs={}, cluster_ip=svc["spec"]["clusterIP"])
        m.start(_pod("web-1", NS, "web", "web"), _pod("client", NS, "client", "client", serve=False),
                _pod("outside", EXT, "default", "outside"))
        yield m


POLICIES: dict[str, dict[str, Any] | None] = {"mbtr": None,
                                              "mbtr2": {"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}}}
ALLOW_ANY = pytest.mark.parametrize("cluster", ["mbtr"], indirect=True)
REGISTRY_ONLY = pytest.mark.parametrize("cluster", ["mbtr2"], indirect=True)


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """The cluster of one outbound policy (the param is its prefix). Tests choose theirs by indirect parametrization
    (ALLOW_ANY, REGISTRY_ONLY), so pytest tears one down before it starts the other instead of keeping both — twice
    the Envoys and agents on CI's two cores — up until the module ends."""
    yield from _up(request.param, POLICIES[request.param])


@pytest.fixture
def allow_any(cluster: Mesh) -> Mesh:
    return cluster


@pytest.fixture
def registry_only(cluster: Mesh) -> Mesh:
    return cluster


# ---- what the Envoys say ---------------------------------------------------------------------------------------------
def _envoy_clusters(run: PodRun) -> str:
    body: bytes = run.call(http_get, "127.0.0.1", C.ENVOY_ADMIN_PORT, "/clusters", 2.0).body
    return body.decode()


def healthy(run: PodRun, cluster: str = OUTBOUND) -> set[str]:
    """host:port of the cluster's endpoints whose health_flags are `healthy` in the pod's Envoy `/clusters`."""
    return {line.split("::")[1] for line in _envoy_clusters(run).splitlines()
            if line.startswith(f"{cluster}::") and line.endswith("::health_flags::healthy")}


def listeners(run: PodRun) -> set[str]:
    body: bytes = run.call(http_get, "127.0.0.1", C.ENVOY_ADMIN_PORT, "/listeners", 2.0).body
    return {line.split("::")[0] for line in body.decode().splitlines()}


Mark = tuple[int, str]          # (offset in istio-proxy's log, UTC time as Envoy's %START_TIME% prints it)


def mark(run: PodRun) -> Mark:
    """Where the pod's log stands now: Envoy flushes its access log about once a second, so lines of earlier
    connections may still arrive after this offset — their start time tells them apart."""
    now = dt.datetime.now(dt.UTC)
    return len(run.logs(C.PROXY_CONTAINER)), now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def access_lines(run: PodRun, since: Mark, cluster: str) -> list[str]:
    """The pod's Envoy access-log lines (istio-proxy's stdout) for `cluster` of connections started after `since`."""
    out = []
    for line in run.logs(C.PROXY_CONTAINER)[since[0]:].splitlines():
        m = ACCESS_LINE.match(line)
        if m and m.group(2) == cluster and m.group(1) >= since[1]:
            out.append(line)
    return out


def _addr(m: Mesh, *names: str) -> set[str]:
    return {f"{m.runs[n].ip}:8080" for n in names}


# ---- ALLOW_ANY: scale 1 → 3 → 1, delete ------------------------------------------------------------------------------
@ALLOW_ANY
def test_one_backend_in_mtls(allow_any: Mesh) -> None:
    m = allow_any
    eventually("the client's Envoy has web-1 from EDS", lambda: healthy(m.runs["client"]),
               lambda h: h == _addr(m, "web-1"))
    since_c, since_w = mark(m.runs["client"]), mark(m.runs["web-1"])
    assert m.service_gets(5) == ["web-1"] * 5
    inbound = eventually("web-1's Envoy logged the requests", lambda: access_lines(m.runs["web-1"], since_w, INBOUND),
                         lambda lines: len(lines) >= 5)
    assert all(f"downstream_peer={CLIENT_ID} " in line and "tls=TLSv1.3" in line for line in inbound), inbound
    outbound = eventually("the client's Envoy logged them",
                          lambda: access_lines(m.runs["client"], since_c, OUTBOUND), lambda lines: len(lines) >= 5)
    assert all(f"upstream_peer={WEB_ID} " in line for line in outbound), outbound


@ALLOW_ANY
def test_scaled_to_three_the_client_spreads_over_all(allow_any: Mesh) -> None:
    m = allow_any
    m.start(_pod("web-2", NS, "web", "web"), _pod("web-3", NS, "web", "web"))
    three = _addr(m, "web-1", "web-2", "web-3")
    eventually("3 healthy endpoints in the client's Envoy", lambda: healthy(m.runs["client"]), lambda h: h == three)
    since = {n: mark(m.runs[n]) for n in ("web-1", "web-2", "web-3")}
    answers = m.service_gets(30)
    assert sorted(set(answers)) == ["web-1", "web-2", "web-3"], answers
    for name, offset in since.items():
        lines = eventually(f"{name}'s Envoy logged its share",
                           lambda n=name, o=offset: access_lines(m.runs[n], o, INBOUND),
                           lambda lines, n=name: len(lines) >= answers.count(n))
        assert all(f"downstream_peer={CLIENT_ID} " in line for line in lines), lines


@ALLOW_ANY
def test_scaled_back_to_one_only_it_answers(allow_any: Mesh) -> None:
    m = allow_any
    for name in ("web-2", "web-3"):
        m.cluster.delete_pod(NS, name)
    during = m.service_gets(10)
    assert {a for a in during if not a.startswith("error")} <= {"web-1"}, during    # the deleted are gone
    eventually("only web-1 in the client's Envoy", lambda: healthy(m.runs["client"]), lambda h: h == _addr(m, "web-1"))
    assert m.service_gets(20) == ["web-1"] * 20                                      # converged: none fails


@ALLOW_ANY
def test_a_deleted_service_falls_back_to_passthrough(allow_any: Mesh) -> None:
    """The ClusterIP is no Service any more: no listener for it, so virtualOutbound's catch-all sends the connection
    to PassthroughCluster (the app's own destination). Nothing answers there — the address is gone with its
    kube-proxy rule — so the request fails; what is asserted is the cluster the client's Envoy chose."""
    m = allow_any
    c, client = m.cluster, m.runs["client"]
    c.apiserver.api.delete("services", NS, "web")
    eventually("the Service's slices and DNAT gone", lambda: (
        c.apiserver.api.list("endpointslices", NS), c.controllers.proxy.dump()),
        lambda seen: not seen[0] and m.cluster_ip not in seen[1])
    eventually("the client's Envoy dropped the Service", lambda: (listeners(client), healthy(client)),
               lambda seen: f"{m.cluster_ip}_80" not in seen[0] and not seen[1])
    since = mark(client)
    [answer] = m.gets(f"http://{m.cluster_ip}:80/name", 1, timeout=2.0)
    assert answer.startswith("error"), answer
    lines = eventually("the client's Envoy logged PassthroughCluster",
                       lambda: access_lines(client, since, C.PASSTHROUGH_CLUSTER), bool)
    assert any(f"-> {m.cluster_ip}:80 " in line for line in lines), lines
    assert not access_lines(client, since, OUTBOUND)


@ALLOW_ANY
def test_allow_any_reaches_an_address_outside_the_registry(allow_any: Mesh) -> None:
    """The contrast for REGISTRY_ONLY below: the same request, from the same kind of client, succeeds here."""
    m = allow_any
    since = mark(m.runs["client"])
    assert m.gets(f"http://{m.runs['outside'].ip}:8080/name?from=client", 3) == ["outside"] * 3
    assert m.runs["outside"].logs("app").count(f"{m.runs['client'].ip} - - ") >= 3    # it came from the client pod
    lines = eventually("PassthroughCluster in the client's log",
                       lambda: access_lines(m.runs["client"], since, C.PASSTHROUGH_CLUSTER), lambda x: len(x) >= 3)
    assert all(f"-> {m.runs['outside'].ip}:8080 " in line for line in lines), lines


# ---- REGISTRY_ONLY ---------------------------------------------------------------------------------------------------
@REGISTRY_ONLY
def test_registry_only_black_holes_the_unknown_and_serves_the_registered(registry_only: Mesh) -> None:
    m = registry_only
    client, outside = m.runs["client"], m.runs["outside"]
    eventually("the client's Envoy has web-1", lambda: healthy(client), lambda h: h == _addr(m, "web-1"))
    since, since_app = mark(client), len(outside.logs("app"))
    answers = m.gets(f"http://{outside.ip}:8080/name?from=client", 3)
    assert all(a.startswith("error") for a in answers), answers
    lines = eventually("BlackHoleCluster in the client's log",
                       lambda: access_lines(client, since, C.BLACKHOLE_CLUSTER), lambda x: len(x) >= 3)
    assert not access_lines(client, since, C.PASSTHROUGH_CLUSTER), "REGISTRY_ONLY must not pass through"
    assert all("flags=UH" in line for line in lines), lines            # no healthy upstream: closed at once
    assert "GET /name?from=client" not in outside.logs("app")[since_app:]     # nothing reached the outside pod
    since_w = mark(m.runs["web-1"])
    assert m.service_gets(5) == ["web-1"] * 5                          # a registered Service still works
    inbound = eventually("web-1's Envoy logged them", lambda: access_lines(m.runs["web-1"], since_w, INBOUND),
                         lambda x: len(x) >= 5)
    assert all(f"downstream_peer={CLIENT_ID} " in line for line in inbound), inbound
