"""`make demo`: the whole pod, locally — two pods injected by the real webhook, run in network namespaces on a local
node, 2/2 READY, a request from pod-a's app to Service `server`'s ClusterIP in mutual TLS between the two Envoys
(configured by meshboot's discovery), pod-a resolving Service `server`'s name through its own agent (DNS capture,
the name table from discovery's NDS), pod-b's SPIFFE identity, a pod without a sidecar served in plaintext, then
refused once a STRICT PeerAuthentication is applied live, and an AuthorizationPolicy allowing only pod-a's identity on
pod-b, applied live: a second mesh pod (pod-c, another service account) refused by pod-b's Envoy, pod-a served.

Needs root (network namespaces, iptables). Everything it makes is removed on exit, also on failure or Ctrl-C; with
`--keep` (`make demo KEEP=1`) it stays up, detached, until `--down` (`make demo-down`).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time

from e2e.local import keep, scenario
from e2e.local.cluster import LocalCluster
from meshboot import constants as C
from testing.netns import have_root


def _sigterm(_signo: int, _frame: object) -> None:
    raise KeyboardInterrupt     # same clean-up path as Ctrl-C


def checks(f: scenario.Facts) -> list[tuple[str, bool]]:
    """The facts the demo promises, each true or false (the test asserts the same ones, one by one)."""
    out = []
    init_names, cont_names = f.pods["pod-a"].init_containers, f.pods["pod-a"].containers
    out.append(("injected pod has istio-init and istio-proxy",
                C.INIT_CONTAINER in init_names and C.PROXY_CONTAINER in init_names + cont_names))
    for name, p in f.pods.items():
        out.append((f"{name}: ISTIO_* nat chains installed",
                    set(scenario.observe.ISTIO_NAT_CHAINS) <= set(p.chains)))
        out.append((f"{name}: agent listens on XDS and SDS, Envoy connected to both",
                    p.agent_pid in p.xds.listening_pids and p.agent_pid in p.sds.listening_pids
                    and bool(set(p.envoy_pids) & p.xds.connected_peer_pids)
                    and bool(set(p.envoy_pids) & p.sds.connected_peer_pids)))
        out.append((f"{name}: {p.ready[0]}/{p.ready[1]} READY, 15021 → {p.readyz_status}",
                    p.ready[0] == p.ready[1] == 2 and p.readyz_status == 200))
    out += mtls_checks(f)
    out += dns_checks(f)
    out.append((f"pod-b serves {f.expected_spiffe_id}",
                f.served is not None and f.expected_spiffe_id in f.served.spiffe_ids))
    return out + service_checks(f) + strict_checks(f) + authz_checks(f)


def _peer_line(lines: list[str], peer: str) -> bool:
    return any(f"downstream_peer={peer} " in line and "tls=TLSv1.3" in line for line in lines)


def mtls_checks(f: scenario.Facts) -> list[tuple[str, bool]]:
    """pod-a → the Service's ClusterIP in mutual TLS, as both Envoys' access logs tell it."""
    r = f.a_to_b
    b_ip = f.pods["pod-b"].ip if "pod-b" in f.pods else "?"
    server_id = C.spiffe_id(scenario.NAMESPACE, scenario.SERVICE)
    return [
        (f"pod-a's Envoy has {scenario.OUTBOUND_CLUSTER} → pod-b from meshboot's discovery (EDS)", f.endpoint_in_eds),
        (f"pod-a → {scenario.SERVICE} ClusterIP {f.cluster_ip}:80 answered 200 by pod-b's app",
         r is not None and r.response.get("status") == 200 and bool(r.app_b)),
        (f"pod-a's Envoy sent it to {scenario.OUTBOUND_CLUSTER} {b_ip}:{scenario.APP_PORT}, peer {server_id}",
         r is not None and any(f"upstream_peer={server_id} " in line and f"-> {b_ip}:" in line for line in r.log_a)),
        (f"pod-b's Envoy took it in mTLS (TLSv1.3) on {scenario.INBOUND_CLUSTER} from peer {scenario.CLIENT_SPIFFE_ID}",
         r is not None and _peer_line(r.log_b, scenario.CLIENT_SPIFFE_ID)),
    ]


def dns_checks(f: scenario.Facts) -> list[tuple[str, bool]]:
    """pod-a resolves the Service's names to its ClusterIP, answered by its agent (no DNS server at the nameserver)."""
    d = f.dns
    if d is None:
        return [("pod-a resolves Service server's name through its agent", False)]
    names = ", ".join(d.answers)
    return [(f"pod-a resolves {names} → {f.cluster_ip} through its agent ({d.agent_requests:.0f} queries reached it; "
             "no DNS server runs at the pod's nameserver)",
             bool(d.answers) and all(a == [f.cluster_ip] for a in d.answers.values()) and d.agent_requests >= 1)]


