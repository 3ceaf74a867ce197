"""`DISABLE_ENVOY=true` (Istio's grpc-agent template): the agent beside a proxyless gRPC app, with no Envoy.

A pod netns, `testing/istiod.py` on 127.0.0.1:15012 (CA + ADS over TLS, istiod's node checks), the real agent as
uid 1337 with the env the grpc-agent template sets. Checked: the gRPC xDS bootstrap (the fields of Istio's
pkg/istio-agent/grpcxds), the workload certificate in OUTPUT_CERTS, readiness on 15020, an xDS stream over
`./etc/istio/proxy/XDS` forwarded to istiod, no Envoy started, and a clean SIGTERM.
"""
from __future__ import annotations

import json
import os
import queue
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format

from agent.config import ConfigError, Flags, build_config
from agent.proxyless import grpc_bootstrap_path
from meshboot import constants as C
from meshboot import pki
from tests.agent.pod import Pod, marker_script, netns_pod
from tests.agent.test_agent_istiod_interop import istiod_log, start_istiod, wait_for

READY = f"http://127.0.0.1:{C.STATUS_PORT}/healthz/ready"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
ENV = {"POD_NAME": "web-1", "POD_NAMESPACE": "prod", "INSTANCE_IP": "10.1.2.3", "SERVICE_ACCOUNT": "web",
       "ISTIO_META_CLUSTER_ID": "Kubernetes", "DISABLE_ENVOY": "true",
       "PROXY_CONFIG": json.dumps({"discoveryAddress": "istiod.istio-system.svc:15012"})}
FILES = {C.ROOT_CERT_PATH: "root"}


def _cfg(**env: str) -> Any:
    e = {k: v for k, v in {**ENV, **env}.items() if v != "<unset>"}
    return build_config(Flags(), e, FILES.get, lambda p: p in FILES, lambda _: None)


def test_no_envoy_binary_is_needed_and_the_bootstrap_path_is_istios() -> None:
    cfg = _cfg()
    assert cfg.disable_envoy and cfg.envoy_binary == ""
    assert grpc_bootstrap_path(cfg) == "./etc/istio/proxy/grpc-bootstrap.json"
    assert grpc_bootstrap_path(_cfg(GRPC_XDS_BOOTSTRAP="/x/b.json")) == "/x/b.json"


@pytest.mark.parametrize(("env", "words"), [
    ({"DISABLE_ENVOY": "yes"}, "env DISABLE_ENVOY: invalid boolean"),
    ({"PROXY_CONFIG": "{}"}, "DISABLE_ENVOY=true (proxyless gRPC) needs a discovery address"),
    ({"DISABLE_ENVOY": "false"}, "no Envoy binary"),
])
def test_refused_at_start_up(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(**env)
    assert words in str(e.value)


@pytest.mark.parametrize("value", ["a\0b", "/etc/istio/proxy/", "x" * 5000])
def test_hostile_bootstrap_path_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="GRPC_XDS_BOOTSTRAP"):
        grpc_bootstrap_path(_cfg(GRPC_XDS_BOOTSTRAP=value))


@pytest.fixture
def pod(root_required: None) -> Iterator[Pod]:
    with netns_pod("mbgrpc") as p:
        yield p


def _ready(pod: Pod) -> tuple[int, str] | None:
    r = pod.http(READY)
    return r if r[0] == 200 else None


def _ads(sock: Path, node: base_pb2.Node) -> discovery_pb2.DiscoveryResponse:
    """One LDS request over the agent's XDS socket, as grpc-go's xDS client sends it; the first response."""
    reqs: queue.Queue[Any] = queue.Queue()
    reqs.put(discovery_pb2.DiscoveryRequest(node=node, type_url=LDS))

    def requests() -> Iterator[Any]:
        while (r := reqs.get()) is not None:
            yield r
    with grpc.insecure_channel(f"unix://{sock}") as ch:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources(requests(), timeout=20)
        try:
            return next(iter(call))
        finally:
            reqs.put(None)
            call.cancel()


