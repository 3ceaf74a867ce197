"""DNS through the agent on the local cluster (issue 13): the mesh config turns DNS capture on
(`defaultConfig.proxyMetadata.ISTIO_META_DNS_CAPTURE: "true"`), so the injected istio-init redirects the pods' DNS
to 15053 and each agent asks discovery for NDS and answers from it.

The local cluster has no cluster DNS: the kubelet's --cluster-dns points at a tiny responder on the node that knows
only `external.example` (tests/agent/dns_upstream.py). So an answer for a Service name can only have come from the
pod's agent (its DNS request counter says the queries reached it), and the external name shows the agent forwards
what is not in its table. Then `http://b/` from pod A's app goes through both Envoys (mTLS; pod B's Envoy logs A's
identity).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from e2e.local import mtls, testkit
from e2e.local.cluster import LocalCluster
from e2e.local.kubelet import PodRun
from e2e.local.scenario import RESOLVE, agent_dns_requests  # getaddrinfo in the pod, the agent's counter
from e2e.local.testkit import web_pod
from meshboot import constants as C
from testing.netns import poll

NS = "dns"
MESH = {"defaultConfig": {"proxyMetadata": {C.ENV_DNS_CAPTURE: "true"}}}


@dataclass
class Dns:
    cluster: LocalCluster
    a: PodRun
    b: PodRun
    cluster_ip: str

    def resolve(self, *names: str) -> dict[str, Any]:
        res = self.a.exec("app", ["python3", "-c", RESOLVE, *names], timeout=30)
        assert res.returncode == 0, res.stderr
        out: dict[str, Any] = json.loads(res.stdout)
        return out

    def agent_dns_requests(self) -> float:
        return agent_dns_requests(self.a)


@pytest.fixture(scope="module")
def dns_mesh() -> Iterator[Dns]:
    testkit.require_root("local DNS")
    from tests.agent import dns_upstream
    with LocalCluster.up(prefix="mbnds", mesh=MESH) as c:
        servers = c.node.call(dns_upstream.serve, c.node.gateway, 53)      # the node's only nameserver
        try:
            c.kubelet.cluster_dns = c.node.gateway
            c.create_namespace(NS, {C.LABEL_INJECTION_NS: "enabled"})
            svc = c.create_service({"metadata": {"name": "b", "namespace": NS},
                                    "spec": {"selector": {"app": "b"},
                                             "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
            runs = {r.name: r for r in c.run([c.admit(p).pod for p in (web_pod("a", NS, "a", "client", serve=False),
                                                                         web_pod("b", NS, "b", "server"))])}
            (runs["b"].containers["app"].cwd / "name").write_text("b")
            for r in runs.values():
                r.wait_ready(timeout=40)
            yield Dns(c, runs["a"], runs["b"], svc["spec"]["clusterIP"])
        finally:
            for s in servers:
                s.shutdown()
                s.server_close()


def test_the_pods_resolv_conf_is_the_kubelets_and_istio_init_captures_dns(dns_mesh: Dns) -> None:
    conf = dns_mesh.a.exec("app", ["cat", "/etc/resolv.conf"]).stdout
    assert f"nameserver {dns_mesh.cluster.node.gateway}" in conf and f"search {NS}.svc.cluster.local" in conf
    rules = [line for line in dns_mesh.a.nsenter(["iptables-save", "-t", "nat"]).stdout.splitlines()
             if f"REDIRECT --to-ports {C.DNS_PROXY_PORT}" in line]
    assert len(rules) == 2 and all(f"-d {dns_mesh.cluster.node.gateway}/32" in r for r in rules), rules


def test_pod_a_resolves_service_b_through_its_agent(dns_mesh: Dns) -> None:
    names = ("b", f"b.{NS}", f"b.{NS}.svc", f"b.{NS}.svc.cluster.local")
    before = dns_mesh.agent_dns_requests()
    got = poll(lambda: dns_mesh.resolve(*names), lambda r: all(v == [dns_mesh.cluster_ip] for v in r.values()), 20)
    assert got == {n: [dns_mesh.cluster_ip] for n in names}, got     # no cluster DNS here: the agent answered
    assert dns_mesh.agent_dns_requests() >= before + len(names)


def test_an_external_name_is_forwarded_to_the_pods_nameserver(dns_mesh: Dns) -> None:
    assert dns_mesh.resolve("external.example.") == {"external.example.": ["203.0.113.7"]}
    assert dns_mesh.resolve("nothing.example.")["nothing.example."].startswith("error")


def test_a_request_to_http_b_goes_through_both_envoys(dns_mesh: Dns) -> None:
    outbound = f"outbound|80||b.{NS}.svc.cluster.local"
    assert mtls.wait_for_endpoint(dns_mesh.a, outbound, f"{dns_mesh.b.ip}:8080")
    req = mtls.request(dns_mesh.a, "http://b/name", "/name", dns_mesh.b, dns_mesh.a, outbound, "inbound|8080||",
                       expect_b=C.spiffe_id(NS, "client"))
    assert req.response.get("status") == 200, req.error
    assert req.log_a and req.log_b, req
    assert any(C.spiffe_id(NS, "client") in line for line in req.log_b), req.log_b


def test_the_kubelets_resolv_conf_follows_dns_policy() -> None:
    from e2e.local.kubelet import resolv_conf
    pod: dict[str, Any] = {"metadata": {"namespace": NS}, "spec": {}}
    assert resolv_conf(pod, "10.244.0.1", "cluster.local") == (
        f"search {NS}.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.244.0.1\noptions ndots:5\n")
    assert resolv_conf(pod, "", "cluster.local") is None                   # no cluster DNS: the node's file
    assert resolv_conf({**pod, "spec": {"dnsPolicy": "Default"}}, "10.244.0.1", "cluster.local") is None
    custom = {**pod, "spec": {"dnsPolicy": "None", "dnsConfig": {
        "nameservers": ["192.0.2.53"], "searches": ["corp.example"], "options": [{"name": "ndots", "value": "2"}]}}}
    assert resolv_conf(custom, "10.244.0.1", "cluster.local") == (
        "search corp.example\nnameserver 192.0.2.53\noptions ndots:2\n")