def strict_checks(f: scenario.Facts) -> list[tuple[str, bool]]:
    """STRICT applied live: the new listener at pod-b, the plaintext client refused, pod-a still served in mTLS."""
    st = f.strict
    if st is None:
        return [("STRICT PeerAuthentication applied", False)]
    return [
        (f"STRICT PeerAuthentication {scenario.NAMESPACE}/default reached pod-b's Envoy live in {st.seconds:.1f}s "
         f"(inbound chains {st.chains_before} → {st.chains_after})",
         st.chains_after == ["tls"] and st.chains_before != st.chains_after),
        (f"{scenario.PLAIN} (no sidecar) refused under STRICT", not st.plain.response and not st.plain.app_b),
        ("pod-a still answered 200 under STRICT, pod-b's Envoy naming its peer",
         st.a_to_b.response.get("status") == 200 and _peer_line(st.a_to_b.log_b, scenario.CLIENT_SPIFFE_ID)),
    ]


def authz_checks(f: scenario.Facts) -> list[tuple[str, bool]]:
    """The AuthorizationPolicy applied live: pod-b's RBAC filter, pod-c refused and counted, pod-a still served."""
    az = f.authz
    if az is None:
        return [("AuthorizationPolicy applied", False)]
    name = scenario.AUTHZ_POLICY["metadata"]["name"]
    return [
        (f"AuthorizationPolicy {scenario.NAMESPACE}/{name} reached pod-b's Envoy live in {az.seconds:.1f}s "
         f"(RBAC filters {az.rbac_before} → {az.rbac_after})",
         az.rbac_before == [] and az.rbac_after == [("ALLOW", (f"ns[{scenario.NAMESPACE}]-policy[{name}]-rule[0]",))]),
        (f"{scenario.OTHER} (mesh pod, another identity) refused by pod-b's Envoy (tcp.rbac.denied {az.denied})",
         not az.other.response and not az.other.app_b and az.denied >= 1),
        ("pod-a (allowed identity) still answered 200",
         az.a_to_b.response.get("status") == 200 and _peer_line(az.a_to_b.log_b, scenario.CLIENT_SPIFFE_ID)),
    ]


def service_checks(f: scenario.Facts) -> list[tuple[str, bool]]:
    """The Service facts: the API server's objects, the slice following readiness, the ClusterIP reached."""
    s = f.services
    if s is None:
        return [("API server holds the pods and the Service", False)]
    pods = {"pod-a", "pod-b", scenario.PLAIN}
    b_ip = f.pods["pod-b"].ip if "pod-b" in f.pods else ""
    return [
        ("API server holds the pods (with IPs) and the Service (with a ClusterIP)",
         pods <= {n for n, p in s.api_pods.items() if (p.get("status") or {}).get("podIP")}
         and scenario.SERVICE in s.api_services and bool(s.cluster_ip)),
        (f"EndpointSlice for {scenario.SERVICE} lists pod-b ready",
         any(ep["targetRef"]["name"] == "pod-b" and ep["conditions"]["ready"] and b_ip in ep["addresses"]
             for ep in s.slice_endpoints)),
        (f"{scenario.PLAIN} (no sidecar) → {s.cluster_ip}:{s.port} answered 200 from pod-b's app",
         s.response.get("status") == 200 and bool(s.app_b_log_lines)),
        ("pod-b's Envoy took it in plaintext (no peer) under PERMISSIVE",
         any("downstream_peer=- " in line and "tls=-" in line for line in s.log_b)),
    ]


def _summary(results: list[tuple[str, bool]]) -> None:
    print("\n== summary")
    for text, passed in results:
        print(f"  [{'ok' if passed else 'FAIL'}] {text}")


def _hold(cluster: LocalCluster, facts: scenario.Facts) -> None:
    """--hold: the summary and the exec instructions with everything up, the state file, then wait for --down."""
    results = checks(facts)
    _summary(results)
    keep.write_state(cluster, facts, 0 if all(p for _, p in results) else 1)
    print(keep.instructions(keep.load_state() or {}), flush=True)
    keep.state_file().with_name("ready").touch()
    keep.hold()
    print("\n== demo-down: cleaning up", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m e2e.local.demo")
    ap.add_argument("--keep", action="store_true", help="leave the cluster running, detached (make demo KEEP=1)")
    ap.add_argument("--down", action="store_true", help="tear down what --keep left (make demo-down)")
    ap.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)     # the detached process --keep starts
    opts = ap.parse_args(argv)
    ok, why = have_root()
    if not ok:
        print(f"make demo {why}", file=sys.stderr)
        return 2
    if opts.down:
        return keep.down()
    if opts.keep:
        return keep.launch(["--hold"])
    signal.signal(signal.SIGTERM, _sigterm)
    start = time.monotonic()
    try:
        facts = scenario.run_flow(prefix="mbd", say=lambda s: print(s, flush=True),
                                  hold=_hold if opts.hold else None)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one readable line plus the logs the runner attached
        print(f"\nDEMO FAILED (everything it made has been removed): {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    left = scenario.leftovers(facts)
    results = [("cleaned up every namespace, process and temp dir", not left)]
    _summary(results if opts.hold else [*checks(facts), *results])
    if left:
        print("  left behind: " + ", ".join(left))
    print("  timings (s since start): " + ", ".join(f"{k} {v}" for k, v in facts.timings.items())
          + f"; total {time.monotonic() - start:.1f}s")
    return 0 if all(p for _, p in results) else 1


if __name__ == "__main__":
    sys.exit(main())
