"""OTEL_RESOURCE_ATTRIBUTES for istio-proxy, as Istio's sidecar template renders it.

Only when a MeshConfig OpenTelemetry tracing provider asks for `serviceAttributeEnrichment:
OTEL_SEMANTIC_CONVENTIONS`: the OTel Kubernetes service attributes (service.namespace, service.version,
service.instance.id), each from its `resource.opentelemetry.io/*` annotation first. The pod name is not known at
admission (controllers name pods later), so service.instance.id uses `$(POD_NAME)`, which the kubelet expands from
the POD_NAME env var defined before it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ENV = "OTEL_RESOURCE_ATTRIBUTES"
SEMCONV = "OTEL_SEMANTIC_CONVENTIONS"
ANNOTATION_PREFIX = "resource.opentelemetry.io/"


def enabled(mesh: Mapping[str, Any]) -> bool:
    """Some OpenTelemetry extension provider enriches with the semantic conventions."""
    providers = mesh.get("extensionProviders")
    if not isinstance(providers, list):
        return False
    for p in providers:
        otel = p.get("opentelemetry") if isinstance(p, Mapping) else None
        if isinstance(otel, Mapping) and otel.get("serviceAttributeEnrichment") == SEMCONV:
            return True
    return False


def image_tag_digest(image: str) -> tuple[str, str]:
    """`[registry[:port]/]name[:tag][@digest]` -> (tag, digest), either may be empty."""
    image, _, digest = image.partition("@")
    slash, colon = image.rfind("/"), image.rfind(":")
    return (image[colon + 1:] if colon > slash else ""), digest


def _version(annotations: Mapping[str, str], labels: Mapping[str, str], containers: list[dict[str, Any]]) -> str:
    v = annotations.get(ANNOTATION_PREFIX + "service.version") or labels.get("app.kubernetes.io/version")
    if v:
        return v
    if len(containers) != 1:
        return ""
    tag, digest = image_tag_digest(str(containers[0].get("image") or ""))
    return f"{tag}@{digest}" if tag and digest else (digest or tag)


def resource_attributes(mesh: Mapping[str, Any], annotations: Mapping[str, str], labels: Mapping[str, str],
                        namespace: str, containers: list[dict[str, Any]]) -> str:
    """The env value, or "" when the mesh does not ask for it. `containers`: the pod's app containers."""
    if not enabled(mesh):
        return ""
    attrs = []
    ns = annotations.get(ANNOTATION_PREFIX + "service.namespace") or namespace
    if ns:
        attrs.append(f"service.namespace={ns}")
    version = _version(annotations, labels, containers)
    if version:
        attrs.append(f"service.version={version}")
    instance = annotations.get(ANNOTATION_PREFIX + "service.instance.id")
    if instance:
        attrs.append(f"service.instance.id={instance}")
    elif containers:
        attrs.append(f"service.instance.id={namespace}.$(POD_NAME).{containers[0].get('name', '')}")
    return ",".join(attrs)
