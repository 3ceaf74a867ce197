"""`make demo`: the whole pod, locally — two pods injected by the real webhook, run in network namespaces on a local
node, 2/2 READY, a request from pod-a's app to pod-b's app through both Envoys, and pod-b's SPIFFE identity.

Needs root (network namespaces, iptables). Everything it makes is removed on exit, also on failure or Ctrl-C.
"""
from __future__ import annotations

import signal
import sys
import time

from e2e.local import scenario
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
    out.append(("pod-a → pod-b answered 200", f.response.get("status") == 200))
    out.append(("pod-a's Envoy carried it (outbound 15001)",
                scenario.observe.listener_increase(f.stats_a, C.OUTBOUND_CAPTURE_PORT) >= 1))
    out.append(("pod-b's Envoy carried it (inbound 15006)",
                scenario.observe.listener_increase(f.stats_b, C.INBOUND_CAPTURE_PORT) >= 1))
    out.append((f"pod-b serves {f.expected_spiffe_id}",
                f.served is not None and f.expected_spiffe_id in f.served.spiffe_ids))
    return out + service_checks(f)


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
    ]


def main() -> int:
    ok, why = have_root()
    if not ok:
        print(f"make demo {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    start = time.monotonic()
    try:
        facts = scenario.run_flow(prefix="mbd", say=lambda s: print(s, flush=True))
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one readable line plus the logs the runner attached
        print(f"\nDEMO FAILED (everything it made has been removed): {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    left = scenario.leftovers(facts)
    results = [*checks(facts), ("cleaned up every namespace, process and temp dir", not left)]
    print("\n== summary")
    for text, passed in results:
        print(f"  [{'ok' if passed else 'FAIL'}] {text}")
    if left:
        print("  left behind: " + ", ".join(left))
    print("  timings (s since start): " + ", ".join(f"{k} {v}" for k, v in facts.timings.items())
          + f"; total {time.monotonic() - start:.1f}s")
    return 0 if all(p for _, p in results) else 1


if __name__ == "__main__":
    sys.exit(main())
