"""The injection engine: pod in, injected pod out (pure; no I/O, no globals).

Renders istio-init, istio-proxy and the sidecar volumes the way Istio's `sidecar` template does (reference §2-§6),
merges them with the pod, and records what it added in `sidecar.istio.io/status` so re-injection is idempotent.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshboot import constants as C
from webhook import annotations as ann_mod
from webhook import cni, probes, prometheus
from webhook import otel as otel_mod
from webhook import overlay as overlay_mod
from webhook import templates as tpl_mod
from webhook.config import PROXY_CONFIG_DEFAULTS, Settings, shown
from webhook.errors import InjectionError
from webhook.workloads import DeployMeta, pod_deploy_meta

ANNOTATION_OVERRIDES = C.ANNOTATION_PROXY_OVERRIDES
ANNOTATION_REV = C.LABEL_REV          # the same key, as an annotation recording the injecting revision
LABEL_NETWORK = C.LABEL_NETWORK
LABEL_TUNNEL = C.LABEL_TUNNEL
ENV_NETWORK = C.ENV_NETWORK
VOLUME_CRL = "istio-ca-crl"
MOUNT_CRL = C.MOUNT_ISTIO_CA_CRL
CUSTOM_BOOTSTRAP_VOLUME = "custom-bootstrap-volume"
CUSTOM_BOOTSTRAP_MOUNT = "/etc/istio/custom-bootstrap"
AGENT_BINARY = "pilot-agent"
_KEYED_LISTS = {"env": "name", "ports": "containerPort", "volumeMounts": "mountPath"}
# json.dumps(x, separators=(",", ":")[, sort_keys=True]) without building an encoder per call (the same output).
_compact = json.JSONEncoder(separators=(",", ":")).encode
_compact_sorted = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def json_copy(obj: Any) -> Any:
    """Deep copy of JSON data (dicts, lists, scalars): several times faster than copy.deepcopy."""
    if isinstance(obj, dict):
        return {k: json_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_copy(v) for v in obj]
    return obj


@dataclass(frozen=True)
class Choices:
    """The per-pod decisions the template depends on (exposed for --explain and tests)."""

    interception_mode: str
    native: bool
    hold: bool
    status_port: int
    proxy_config: dict[str, Any]


def proxy_image(annotations: Mapping[str, str], settings: Settings, ch: Choices, init: bool = False) -> str:
    """istio-proxy's image (istio-init's with `init`): `sidecar.istio.io/proxyImage` or the values' name, on the
    values' hub and tag, in the variant `sidecar.istio.io/proxyImageType` › ProxyConfig `image.imageType` ›
    `global.variant` picks — one rule for every template."""
    g = settings.g
    name = annotations.get(C.ANNOTATION_PROXY_IMAGE) or (g["proxy_init"]["image"] if init else settings.proxy["image"])
    variant = (annotations.get(C.ANNOTATION_PROXY_IMAGE_TYPE)
               or (ch.proxy_config.get("image") or {}).get("imageType") or g.get("variant") or "")
    return image_name(g["hub"], name, g["tag"], variant)

def image_name(hub: str, name: str, tag: str, variant: str) -> str:
    """<hub>/<name>:<tag>[-<variant>], or `name` verbatim when it already holds a registry path."""
    if "/" in name:
        return name
    for suffix in ("-debug", "-distroless"):
        if tag.endswith(suffix):
            tag = tag[: -len(suffix)]
    if variant and variant != "default":
        tag = f"{tag}-{variant}"
    return f"{hub}/{name}:{tag}"


def effective_proxy_config(annotations: Mapping[str, str], settings: Settings,
                           parsed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """mesh defaultConfig <- proxy.istio.io/config annotation (field-wise; proxyMetadata merged). `parsed`: the
    annotations already parsed by `annotations.validate` (YAML is parsed once)."""
    pc = dict(settings.default_proxy_config)
    raw = annotations.get(C.ANNOTATION_PROXY_CONFIG)
    if raw:
        over = (parsed or {}).get(C.ANNOTATION_PROXY_CONFIG)
        if over is None:
            over = ann_mod.parse_proxy_config_annotation(raw)
        md = {**(pc.get("proxyMetadata") or {}), **(over.get("proxyMetadata") or {})}
        pc.update(over)
        if md:
            pc["proxyMetadata"] = md
    return pc


def proxy_config_env(pc: Mapping[str, Any]) -> str:
    """PROXY_CONFIG: the effective ProxyConfig minus fields equal to the built-in defaults, as JSON plus newline."""
    diff = {k: v for k, v in pc.items() if v is not None and PROXY_CONFIG_DEFAULTS.get(k, object()) != v}
    return _compact_sorted(diff) + "\n"


def choices(pod: Mapping[str, Any], settings: Settings, parsed: Mapping[str, Any] | None = None) -> Choices:
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    pc = effective_proxy_config(annotations, settings, parsed)
    mode = annotations.get(C.ANNOTATION_INTERCEPTION_MODE) or pc.get("interceptionMode") or "REDIRECT"
    if C.ANNOTATION_NATIVE_SIDECAR in annotations:
        native = annotations[C.ANNOTATION_NATIVE_SIDECAR] != "false"
    else:
        native = settings.native_default()
    pod_hold = pc.get("holdApplicationUntilProxyStarts")
    if settings.hold_explicit or pod_hold is None:  # Istio: the ProxyConfig's value ORs with the values'
        hold = bool(pod_hold) or bool(settings.proxy["holdApplicationUntilProxyStarts"])
    else:  # meshboot's own default (on) yields to the pod's (or the mesh's) ProxyConfig
        hold = bool(pod_hold)
    sp = annotations.get(C.ANNOTATION_STATUS_PORT)
    status_port = int(sp) if sp not in (None, "") else int(settings.proxy["statusPort"])
    return Choices(mode, native, hold, status_port, pc)


# ---- rendering -------------------------------------------------------------------------------------------------

def _resources(annotations: Mapping[str, str], settings: Settings) -> dict[str, Any]:
    keys = (C.ANNOTATION_PROXY_CPU, C.ANNOTATION_PROXY_MEMORY, C.ANNOTATION_PROXY_CPU_LIMIT,
            C.ANNOTATION_PROXY_MEMORY_LIMIT)
    if any(k in annotations for k in keys):
        out: dict[str, dict[str, str]] = {}
        for key, section, res in ((keys[0], "requests", "cpu"), (keys[1], "requests", "memory"),
                                  (keys[2], "limits", "cpu"), (keys[3], "limits", "memory")):
            if annotations.get(key):
                out.setdefault(section, {})[res] = annotations[key]
        return out
    out = {}
    for section, vals in (settings.proxy.get("resources") or {}).items():
        if isinstance(vals, Mapping):
            kept = {k: str(v) for k, v in vals.items() if v is not None}
            if kept:
                out[section] = kept
    return out


def _copy_resources(resources: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Deep copy of `_resources`' result (sections of strings: two levels)."""
    return {section: dict(values) for section, values in resources.items()}


