"""The `gateway` template: an Istio gateway Deployment's istio-proxy (`proxy router`), as Istio's gateway template and
its goldens shape it.

A gateway pod is its own proxy: no istio-init (nothing is captured), istio-proxy always in `containers` (a gateway is
never a native sidecar), its env, ports and readiness probe the gateway's own (no startup probe, no app probers, no
CRL, no user volumes), it runs as 1337 and the pod may bind low ports
(`net.ipv4.ip_unprivileged_port_start=0`, or `gateways.securityContext` from the values).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from meshboot import constants as C
from webhook.config import Settings
from webhook.inject import (
    CUSTOM_BOOTSTRAP_MOUNT,
    CUSTOM_BOOTSTRAP_VOLUME,
    ENV_NETWORK,
    Choices,
    _field_env,
    _http_probe,
    _take_user_containers,
    json_copy,
    merge_user_container,
    merge_volumes,
    proxy_args,
    proxy_env_head,
    proxy_image,
    reorder_pod,
    tail_mounts,
    tail_volumes,
)
from webhook.overlay import Recorder
from webhook.workloads import DeployMeta

GATEWAY_VOLUMES = ("workload-socket", "credential-socket", "workload-certs", CUSTOM_BOOTSTRAP_VOLUME, "istio-envoy",
                   "istio-data", "istio-podinfo", "istio-token", "istiod-ca-cert", "istio-certs")


def gateway_env(annotations: Mapping[str, str], settings: Settings, ch: Choices, dm: DeployMeta,
                apps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The gateway template's env, in its order (GOMEMLIMIT before the app containers; the workload name is the
    deployment's, never a label)."""
    g = settings.g
    names = ",".join(c.get("name", "") for c in apps if c.get("name") != C.PROXY_CONTAINER)
    env: list[dict[str, Any]] = [
        *proxy_env_head(settings, ch, apps),
        {"name": C.ENV_GOMEMLIMIT, "valueFrom": {"resourceFieldRef": {"divisor": "1", "resource": "limits.memory"}}},
        {"name": C.ENV_APP_CONTAINERS, **({"value": names} if names else {})},
        {"name": C.ENV_CLUSTER_ID, "value": str(g["multiCluster"].get("clusterName") or C.DEFAULT_CLUSTER_ID)},
        _field_env(C.ENV_NODE_NAME, "spec.nodeName"),
        {"name": C.ENV_INTERCEPTION_MODE, "value": str(ch.proxy_config.get("interceptionMode") or "REDIRECT")},
    ]
    if g.get("network"):
        env.append({"name": ENV_NETWORK, "value": str(g["network"])})
    if dm.name:
        env.append({"name": C.ENV_WORKLOAD_NAME, "value": dm.name})
    if dm.name and dm.kind:
        env.append({"name": C.ENV_OWNER, "value": dm.owner()})
    if C.ANNOTATION_BOOTSTRAP_OVERRIDE in annotations:
        env.append({"name": "ISTIO_BOOTSTRAP_OVERRIDE", "value": C.CUSTOM_BOOTSTRAP_FILE})
    env.append({"name": C.ENV_MESH_ID, "value": str(g.get("meshID") or settings.trust_domain)})
    if settings.trust_domain:
        env.append({"name": C.ENV_TRUST_DOMAIN, "value": settings.trust_domain})
    md = ch.proxy_config.get("proxyMetadata") or {}
    env += [{"name": k, "value": md[k]} for k in sorted(md)]
    return env


def _mounts(annotations: Mapping[str, str], settings: Settings) -> list[dict[str, Any]]:
    m: list[dict[str, Any]] = [{"mountPath": C.MOUNT_WORKLOAD_SOCKET, "name": "workload-socket"},
                               {"mountPath": C.MOUNT_CREDENTIAL_UDS, "name": "credential-socket"},
                               {"mountPath": C.MOUNT_WORKLOAD_CERTS, "name": "workload-certs"}]
    if settings.g.get("pilotCertProvider", "istiod") == "istiod":
        m.append({"mountPath": C.MOUNT_ISTIOD_CA, "name": "istiod-ca-cert"})
    m.append({"mountPath": C.MOUNT_ISTIO_DATA, "name": "istio-data"})
    if C.ANNOTATION_BOOTSTRAP_OVERRIDE in annotations:
        m.append({"mountPath": CUSTOM_BOOTSTRAP_MOUNT, "name": CUSTOM_BOOTSTRAP_VOLUME})
    return m + tail_mounts(settings, "istio-envoy")


