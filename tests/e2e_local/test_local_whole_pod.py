"""The whole pod, locally: the flow of `make demo`, asserted fact by fact.

Two plain pods go through the real webhook (HTTPS AdmissionReview, JSONPatch), then the local kubelet runs the injected
spec: istio-init's iptables, istio-proxy (agent + Envoy as uid 1337, certificate from the real CA), the app. The flow
runs once per module (about 10 s); each test checks one promise of the issue.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2e.local import observe, scenario, testkit
from meshboot import constants as C

PODS = ("pod-a", "pod-b")


# Kubernetes >= 1.33: the webhook makes istio-proxy a native sidecar (an init container with restartPolicy Always);
# older: the classic layout, istio-proxy among the containers. The kubelet runs both.
LAYOUTS = {"native-sidecar": "1.34", "classic": "1.30"}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def facts(request: pytest.FixtureRequest) -> Iterator[scenario.Facts]:
    testkit.require_root("whole-pod")
    yield scenario.run_flow(prefix="mbp", kubernetes_version=LAYOUTS[request.param])


def test_webhook_injected_istio_init_and_istio_proxy(facts: scenario.Facts) -> None:
    spec = facts.injected["spec"]
    inits = {c["name"]: c for c in spec.get("initContainers") or []}
    containers = {c["name"]: c for c in spec.get("containers") or []}
    assert C.INIT_CONTAINER in inits
    if facts.kubernetes_version == LAYOUTS["native-sidecar"]:
        assert list(inits) == [C.INIT_CONTAINER, C.PROXY_CONTAINER] and C.PROXY_CONTAINER not in containers
        assert inits[C.PROXY_CONTAINER].get("restartPolicy") == "Always"
        proxy = inits[C.PROXY_CONTAINER]
    else:
        assert list(inits) == [C.INIT_CONTAINER] and C.PROXY_CONTAINER in containers
        proxy = containers[C.PROXY_CONTAINER]
    assert inits[C.INIT_CONTAINER]["args"][0] == "istio-iptables"
    assert proxy["args"][:2] == ["proxy", "sidecar"]
    assert proxy["securityContext"]["runAsUser"] == C.PROXY_UID
    assert "app" in containers
    assert facts.patch_ops > 0


@pytest.mark.parametrize("pod", PODS)
def test_init_container_installed_istio_chains(facts: scenario.Facts, pod: str) -> None:
    p = facts.pods[pod]
    assert p.init_exit_codes.get(C.INIT_CONTAINER) == 0
    assert set(observe.ISTIO_NAT_CHAINS) <= set(p.chains), sorted(p.chains)
    redirect = " ".join(p.chains["ISTIO_REDIRECT"])
    in_redirect = " ".join(p.chains["ISTIO_IN_REDIRECT"])
    assert f"--to-ports {C.OUTBOUND_CAPTURE_PORT}" in redirect
    assert f"--to-ports {C.INBOUND_CAPTURE_PORT}" in in_redirect
    assert any(f"--uid-owner {C.PROXY_UID}" in r for r in p.chains["ISTIO_OUTPUT"])
    assert any("-j ISTIO_OUTPUT" in r for r in p.chains["OUTPUT"])
    assert any("-j ISTIO_INBOUND" in r for r in p.chains["PREROUTING"])


@pytest.mark.parametrize("pod", PODS)
def test_agent_and_envoy_run_as_1337(facts: scenario.Facts, pod: str) -> None:
    p = facts.pods[pod]
    assert p.agent_uid == C.PROXY_UID
    assert p.envoy_pids, "the agent has no Envoy child"
    assert set(p.envoy_uids.values()) == {C.PROXY_UID}


@pytest.mark.parametrize("pod", PODS)
def test_agent_owns_xds_and_sds_sockets_with_envoy_connected(facts: scenario.Facts, pod: str) -> None:
    p = facts.pods[pod]
    for check in (p.xds, p.sds):
        assert p.agent_pid in check.listening_pids, f"{check.suffix}: listeners {set(check.listening_pids)}"
        assert set(p.envoy_pids) & check.connected_peer_pids, \
            f"{check.suffix}: Envoy {set(p.envoy_pids)} not among connected {set(check.connected_peer_pids)}"


@pytest.mark.parametrize("pod", PODS)
def test_envoy_and_agent_listen_on_their_ports(facts: scenario.Facts, pod: str) -> None:
    listeners = facts.pods[pod].tcp_listeners
    for port in (C.OUTBOUND_CAPTURE_PORT, C.INBOUND_CAPTURE_PORT, C.ENVOY_STATUS_PORT, C.ENVOY_ADMIN_PORT):
        assert any(n.startswith("envoy") for n in listeners.get(port, ())), f"{port}: {listeners.get(port)}"
    assert listeners.get(C.STATUS_PORT), "nothing on the agent's status port 15020"
    assert not any(n.startswith("envoy") for n in listeners[C.STATUS_PORT])


@pytest.mark.parametrize("pod", PODS)
def test_pod_is_2_of_2_ready_with_15021_200(facts: scenario.Facts, pod: str) -> None:
    p = facts.pods[pod]
    assert p.ready == (2, 2)
    assert p.readyz_status == 200


def test_injected_agents_run_in_proxy_mode_against_the_local_control_plane(facts: scenario.Facts) -> None:
    """The runner's mesh config sets defaultConfig.discoveryAddress to the control plane on the node's bridge."""
    env = {e["name"]: e.get("value") for c in facts.injected["spec"]["initContainers"] + facts.injected["spec"][
        "containers"] if c["name"] == C.PROXY_CONTAINER for e in c.get("env") or []}
    assert '"discoveryAddress":"10.244.0.1:15012"' in (env.get("PROXY_CONFIG") or "").replace(" ", ""), env
    assert env.get("CA_ADDR") == "10.244.0.1:15012"


def test_request_a_to_b_goes_through_the_cluster_ip_in_mutual_tls(facts: scenario.Facts) -> None:
    """pod-a → Service `server`'s ClusterIP: pod-a's Envoy uses the EDS cluster from meshboot's discovery (not
    PassthroughCluster) and verifies pod-b as `server`; pod-b's Envoy terminates mTLS and names pod-a's identity."""
    r = facts.a_to_b
    assert r is not None and facts.endpoint_in_eds
    assert facts.response["status"] == 200 and facts.response["bytes"] > 0
    b = facts.pods["pod-b"]
    assert r.log_a and all(f" {scenario.OUTBOUND_CLUSTER} " in line and f"-> {b.ip}:8080 " in line
                           and "upstream_peer=spiffe://cluster.local/ns/demo/sa/server " in line
                           for line in r.log_a), r.log_a
    assert r.log_b and all("downstream_peer=spiffe://cluster.local/ns/demo/sa/client " in line
                           and "tls=TLSv1.3 " in line for line in r.log_b
                           if line.split()[2].startswith(facts.pods["pod-a"].ip + ":")), r.log_b
    assert any(line.split()[2].startswith(facts.pods["pod-a"].ip + ":") for line in r.log_b), r.log_b
    # B's app saw the request arrive from its own Envoy's inbound source, not from pod-a.
    assert facts.app_b_log_lines, "pod-b's app never logged the request"
    assert all(line.startswith(C.INBOUND_PASSTHROUGH_SRC_V4 + " ") for line in facts.app_b_log_lines), \
        facts.app_b_log_lines


def test_pod_a_resolves_service_b_through_its_agent(facts: scenario.Facts) -> None:
    """DNS capture on (mesh proxyMetadata): pod-a's app resolves `server`, `server.demo` and the full name to the
    Service's ClusterIP. The pod's nameserver is the node's bridge address, where no DNS server runs: the answer
    came from pod-a's agent (its DNS request counter moved), from the name table discovery sent over NDS."""
    d = facts.dns
    assert d is not None
    assert d.answers == {n: [facts.cluster_ip] for n in ("server", "server.demo", "server.demo.svc.cluster.local")}
    assert d.agent_requests >= 3
    assert "nameserver 10.244.0.1" in d.resolv_conf and "search demo.svc.cluster.local" in d.resolv_conf
    dns_rules = [r for r in facts.pods["pod-a"].chains.get("ISTIO_OUTPUT_DNS", []) if "REDIRECT" in r]
    assert dns_rules and all(f"--to-ports {C.DNS_PROXY_PORT}" in r and "-d 10.244.0.1/32" in r for r in dns_rules)