def _ann_or(annotations: Mapping[str, str], key: str, default: Any) -> str:
    v = annotations.get(key)
    return str(default if v is None else v)


def _init_container(annotations: Mapping[str, str], settings: Settings, ch: Choices, image: str,
                    resources: dict[str, Any]) -> dict[str, Any]:
    p, g, mesh = settings.proxy, settings.g, settings.mesh
    uid = C.PROXY_UID
    exc = _ann_or(annotations, C.ANNOTATION_EXCLUDE_INBOUND_PORTS, p.get("excludeInboundPorts", ""))
    d_ports = [str(C.ENVOY_PROMETHEUS_PORT), str(C.ENVOY_STATUS_PORT)]
    if exc:
        d_ports.append(exc)
    if ch.status_port and str(ch.status_port) not in [x.strip() for x in exc.split(",")]:
        d_ports.append(str(ch.status_port))
    args = ["istio-iptables",
            "-p", str(mesh["proxyListenPort"]),
            "-z", str(mesh["proxyInboundListenPort"]),
            "-u", str(uid),
            "-m", ch.interception_mode,
            "-i", _ann_or(annotations, C.ANNOTATION_INCLUDE_OUTBOUND_IP_RANGES, p.get("includeIPRanges", "*")),
            "-x", _ann_or(annotations, C.ANNOTATION_EXCLUDE_OUTBOUND_IP_RANGES, p.get("excludeIPRanges", "")),
            "-b", _ann_or(annotations, C.ANNOTATION_INCLUDE_INBOUND_PORTS, p.get("includeInboundPorts", "*")),
            "-d", ",".join(d_ports)]
    for key, value_key, flag in ((C.ANNOTATION_INCLUDE_OUTBOUND_PORTS, "includeOutboundPorts", "-q"),
                                 (C.ANNOTATION_EXCLUDE_OUTBOUND_PORTS, "excludeOutboundPorts", "-o")):
        if key in annotations:
            args += [flag, annotations[key]]
        elif p.get(value_key):
            args += [flag, str(p[value_key])]
    if C.ANNOTATION_REROUTE_VIRTUAL_INTERFACES in annotations:
        args += ["-k", annotations[C.ANNOTATION_REROUTE_VIRTUAL_INTERFACES]]
    elif C.ANNOTATION_KUBEVIRT_INTERFACES in annotations:
        args += ["-k", annotations[C.ANNOTATION_KUBEVIRT_INTERFACES]]
    if C.ANNOTATION_EXCLUDE_INTERFACES in annotations:
        args += ["-c", annotations[C.ANNOTATION_EXCLUDE_INTERFACES]]
    args.append("--log_output_level=" + _ann_or(annotations, C.ANNOTATION_AGENT_LOG_LEVEL, g["logging"]["level"]))
    if g.get("logAsJson"):
        args.append("--log_as_json")
    if settings.g["proxy_init"].get("forceApplyIptables"):
        args.append("--force-apply")
    if g.get("nativeNftables"):
        args.append("--native-nftables")
    privileged = bool(p.get("privileged"))
    sc: dict[str, Any] = {"allowPrivilegeEscalation": privileged, "privileged": privileged,
                          "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                          "readOnlyRootFilesystem": False, "runAsGroup": 0, "runAsNonRoot": False, "runAsUser": 0}
    if p.get("seccompProfile"):
        sc["seccompProfile"] = p["seccompProfile"]
    c: dict[str, Any] = {"name": C.INIT_CONTAINER, "image": image}
    if g.get("imagePullPolicy"):
        c["imagePullPolicy"] = g["imagePullPolicy"]
    c["args"] = args
    md = ch.proxy_config.get("proxyMetadata") or {}
    if md:
        c["env"] = [{"name": k, "value": md[k]} for k in sorted(md)]
    if resources:
        c["resources"] = _copy_resources(resources)
    c["securityContext"] = sc
    return c


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _pod_ports_json(containers: list[dict[str, Any]]) -> str:
    entries = []
    for c in containers:
        for port in c.get("ports") or []:
            e: dict[str, Any] = {}
            for k in ("name", "hostPort", "containerPort", "protocol", "hostIP"):
                if port.get(k):
                    e[k] = port[k]
            entries.append(_compact(e))
    body = "".join(("    " if i == 0 else "    ,") + e + "\n" for i, e in enumerate(entries))
    return "[\n" + body + "]"


def _proxy_env(pod: Mapping[str, Any], annotations: Mapping[str, str], labels: Mapping[str, str],
               settings: Settings, ch: Choices, dm: DeployMeta, app_containers: list[dict[str, Any]]) -> list[dict]:
    g, mesh = settings.g, settings.mesh
    env: list[dict[str, Any]] = []
    if (mesh.get("inboundTrafficPolicy") or {}).get("mode") == "LOCALHOST":
        env.append({"name": "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION", "value": "true"})
    env += proxy_env_head(settings, ch, app_containers)
    env += [
        {"name": C.ENV_APP_CONTAINERS, "value": ",".join(c.get("name", "") for c in app_containers)},
        {"name": C.ENV_GOMEMLIMIT, "valueFrom": {"resourceFieldRef": {"divisor": "1", "resource": "limits.memory"}}},
        {"name": C.ENV_CLUSTER_ID, "value": str(g["multiCluster"].get("clusterName") or C.DEFAULT_CLUSTER_ID)},
        _field_env(C.ENV_NODE_NAME, "spec.nodeName"),
        {"name": C.ENV_INTERCEPTION_MODE, "value": ch.interception_mode},
    ]
    if g.get("network"):
        env.append({"name": ENV_NETWORK, "value": str(g["network"])})
    workload = labels.get(C.LABEL_WORKLOAD_NAME) or dm.name
    if workload:
        env.append({"name": C.ENV_WORKLOAD_NAME, "value": workload})
    if dm.name and dm.kind:
        env.append({"name": C.ENV_OWNER, "value": dm.owner()})
    if annotations.get(C.ANNOTATION_BOOTSTRAP_OVERRIDE):
        env.append({"name": "ISTIO_BOOTSTRAP_OVERRIDE", "value": C.CUSTOM_BOOTSTRAP_FILE})
    env.append({"name": C.ENV_MESH_ID, "value": str(g.get("meshID") or settings.trust_domain)})
    if settings.trust_domain:
        env.append({"name": C.ENV_TRUST_DOMAIN, "value": settings.trust_domain})
    otel_attrs = otel_mod.resource_attributes(mesh, annotations, labels, dm.namespace, app_containers)
    if otel_attrs:
        env.append({"name": otel_mod.ENV, "value": otel_attrs})
    md = ch.proxy_config.get("proxyMetadata") or {}
    env += [{"name": k, "value": md[k]} for k in sorted(md)]
    return env


def proxy_env_head(settings: Settings, ch: Choices, app_containers: list[dict[str, Any]], cpu_limit: bool = True
                   ) -> list[dict[str, Any]]:
    """The env istio-proxy's templates begin alike with: identity, CA, pod fields, CPU limit (not grpc-agent's),
    PROXY_CONFIG and the app's ports."""
    g = settings.g
    ns_name = g.get("istioNamespace") or C.ISTIO_NAMESPACE
    istiod = "istiod" + (f"-{settings.revision}" if settings.revision else "")
    env = [
        {"name": C.ENV_PILOT_CERT_PROVIDER, "value": str(g.get("pilotCertProvider") or "istiod")},
        {"name": C.ENV_CA_ADDR, "value": str(g.get("caAddress") or f"{istiod}.{ns_name}.svc:{C.CA_PORT}")},
        _field_env(C.ENV_POD_NAME, "metadata.name"),
        _field_env(C.ENV_POD_NAMESPACE, "metadata.namespace"),
        _field_env(C.ENV_INSTANCE_IP, "status.podIP"),
        _field_env(C.ENV_SERVICE_ACCOUNT, "spec.serviceAccountName"),
        _field_env(C.ENV_HOST_IP, "status.hostIP"),
        {"name": C.ENV_CPU_LIMIT, "valueFrom": {"resourceFieldRef": {"divisor": "1", "resource": "limits.cpu"}}},
        {"name": C.ENV_PROXY_CONFIG, "value": proxy_config_env(ch.proxy_config)},
        {"name": C.ENV_POD_PORTS, "value": _pod_ports_json(app_containers)},
    ]
    return env if cpu_limit else [e for e in env if e["name"] != C.ENV_CPU_LIMIT]


def _http_probe(period: int, delay: int, failure: int) -> dict[str, Any]:
    return {"failureThreshold": failure, "httpGet": {"path": "/healthz/ready", "port": C.ENVOY_STATUS_PORT},
            "initialDelaySeconds": delay, "periodSeconds": period, "timeoutSeconds": 3}


def _proxy_security_context(annotations: Mapping[str, str], settings: Settings, ch: Choices) -> dict[str, Any]:
    p = settings.proxy
    tproxy = ch.interception_mode == "TPROXY"
    bind = _ann_or(annotations, C.ANNOTATION_CAP_NET_BIND, str(p.get("capNetBindService", False)).lower()) == "true"
    privileged = bool(p.get("privileged"))
    sc: dict[str, Any] = {"allowPrivilegeEscalation": privileged and not ch.native, "privileged": privileged}
    caps: dict[str, Any] = {}
    add = (["NET_ADMIN"] if tproxy else []) + (["NET_BIND_SERVICE"] if bind else [])
    if add:
        caps["add"] = add
    caps["drop"] = ["ALL"]
    sc["capabilities"] = caps
    sc["readOnlyRootFilesystem"] = True
    sc["runAsGroup"] = C.PROXY_GID
    if tproxy or bind:
        sc["runAsNonRoot"], sc["runAsUser"] = False, 0
    else:
        sc["runAsNonRoot"], sc["runAsUser"] = True, C.PROXY_UID
    if (ch.proxy_config.get("proxyMetadata") or {}).get("IPTABLES_TRACE_LOGGING") == "true":
        sc.update({"privileged": True, "allowPrivilegeEscalation": True, "runAsUser": 0, "runAsNonRoot": False,
                   "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}})
    if p.get("seccompProfile"):
        sc["seccompProfile"] = p["seccompProfile"]
    return sc


def _volume_mounts(annotations: Mapping[str, str], settings: Settings) -> list[dict[str, Any]]:
    istiod = settings.g.get("pilotCertProvider", "istiod") == "istiod"
    m: list[dict[str, Any]] = [{"mountPath": C.MOUNT_WORKLOAD_SOCKET, "name": "workload-socket"},
         {"mountPath": C.MOUNT_CREDENTIAL_UDS, "name": "credential-socket"},
         {"mountPath": C.MOUNT_WORKLOAD_CERTS, "name": "workload-certs"}]
    if istiod:
        m += [{"mountPath": C.MOUNT_ISTIOD_CA, "name": "istiod-ca-cert"},
              {"mountPath": MOUNT_CRL, "name": VOLUME_CRL}]
    m.append({"mountPath": C.MOUNT_ISTIO_DATA, "name": "istio-data"})
    if annotations.get(C.ANNOTATION_BOOTSTRAP_OVERRIDE):
        m.append({"mountPath": CUSTOM_BOOTSTRAP_MOUNT, "name": CUSTOM_BOOTSTRAP_VOLUME})
    return m + tail_mounts(settings, "istio-envoy") + user_mounts(annotations)


def tail_mounts(settings: Settings, envoy_volume: str) -> list[dict[str, Any]]:
    """The mounts every proxy template ends with: Envoy's directory (`envoy_volume`), the token, the mTLS certs when
    mounted, the pod info — in Istio's templates' order."""
    m: list[dict[str, Any]] = [{"mountPath": C.MOUNT_ISTIO_ENVOY, "name": envoy_volume},
                               {"mountPath": C.MOUNT_ISTIO_TOKEN, "name": "istio-token"}]
    if settings.g.get("mountMtlsCerts"):
        m.append({"mountPath": "/etc/certs/", "name": "istio-certs", "readOnly": True})
    m.append({"mountPath": C.MOUNT_ISTIO_PODINFO, "name": "istio-podinfo"})
    return m


def user_mounts(annotations: Mapping[str, str]) -> list[dict[str, Any]]:
    """`sidecar.istio.io/userVolumeMount`'s mounts (already checked at admission)."""
    user = annotations.get(C.ANNOTATION_USER_VOLUME_MOUNT)
    return [{**mount, "name": name} for name, mount in ann_mod.parse_json_map(user).items()] if user else []


def _volumes(pod: Mapping[str, Any], annotations: Mapping[str, str], settings: Settings) -> list[dict[str, Any]]:
    g = settings.g
    v: list[dict[str, Any]] = [{"emptyDir": {}, "name": "workload-socket"},
                               {"emptyDir": {}, "name": "credential-socket"},
                               {"emptyDir": {}, "name": "workload-certs"}]
    if annotations.get(C.ANNOTATION_BOOTSTRAP_OVERRIDE):
        v.append({"configMap": {"name": annotations[C.ANNOTATION_BOOTSTRAP_OVERRIDE]},
                  "name": CUSTOM_BOOTSTRAP_VOLUME})
    return v + tail_volumes(pod, g, "istio-envoy", crl=True) + user_volumes(annotations)


def tail_volumes(pod: Mapping[str, Any], g: Mapping[str, Any], envoy_volume: str, *, crl: bool
                 ) -> list[dict[str, Any]]:
    """The volumes every proxy template ends with, in Istio's templates' order: Envoy's directory (memory), the
    agent's data, the pod info, the projected token, the root ConfigMap (istiod as cert provider), the CRL (the
    sidecar only), the mTLS certs Secret when mounted."""
    v: list[dict[str, Any]] = [
        {"emptyDir": {"medium": "Memory"}, "name": envoy_volume},
        {"emptyDir": {}, "name": "istio-data"},
        {"downwardAPI": {"items": [{"fieldRef": {"fieldPath": "metadata.labels"}, "path": "labels"},
                                   {"fieldRef": {"fieldPath": "metadata.annotations"}, "path": "annotations"}]},
         "name": "istio-podinfo"},
        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": str(g["sds"]["token"].get("aud") or C.TOKEN_AUDIENCE),
            "expirationSeconds": C.TOKEN_EXPIRATION_SECONDS, "path": "istio-token"}}]}},
    ]
    if g.get("pilotCertProvider", "istiod") == "istiod":
        v.append({"configMap": {"name": g.get("trustBundleName") or C.ROOT_CERT_CONFIGMAP}, "name": "istiod-ca-cert"})
    if crl:
        v.append({"configMap": {"name": VOLUME_CRL, "optional": True}, "name": VOLUME_CRL})
    if g.get("mountMtlsCerts"):
        sa = (pod.get("spec") or {}).get("serviceAccountName") or "default"
        v.append({"name": "istio-certs", "secret": {"optional": True, "secretName": f"istio.{sa}"}})
    return v


