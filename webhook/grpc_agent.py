"""The `grpc-agent` template: proxyless gRPC beside the agent run without Envoy, as Istio's grpc-agent template
(manifests/charts/istio-control/istio-discovery/files/grpc-agent.yaml) and its golden shape it.

istio-proxy is the agent alone (`DISABLE_ENVOY=true`, docs/agent.md "No Envoy"): it writes the workload certificate
to `OUTPUT_CERTS=/var/lib/istio/data` and the gRPC xDS bootstrap to `/etc/istio/proxy/grpc-bootstrap.json`, and
proxies xDS on `/etc/istio/proxy/XDS`; every app container gets `GRPC_XDS_BOOTSTRAP` pointing there and mounts
`istio-data` and `istio-xds` to read them. Nothing is captured (no istio-init), the app's probes are not rewritten
(`sidecar.istio.io/rewriteAppHTTPProbers: "false"`), istio-proxy is always in `containers` (Istio's template puts it
there; first when hold is on) and its readiness is the agent's own, on 15020.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from meshboot import constants as C
from webhook import overlay as overlay_mod
from webhook.config import Settings
from webhook.inject import (
    AGENT_BINARY,
    CUSTOM_BOOTSTRAP_VOLUME,
    ENV_NETWORK,
    Choices,
    _ann_or,
    _copy_resources,
    _field_env,
    _merge_map,
    _resources,
    _take_user_containers,
    merge_user_container,
    merge_volumes,
    proxy_args,
    proxy_env_head,
    proxy_image,
    reorder_pod,
    tail_mounts,
    tail_volumes,
    user_mounts,
    user_volumes,
)
from webhook.overlay import Recorder
from webhook.workloads import DeployMeta

BOOTSTRAP = "/etc/istio/proxy/grpc-bootstrap.json"
XDS_VOLUME = "istio-xds"
OUTPUT_CERTS = C.MOUNT_ISTIO_DATA
_PROBE_URL = f"--url=http://localhost:{C.STATUS_PORT}/healthz/ready"


def grpc_agent_env(settings: Settings, ch: Choices, dm: DeployMeta, apps: list[dict[str, Any]]) -> list[dict]:
    """istio-proxy's env, in the template's order: the generator and OUTPUT_CERTS first, DISABLE_ENVOY last."""
    g, mesh = settings.g, settings.mesh
    env: list[dict[str, Any]] = [{"name": "ISTIO_META_GENERATOR", "value": "grpc"},
                                 {"name": C.ENV_OUTPUT_CERTS, "value": OUTPUT_CERTS}]
    if (mesh.get("inboundTrafficPolicy") or {}).get("mode") == "LOCALHOST":
        env.append({"name": "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION", "value": "true"})
    env += proxy_env_head(settings, ch, apps, cpu_limit=False)
    env += [
        {"name": C.ENV_APP_CONTAINERS, "value": ",".join(c.get("name", "") for c in apps)},
        {"name": C.ENV_CLUSTER_ID, "value": str(g["multiCluster"].get("clusterName") or C.DEFAULT_CLUSTER_ID)},
        _field_env(C.ENV_NODE_NAME, "spec.nodeName"),
    ]
    if g.get("network"):
        env.append({"name": ENV_NETWORK, "value": str(g["network"])})
    if dm.name:
        env.append({"name": C.ENV_WORKLOAD_NAME, "value": dm.name})
    if dm.name and dm.kind:
        env.append({"name": C.ENV_OWNER, "value": dm.owner()})
    env.append({"name": C.ENV_MESH_ID, "value": str(g.get("meshID") or settings.trust_domain)})
    if settings.trust_domain:
        env.append({"name": C.ENV_TRUST_DOMAIN, "value": settings.trust_domain})
    md = ch.proxy_config.get("proxyMetadata") or {}
    env += [{"name": k, "value": md[k]} for k in sorted(md)]
    # gRPC resolves xds:/// names itself: no DNS capture; and no Envoy
    return [*env, {"name": "ISTIO_META_DNS_CAPTURE", "value": "false"}, {"name": "DISABLE_ENVOY", "value": "true"}]


def _mounts(annotations: Mapping[str, str], settings: Settings) -> list[dict[str, Any]]:
    m: list[dict[str, Any]] = [{"mountPath": C.MOUNT_WORKLOAD_SOCKET, "name": "workload-socket"},
                               {"mountPath": C.MOUNT_WORKLOAD_CERTS, "name": "workload-certs"}]
    if settings.g.get("pilotCertProvider", "istiod") == "istiod":
        m.append({"mountPath": C.MOUNT_ISTIOD_CA, "name": "istiod-ca-cert"})
    m.append({"mountPath": C.MOUNT_ISTIO_DATA, "name": "istio-data"})
    return m + tail_mounts(settings, XDS_VOLUME) + user_mounts(annotations)


def grpc_agent_volumes(pod: Mapping[str, Any], annotations: Mapping[str, str], settings: Settings
                       ) -> list[dict[str, Any]]:
    """The template's volumes: no istio-envoy, credential-socket or CRL; `istio-xds` (memory) for the sockets."""
    g = settings.g
    v: list[dict[str, Any]] = [{"emptyDir": {}, "name": "workload-socket"},
                               {"emptyDir": {}, "name": "workload-certs"}]
    if C.ANNOTATION_BOOTSTRAP_OVERRIDE in annotations:
        v.append({"configMap": {"name": annotations[C.ANNOTATION_BOOTSTRAP_OVERRIDE]}, "name": CUSTOM_BOOTSTRAP_VOLUME})
    return v + tail_volumes(pod, g, XDS_VOLUME, crl=False) + user_volumes(annotations)


