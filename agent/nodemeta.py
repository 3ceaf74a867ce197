"""The Envoy node as pilot-agent describes it to istiod: metadata, service cluster, locality — pure functions.

istiod reads the node metadata into a typed struct (Istio's `pkg/model` NodeMetadata) and refuses a proxy whose
metadata does not fit it, so the agent builds it as pilot-agent's `GetNodeMetaData` does: every `ISTIO_META_*`
(env and ProxyConfig `proxyMetadata`) as a string with the prefix stripped; every `ISTIO_METAJSON_*` object merged
key by key at the top level (the variable's name is ignored, as in Istio); then the typed fields are normalised the
way Go's JSON round trip does (string booleans, `POD_PORTS`, maps of strings) and the agent's own fields set. A
typed field with a value of the wrong type stops pilot-agent at start; here it is the one `ConfigError` naming the
variable it came from.
"""
from __future__ import annotations

import json
from typing import Any

from meshboot import constants as C
from meshboot.syntax import parse_go_bool

from . import __version__
from .config import AgentConfig, ConfigError, load_json, parse_duration, parse_int, show

# NodeMetadata fields by JSON type (istio/istio pkg/model/proxy.go); anything else passes through untouched.
_STRING_BOOLS = frozenset({"ENABLE_SELF_DISCOVERY", "DNS_CAPTURE", "DNS_AUTO_ALLOCATE", "ENABLE_HBONE",
                           "DISABLE_HBONE_SEND", "INBOUND_LISTENER_EXACT_BALANCE", "OUTBOUND_LISTENER_EXACT_BALANCE",
                           "EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "METADATA_DISCOVERY", "ENVOY_SKIP_DEPRECATED_LOGS"})
_INTS = frozenset({"ENVOY_STATUS_PORT", "ENVOY_PROMETHEUS_PORT", "ENVOY_SECURE_METRICS_PORT",
                   "ENVOY_SECURE_MERGED_METRICS_PORT"})
_STRING_MAPS = frozenset({"LABELS", "STATIC_LABELS", "ANNOTATIONS", "PLATFORM_METADATA"})
_STRINGS = frozenset({"NAME", "OWNER", "OUTLIER_LOG_PATH", "APP_CONTAINERS", "ISTIO_PROXY_SHA", "ISTIO_VERSION",
                      "ISTIO_REVISION", "INSTANCE_IPS", "NAMESPACE", "NODE_NAME", "WORKLOAD_NAME",
                      "INTERCEPTION_MODE", "SERVICE_ACCOUNT", "HTTP_PROXY_PORT", "MESH_ID", "CLUSTER_ID", "NETWORK",
                      "REQUESTED_NETWORK_VIEW", "TLS_SERVER_CERT_CHAIN", "TLS_SERVER_KEY", "TLS_SERVER_ROOT_CERT",
                      "TLS_CLIENT_CERT_CHAIN", "TLS_CLIENT_KEY", "TLS_CLIENT_ROOT_CERT", "BASE", "IDLE_TIMEOUT",
                      "HTTP10", "GENERATOR", "DNS_PROXY_ADDR", "AUTO_REGISTER_GROUP", "WORKLOAD_ENTRY",
                      "UNPRIVILEGED_POD", "CLOUDRUN_ADDR", "STS_PORT", "WORKLOAD_IDENTITY_SOCKET_FILE"})
DURATION_FIELDS = frozenset({"drainDuration", "terminationDrainDuration", "fileFlushInterval",
                             "parentShutdownDuration"})
LOCALITY_LABELS = ("topology.istio.io/locality", "istio-locality")   # model.GetLocalityLabel's order
LOCALITY_LABEL = "istio-locality"                                     # model.LocalityLabel: the sanitised copy
APP_LABELS = ("app", "app.kubernetes.io/name", "service.istio.io/canonical-name")  # labels.GetApp's order
CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")


def raw_metadata(env: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The untyped metadata and, per key, the variable it came from (for error messages)."""
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for k, v in sorted(env.items()):
        if k.startswith(C.ISTIO_META_PREFIX) and len(k) > len(C.ISTIO_META_PREFIX):
            raw[k[len(C.ISTIO_META_PREFIX):]] = v
            origin[k[len(C.ISTIO_META_PREFIX):]] = f"env {k}"
    for k, v in sorted(env.items()):
        if not k.startswith(C.ISTIO_METAJSON_PREFIX):
            continue
        try:
            val = load_json(v, f"env {k}")
        except ConfigError:            # best effort, as in Istio (a warning there)
            continue
        if isinstance(val, dict):      # Go's json.Unmarshal into the metadata map: top-level keys merged
            raw.update(val)
            origin.update(dict.fromkeys(val, f"env {k}"))
    if env.get("DNS_PROXY_ADDR"):
        raw["DNS_PROXY_ADDR"] = env["DNS_PROXY_ADDR"]
        origin["DNS_PROXY_ADDR"] = "env DNS_PROXY_ADDR"
    return raw, origin


def _pod_ports(v: Any, where: str) -> str | None:
    """POD_PORTS: a string holding a JSON list of {name, containerPort, protocol}, re-marshalled as Go does."""
    if not isinstance(v, str):
        raise ConfigError(f"{where}: POD_PORTS must be a string holding a JSON list, got {show(v)}")
    if not v.strip():
        return None                    # nothing to type (kept as given)
    ports = load_json(v, where)
    if not isinstance(ports, list):
        raise ConfigError(f"{where}: POD_PORTS must be a JSON list of ports, got {show(v)}")
    out = []
    for p in ports:
        if not isinstance(p, dict):
            raise ConfigError(f"{where}: POD_PORTS entries must be objects, got {show(p)}")
        name, port, proto = p.get("name", ""), p.get("containerPort", 0), p.get("protocol", "")
        if not isinstance(name, str) or not isinstance(proto, str) or type(port) is not int:
            raise ConfigError(f"{where}: POD_PORTS entry {show(json.dumps(p))}: want name and protocol strings "
                              "and an integer containerPort")
        out.append({**({"name": name} if name else {}), "containerPort": port, "protocol": proto})
    return json.dumps(out, separators=(",", ":"))


def _typed(key: str, v: Any, where: str) -> Any:
    """The value Go's round trip through NodeMetadata gives; None = omitted there (the raw value is kept)."""
    if key in _STRING_BOOLS:
        b = parse_go_bool(v) if isinstance(v, str) else None
        if b is None:
            raise ConfigError(f"{where}: {key} must be a boolean string (true or false), got {show(v)}")
        return "true" if b else None
    if key in _INTS:
        if type(v) is not int:
            raise ConfigError(f"{where}: {key} must be a JSON number, got {show(v)}")
        return v or None
    if key in _STRING_MAPS:
        if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
            raise ConfigError(f"{where}: {key} must be an object of strings, got {show(v)}")
        return v or None
    if key == "POD_PORTS":
        return _pod_ports(v, where)
    if key == "PILOT_SAN":
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{where}: PILOT_SAN must be a list of strings, got {show(v)}")
        return v or None
    if key in _STRINGS and not isinstance(v, str):
        raise ConfigError(f"{where}: {key} must be a string, got {show(v)}")
    return None


def labels_of(cfg: AgentConfig, raw: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(LABELS, STATIC_LABELS): ISTIO_METAJSON_LABELS, then the pod's labels file (minus pod-template-hash), with
    the locality label sanitised (region.zone.subzone → region/zone/subzone) as Istio does."""
    static: dict[str, str] = {}
    text = cfg.env.get("ISTIO_METAJSON_LABELS")
    if text:
        try:
            val = load_json(text, "env ISTIO_METAJSON_LABELS")
        except ConfigError:
            val = None
        if isinstance(val, dict) and all(isinstance(x, str) for x in val.values()):
            static = dict(val)
    base = static or (raw.get("LABELS") if isinstance(raw.get("LABELS"), dict) else {}) or {}
    labels = {**base, **{k: v for k, v in cfg.labels.items() if k != "pod-template-hash"}}
    loc = locality_string(labels)
    if loc:
        labels[LOCALITY_LABEL] = loc
    # Without a labels file Istio's LABELS and STATIC_LABELS are one Go map, so the sanitised locality shows in both.
    return labels, (dict(labels) if static and not cfg.labels else static)


def locality_string(labels: dict[str, str]) -> str:
    for key in LOCALITY_LABELS:
        if key in labels:
            loc = labels[key]
            return loc if "/" in loc else loc.replace(".", "/")
    return ""


def locality(labels: dict[str, str]) -> dict[str, str]:
    """node.locality: region/zone/sub_zone from the locality label (no cloud platform detection in meshboot)."""
    parts = locality_string(labels).split("/", 2) if locality_string(labels) else []
    return {k: v for k, v in zip(("region", "zone", "sub_zone"), parts, strict=False) if v}


def secure_metrics_ports(cfg: AgentConfig) -> tuple[int, int]:
    """ENVOY_SECURE_METRICS_PORT / ENVOY_SECURE_MERGED_METRICS_PORT (0 = no such mTLS listener, the default)."""
    return tuple(parse_int(cfg.env.get(name) or 0, f"env {name}", 0, 65535)   # type: ignore[return-value]
                 for name in ("ENVOY_SECURE_METRICS_PORT", "ENVOY_SECURE_MERGED_METRICS_PORT"))


def node_metadata(cfg: AgentConfig) -> dict[str, Any]:
    """pilot-agent's node metadata for this pod (keys sorted, as Go's map marshalling gives them)."""
    raw, origin = raw_metadata(cfg.env)
    meta = dict(raw)
    for key, v in raw.items():
        typed = _typed(key, v, origin.get(key, "node metadata"))
        if typed is not None:
            meta[key] = typed
    labels, static = labels_of(cfg, raw)
    annotations = {**(raw["ANNOTATIONS"] if isinstance(raw.get("ANNOTATIONS"), dict) else {}), **cfg.annotations}
    own: dict[str, Any] = {
        "ISTIO_VERSION": raw.get("ISTIO_VERSION") or C.ISTIO_VERSION,
        C.MESHBOOT_VERSION_META: __version__,
        "INSTANCE_IPS": ",".join(dict.fromkeys(cfg.instance_ips)),
        "ENVOY_STATUS_PORT": cfg.envoy_status_port, "ENVOY_PROMETHEUS_PORT": cfg.envoy_prometheus_port,
        **dict(zip(("ENVOY_SECURE_METRICS_PORT", "ENVOY_SECURE_MERGED_METRICS_PORT"), secure_metrics_ports(cfg),
                   strict=True)),
        "ENVOY_SKIP_DEPRECATED_LOGS": "true", "METADATA_DISCOVERY": "false",
        "WORKLOAD_IDENTITY_SOCKET_FILE": cfg.env.get(C.ENV_WORKLOAD_SOCKET_FILE) or "socket",
        "PROXY_CONFIG": proxy_config_json(cfg.proxy_config),
        "NAME": cfg.pod_name, "NAMESPACE": cfg.pod_namespace, "SERVICE_ACCOUNT": cfg.service_account,
        "LABELS": labels, "STATIC_LABELS": static, "ANNOTATIONS": annotations,
        "PILOT_SAN": [cfg.xds_server_name] if cfg.discovery_address and not cfg.xds_plaintext else [],
        "EXIT_ON_ZERO_ACTIVE_CONNECTIONS": "true" if cfg.exit_on_zero_active else "",
        "OUTLIER_LOG_PATH": cfg.flags.outlier_log_path,
    }
    meta.update({k: v for k, v in own.items() if v not in ("", [], {}, None, 0)})
    return dict(sorted(meta.items()))


def proxy_config_json(pc: dict[str, Any]) -> dict[str, Any]:
    """PROXY_CONFIG as protojson writes it: empty strings, lists and maps left out (an empty message is kept),
    durations in protojson's form (`1h30m` → `5400s`: istiod parses this with protojson)."""
    out = {k: v for k, v in pc.items()
           if v not in ("", [], None) and not (v == {} and k in ("proxyMetadata", "runtimeValues"))}
    for k in DURATION_FIELDS & out.keys():
        secs = parse_duration(out[k], f"ProxyConfig.{k}")
        out[k] = f"{int(secs)}s" if secs == int(secs) else f"{secs:.9f}".rstrip("0") + "s"
    return out


def service_cluster(cfg: AgentConfig, meta: dict[str, Any]) -> str:
    """node.cluster as pilot-agent's getServiceCluster: `--serviceCluster` / ProxyConfig `serviceCluster`, else by
    `tracingServiceName` (APP_LABEL_AND_NAMESPACE by default: `<app>.<ns>`, else `<workload>.<ns>`)."""
    pc = cfg.proxy_config
    labels = meta.get("LABELS") or {}
    ns = cfg.pod_namespace
    workload = str(meta.get("WORKLOAD_NAME") or "") or "istio-proxy"
    name = cfg.flags.service_cluster or str(pc.get("serviceCluster") or "")
    mode = str(pc.get("tracingServiceName") or "")
    if name in ("", "istio-proxy") and mode in ("CANONICAL_NAME_ONLY", "CANONICAL_NAME_AND_NAMESPACE"):
        cs = next((labels[k] for k in CANONICAL_NAME_LABELS if k in labels), workload)
        return f"{cs}.{ns}" if mode == "CANONICAL_NAME_AND_NAMESPACE" and ns else _or_default(cs, cfg, meta)
    return _or_default(name, cfg, meta)


def _or_default(name: str, cfg: AgentConfig, meta: dict[str, Any]) -> str:
    if name and name != "istio-proxy":
        return name
    labels = meta.get("LABELS") or {}
    app = next((labels[k] for k in APP_LABELS if k in labels), None)
    if app is not None:
        return f"{app}.{cfg.pod_namespace}"
    if meta.get("WORKLOAD_NAME"):
        return f"{meta['WORKLOAD_NAME']}.{cfg.pod_namespace}"
    return f"istio-proxy.{cfg.pod_namespace}" if cfg.pod_namespace else "istio-proxy"