def user_volumes(annotations: Mapping[str, str]) -> list[dict[str, Any]]:
    """`sidecar.istio.io/userVolume`'s volumes (already checked at admission)."""
    user = annotations.get(C.ANNOTATION_USER_VOLUME)
    return [{**source, "name": name} for name, source in ann_mod.parse_json_map(user).items()] if user else []


def proxy_args(annotations: Mapping[str, str], settings: Settings, role: str) -> list[str]:
    """istio-proxy's args, the sidecar's (`role` sidecar) and the gateway's (router) alike up to --log_as_json."""
    p, g = settings.proxy, settings.g
    args = ["proxy", role, "--domain", f"$(POD_NAMESPACE).svc.{p.get('clusterDomain') or 'cluster.local'}",
            "--proxyLogLevel=" + _ann_or(annotations, C.ANNOTATION_LOG_LEVEL, p["logLevel"]),
            "--proxyComponentLogLevel=" + _ann_or(annotations, C.ANNOTATION_COMPONENT_LOG_LEVEL,
                                                  p["componentLogLevel"]),
            "--log_output_level=" + _ann_or(annotations, C.ANNOTATION_AGENT_LOG_LEVEL, g["logging"]["level"])]
    if int(g["sts"].get("servicePort") or 0):
        args.append(f"--stsPort={int(g['sts']['servicePort'])}")
    if g.get("logAsJson"):
        args.append("--log_as_json")
    return args


