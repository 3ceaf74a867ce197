"""What a kubelet computes from a pod spec before it starts a container: env, argv, user, files of the downward API.

Pure functions over the pod as a dict (exactly the JSON the API server stores), so the local pod runner and its unit
tests share one definition of "as a kubelet would": `$(VAR)` expansion, `fieldRef`/`resourceFieldRef` resolution,
resource quantities, the image's ENTRYPOINT/CMD combined with the container's command/args, and the downward-API file
format. No I/O here; `kubelet.py` is the shell that acts on these results.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

Pod = dict[str, Any]
Container = dict[str, Any]


class PodSpecError(ValueError):
    """A pod spec the runner cannot run, with where the problem is (like the kubelet's CreateContainerConfigError)."""


# ---- resource quantities ----------------------------------------------------------------------------------------
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1), "k": Decimal(10**3),
            "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12), "P": Decimal(10**15),
            "E": Decimal(10**18)}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")


def parse_quantity(text: str | int | float) -> Decimal:
    """A Kubernetes resource.Quantity ("100m", "1Gi", "2", "1e3") as an exact decimal."""
    s = str(text).strip()
    m = _QUANTITY.match(s)
    if not m:
        raise PodSpecError(f"invalid quantity {text!r}")
    try:
        number = Decimal(m.group(1))
    except InvalidOperation as e:
        raise PodSpecError(f"invalid quantity {text!r}") from e
    suffix = m.group(2) or ""
    return number * (_BINARY[suffix] if suffix in _BINARY else _DECIMAL[suffix])


def resource_field_value(pod: Pod, container: Container, ref: Mapping[str, Any],
                         node_allocatable: Mapping[str, str]) -> str:
    """`valueFrom.resourceFieldRef`: the container's limit/request divided by `divisor`, rounded up, as the kubelet
    does; a missing limit falls back to the node's allocatable (a missing request to 0)."""
    name = ref.get("containerName") or container.get("name")
    target = next((c for c in all_containers(pod) if c.get("name") == name), None)
    if target is None:
        raise PodSpecError(f"resourceFieldRef: no container named {name!r}")
    resource = ref.get("resource", "")
    kind, _, res = resource.partition(".")
    if kind not in ("limits", "requests") or not res:
        raise PodSpecError(f"resourceFieldRef: unsupported resource {resource!r}")
    value = ((target.get("resources") or {}).get(kind) or {}).get(res)
    if value is None:
        value = node_allocatable.get(res, "0") if kind == "limits" else "0"
    divisor = parse_quantity(ref.get("divisor") or "1")
    if divisor == 0:
        raise PodSpecError(f"resourceFieldRef {resource}: divisor 0")
    return str(math.ceil(parse_quantity(value) / divisor))


# ---- fieldRef ---------------------------------------------------------------------------------------------------
_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: Pod, path: str) -> str:
    """`valueFrom.fieldRef.fieldPath` (and downward-API volume items) resolved against the pod object."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": status.get("hostIP", ""),
        "status.podIP": status.get("podIP", ""),
    }
    if path in simple:
        return simple[path]
    if path == "status.podIPs":
        return ",".join(p["ip"] for p in status.get("podIPs") or [])
    if path == "status.hostIPs":
        return ",".join(p["ip"] for p in status.get("hostIPs") or [])
    if path == "metadata.labels":
        return downward_api_map(meta.get("labels") or {})
    if path == "metadata.annotations":
        return downward_api_map(meta.get("annotations") or {})
    m = _SUBSCRIPT.match(path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    raise PodSpecError(f"fieldRef: unsupported fieldPath {path!r}")


def go_quote(value: str) -> str:
    """Go's strconv.Quote for the characters pod metadata holds (JSON's escaping agrees on all of them)."""
    return json.dumps(value, ensure_ascii=False)


def downward_api_map(values: Mapping[str, str]) -> str:
    """The downward-API file format for labels/annotations: sorted `key="quoted value"` lines."""
    return "\n".join(f"{k}={go_quote(str(v))}" for k, v in sorted(values.items()))


# ---- env and $(VAR) -----------------------------------------------------------------------------------------------
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined names are replaced, `$$` escapes `$`, unknown refs stay verbatim."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)
    return _VAR_REF.sub(sub, text)


@dataclass(frozen=True)
class Lookup:
    """API objects a container's env may reference (ConfigMaps and Secrets by namespace/name) and node facts."""

    config_maps: Mapping[tuple[str, str], Mapping[str, str]] = field(default_factory=dict)
    secrets: Mapping[tuple[str, str], Mapping[str, str]] = field(default_factory=dict)
    node_allocatable: Mapping[str, str] = field(default_factory=lambda: {"cpu": "2", "memory": "8Gi"})


