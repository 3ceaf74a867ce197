"""CNI mode and the nftables switch: what Istio's sidecar template does differently under `pilot.cni.enabled`.

With a CNI plugin writing the capture rules on the node, the pod needs no NET_ADMIN: Istio renders `istio-validation`
(the same istio-iptables arguments plus `--run-validation --skip-rule-apply`, run as the proxy's uid without any
capability) instead of `istio-init`, writes the capture settings as pod annotations for the plugin, and with
`pilot.cni.provider: multus` asks Multus for the `default/istio-cni` network. The plugin itself is not meshboot's.

`global.nativeNftables` makes Istio's istio-init write nftables rules; meshboot's writes iptables rules (through
iptables-nft where the node uses nftables), so a pod that would get istio-init with it is refused at admission with
a message naming the value, instead of failing in the pod. In CNI mode the flag only reaches the validation, which
does not depend on how the rules were written, so it is passed on as Istio does.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshboot import constants as C
from meshboot import jsonsafe
from webhook.errors import InjectionError

ANNOTATION_MULTUS_NETWORKS = "k8s.v1.cni.cncf.io/networks"
ISTIO_CNI_NETWORK = "default/istio-cni"          # Istio's template: appendMultusNetwork(..., `default/istio-cni`)
RUN_VALIDATION = ("--run-validation", "--skip-rule-apply")
NATIVE_NFTABLES = "--native-nftables"


def truthy(value: Any) -> bool:
    """Go template truth, as Istio's `{{ if .Values.x }}` reads a value: false, 0, "", nil and empty are false."""
    return value not in (None, False, 0, "") and value != [] and value != {}


def _cni(values: Mapping[str, Any]) -> Mapping[str, Any]:
    pilot = values.get("pilot")
    cni = pilot.get("cni") if isinstance(pilot, Mapping) else None
    return cni if isinstance(cni, Mapping) else {}


def enabled(values: Mapping[str, Any]) -> bool:
    """`pilot.cni.enabled`, the key Istio's template reads since 1.24 (the older `istio_cni.*` keys are gone there,
    and ignored here likewise)."""
    return truthy(_cni(values).get("enabled"))


def multus(values: Mapping[str, Any]) -> bool:
    return enabled(values) and _cni(values).get("provider") == "multus"


def check_native_nftables(values: Mapping[str, Any]) -> None:
    """Refuse, at admission, a pod whose istio-init would get `--native-nftables` (meshboot's cannot write nft)."""
    g = values.get("global")
    value = g.get("nativeNftables") if isinstance(g, Mapping) else None
    if truthy(value) and not enabled(values):
        raise InjectionError(
            "failed to run injection template: values.global.nativeNftables is set, but meshboot's istio-init "
            "writes iptables rules only (iptables-nft where the node uses nftables); set values.global."
            "nativeNftables to false, or use CNI mode (values.pilot.cni.enabled) with a CNI plugin that writes them")


def as_validation(init: dict[str, Any]) -> dict[str, Any]:
    """istio-init -> istio-validation (Istio's sidecar template under pilot.cni.enabled): `--run-validation
    --skip-rule-apply` in place of `--force-apply`, before `--native-nftables`; no capabilities, a read-only root,
    runAsNonRoot as the proxy's uid/gid (1337; the template's ProxyUID/GID, 1337 also in TPROXY mode)."""
    args = [a for a in init["args"] if a != "--force-apply"]
    at = args.index(NATIVE_NFTABLES) if NATIVE_NFTABLES in args else len(args)
    args[at:at] = RUN_VALIDATION
    old = init.get("securityContext") or {}
    sc: dict[str, Any] = {"allowPrivilegeEscalation": old.get("allowPrivilegeEscalation", False),
                          "privileged": old.get("privileged", False),
                          "capabilities": {"drop": ["ALL"]},
                          "readOnlyRootFilesystem": True, "runAsGroup": C.PROXY_GID, "runAsNonRoot": True,
                          "runAsUser": C.PROXY_UID}
    if "seccompProfile" in old:
        sc["seccompProfile"] = old["seccompProfile"]
    return {**init, "name": C.VALIDATION_CONTAINER, "args": args, "securityContext": sc}


