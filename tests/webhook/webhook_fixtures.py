"""Pods and helpers shared by the webhook tests: Istio's `hello` shape, schema validation, AdmissionReviews."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from webhook.config import Settings, build_settings

SCHEMA_VERSIONS = ("1.29.0", "1.33.0")


def hello_pod(**over: Any) -> dict[str, Any]:
    """One container, two ports, a readiness probe on a named port (Istio's hello sample shape)."""
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "hello", "namespace": "default",
                     "labels": {"app": "hello", "tier": "backend", "version": "v1"}},
        "spec": {"containers": [{
            "name": "hello", "image": "fake.docker.io/google-samples/hello-go-gke:1.0",
            "ports": [{"name": "http", "containerPort": 80}, {"name": "metrics", "containerPort": 9090}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5},
        }]},
    }
    pod.update(copy.deepcopy(over))
    return pod


def settings(**kw: Any) -> Settings:
    kw.setdefault("kubernetes_version", "1.33")
    return build_settings(kw.pop("values", None), kw.pop("mesh", None), kw.pop("injector", None), **kw)


def validate_pod(pod: dict[str, Any]) -> None:
    """Strict Kubernetes Pod schema validation for every supported version we promise."""
    doc = copy.deepcopy(pod)
    doc.setdefault("apiVersion", "v1")
    doc.setdefault("kind", "Pod")
    doc.setdefault("metadata", {}).setdefault("name", "x")
    for v in SCHEMA_VERSIONS:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"pod fails the {v} schema at {list(e.path)}: {str(e).splitlines()[0]}") from None


def validate_object(obj: dict[str, Any]) -> None:
    for v in SCHEMA_VERSIONS:
        try:
            kubernetes_validate.validate(obj, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{obj.get('kind')} fails the {v} schema at {list(e.path)}: "
                                 f"{str(e).splitlines()[0]}") from None


def review_body(pod: Any, uid: str = "0d8a3c4e-1", namespace: str = "default",
                api_version: str = "admission.k8s.io/v1") -> bytes:
    return json.dumps({"apiVersion": api_version, "kind": "AdmissionReview",
                       "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                                   "resource": {"group": "", "version": "v1", "resource": "pods"},
                                   "namespace": namespace, "operation": "CREATE", "object": pod}}).encode()


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def named(containers: list[dict[str, Any]] | None, name: str) -> dict[str, Any]:
    for c in containers or []:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name!r} in {[c['name'] for c in containers or []]}")


def names(containers: list[dict[str, Any]] | None) -> list[str]:
    return [c["name"] for c in containers or []]


def arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


class _GoldenDumper(yaml.SafeDumper):
    """Multi-line strings (PROXY_CONFIG, ISTIO_META_POD_PORTS) as `|` blocks, readable in review."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_GoldenDumper.add_representer(str, _str)


def render_golden(pod: dict[str, Any]) -> str:
    """An injected pod as its golden file holds it: sorted keys, `|` blocks."""
    return yaml.dump(pod, Dumper=_GoldenDumper, sort_keys=True, width=120, default_flow_style=False)


def golden_inputs(folder: Path) -> set[str]:
    """The cases of a golden folder: each <case>.yaml input, beside its <case>.golden.yaml."""
    return {p.name.removesuffix(".yaml") for p in folder.glob("*.yaml") if not p.name.endswith(".golden.yaml")}


def golden_input(folder: Path, case: str) -> Any:
    return yaml.safe_load((folder / f"{case}.yaml").read_text())