def container_env(pod: Pod, container: Container, image_env: Mapping[str, str],
                  lookup: Lookup = Lookup()) -> dict[str, str]:
    """The process environment: image ENV, then `envFrom`, then `env` in order (each may use `$(earlier)`)."""
    ns = (pod.get("metadata") or {}).get("namespace", "")
    where = f"container {container.get('name')!r}"
    env: dict[str, str] = dict(image_env)
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        for kind, store in (("configMapRef", lookup.config_maps), ("secretRef", lookup.secrets)):
            if kind in src:
                ref = src[kind]
                data = store.get((ns, ref.get("name", "")))
                if data is None and not ref.get("optional"):
                    raise PodSpecError(f"{where}: envFrom {kind} {ref.get('name')!r} not found")
                env.update({prefix + k: v for k, v in (data or {}).items()})
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = expand(str(item.get("value", "")), env)
            continue
        vf = item["valueFrom"]
        if "fieldRef" in vf:
            env[name] = field_value(pod, vf["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in vf:
            env[name] = resource_field_value(pod, container, vf["resourceFieldRef"], lookup.node_allocatable)
        elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
            kind = "configMapKeyRef" if "configMapKeyRef" in vf else "secretKeyRef"
            ref = vf[kind]
            store = lookup.config_maps if kind == "configMapKeyRef" else lookup.secrets
            value = (store.get((ns, ref.get("name", ""))) or {}).get(ref.get("key", ""))
            if value is None:
                if ref.get("optional"):
                    continue
                raise PodSpecError(f"{where}: env {name}: {kind} {ref.get('name')}/{ref.get('key')} not found")
            env[name] = value
        else:
            raise PodSpecError(f"{where}: env {name}: unsupported valueFrom {sorted(vf)}")
    return env


# ---- images, argv, user -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    """What an OCI image contributes to a container: ENTRYPOINT, CMD, ENV, WORKDIR and USER."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: int = 0


def image_repository(ref: str) -> str:
    """`ghcr.io/meshboot/meshboot-agent:0.1.0@sha256:..` -> `ghcr.io/meshboot/meshboot-agent`."""
    ref = ref.split("@", 1)[0]
    last = ref.rsplit("/", 1)
    if ":" in last[-1]:
        ref = ref[: ref.rfind(":")]
    return ref


def which(cmd: str, path: str) -> str | None:
    """Resolve argv[0] on the container's PATH as the runtime does (names with a slash are taken as they are)."""
    if "/" in cmd:
        return cmd
    for d in path.split(os.pathsep):
        candidate = os.path.join(d, cmd)
        if d and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def container_argv(image: Image, container: Container, env: Mapping[str, str]) -> list[str]:
    """ENTRYPOINT/CMD vs command/args (command replaces both; args alone replace CMD), then `$(VAR)` expansion."""
    command, args = container.get("command"), container.get("args")
    if command:
        argv = [*command, *(args or [])]
    elif args is not None:
        argv = [*image.entrypoint, *args]
    else:
        argv = [*image.entrypoint, *image.cmd]
    if not argv:
        raise PodSpecError(f"container {container.get('name')!r}: no command and the image has no entrypoint")
    argv = [expand(str(a), env) for a in argv]
    resolved = which(argv[0], env.get("PATH", ""))
    if resolved is None:
        raise PodSpecError(f"container {container.get('name')!r}: executable {argv[0]!r} not found in $PATH")
    return [resolved, *argv[1:]]


def run_as(pod: Pod, container: Container, image: Image) -> tuple[int, int]:
    """uid/gid from the container's securityContext, then the pod's, then the image's USER."""
    pod_sc = (pod.get("spec") or {}).get("securityContext") or {}
    sc = container.get("securityContext") or {}
    uid = sc.get("runAsUser", pod_sc.get("runAsUser", image.user))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", uid))  # the image's user's primary group: uid here
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and uid == 0:
        raise PodSpecError(f"container {container.get('name')!r} has runAsNonRoot and would run as root")
    return int(uid), int(gid)


# ---- pod shape ------------------------------------------------------------------------------------------------------
def all_containers(pod: Pod) -> list[Container]:
    spec = pod.get("spec") or {}
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def is_sidecar(container: Container) -> bool:
    """A native sidecar: an init container with restartPolicy Always (started in order, kept running)."""
    return container.get("restartPolicy") == "Always"


def ready_total(pod: Pod) -> int:
    """The denominator of kubectl's READY column: regular containers plus native sidecars."""
    spec = pod.get("spec") or {}
    return len(spec.get("containers") or []) + sum(1 for c in spec.get("initContainers") or [] if is_sidecar(c))


def port_number(container: Container, port: int | str) -> int:
    """A probe's port, resolving a named port against the container's ports."""
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise PodSpecError(f"container {container.get('name')!r}: no port named {port!r}")


def volume_mounts(container: Container) -> Sequence[Mapping[str, Any]]:
    return container.get("volumeMounts") or []