def test_agent_without_envoy_against_istiod(pod: Pod) -> None:
    start_istiod(pod)
    out = pod.path("var/lib/istio/data")
    envoy = marker_script(pod.path("envoy.sh"), pod.path("envoy-started"))
    pod.start_agent(PROXY_CONFIG=json.dumps({"discoveryAddress": "localhost:15012"}), DISABLE_ENVOY="true",
                    OUTPUT_CERTS=str(out), ISTIO_META_GENERATOR="grpc", ISTIO_META_DNS_CAPTURE="false",
                    ENVOY_BINARY=str(envoy))
    wait_for(lambda: _ready(pod), 40, f"readiness on 15020; agent log:\n{pod.log()[-3000:]}")
    assert pod.http(f"http://127.0.0.1:{C.ENVOY_STATUS_PORT}/healthz/ready")[0] == -1    # no Envoy listener
    assert not pod.path("envoy-started").exists() and not pod.path("etc/istio/proxy/envoy-rev.json").exists()
    assert "agent started without Envoy (DISABLE_ENVOY)" in pod.log()

    boot = json.loads(pod.path("etc/istio/proxy/grpc-bootstrap.json").read_text())
    assert boot["xds_servers"] == [{"server_uri": "unix:///etc/istio/proxy/XDS",
                                    "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}]
    assert boot["node"]["id"] == "sidecar~127.0.0.1~web-1.default~default.svc.cluster.local"
    meta = boot["node"]["metadata"]
    assert (meta["GENERATOR"], meta["NAMESPACE"], meta["CLUSTER_ID"]) == ("grpc", "default", "Kubernetes")
    assert boot["server_listener_resource_name_template"] == "xds.istio.io/grpc/lds/inbound/%s"
    assert boot["certificate_providers"] == {"default": {"plugin_name": "file_watcher", "config": {
        "certificate_file": f"{out}/cert-chain.pem", "private_key_file": f"{out}/key.pem",
        "ca_certificate_file": f"{out}/root-cert.pem", "refresh_interval": "900s"}}}

    leaf = pki.load_certs((out / "cert-chain.pem").read_bytes())[0]
    assert pki.uri_sans(leaf) == ["spiffe://cluster.local/ns/default/sa/web"]
    assert pki.load_key((out / "key.pem").read_bytes()).public_key() == leaf.public_key()
    assert (out / "root-cert.pem").read_bytes() == pod.path("ca/root-cert.pem").read_bytes()

    node = json_format.ParseDict(boot["node"], base_pb2.Node())
    resp = _ads(pod.path("etc/istio/proxy/XDS"), node)
    assert resp.type_url == LDS and resp.resources, resp
    log = istiod_log(pod)
    assert "stream accepted proxy=web-1.default delta=False cluster=Kubernetes" in log, log

    assert pod.agent_proc is not None
    pod.agent_proc.send_signal(signal.SIGTERM)
    assert pod.agent_proc.wait(15) == 0, pod.log()[-3000:]
    assert not os.path.exists(pod.path("etc/istio/proxy/XDS"))


def test_not_ready_until_the_certificate_files_exist(pod: Pod) -> None:
    """Without a CA the bootstrap is written, but readiness stays 503 naming the missing certificate; POST
    /quitquitquit stops the agent (exit 0)."""
    pod.path(C.ROOT_CERT_PATH).write_text("")
    pod.start_agent(PROXY_CONFIG=json.dumps({"discoveryAddress": "localhost:15012"}), DISABLE_ENVOY="true",
                    OUTPUT_CERTS=str(pod.path("var/lib/istio/data")))
    wait_for(lambda: pod.path("etc/istio/proxy/grpc-bootstrap.json").exists(), 20, "the bootstrap")
    _status, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(pod.http(READY)), 20, "a 503")
    assert "no valid workload certificate yet" in body, body
    assert pod.http(f"http://127.0.0.1:{C.STATUS_PORT}/quitquitquit", method="POST")[0] == 200
    assert pod.agent_proc is not None and pod.agent_proc.wait(15) == 0, pod.log()[-3000:]