def _proxy_container(pod: Mapping[str, Any], annotations: Mapping[str, str], labels: Mapping[str, str],
                     settings: Settings, ch: Choices, dm: DeployMeta, image: str, resources: dict[str, Any],
                     app_containers: list[dict[str, Any]]) -> dict[str, Any]:
    p, g = settings.proxy, settings.g
    args = proxy_args(annotations, settings, "sidecar")
    if p.get("outlierLogPath"):
        args.append(f"--outlierLogPath={p['outlierLogPath']}")
    c: dict[str, Any] = {"name": C.PROXY_CONTAINER, "image": image}
    if g.get("imagePullPolicy"):
        c["imagePullPolicy"] = g["imagePullPolicy"]
    c["args"] = args
    c["env"] = _proxy_env(pod, annotations, labels, settings, ch, dm, app_containers)
    lifecycle = _lifecycle(settings, ch)
    if lifecycle:
        c["lifecycle"] = lifecycle
    c["ports"] = [{"containerPort": C.ENVOY_PROMETHEUS_PORT, "name": "http-envoy-prom", "protocol": "TCP"}]
    if ch.status_port:
        rp = C.ANNOTATION_READINESS_PREFIX
        c["readinessProbe"] = _http_probe(
            int(_ann_or(annotations, rp + "periodSeconds", p["readinessPeriodSeconds"])),
            int(_ann_or(annotations, rp + "initialDelaySeconds", p["readinessInitialDelaySeconds"])),
            int(_ann_or(annotations, rp + "failureThreshold", p["readinessFailureThreshold"])))
        if p["startupProbe"]["enabled"]:
            c["startupProbe"] = _http_probe(1, 0, int(p["startupProbe"]["failureThreshold"]))
    if resources:
        c["resources"] = _copy_resources(resources)
    if ch.native:
        c["restartPolicy"] = "Always"
    c["securityContext"] = _proxy_security_context(annotations, settings, ch)
    c["volumeMounts"] = _volume_mounts(annotations, settings)
    return c


def _lifecycle(settings: Settings, ch: Choices) -> dict[str, Any] | None:
    configured = settings.proxy.get("lifecycle")
    if configured:
        return json_copy(configured)
    if ch.hold and not ch.native:
        return {"postStart": {"exec": {"command": [AGENT_BINARY, "wait"]}}}
    if ch.native:
        return {"preStop": {"exec": {"command": [AGENT_BINARY, "request", f"--debug-port={ch.status_port}",
                                                 "POST", "drain"]}}}
    return None


# ---- user overrides of injected containers (a strategic-merge subset) -------------------------------------------

def _merge_keyed(base: list[Any], over: list[Any], key: str) -> list[Any]:
    over_by = {o.get(key): o for o in over if isinstance(o, dict)}
    out = [(_merge_map(b, over_by.pop(b.get(key))) if isinstance(b, dict) and b.get(key) in over_by else b)
           for b in base]
    return out + [o for o in over if isinstance(o, dict) and o.get(key) in over_by]