def render_grpc_agent(annotations: Mapping[str, str], settings: Settings, ch: Choices, dm: DeployMeta,
                      apps: list[dict[str, Any]]) -> dict[str, Any]:
    """istio-proxy as the template renders it (the agent's readiness on 15020, unless the status port is 0)."""
    p, g = settings.proxy, settings.g
    c: dict[str, Any] = {"name": C.PROXY_CONTAINER, "image": proxy_image(annotations, settings, ch),
                         "ports": [{"containerPort": C.STATUS_PORT, "protocol": "TCP", "name": "mesh-metrics"}],
                         "args": proxy_args(annotations, settings, "sidecar"),
                         "lifecycle": {"postStart": {"exec": {"command": [AGENT_BINARY, "wait", _PROBE_URL]}}},
                         "env": grpc_agent_env(settings, ch, dm, apps)}
    if g.get("imagePullPolicy"):
        c["imagePullPolicy"] = g["imagePullPolicy"]
    if _ann_or(annotations, C.ANNOTATION_STATUS_PORT, p["statusPort"]) != "0":
        rp = C.ANNOTATION_READINESS_PREFIX
        c["readinessProbe"] = {
            "httpGet": {"path": "/healthz/ready", "port": C.STATUS_PORT},
            "initialDelaySeconds": int(_ann_or(annotations, rp + "initialDelaySeconds",
                                               p["readinessInitialDelaySeconds"])),
            "periodSeconds": int(_ann_or(annotations, rp + "periodSeconds", p["readinessPeriodSeconds"])),
            "timeoutSeconds": 3,
            "failureThreshold": int(_ann_or(annotations, rp + "failureThreshold", p["readinessFailureThreshold"]))}
    resources = _resources(annotations, settings)
    if resources:
        c["resources"] = _copy_resources(resources)
    c["volumeMounts"] = _mounts(annotations, settings)
    return c


def app_overlay(apps: list[dict[str, Any]]) -> dict[str, Any]:
    """What the template adds to every app container: the bootstrap's path and the two volumes the agent writes."""
    return {"spec": {"containers": [{
        "name": c["name"],
        "env": [{"name": "GRPC_XDS_EXPERIMENTAL_SECURITY_SUPPORT", "value": "true"},
                {"name": "GRPC_XDS_BOOTSTRAP", "value": BOOTSTRAP}],
        "volumeMounts": [{"mountPath": C.MOUNT_ISTIO_DATA, "name": "istio-data"},
                         {"mountPath": C.MOUNT_ISTIO_ENVOY, "name": XDS_VOLUME},
                         {"mountPath": C.MOUNT_WORKLOAD_CERTS, "name": "workload-certs"}]} for c in apps]}}


def inject_grpc_agent(pod: dict[str, Any], annotations: dict[str, str], labels: dict[str, str],
                      settings: Settings, ch: Choices, dm: DeployMeta, injected: Recorder, *, record: bool
                      ) -> dict[str, Any]:
    """The `grpc-agent` template on the pod: istio-proxy rendered (the user's own merged on top) and placed, the app
    containers' env and mounts merged as a template overlay (kept in proxy.istio.io/overrides), the volumes; returns
    istio-proxy."""
    spec = pod["spec"]
    inits: list[dict[str, Any]] = spec.get("initContainers") or []
    user_proxy, user_init = _take_user_containers(spec, annotations, need_app=False)
    if user_init is not None:       # the template renders no istio-init: the user's stays theirs
        inits.append(user_init)
    apps = [c for c in spec["containers"] if c.get("name") != C.PROXY_CONTAINER]
    proxy = render_grpc_agent(annotations, settings, ch, dm, apps)
    if user_proxy is not None:
        proxy = merge_user_container(proxy, user_proxy)
    _, status_containers = reorder_pod(spec, proxy, None, inits, dataclasses.replace(ch, native=False))
    injected.add("containers", status_containers)        # istio-proxy first, as the template renders it
    annotations[C.ANNOTATION_REWRITE_PROBES] = "false"      # the template's: gRPC health is the app's own
    overlay_mod.apply(pod, annotations, labels, app_overlay(apps), injected, _merge_map, record=record)
    volume_names, pull_names = merge_volumes(spec, grpc_agent_volumes(pod, annotations, settings), settings)
    injected.add("volumes", volume_names)
    injected.add("imagePullSecrets", pull_names)
    return proxy