def adopt_user_ids(validation: dict[str, Any], user_proxy: Mapping[str, Any], tproxy: bool) -> None:
    """Istio's adjustInitContainerUser for istio-validation: it runs as the user's istio-proxy runAsUser/runAsGroup
    (not in TPROXY mode), so the validation's probe is the proxy's traffic. Integers only (a pod's schema type)."""
    if tproxy:
        return
    user_sc = user_proxy.get("securityContext")
    if not isinstance(user_sc, Mapping):
        return
    sc = validation.setdefault("securityContext", {})
    for key in ("runAsUser", "runAsGroup"):
        value = user_sc.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            sc[key] = value


def excluded_inbound_ports(status_port: str, excluded: str) -> str:
    """Istio's excludeInboundPort: the status port added to the excluded inbound ports unless already there."""
    port = status_port.strip()
    if not port or port == "0":
        return excluded
    ports = [p.strip() for p in excluded.split(",")]
    if port in excluded.split(","):
        return excluded
    return ",".join([*(p for p in ports if p), port])


def append_multus_network(existing: str, network: str = ISTIO_CNI_NETWORK) -> str:
    """Istio's appendMultusNetwork: add `network` to the Multus annotation, flat (`a, b`) or JSON (`[{"name": ..}]`),
    unless it is there already. A JSON value that is not a list of objects is left as it is (Istio logs and skips);
    an empty JSON list gets the network alone (where Istio's splice would write invalid JSON)."""
    if existing == "":
        return network
    close = existing.rfind("]")
    if close == -1:
        if any(item.strip() == network for item in existing.split(",")):
            return existing
        return existing + ", " + network
    try:
        nets = jsonsafe.load(existing)
    except jsonsafe.JSONRefused:
        return existing
    if not isinstance(nets, list) or not all(n is None or isinstance(n, dict) for n in nets):
        return existing
    ns, _, name = network.rpartition("/")
    for net in (n for n in nets if n is not None):
        if net.get("name") == name and (net.get("namespace") if net.get("namespace") is not None else "") == ns:
            return existing
    entry = f'{{"name": "{name}", "namespace": "{ns}"}}' if ns else f'{{"name": "{name}"}}'
    sep = "" if not nets else ", "      # Istio always splices ", ": `[, {...}]` of an empty list is not JSON
    return existing[:close] + sep + entry + existing[close:]


def plugin_annotations(pod_annotations: Mapping[str, str], values: Mapping[str, Any], interception_mode: str,
                status_port: int) -> dict[str, str]:
    """The annotations Istio's sidecar template writes in CNI mode, for the plugin to read the capture settings
    from (each the pod's own value or the values' default), and the Multus network with provider multus."""
    g = values.get("global") or {}
    p = g.get("proxy") or {}

    def pick(key: str, default: Any) -> str:
        v = pod_annotations.get(key)
        return str(default if v is None else v)

    out: dict[str, str] = {}
    if multus(values):
        out[ANNOTATION_MULTUS_NETWORKS] = append_multus_network(pod_annotations.get(ANNOTATION_MULTUS_NETWORKS, ""))
    out[C.ANNOTATION_INTERCEPTION_MODE] = interception_mode
    for key, value_key in ((C.ANNOTATION_INCLUDE_OUTBOUND_IP_RANGES, "includeIPRanges"),
                           (C.ANNOTATION_EXCLUDE_OUTBOUND_IP_RANGES, "excludeIPRanges")):
        if pick(key, p.get(value_key, "")):                       # `{{ with ... }}`: only when not empty
            out[key] = pick(key, p.get(value_key, ""))
    out[C.ANNOTATION_INCLUDE_INBOUND_PORTS] = pick(C.ANNOTATION_INCLUDE_INBOUND_PORTS, p.get("includeInboundPorts", ""))
    out[C.ANNOTATION_EXCLUDE_INBOUND_PORTS] = excluded_inbound_ports(
        str(status_port), pick(C.ANNOTATION_EXCLUDE_INBOUND_PORTS, p.get("excludeInboundPorts", "")))
    for key, value_key in ((C.ANNOTATION_INCLUDE_OUTBOUND_PORTS, "includeOutboundPorts"),
                           (C.ANNOTATION_EXCLUDE_OUTBOUND_PORTS, "excludeOutboundPorts")):
        if key in pod_annotations or p.get(value_key):
            out[key] = pick(key, p.get(value_key, ""))
    for key in (C.ANNOTATION_KUBEVIRT_INTERFACES, C.ANNOTATION_REROUTE_VIRTUAL_INTERFACES,
                C.ANNOTATION_EXCLUDE_INTERFACES):
        if pod_annotations.get(key):
            out[key] = pod_annotations[key]
    return out