def _merge_map(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif k in _KEYED_LISTS and isinstance(v, list) and isinstance(out.get(k), list):
            out[k] = _merge_keyed(out[k], v, _KEYED_LISTS[k])
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge_map(out[k], v)
        else:
            out[k] = json_copy(v)
    return out


def merge_user_container(injected: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """The user's container named like an injected one, on top of it; `image: auto` keeps the injected image."""
    user = {k: v for k, v in user.items() if not (k == "image" and v == "auto")}
    return _merge_map(injected, user)


# ---- the pipeline ----------------------------------------------------------------------------------------------

def _fail(where: str, want: str) -> InjectionError:
    return InjectionError(f"failed to process pod: {where}: {want}")


def validate_meta_shape(meta: Any) -> None:
    """The metadata fields the injector reads, with the types Kubernetes gives them."""
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise _fail("metadata", "want an object")
    for key in ("name", "generateName", "namespace"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise _fail(f"metadata.{key}", "want a string")
    for key in ("labels", "annotations"):
        m = meta.get(key)
        if m is not None and not (isinstance(m, dict) and all(isinstance(v, str) for v in m.values())):
            raise _fail(f"metadata.{key}", "want a map of strings")
    refs = meta.get("ownerReferences")
    if refs is not None and not (isinstance(refs, list) and all(isinstance(r, dict) for r in refs)):
        raise _fail("metadata.ownerReferences", "want a list of objects")
    for i, ref in enumerate(refs or []):
        for key in ("apiVersion", "kind", "name"):  # they name the workload in ISTIO_META_OWNER and WORKLOAD_NAME
            if not isinstance(ref.get(key, ""), str):
                raise _fail(f"metadata.ownerReferences[{i}].{key}", "want a string")


# Lists of objects inside a container, and the key each element must have as a string (None: any object).
_CONTAINER_LISTS = {"env": "name", "ports": None, "volumeMounts": "mountPath"}


def _object_list(lst: Any, where: str, named: str | None, *, required: bool) -> list[dict[str, Any]]:
    """`lst` (absent: empty) as a list of objects whose `named` key, if any, is a string (`required`: present)."""
    if lst is None:
        return []
    if not isinstance(lst, list):
        raise _fail(where, "want a list")
    for i, item in enumerate(lst):
        if not isinstance(item, dict) or (named and not isinstance(item.get(named, None if required else ""), str)):
            raise _fail(f"{where}[{i}]", f"want an object{f' with a string {named}' if named else ''}")
    return lst


def _validate_container(c: Any, where: str) -> None:
    if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c.get("name"):
        raise _fail(where, "want a container with a name")
    for key, named in _CONTAINER_LISTS.items():
        for i, item in enumerate(_object_list(c.get(key), f"{where}.{key}", named, required=True)):
            port = item.get("containerPort") if key == "ports" else None
            if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
                raise _fail(f"{where}.{key}[{i}].containerPort", "want a number")
            if key == "env" and not isinstance(item.get("value", ""), str):
                raise _fail(f"{where}.{key}[{i}].value", "want a string")
    for key in ("securityContext", "lifecycle", "readinessProbe", "livenessProbe", "startupProbe", "resources"):
        if c.get(key) is not None and not isinstance(c[key], dict):
            raise _fail(f"{where}.{key}", "want an object")


def validate_pod_shape(pod: Any) -> None:
    """Every field the injector reads has the shape Kubernetes gives it, so nothing later meets a surprise type."""
    if not isinstance(pod, dict):
        raise InjectionError("failed to process pod: the object is not a Pod (want a JSON object)")
    if pod.get("kind") not in (None, "Pod"):
        raise _fail("kind", f"is {shown(pod.get('kind'))}, want Pod")
    validate_meta_shape(pod.get("metadata"))
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        raise _fail("spec", "missing (a Pod needs spec.containers)")
    for key in ("containers", "initContainers"):
        lst = spec.get(key)
        if lst is None and key == "initContainers":
            continue
        if not isinstance(lst, list) or (key == "containers" and not lst):
            raise _fail(f"spec.{key}", "want a non-empty list of containers")
        for i, c in enumerate(lst):
            _validate_container(c, f"spec.{key}[{i}]")
    for key in ("volumes", "imagePullSecrets"):
        _object_list(spec.get(key), f"spec.{key}", "name", required=False)


def _env_value(container: Mapping[str, Any] | None, name: str) -> str | None:
    for e in (container or {}).get("env") or []:
        if e.get("name") == name:
            return e.get("value")
    return None


def _env_default(env: list[dict[str, Any]], name: str, value: str) -> None:
    """Append `name`, unless the user's own istio-proxy already sets it (theirs wins, as in Istio's merge): a second
    entry would be carried into the next re-injection and the pod would change every time."""
    if not any(e.get("name") == name for e in env):
        env.append({"name": name, "value": value})


def _pop_named(lst: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for i, c in enumerate(lst):
        if c.get("name") == name:
            return lst.pop(i)
    return None


def _annotation(parse: Any, value: str, key: str) -> Any:
    """`parse(value)`, its ValueError as an InjectionError naming the annotation."""
    try:
        return parse(value)
    except ValueError as e:
        raise InjectionError(f"failed to process pod: annotation {key}: {e}") from None


def _strip(pod: dict[str, Any], annotations: dict[str, str], status_port: int) -> dict[str, str | None]:
    """Undo a previous injection recorded in the status annotation; returns env values worth carrying over."""
    status = _annotation(ann_mod.parse_status, annotations.pop(C.ANNOTATION_STATUS), C.ANNOTATION_STATUS)
    spec = pod["spec"]
    carried: dict[str, str | None] = {}
    for key in ("containers", "initContainers"):
        names = set(status.get(key) or [])
        if not names or not spec.get(key):
            continue
        for c in spec[key]:
            if c.get("name") == C.PROXY_CONTAINER:
                carried[C.ENV_APP_PROBERS] = _env_value(c, C.ENV_APP_PROBERS)
                carried[C.ENV_PROMETHEUS_ANNOTATIONS] = _env_value(c, C.ENV_PROMETHEUS_ANNOTATIONS)
        spec[key] = [c for c in spec[key] if c.get("name") not in names]
    for key, field in (("volumes", "volumes"), ("imagePullSecrets", "imagePullSecrets")):
        names = set(status.get(key) or [])
        if names and spec.get(field):
            spec[field] = [v for v in spec[field] if v.get("name") not in names]
    if prometheus.written_by_merge(annotations, status_port):  # only what the merge wrote: a user's own
        for k in [k for k in annotations if prometheus.sanitize(k) in  # prometheus_io/port: 15020 stays
                  ("prometheus_io_scrape", "prometheus_io_port", "prometheus_io_path")]:
            del annotations[k]
    else:  # the app's own scrape settings were never moved into the env: nothing to carry
        carried.pop(C.ENV_PROMETHEUS_ANNOTATIONS, None)
    overrides = annotations.get(ANNOTATION_OVERRIDES)
    if overrides:
        saved = _annotation(ann_mod.parse_overrides, overrides, ANNOTATION_OVERRIDES)
        for key in ("containers", "initContainers"):
            for i, c in enumerate(saved.get(key) or []):
                _validate_container(c, f"annotation {ANNOTATION_OVERRIDES}: {key}[{i}]")
                if not any(x.get("name") == c["name"] for x in spec.get(key) or []):  # Istio's reinsertOverrides
                    spec.setdefault(key, []).append(c)
    return carried


def canonical_name(labels: Mapping[str, str], dm: DeployMeta) -> str:
    name = (labels.get(C.LABEL_CANONICAL_NAME) or labels.get("app.kubernetes.io/name") or labels.get("app")
            or dm.name)
    return name[:63].strip("-_.")


def _writable_copy(pod: Mapping[str, Any], namespace: str | None) -> dict[str, Any]:
    """A copy of only what injection modifies (the input is never mutated; untouched subtrees are shared with it),
    with managedFields dropped and the namespace filled in."""
    out: dict[str, Any] = dict(pod)
    meta = out["metadata"] = dict(pod.get("metadata") or {})
    meta.pop("managedFields", None)
    spec = out["spec"] = dict(pod["spec"])
    for key in ("containers", "initContainers"):
        if spec.get(key) is not None:
            spec[key] = [dict(c) for c in spec[key]]
    if spec.get("volumes") is not None:
        spec["volumes"] = list(spec["volumes"])
    ns = meta.get("namespace") or namespace or ""
    if ns and not meta.get("namespace"):
        meta["namespace"] = ns
    return out


def _take_user_containers(spec: dict[str, Any], annotations: dict[str, str], need_app: bool = True
                          ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Pop the user's own istio-proxy / istio-init out of the pod, recording them in proxy.istio.io/overrides the
    first time (Istio's overwritten containers), so a re-injection can apply them again."""
    containers: list[dict[str, Any]] = spec["containers"]
    inits: list[dict[str, Any]] = spec.get("initContainers") or []
    user_proxy = _pop_named(containers, C.PROXY_CONTAINER) or _pop_named(inits, C.PROXY_CONTAINER)
    user_init = _pop_named(inits, C.INIT_CONTAINER) or _pop_named(containers, C.INIT_CONTAINER)
    if (user_proxy or user_init) and ANNOTATION_OVERRIDES not in annotations:
        saved: dict[str, list[Any]] = {}
        for c in (user_proxy, user_init):
            if c is not None:
                in_init = c is user_init or c.get("restartPolicy") == "Always"
                saved.setdefault("initContainers" if in_init else "containers", []).append(c)
        annotations[ANNOTATION_OVERRIDES] = _compact_sorted(saved)
    if not containers and need_app:
        raise InjectionError("failed to process pod: spec.containers: the pod has no application container")
    return user_proxy, user_init


def _render_sidecar(pod: dict[str, Any], annotations: Mapping[str, str], labels: Mapping[str, str],
                    settings: Settings, ch: Choices, dm: DeployMeta
                    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The template: istio-proxy, and istio-init unless interception is NONE, with their images and resources."""
    resources = _resources(annotations, settings)
    proxy = _proxy_container(pod, annotations, labels, settings, ch, dm, proxy_image(annotations, settings, ch),
                             resources, pod["spec"]["containers"])
    init = None
    if ch.interception_mode != "NONE":
        cni.check_native_nftables(settings.values)
        init = _init_container(annotations, settings, ch, proxy_image(annotations, settings, ch, init=True),
                               resources)
        if cni.enabled(settings.values):
            init = cni.as_validation(init)
    return proxy, init


def reapply_overwritten_containers(proxy: dict[str, Any], init: dict[str, Any] | None,
                                   user_proxy: dict[str, Any] | None, user_init: dict[str, Any] | None,
                                   ch: Choices) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Istio's reapplyOverwrittenContainers: the user's istio-proxy / istio-init on top of the injected ones. A user
    runAsUser on istio-proxy becomes istio-init's -u (its traffic is the proxy's); TPROXY keeps the proxy root."""
    if user_proxy is not None:
        proxy = merge_user_container(proxy, user_proxy)
        if ch.native:
            proxy["restartPolicy"] = "Always"
        run_as = (user_proxy.get("securityContext") or {}).get("runAsUser")
        if ch.interception_mode == "TPROXY":
            proxy.setdefault("securityContext", {})["runAsUser"] = 0
        elif init is not None and isinstance(run_as, int) and not isinstance(run_as, bool) and run_as > 0:
            init["args"][init["args"].index("-u") + 1] = str(run_as)
        if init is not None and init["name"] == C.VALIDATION_CONTAINER:
            cni.adopt_user_ids(init, user_proxy, ch.interception_mode == "TPROXY")
    if user_init is not None and init is not None:
        init = merge_user_container(init, user_init)
    return proxy, init


def reorder_pod(spec: dict[str, Any], proxy: dict[str, Any], init: dict[str, Any] | None,
                inits: list[dict[str, Any]], ch: Choices) -> tuple[list[str], list[str] | None]:
    """Istio's reorderPod: native sidecars go to the init side (istio-init or istio-validation, istio-proxy, then the
    user's); classic puts istio-proxy in containers, first when the app waits for the proxy, istio-init after the
    user's inits and istio-validation before them. Returns the injected names for the status annotation (init
    containers, containers)."""
    containers: list[dict[str, Any]] = spec["containers"]
    first = [init] if init else []
    if ch.native:
        spec["initContainers"] = [*first, proxy, *inits]
        status_init = [c["name"] for c in first] + [C.PROXY_CONTAINER]
        status_containers: list[str] | None = None
    else:  # istio-validation first, to hold back the user's inits until capture works; istio-init last
        validating = init is not None and init["name"] == C.VALIDATION_CONTAINER
        spec["initContainers"] = [*first, *inits] if validating else [*inits, *first]
        spec["containers"] = [proxy, *containers] if ch.hold else [*containers, proxy]
        status_init = [c["name"] for c in first]
        status_containers = [C.PROXY_CONTAINER]
    if not spec["initContainers"]:
        del spec["initContainers"]
    return status_init, status_containers


def _overwrite_cluster_info(env: list[dict[str, Any]], settings: Settings,
                            url_env: Mapping[str, str] | None) -> dict[str, str]:
    """Cluster and network from the values and the webhook URL (/inject/cluster/<c>/net/<n>) replace the rendered
    ones, appended sorted (Istio's overwriteClusterInfo). Returns what was moved."""
    g = settings.g
    moved: dict[str, str] = {}
    if g["multiCluster"].get("clusterName"):
        moved[C.ENV_CLUSTER_ID] = str(g["multiCluster"]["clusterName"])
    if g.get("network"):
        moved[ENV_NETWORK] = str(g["network"])
    for k, v in (url_env or {}).items():
        moved[k] = v
    if moved:
        env[:] = [e for e in env if e.get("name") not in moved]
        env += [{"name": k, "value": moved[k]} for k in sorted(moved)]
    return moved


def post_process_pod(spec: dict[str, Any], proxy_env: list[dict[str, Any]] | None, annotations: dict[str, str],
                     settings: Settings, carried: Mapping[str, str | None],
                     url_env: Mapping[str, str] | None) -> dict[str, str]:
    """Istio's postProcessPod on the placed pod: cluster info into istio-proxy's env, the prometheus merge, the app
    probes rewritten to the agent (only when there is an istio-proxy). `carried`: env a previous injection held
    (re-injection). Returns the moved env."""
    env = proxy_env if proxy_env is not None else []
    moved = _overwrite_cluster_info(env, settings, url_env)
    prom_env = prometheus.apply_merge(annotations, settings.mesh)
    # Re-injection: the app's original prometheus.io/* survive only in the old env (the merge overwrote them).
    prom_env = carried.get(C.ENV_PROMETHEUS_ANNOTATIONS) or prom_env
    if prom_env:
        _env_default(env, C.ENV_PROMETHEUS_ANNOTATIONS, prom_env)
    rewrite = ann_mod.parse_go_bool(annotations.get(C.ANNOTATION_REWRITE_PROBES, ""))
    if rewrite is None:
        rewrite = bool(settings.values["sidecarInjectorWebhook"]["rewriteAppHTTPProbe"])
    probe_port = int(annotations.get(C.ANNOTATION_STATUS_PORT) or settings.default_proxy_config.get("statusPort")
                     or C.STATUS_PORT)
    if rewrite and probe_port and proxy_env is not None:
        probers = probes.rewrite_app_probes(spec, probe_port)
        probers = probes.merge_probers(probers, carried.get(C.ENV_APP_PROBERS))
        if probers:
            _env_default(env, C.ENV_APP_PROBERS, probes.probers_json(probers))
    return moved


def _merge_volumes(pod: dict[str, Any], annotations: Mapping[str, str], settings: Settings
                   ) -> tuple[list[str], list[str]]:
    """The injected volumes and image pull secrets first, the pod's own (not named like ours) after; returns the
    injected names of each for the status annotation."""
    return merge_volumes(pod["spec"], _volumes(pod, annotations, settings), settings)


def merge_volumes(spec: dict[str, Any], volumes: list[dict[str, Any]], settings: Settings
                  ) -> tuple[list[str], list[str]]:
    """`volumes` and the values' imagePullSecrets first in `spec`, the pod's own (not named like ours) after, for
    every template; returns the injected names of each for the status annotation."""
    vnames = {v["name"] for v in volumes}
    spec["volumes"] = volumes + [v for v in spec.get("volumes") or [] if v.get("name") not in vnames]
    pull = [{"name": str(s if isinstance(s, str) else s.get("name"))} for s in settings.g.get("imagePullSecrets") or []]
    if pull:
        pnames = {p["name"] for p in pull}
        spec["imagePullSecrets"] = pull + [s for s in spec.get("imagePullSecrets") or []
                                           if s.get("name") not in pnames]
    return [v["name"] for v in volumes], [p["name"] for p in pull]


def apply_metadata(meta: dict[str, Any], labels: dict[str, str], annotations: dict[str, str], settings: Settings,
                   ch: Choices, dm: DeployMeta, app: str | None, network: str | None, status: str) -> None:
    """Istio's applyMetadata: the mesh labels (tlsMode, canonical name/revision, tunnel, network), the default
    container for kubectl, the configured injected annotations, the revision and `status` (what was injected)."""
    _sidecar_metadata(labels, annotations, settings, ch, dm, app)
    _injected_metadata(meta, labels, annotations, settings, network, status)


def _sidecar_metadata(labels: dict[str, str], annotations: dict[str, str], settings: Settings, ch: Choices,
                      dm: DeployMeta, app: str | None) -> None:
    """The sidecar template's metadata: tlsMode, canonical name/revision, tunnel, kubectl's default container and
    the revision."""
    labels.setdefault(C.LABEL_SECURITY_TLS_MODE, "istio")
    labels[C.LABEL_CANONICAL_NAME] = canonical_name(labels, dm)
    labels.setdefault(C.LABEL_CANONICAL_REVISION, labels.get("app.kubernetes.io/version") or labels.get("version")
                      or "latest")
    if (ch.proxy_config.get("proxyMetadata") or {}).get("ISTIO_META_ENABLE_HBONE") == "true":
        labels.setdefault(LABEL_TUNNEL, "http")
    if app:
        annotations.setdefault(C.ANNOTATION_DEFAULT_CONTAINER, app)
        annotations.setdefault(C.ANNOTATION_DEFAULT_LOGS_CONTAINER, app)
    annotations[ANNOTATION_REV] = settings.revision or "default"


def _injected_metadata(meta: dict[str, Any], labels: dict[str, str], annotations: dict[str, str],
                       settings: Settings, network: str | None, status: str) -> None:
    """What every template gets (Istio's applyMetadata): the network label, the configured injected annotations
    and `status`."""
    if network:
        labels.setdefault(LABEL_NETWORK, network)
    annotations.update(settings.injected_annotations)
    annotations[C.ANNOTATION_STATUS] = status
    meta["labels"] = labels
    meta["annotations"] = annotations


def inject_pod(pod: Mapping[str, Any], settings: Settings, *, namespace: str | None = None,
               deploy_meta: DeployMeta | None = None, url_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The injected pod (a new object). Raises InjectionError for invalid pods or annotations.

    Istio's injectPod order: undo a previous injection, render the templates the pod selects
    (`inject.istio.io/templates`), reapply the user's overrides, place the containers, post-process, merge the
    volumes, then the metadata that records what was injected."""
    validate_pod_shape(pod)
    out = _writable_copy(pod, namespace)
    meta, spec = out["metadata"], out["spec"]
    annotations: dict[str, str] = dict(meta.get("annotations") or {})
    labels: dict[str, str] = dict(meta.get("labels") or {})
    ch = choices(out, settings, ann_mod.validate(annotations))
    names = tpl_mod.select(annotations, settings.default_templates, settings.aliases, settings.has_template,
                           settings.template_names)
    proxy_tpl = _proxy_template(names)
    carried: dict[str, str | None] = {}
    reinjected = C.ANNOTATION_STATUS in annotations
    if reinjected:
        mesh_status_port = int(settings.default_proxy_config.get("statusPort") or C.STATUS_PORT)
        carried = _strip(out, annotations, mesh_status_port)
    dm = deploy_meta or pod_deploy_meta(out, meta.get("namespace") or "")
    overlays = [n for n in names if n not in tpl_mod.PROXY_TEMPLATES]
    # Custom templates read the pod as it was before anything was rendered into it.
    ctx = _template_context(out, annotations, labels, settings, ch, dm) if overlays else None
    budget = tpl_mod.Budget() if overlays else None  # the render bounds hold for the pod, not per template
    injected = _Injected()
    if proxy_tpl == "sidecar":
        proxy: dict[str, Any] | None = _inject_sidecar(out, annotations, labels, settings, ch, dm, injected)
    elif proxy_tpl == "grpc-agent":
        from webhook import grpc_agent  # noqa: PLC0415 - as gateway's (import cycle)
        proxy = grpc_agent.inject_grpc_agent(out, annotations, labels, settings, ch, dm, injected,
                                             record=not reinjected)
    elif proxy_tpl is not None:
        from webhook import gateway  # noqa: PLC0415 - gateway renders with this module's helpers (import cycle)
        proxy = gateway.inject_gateway(out, annotations, settings, ch, dm, injected)
    else:
        proxy = None
    for name in overlays:
        assert ctx is not None
        overlay_mod.apply(out, annotations, labels, tpl_mod.render(settings.templates[name], ctx, budget),
                          injected, _merge_map, record=not reinjected)
    moved = post_process_pod(spec, proxy["env"] if proxy is not None else None, annotations, settings, carried,
                             url_env)
    app = next((c["name"] for c in spec["containers"] if c.get("name") != C.PROXY_CONTAINER), None)
    if proxy_tpl == "sidecar":
        _sidecar_metadata(labels, annotations, settings, ch, dm, app)
    elif proxy_tpl is not None:    # gateway and grpc-agent: the same metadata (canonical labels, rev, kubectl's)
        from webhook import gateway  # noqa: PLC0415 - as above
        gateway.gateway_metadata(labels, annotations, settings, canonical_name(labels, dm), app)
    _injected_metadata(meta, labels, annotations, settings, moved.get(ENV_NETWORK), injected.status(settings))
    return out


class _Injected:
    """The names every rendered template added, for `sidecar.istio.io/status` (Istio lists the rendered templates'
    containers, init containers, volumes and pull secrets; an empty list is null)."""

    def __init__(self) -> None:
        self.names: dict[str, list[str]] = {"initContainers": [], "containers": [], "volumes": [],
                                            "imagePullSecrets": []}

    def add(self, key: str, names: list[str] | None) -> None:
        self.names[key] += [n for n in names or [] if n not in self.names[key]]

    def status(self, settings: Settings) -> str:
        n = self.names
        return _compact({"initContainers": n["initContainers"] or None, "containers": n["containers"] or None,
                         "volumes": n["volumes"] or None, "imagePullSecrets": n["imagePullSecrets"] or None,
                         "revision": settings.revision or "default"})


def _proxy_template(names: list[str]) -> str | None:
    """The one template that renders istio-proxy (sidecar or gateway), if any; two different ones would
    render two proxies into one pod, which is refused."""
    found = list(dict.fromkeys(n for n in names if n in tpl_mod.PROXY_TEMPLATES))
    if len(found) > 1:
        raise InjectionError(f"failed to run injection template: annotation {tpl_mod.ANNOTATION_TEMPLATES}: "
                             f"templates {' and '.join(found)} each render istio-proxy; select one of them")
    return found[0] if found else None


def _template_context(pod: dict[str, Any], annotations: Mapping[str, str], labels: Mapping[str, str],
                      settings: Settings, ch: Choices, dm: DeployMeta) -> tpl_mod.Context:
    """What custom templates read: the pod as it was before this injection rendered anything."""
    spec = pod["spec"]
    meta = pod["metadata"]
    proxy, init = proxy_image(annotations, settings, ch), proxy_image(annotations, settings, ch, init=True)
    return tpl_mod.Context(
        meta={"name": meta.get("name") or "", "namespace": meta.get("namespace") or "", "labels": dict(labels),
              "annotations": dict(annotations)},
        spec={"containers": list(spec["containers"]), "initContainers": list(spec.get("initContainers") or []),
              "serviceAccountName": spec.get("serviceAccountName") or ""},
        deploy={"name": dm.name, "namespace": dm.namespace, "kind": dm.kind},
        values=settings.values, mesh=settings.mesh,
        scalars={"Revision": settings.revision, "ProxyImage": proxy, "ProxyInitImage": init})


def _inject_sidecar(out: dict[str, Any], annotations: dict[str, str], labels: Mapping[str, str],
                    settings: Settings, ch: Choices, dm: DeployMeta, injected: _Injected) -> dict[str, Any]:
    """The `sidecar` template: render istio-init/istio-proxy, reapply the user's, place them, merge the volumes."""
    spec = out["spec"]
    inits: list[dict[str, Any]] = spec.get("initContainers") or []
    user_proxy, user_init = _take_user_containers(spec, annotations)
    proxy, init = _render_sidecar(out, annotations, labels, settings, ch, dm)
    proxy, init = reapply_overwritten_containers(proxy, init, user_proxy, user_init, ch)
    status_init, status_containers = reorder_pod(spec, proxy, init, inits, ch)
    if cni.enabled(settings.values):  # the capture settings, for the CNI plugin to read
        annotations.update(cni.plugin_annotations(annotations, settings.values, ch.interception_mode, ch.status_port))
    volume_names, pull_names = _merge_volumes(out, annotations, settings)
    injected.add("initContainers", status_init)
    injected.add("containers", status_containers)
    injected.add("volumes", volume_names)
    injected.add("imagePullSecrets", pull_names)
    return proxy
