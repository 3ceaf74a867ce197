"""kube-proxy (iptables mode) for the local node: ClusterIP → ready endpoint DNAT in the node's network namespace, so a
pod without a sidecar reaches a Service by its ClusterIP (pods with a sidecar get there through Envoy, which the
control plane configures from the same objects).

`rules()` is pure: Services and EndpointSlices in, an `iptables-restore --noflush` document out. Every sync rewrites
the KUBE-* chains whole. One endpoint of n is picked with `statistic --mode random` as kube-proxy does. Service
traffic is masqueraded (kube-proxy's `--masquerade-all`): pods share one bridge, so without it the backend's reply
would skip the node's conntrack and never be un-DNATed.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from testing.netns import Netns

Obj = dict[str, Any]
MASQ_MARK = "0x4000/0x4000"
CHAINS = ("KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-POSTROUTING")


def ready_backends(service: Obj, slices: Iterable[Obj], port_name: str) -> list[tuple[str, int]]:
    """(ip, port) of the ready endpoints behind one Service port, from the Service's slices (sorted, no repeats)."""
    md = service["metadata"]
    out: set[tuple[str, int]] = set()
    for s in slices:
        smd = s.get("metadata") or {}
        if smd.get("namespace") != md["namespace"] or \
                (smd.get("labels") or {}).get("kubernetes.io/service-name") != md["name"]:
            continue
        port = next((p["port"] for p in s.get("ports") or [] if p.get("name", "") == port_name), None)
        if port is None:
            continue
        for ep in s.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is not False:   # unset means ready
                out.update((a, int(port)) for a in ep.get("addresses") or [])
    return sorted(out)


def rules(services: Iterable[Obj], slices: Iterable[Obj]) -> str:
    """The nat table's KUBE-* chains for these Services (ClusterIP only; headless and selector-less ones have none)."""
    slices = list(slices)
    lines = ["*nat", *(f":{c} - [0:0]" for c in CHAINS),
             f"-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}",
             f"-A KUBE-POSTROUTING -m mark --mark {MASQ_MARK} -j MASQUERADE"]
    for svc in sorted(services, key=lambda s: (s["metadata"]["namespace"], s["metadata"]["name"])):
        spec = svc.get("spec") or {}
        cip = spec.get("clusterIP")
        if not cip or cip == "None":
            continue
        for p in spec.get("ports") or []:
            proto = str(p.get("protocol", "TCP")).lower()
            match = f"-d {cip}/32 -p {proto} -m {proto} --dport {p['port']}"
            backends = ready_backends(svc, slices, p.get("name", ""))
            if not backends:
                continue
            lines.append(f"-A KUBE-SERVICES {match} -j KUBE-MARK-MASQ")
            for i, (ip, port) in enumerate(backends):
                left = len(backends) - i
                pick = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
                lines.append(f"-A KUBE-SERVICES {match} {pick}-j DNAT --to-destination {ip}:{port}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


HOOKS = ("-A PREROUTING -j KUBE-SERVICES", "-A OUTPUT -j KUBE-SERVICES", "-A POSTROUTING -j KUBE-POSTROUTING")


class KubeProxy:
    """Applies `rules()` in the node's namespace, only when they change."""

    def __init__(self, node_ns: Netns) -> None:
        self.ns = node_ns
        self.applied = ""

    def install(self) -> None:
        """Forwarding on (the node routes pod → ClusterIP → pod) and the jumps from the built-in chains."""
        self.ns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self._restore("*nat\n" + "".join(f":{c} - [0:0]\n" for c in CHAINS) + "\n".join(HOOKS) + "\nCOMMIT\n")

    def sync(self, services: Iterable[Obj], slices: Iterable[Obj]) -> bool:
        """Write the chains if they differ from what is applied; True if it wrote."""
        text = rules(services, slices)
        if text == self.applied:
            return False
        self._restore(text)
        self.applied = text
        return True

    def _restore(self, text: str) -> None:
        res = self.ns.run(["iptables-restore", "--noflush"], input=text, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"iptables-restore in {self.ns.name}: {res.stderr.strip()}\n{text}")

    def dump(self) -> str:
        """The node's KUBE-* nat rules as iptables-save prints them."""
        out = self.ns.run(["iptables-save", "-t", "nat"], check=False).stdout
        return "\n".join(line for line in out.splitlines() if "KUBE-" in line)