def test_strict_peer_authentication_applied_live(facts: scenario.Facts) -> None:
    """STRICT for the namespace, created in the API server: pod-b's Envoy gets a TLS-only inbound chain without a
    restart, the client without a sidecar is refused (its request never reaches the app), pod-a still answered."""
    st = facts.strict
    assert st is not None
    assert st.chains_before == ["tls", "tls", "raw_buffer"] and st.chains_after == ["tls"]
    assert not st.plain.response and st.plain.error and not st.plain.app_b, st.plain
    assert st.a_to_b.response.get("status") == 200 and st.a_to_b.app_b
    assert any("downstream_peer=spiffe://cluster.local/ns/demo/sa/client " in line and "tls=TLSv1.3 " in line
               for line in st.a_to_b.log_b), st.a_to_b.log_b


def test_authorization_policy_applied_live(facts: scenario.Facts) -> None:
    """ALLOW only pod-a's identity on pod-b, created in the API server: pod-b's Envoy gets the RBAC filter without a
    restart, pod-c (a mesh pod with another service account) is refused by it and counted, pod-a still answered."""
    az = facts.authz
    assert az is not None
    assert az.rbac_before == [] and az.rbac_after == [("ALLOW", ("ns[demo]-policy[server-allow-pod-a]-rule[0]",))]
    assert not az.other.response and az.other.error and not az.other.app_b, az.other
    assert az.denied >= 1
    assert az.a_to_b.response.get("status") == 200 and az.a_to_b.app_b
    assert any("downstream_peer=spiffe://cluster.local/ns/demo/sa/client " in line for line in az.a_to_b.log_b)
    assert "pod-c" in facts.pods and facts.pods["pod-c"].service_account == "other-client"


