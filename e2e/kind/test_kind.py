"""meshboot on a real cluster (kind): the chart installs, labelled namespaces get 2/2 pods whose capture rules and
agent sockets are really there, traffic goes through both sidecars in mutual TLS (config from meshboot's discovery),
and everything else stays 1/1."""
from __future__ import annotations

import json
import re
import time

import pytest

from e2e.kind import manifests as M
from e2e.kind.cluster import Cluster, wait_for
from e2e.kind.settings import RELEASE_NS, WEBHOOK_CONFIG, WEBHOOK_DEPLOYMENT
from meshboot import constants as C

CHAINS = (C.CHAIN_INBOUND, C.CHAIN_REDIRECT, C.CHAIN_IN_REDIRECT, C.CHAIN_OUTPUT)


def _containers(pod: dict) -> list[str]:
    spec = pod["spec"]
    return [c["name"] for c in spec.get("initContainers", []) + spec["containers"]]


def _ready_counts(pod: dict) -> tuple[int, int]:
    """(ready, total) over app containers and native sidecars, computed from the status, like kubectl's column."""
    sidecars = {c["name"] for c in pod["spec"].get("initContainers", []) if c.get("restartPolicy") == "Always"}
    statuses = pod["status"].get("containerStatuses", []) + [
        s for s in pod["status"].get("initContainerStatuses", []) if s["name"] in sidecars]
    return sum(1 for s in statuses if s.get("ready")), len(pod["spec"]["containers"]) + len(sidecars)


def test_control_plane_is_up(cluster: Cluster) -> None:
    dep = cluster.get_json("deployment", WEBHOOK_DEPLOYMENT, "-n", RELEASE_NS)
    assert dep["status"].get("availableReplicas") == dep["spec"]["replicas"]
    mwc = cluster.get_json("mutatingwebhookconfiguration", WEBHOOK_CONFIG)
    assert {w["name"] for w in mwc["webhooks"]} >= {"namespace.sidecar-injector.istio.io"}


def test_root_cert_is_published(mesh: Cluster) -> None:
    cm = mesh.get_json("configmap", C.ROOT_CERT_CONFIGMAP, "-n", M.MESH_NS)
    assert cm["data"][C.ROOT_CERT_KEY].startswith("-----BEGIN CERTIFICATE-----")


@pytest.mark.parametrize("app", ["server", "client"])
def test_injected_pods_are_2_of_2_ready(mesh: Cluster, app: str) -> None:
    pod_name = mesh.pod_name(M.MESH_NS, f"app={app}")
    pod = mesh.get_json("pod", pod_name, "-n", M.MESH_NS)
    names = _containers(pod)
    assert C.INIT_CONTAINER in names and C.PROXY_CONTAINER in names
    assert C.ANNOTATION_STATUS in pod["metadata"]["annotations"]
    for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        if c["name"] in (C.INIT_CONTAINER, C.PROXY_CONTAINER):
            assert c["image"].endswith(f"/meshboot-agent:{mesh.tag}"), "injected with this run's build"
    assert wait_for(f"{pod_name} 2/2", lambda: mesh.ready_column(M.MESH_NS, pod_name) == "2/2", timeout=180)
    assert _ready_counts(mesh.get_json("pod", pod_name, "-n", M.MESH_NS)) == (2, 2)


def test_capture_rules_are_installed_in_the_pod(mesh: Cluster) -> None:
    pod = mesh.pod_name(M.MESH_NS, "app=server")
    out = mesh.debug_output(M.MESH_NS, pod, "dbg-iptables", M.NETSHOOT_IMAGE,
                            "iptables-nft-save 2>/dev/null; iptables-legacy-save 2>/dev/null; true",
                            profile="netadmin")
    for chain in CHAINS:
        assert re.search(rf"^:{chain} ", out, re.M), f"{chain} missing from iptables-save:\n{out}"
    assert f"--to-ports {C.OUTBOUND_CAPTURE_PORT}" in out and f"--to-ports {C.INBOUND_CAPTURE_PORT}" in out
    assert f"--uid-owner {C.PROXY_UID}" in out


