"""A rendered template merged onto the pod, as Istio's strategic merge patch does for the fields templates set.

Containers and init containers merge by name (wherever the named container is: a native istio-proxy lives in
`initContainers`, and an overlay naming it in `containers` means that container — Istio would add a second,
image-less `istio-proxy`, which the API server refuses); env by name, ports by containerPort, volumeMounts by
mountPath. A container of the user's that a template touches gets the user's own fields back on top and is kept in
`proxy.istio.io/overrides` (Istio's reapplyOverwrittenContainers), so re-injection starts again from the original.
Volumes merge by name, and a volume source the template sets replaces the injected one (a volume has one source).
Labels and annotations: the template's win.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from meshboot import constants as C
from webhook.errors import InjectionError

Merge = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
_OURS = (C.PROXY_CONTAINER, C.INIT_CONTAINER, C.VALIDATION_CONTAINER)


class Recorder(Protocol):
    def add(self, key: str, names: list[str] | None) -> None: ...


def _find(spec: dict[str, Any], name: str) -> tuple[str, int] | None:
    for key in ("containers", "initContainers"):
        for i, c in enumerate(spec.get(key) or []):
            if c.get("name") == name:
                return key, i
    return None


def _containers(spec: dict[str, Any], key: str, overlay: list[dict[str, Any]], merge: Merge,
                saved: dict[str, list[Any]], injected: Recorder) -> None:
    for c in overlay:
        name = c["name"]
        where = _find(spec, name)
        if where is None:
            spec.setdefault(key, []).append(c)
            injected.add(key, [name])
            continue
        lst, i = spec[where[0]], where[1]
        merged = merge(lst[i], c)
        if name not in _OURS:       # the user's container: their own fields win, and are kept for re-injection
            original = {k: v for k, v in lst[i].items() if not (k == "image" and v == "auto")}
            merged = merge(merged, original)
            saved.setdefault(where[0], []).append(lst[i])
        lst[i] = merged
        injected.add(where[0], [name])


def _volumes(spec: dict[str, Any], overlay: list[dict[str, Any]], merge: Merge) -> list[str]:
    vols: list[dict[str, Any]] = list(spec.get("volumes") or [])
    for v in overlay:
        i = next((j for j, x in enumerate(vols) if x.get("name") == v["name"]), None)
        if i is None:
            vols.append(v)
            continue
        sources = set(v) - {"name"}
        base = vols[i] if not sources else {k: x for k, x in vols[i].items() if k == "name" or k in sources}
        vols[i] = merge(base, v)
    spec["volumes"] = vols
    return [v["name"] for v in overlay]


def apply(pod: dict[str, Any], annotations: dict[str, str], labels: dict[str, str], doc: dict[str, Any],
          injected: Recorder, merge: Merge, *, record: bool) -> None:
    """Merge one rendered template (`templates.render`'s checked overlay) onto the pod. `record`: keep the user's
    touched containers in proxy.istio.io/overrides (not on re-injection: the annotation already holds them)."""
    meta = doc.get("metadata") or {}
    labels.update(meta.get("labels") or {})
    annotations.update(meta.get("annotations") or {})
    spec = pod["spec"]
    over = dict(doc.get("spec") or {})
    saved: dict[str, list[Any]] = {}
    for key in ("initContainers", "containers"):
        _containers(spec, key, over.pop(key, None) or [], merge, saved, injected)
    if "volumes" in over:
        injected.add("volumes", _volumes(spec, over.pop("volumes") or [], merge))
    pulls = over.pop("imagePullSecrets", None) or []
    if pulls:
        have = {s.get("name") for s in spec.get("imagePullSecrets") or []}
        spec["imagePullSecrets"] = list(spec.get("imagePullSecrets") or []) + [
            {"name": p["name"]} for p in pulls if p["name"] not in have]
        injected.add("imagePullSecrets", [p["name"] for p in pulls])
    for key, value in over.items():
        spec[key] = merge(spec[key], value) if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    if record and saved:
        try:   # checked by annotations.validate when the pod brought it; a template may have set it too
            current = json.loads(annotations.get(C.ANNOTATION_PROXY_OVERRIDES) or "{}")
        except ValueError:
            current = None
        if not isinstance(current, dict):
            raise InjectionError(f"failed to run injection template: annotation {C.ANNOTATION_PROXY_OVERRIDES}: "
                                 "want a JSON object")
        for key, cs in saved.items():
            kept: list[Any] = current[key] if isinstance(current.get(key), list) else []
            names = {c.get("name") for c in kept if isinstance(c, dict)}
            current[key] = kept + [c for c in cs if c.get("name") not in names]
        annotations[C.ANNOTATION_PROXY_OVERRIDES] = json.dumps(current, separators=(",", ":"), sort_keys=True)
