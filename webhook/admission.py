"""AdmissionReview in, AdmissionReview out (admission.k8s.io/v1 and v1beta1): the webhook's pure request handler.

Every input gets an answer the API server can use: a JSONPatch, no patch (skipped), or `allowed: false` with a
message naming what was wrong. Nothing here raises.
"""
from __future__ import annotations

import base64
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from meshboot import constants as C
from webhook.config import Settings
from webhook.errors import InjectionError
from webhook.inject import ENV_NETWORK, inject_pod
from webhook.patch import make_patch
from webhook.policy import Decision, decide

API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
FALLBACK_API_VERSION = "admission.k8s.io/v1beta1"
INJECTED, SKIPPED, ERROR = "injected", "skipped", "error"


@dataclass
class Outcome:
    """The response document plus what happened, for metrics and logs."""

    response: dict[str, Any]
    result: str                     # injected | skipped | error
    reason: str = ""                # skip reason code, or error message
    pod: str = ""                   # namespace/name-or-generateName, for logs
    patch: list[dict[str, Any]] = field(default_factory=list)


def parse_url_env(path: str) -> dict[str, str]:
    """`/inject/cluster/c1/net/n1` -> {ISTIO_META_CLUSTER_ID: c1, ISTIO_META_NETWORK: n1}; also the legacy
    `/inject/:ENV:cluster=c1:ENV:net=n1` form. `--slash--` in a value stands for '/'."""
    rest = path.split("/inject", 1)[1] if "/inject" in path else ""
    rest = rest.strip("/")
    pairs: list[tuple[str, str]] = []
    if rest.startswith(":ENV:"):
        for item in rest.split(":ENV:"):
            if "=" in item:
                k, v = item.split("=", 1)
                pairs.append((k, v))
    elif rest:
        parts = rest.split("/")
        pairs = [(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
    env: dict[str, str] = {}
    for k, v in pairs:
        if not k:
            continue
        v = v.replace("--slash--", "/")
        name = {"cluster": C.ENV_CLUSTER_ID, "net": ENV_NETWORK}.get(k, k.upper())
        env[name] = v
    return env


def _response(api_version: str, uid: str | None, allowed: bool, patch: list | None = None,
              message: str | None = None) -> dict[str, Any]:
    resp: dict[str, Any] = {"allowed": allowed}
    if uid is not None:
        resp = {"uid": uid, **resp}
    if patch is not None:
        resp["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
        resp["patchType"] = "JSONPatch"
    if message is not None:
        resp["status"] = {"message": message}
    return {"apiVersion": api_version, "kind": "AdmissionReview", "response": resp}


def review(body: bytes | str | dict, settings: Settings, path: str = "/inject") -> Outcome:
    """Decide and inject for one AdmissionReview body; always returns a response document."""
    try:
        doc = json.loads(body) if isinstance(body, (bytes, str)) else body
    except (ValueError, UnicodeDecodeError) as e:
        msg = f"could not decode body as an AdmissionReview: not JSON ({e})"
        return Outcome(_response(FALLBACK_API_VERSION, None, False, message=msg), ERROR, msg)
    if not isinstance(doc, dict):
        msg = "could not decode body as an AdmissionReview: want a JSON object"
        return Outcome(_response(FALLBACK_API_VERSION, None, False, message=msg), ERROR, msg)
    api_version = doc.get("apiVersion")
    api_ok = api_version in API_VERSIONS
    out_version = api_version if api_ok else FALLBACK_API_VERSION
    request = doc.get("request")
    uid = request.get("uid") if isinstance(request, dict) and isinstance(request.get("uid"), str) else None

    def fail(msg: str) -> Outcome:
        return Outcome(_response(out_version, uid, False, message=msg), ERROR, msg)

    if doc.get("kind") != "AdmissionReview":
        return fail(f"could not decode body as an AdmissionReview: kind is {doc.get('kind')!r}, want AdmissionReview")
    if not api_ok:
        return fail(f"could not decode body as an AdmissionReview: apiVersion {api_version!r} is not one of "
                    f"{', '.join(API_VERSIONS)}")
    if not isinstance(request, dict):
        return fail("could not decode body as an AdmissionReview: the request field is missing")
    pod = request.get("object")
    if not isinstance(pod, dict):
        return fail("failed to process pod: request.object is missing or not a JSON object")
    namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or ""
    if not isinstance(namespace, str):
        return fail("failed to process pod: request.namespace: want a string")
    if pod.get("metadata") is not None and not isinstance(pod.get("metadata"), dict):
        return fail("failed to process pod: request.object.metadata: want a JSON object")
    meta = pod.get("metadata") or {}
    label = f"{namespace}/{meta.get('name') or meta.get('generateName') or ''}"
    try:
        if not isinstance(pod.get("spec"), dict):
            raise InjectionError("failed to process pod: request.object.spec is missing (a Pod needs containers)")
        decision: Decision = decide(pod, namespace, settings)
        if not decision.inject:
            return Outcome(_response(out_version, uid, True), SKIPPED, decision.reason, label)
        original = dict(pod)  # the decoded pod as the patch base: managedFields dropped, namespace filled
        if "managedFields" in meta or (namespace and not meta.get("namespace")):
            original["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
            if namespace and not meta.get("namespace"):
                original["metadata"]["namespace"] = namespace
        final = inject_pod(original, settings, namespace=namespace, url_env=parse_url_env(path))
        ops = make_patch(original, final)
    except InjectionError as e:
        return Outcome(_response(out_version, uid, False, message=str(e)), ERROR, str(e), label)
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        # Shapes the validators did not anticipate: still a clear denial, never a 500.
        msg = f"failed to process pod: unexpected pod shape ({type(e).__name__}: {e})"
        return Outcome(_response(out_version, uid, False, message=msg), ERROR, msg, label)
    return Outcome(_response(out_version, uid, True, patch=ops), INJECTED, decision.reason, label, ops)


class ReplicaCache:
    """Answers for pods already seen, keyed by the whole request minus its uid (and the config generation).

    A ReplicaSet's replicas reach the webhook as identical objects (generateName, no name yet), so a scale-up or
    rollout of N replicas costs one injection and N-1 lookups. Bounded LRU; only bodies are stored (bytes).
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, tuple[str, Outcome]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def key(self, body: bytes, uid: str, settings: Settings, path: str) -> tuple | None:
        if self.size <= 0 or len(uid) < 8:
            return None
        return settings.generation, id(settings), path, body.replace(uid.encode(), b"")

    def get(self, key: tuple) -> tuple[str, Outcome] | None:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return hit

    def put(self, key: tuple, value: tuple[str, Outcome]) -> None:
        self._entries[key] = value
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)


def review_bytes(body: bytes, settings: Settings, path: str = "/inject",
                 cache: ReplicaCache | None = None) -> tuple[bytes, Outcome]:
    """`review` as the server needs it: response bytes, with identical pods answered from `cache`."""
    key = None
    if cache is not None:
        try:
            doc = json.loads(body)
            req = doc.get("request") if isinstance(doc, dict) else None
            uid = req.get("uid") if isinstance(req, dict) else None
        except (ValueError, UnicodeDecodeError):
            uid = None
        if isinstance(uid, str):
            key = cache.key(body, uid, settings, path)
        if key is not None:
            hit = cache.get(key)
            if hit is not None:
                template, outcome = hit
                return template.replace(_UID_SLOT, json.dumps(uid)).encode(), outcome
            outcome = review(doc, settings, path)
        else:
            outcome = review(body, settings, path)
    else:
        outcome = review(body, settings, path)
    payload = json.dumps(outcome.response, separators=(",", ":"))
    if key is not None and outcome.result != ERROR:
        # The uid is the response's first field: mark it in the serialized answer for reuse.
        template = payload.replace('"uid":' + json.dumps(uid), '"uid":' + _UID_SLOT, 1)
        cache.put(key, (template, Outcome(outcome.response, outcome.result, outcome.reason, outcome.pod)))
    return payload.encode(), outcome


_UID_MARK = "\x00uid\x00"
_UID_SLOT = json.dumps(_UID_MARK)