def gateway_volumes(pod: Mapping[str, Any], annotations: Mapping[str, str], settings: Settings
                    ) -> list[dict[str, Any]]:
    """The gateway's volumes: the sidecar's, without the CRL and the user volumes."""
    g = settings.g
    v: list[dict[str, Any]] = [{"emptyDir": {}, "name": "workload-socket"},
                               {"emptyDir": {}, "name": "credential-socket"},
                               {"emptyDir": {}, "name": "workload-certs"}]
    if C.ANNOTATION_BOOTSTRAP_OVERRIDE in annotations:
        v.append({"configMap": {"name": annotations[C.ANNOTATION_BOOTSTRAP_OVERRIDE]}, "name": CUSTOM_BOOTSTRAP_VOLUME})
    return v + tail_volumes(pod, g, "istio-envoy", crl=False)


def render_gateway(annotations: Mapping[str, str], settings: Settings, ch: Choices, dm: DeployMeta,
                   apps: list[dict[str, Any]]) -> dict[str, Any]:
    """The gateway's istio-proxy container."""
    p, g = settings.proxy, settings.g
    c: dict[str, Any] = {"name": C.PROXY_CONTAINER, "image": proxy_image(annotations, settings, ch),
                         "ports": [{"containerPort": C.ENVOY_PROMETHEUS_PORT, "name": "http-envoy-prom",
                                    "protocol": "TCP"}],
                         "args": proxy_args(annotations, settings, "router")}
    if p.get("lifecycle"):
        c["lifecycle"] = json_copy(p["lifecycle"])
    c["securityContext"] = {"runAsGroup": C.PROXY_GID, "runAsUser": C.PROXY_UID}
    c["env"] = gateway_env(annotations, settings, ch, dm, apps)
    if g.get("imagePullPolicy"):
        c["imagePullPolicy"] = g["imagePullPolicy"]
    c["readinessProbe"] = _http_probe(int(p["readinessPeriodSeconds"]), int(p["readinessInitialDelaySeconds"]),
                                      int(p["readinessFailureThreshold"]))
    c["volumeMounts"] = _mounts(annotations, settings)
    return c


def gateway_pod_security_context(pod_sc: Any, settings: Settings) -> dict[str, Any]:
    """The pod's securityContext with the gateway template's on top (`gateways.securityContext`, else the sysctl
    that lets the non-root proxy bind ports below 1024)."""
    own = (settings.values.get("gateways") or {}).get("securityContext") if isinstance(
        settings.values.get("gateways"), Mapping) else None
    over = json_copy(own) if isinstance(own, Mapping) and own else {
        "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]}
    return {**(pod_sc if isinstance(pod_sc, Mapping) else {}), **over}


def gateway_metadata(labels: dict[str, str], annotations: dict[str, str], settings: Settings, canonical: str,
                     app: str | None) -> None:
    """The gateway template's metadata: canonical name/revision, the revision, kubectl's default container (no
    tlsMode: a gateway's inbound is not the mesh's sidecar mTLS)."""
    labels[C.LABEL_CANONICAL_NAME] = canonical
    labels.setdefault(C.LABEL_CANONICAL_REVISION, labels.get("app.kubernetes.io/version") or labels.get("version")
                      or "latest")
    annotations[C.LABEL_REV] = settings.revision or "default"
    if app:
        annotations.setdefault(C.ANNOTATION_DEFAULT_LOGS_CONTAINER, app)
        annotations.setdefault(C.ANNOTATION_DEFAULT_CONTAINER, app)


def inject_gateway(pod: dict[str, Any], annotations: dict[str, str], settings: Settings, ch: Choices,
                   dm: DeployMeta, injected: Recorder) -> dict[str, Any]:
    """The `gateway` template on the pod: istio-proxy rendered, the user's own `istio-proxy` (`image: auto`) merged
    on top, placed in `containers`, the volumes and the pod securityContext; returns istio-proxy."""
    spec = pod["spec"]
    inits: list[dict[str, Any]] = spec.get("initContainers") or []
    user_proxy, user_init = _take_user_containers(spec, annotations, need_app=False)
    if user_init is not None:       # the gateway renders no istio-init: the user's stays theirs
        inits.append(user_init)
    gw = dataclasses.replace(ch, native=False)
    proxy = render_gateway(annotations, settings, gw, dm, spec["containers"])
    if user_proxy is not None:  # no istio-init to adjust, and no TPROXY root: nothing is captured in a gateway
        proxy = merge_user_container(proxy, user_proxy)
    _, status_containers = reorder_pod(spec, proxy, None, inits, gw)
    volume_names, pull_names = merge_volumes(spec, gateway_volumes(pod, annotations, settings), settings)
    spec["securityContext"] = gateway_pod_security_context(spec.get("securityContext"), settings)
    injected.add("containers", status_containers)
    injected.add("volumes", volume_names)
    injected.add("imagePullSecrets", pull_names)
    return proxy