def test_agent_serves_sds_and_xds_sockets(mesh: Cluster) -> None:
    pod = mesh.pod_name(M.MESH_NS, "app=server")
    script = "ss -xlp"
    try:
        out = mesh.debug_output(M.MESH_NS, pod, "dbg-ss", M.NETSHOOT_IMAGE, script, profile="sysadmin",
                                target=C.PROXY_CONTAINER)
    except Exception as e:  # noqa: BLE001 - a cluster refusing a privileged debug container still lets us list
        # The fallback needs neither --target nor sysadmin (which PodSecurity `baseline` refuses): the pod's network
        # namespace lists its Unix sockets, without process names.
        print(f"--profile=sysadmin --target={C.PROXY_CONTAINER} refused ({e}); listing sockets with "
              "--profile=general, without process names")
        out = mesh.debug_output(M.MESH_NS, pod, "dbg-ss2", M.NETSHOOT_IMAGE, script, profile="general")
    xds = C.XDS_SOCKET.lstrip(".")
    sds = C.WORKLOAD_SOCKET.lstrip(".")
    lines = out.splitlines()
    for path in (xds, sds):
        hits = [ln for ln in lines if path in ln]
        assert hits, f"no listening socket {path} in ss -xlp:\n{out}"
        for ln in hits:
            if "users:((" in ln:
                assert re.search(r'users:\(\("(python3?|meshboot-agent|pilot-agent)"', ln), ln


def test_client_reaches_server_through_both_sidecars_in_mtls(mesh: Cluster) -> None:
    """The request crosses the client's Envoy on the Service's EDS cluster from meshboot's discovery and the server's
    Envoy on its inbound cluster, in mutual TLS: the server side saw Istio's SNI for the service (Istio's default
    access log format carries the cluster and the requested server name)."""
    client = mesh.pod_name(M.MESH_NS, "app=client")
    server = mesh.pod_name(M.MESH_NS, "app=server")
    url = f"http://server.{M.MESH_NS}.svc.cluster.local:{M.SERVER_PORT}/"
    code = mesh.kubectl("exec", "-n", M.MESH_NS, client, "-c", "client", "--",
                        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", url).stdout
    assert code == "200"
    cluster = f"outbound|{M.SERVER_PORT}||server.{M.MESH_NS}.svc.cluster.local"
    sni = f"outbound_.{M.SERVER_PORT}_._.server.{M.MESH_NS}.svc.cluster.local"
    deadline = time.monotonic() + 15        # Envoy flushes access logs every second or so
    while True:
        out = mesh.kubectl("logs", "-n", M.MESH_NS, client, "-c", C.PROXY_CONTAINER).stdout
        inb = mesh.kubectl("logs", "-n", M.MESH_NS, server, "-c", C.PROXY_CONTAINER).stdout
        if (cluster in out and sni in inb) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert cluster in out, f"the client's Envoy did not use {cluster}:\n{out[-2000:]}"
    assert f"inbound|{M.SERVER_PORT}||" in inb and sni in inb, \
        f"the server's Envoy saw no mTLS for {sni}:\n{inb[-2000:]}"


@pytest.mark.parametrize("ns,app", [(M.PLAIN_NS, "client"), (M.MESH_NS, "optout")])
def test_uninjected_pods_stay_1_of_1(mesh: Cluster, ns: str, app: str) -> None:
    pod_name = mesh.pod_name(ns, f"app={app}")
    pod = mesh.get_json("pod", pod_name, "-n", ns)
    assert _containers(pod) == ["client"]
    assert C.ANNOTATION_STATUS not in (pod["metadata"].get("annotations") or {})
    assert mesh.ready_column(ns, pod_name) == "1/1"


def test_sidecar_got_a_workload_certificate(mesh: Cluster) -> None:
    """The agent fetched a SPIFFE certificate from the chart's CA and handed it to Envoy over SDS."""
    pod = mesh.pod_name(M.MESH_NS, "app=server")
    script = ("import urllib.request;print(urllib.request.urlopen("
              f"'http://127.0.0.1:{C.ENVOY_ADMIN_PORT}/certs',timeout=5).read().decode())")
    certs = json.loads(mesh.kubectl("exec", "-n", M.MESH_NS, pod, "-c", C.PROXY_CONTAINER, "--",
                                    "python3", "-c", script).stdout)
    uris = [san.get("uri") for c in certs.get("certificates", []) for chain in c.get("cert_chain", [])
            for san in chain.get("subject_alt_names", [])]
    assert C.spiffe_id(M.MESH_NS, "default") in uris, certs