def test_pod_b_serves_its_spiffe_identity(facts: scenario.Facts) -> None:
    assert facts.expected_spiffe_id == "spiffe://cluster.local/ns/demo/sa/server"
    assert facts.served is not None and facts.served.chain_verified
    assert facts.served.spiffe_ids == (facts.expected_spiffe_id,)


def test_everything_was_cleaned_up(facts: scenario.Facts) -> None:
    assert facts.netns_names and facts.pids
    assert scenario.leftovers(facts) == []


def test_plain_client_reaches_pod_b_through_the_service_cluster_ip(facts: scenario.Facts) -> None:
    s = facts.services
    assert s is not None
    assert {"pod-a", "pod-b", scenario.PLAIN} <= set(s.api_pods) and scenario.SERVICE in s.api_services
    assert scenario.PLAIN not in facts.pods      # no sidecar: the webhook skipped it
    b = facts.pods["pod-b"]
    assert [(ep["targetRef"]["name"], ep["addresses"], ep["conditions"]["ready"]) for ep in s.slice_endpoints] == [
        ("pod-b", [b.ip], True)]
    assert f"-d {s.cluster_ip}/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination {b.ip}:8080" in s.proxy_rules
    assert s.response.get("status") == 200
    assert len(s.app_b_log_lines) == 1 and s.app_b_log_lines[0].startswith("127.0.0.6 ")   # via pod-b's Envoy
    # PERMISSIVE: pod-b's Envoy took it in plaintext, with no peer identity.
    assert any(f" {scenario.INBOUND_CLUSTER} " in line and "downstream_peer=- " in line and "tls=- " in line
               for line in s.log_b), s.log_b
