"""AdmissionReview in, AdmissionReview out (admission.k8s.io/v1 and v1beta1): the webhook's pure request handler.

Every input gets an answer the API server can use: a JSONPatch, no patch (skipped), or `allowed: false` with a
message naming what was wrong. Nothing here raises.
"""
from __future__ import annotations

import base64
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from meshboot import constants as C
from webhook.config import Settings, shown
from webhook.errors import InjectionError
from webhook.inject import ENV_NETWORK, inject_pod, validate_meta_shape
from webhook.patch import make_patch
from webhook.policy import Decision, decide

API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
FALLBACK_API_VERSION = "admission.k8s.io/v1beta1"
INJECTED, SKIPPED, ERROR = "injected", "skipped", "error"
# Bounds on every answer: the whole AdmissionReview response (patch included), the echoed uid (Kubernetes sends a
# 36-character UUID), a denial's message, and how deeply the request body may nest (a Pod is ~15 levels deep).
MAX_RESPONSE_BYTES = 1024 * 1024
MAX_UID_CHARS = 256
MAX_MESSAGE_CHARS = 4096
MAX_BODY_DEPTH = 64
_ENVELOPE_BYTES = 1024      # apiVersion, kind, uid, allowed, patchType around the base64 patch


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


_orjson: ModuleType | None
try:  # the webhook extra installs orjson; without it every document takes the json module's (slower) path
    import orjson as _orjson
except ImportError:  # pragma: no cover
    _orjson = None

# ---- JSON: orjson where it gives exactly what the json module gives, the json module everywhere else ----------------

_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 19   # 19+ digits in a row: maybe an integer beyond 64 bits (orjson would make it a float)
_SHORT_NEG_EXPONENT = re.compile(rb"e-[1-9][,\]}]")   # orjson's 1e-7 (json's 1e-07)


def _decode(body: bytes | str) -> tuple[Any, bool]:
    """json.loads(body), and whether orjson read it: then it holds no NaN/Infinity and no integer beyond 64 bits.

    orjson refuses what it reads differently (NaN, 1e400, lone surrogates, UTF-16...): the json module then reads
    it, or raises its own error, as before."""
    if _orjson is not None and isinstance(body, bytes) and _LONG_NUMBER not in body.translate(_DIGITS):
        try:
            return _orjson.loads(body), True
        except _orjson.JSONDecodeError:
            pass
    try:
        return json.loads(body), False
    except RecursionError:  # the json module recurses per level; deeper than orjson's 1024 is refused anyway
        raise ValueError(f"nested deeper than {MAX_BODY_DEPTH} levels") from None


def _openers(body: Any) -> int:
    """How many arrays and objects a JSON text can open: a bound on its depth (C speed; most pods have < 64).
    Not text (an already decoded body): no bound known."""
    if isinstance(body, bytes):
        return body.count(b"[") + body.count(b"{")
    if isinstance(body, str):
        return body.count("[") + body.count("{")
    return MAX_BODY_DEPTH + 1


def _too_deep(value: Any, limit: int = MAX_BODY_DEPTH) -> bool:
    """Whether `value` nests deeper than `limit`: every later step (diff, copy, encode) recurses per level."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        for child in (v.values() if type(v) is dict else v):
            if type(child) is dict or type(child) is list:
                stack.append((child, d + 1))
    return False


_compact = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(obj, separators=(",", ":"))


def _encode_exact(obj: Any) -> bytes:
    return _compact(obj).encode()


def _encode(obj: Any) -> bytes:
    """Byte for byte `json.dumps(obj, separators=(",", ":")).encode()`, for data without NaN/Infinity.

    orjson writes the same compact JSON except for non-ASCII and DEL characters (json escapes them) and floats
    below 1e-4 (0.00001, 1e-7 vs 1e-05, 1e-07); those, and what orjson refuses (integers beyond 64 bits), go to the
    json module."""
    if _orjson is not None:
        try:
            out = _orjson.dumps(obj)
        except TypeError:
            return _encode_exact(obj)
        if (out.isascii() and b"\x7f" not in out and b"0.0000" not in out
                and (b"e-" not in out or _SHORT_NEG_EXPONENT.search(out) is None)):  # the regex only if it may match
            return out
    return _encode_exact(obj)


def _finite(value: Any) -> bool:
    """No NaN or Infinity anywhere in `value` (orjson would write null where json writes NaN)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


_settings_finite: dict[int, tuple[Settings, bool]] = {}


def _fast_patch(settings: Settings) -> bool:
    """Whether orjson may write the patch: no NaN/Infinity can reach it from the settings.

    (The pod itself was read by orjson, and the JSON annotations the injection copies into it by meshboot/jsonsafe,
    which refuses non-finite numbers: neither holds any.)"""
    hit = _settings_finite.get(id(settings))
    if hit is None or hit[0] is not settings:
        if len(_settings_finite) >= 8:
            _settings_finite.clear()
        try:
            finite = _finite(settings.values) and _finite(settings.mesh)
        except RecursionError:  # a self-referencing YAML alias: leave it to the json module
            finite = False
        hit = _settings_finite[id(settings)] = (settings, finite)
    return hit[1]


def _response(api_version: str, uid: str | None, allowed: bool, patch: str | None = None,
              message: str | None = None) -> dict[str, Any]:
    """The AdmissionReview answer; `patch` already base64; a message longer than MAX_MESSAGE_CHARS is cut."""
    resp: dict[str, Any] = {"allowed": allowed}
    if uid is not None:
        resp = {"uid": uid, **resp}
    if patch is not None:
        resp["patch"] = patch
        resp["patchType"] = "JSONPatch"
    if message is not None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS - 40] + f" ... ({len(message)} characters in all)"
        resp["status"] = {"message": message}
    return {"apiVersion": api_version, "kind": "AdmissionReview", "response": resp}


def _not_json(e: Exception) -> Outcome:
    msg = f"could not decode body as an AdmissionReview: not JSON ({e})"
    return Outcome(_response(FALLBACK_API_VERSION, None, False, message=msg), ERROR, msg)


def _patch_b64(ops: list[dict[str, Any]], fast: bool, pod: dict[str, Any]) -> str:
    """The patch as base64, or InjectionError when the answer would exceed MAX_RESPONSE_BYTES."""
    raw = _encode(ops) if fast else _encode_exact(ops)
    size = (len(raw) + 2) // 3 * 4
    if size > MAX_RESPONSE_BYTES - _ENVELOPE_BYTES:
        raise InjectionError(f"failed to process pod: the injection patch would be {size} bytes, over the "
                             f"{MAX_RESPONSE_BYTES}-byte limit on an answer; {_culprit(pod)}")
    return base64.b64encode(raw).decode()


# Annotations whose values the injection copies into the patch (env, args, volumes, containers).
_COPIED = frozenset(v for k, v in vars(C).items() if k.startswith("ANNOTATION_") and isinstance(v, str))


def _culprit(pod: dict[str, Any]) -> str:
    """The tenant input that made the patch large: the largest copied annotation, else the pod's own spec."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    sizes = {k: len(v) for k, v in annotations.items() if k in _COPIED or k.startswith(C.ANNOTATION_READINESS_PREFIX)}
    if sizes and max(sizes.values()) >= 4096:
        key = max(sizes, key=sizes.__getitem__)
        return f"shrink annotation '{key}' ({sizes[key]} characters)"
    return "shrink request.object.spec (the pod's containers are copied into the patch)"


def review(body: bytes | str | dict, settings: Settings, path: str = "/inject") -> Outcome:
    """Decide and inject for one AdmissionReview body; always returns a response document."""
    fast = False
    try:
        if isinstance(body, (bytes, str)):
            doc, fast = _decode(body)
        else:
            doc = body
    except (ValueError, UnicodeDecodeError) as e:
        return _not_json(e)
    return _review(doc, settings, path, fast, _openers(body) <= MAX_BODY_DEPTH)


def _review(doc: Any, settings: Settings, path: str, fast: bool, shallow: bool = False) -> Outcome:
    """`review` of a decoded body; `fast`: the body was read by orjson (see `_decode`); `shallow`: the body has too
    few brackets to nest deeper than MAX_BODY_DEPTH (`_openers`), so the depth walk is skipped."""
    if not isinstance(doc, dict):
        msg = "could not decode body as an AdmissionReview: want a JSON object"
        return Outcome(_response(FALLBACK_API_VERSION, None, False, message=msg), ERROR, msg)
    api_version = doc.get("apiVersion")
    api_ok = api_version in API_VERSIONS
    out_version = str(api_version) if api_ok else FALLBACK_API_VERSION   # api_ok: one of the strings
    request = doc.get("request")
    uid = request.get("uid") if isinstance(request, dict) and isinstance(request.get("uid"), str) else None
    long_uid = uid is not None and len(uid) > MAX_UID_CHARS
    if long_uid:
        uid = None

    def fail(msg: str) -> Outcome:
        return Outcome(_response(out_version, uid, False, message=msg), ERROR, msg)

    if doc.get("kind") != "AdmissionReview":
        return fail(f"could not decode body as an AdmissionReview: kind is {shown(doc.get('kind'))}, want "
                    "AdmissionReview")
    if not api_ok:
        return fail(f"could not decode body as an AdmissionReview: apiVersion {shown(api_version)} is not one of "
                    f"{', '.join(API_VERSIONS)}")
    if not isinstance(request, dict):
        return fail("could not decode body as an AdmissionReview: the request field is missing")
    if long_uid:
        return fail(f"could not decode body as an AdmissionReview: request.uid is longer than {MAX_UID_CHARS} "
                    "characters")
    if not shallow and _too_deep(request):
        return fail(f"could not decode body as an AdmissionReview: request nested deeper than {MAX_BODY_DEPTH} "
                    "levels")
    return _review_pod(request, settings, path, fast, out_version, uid)


def _review_pod(request: dict[str, Any], settings: Settings, path: str, fast: bool, out_version: str,
                uid: str | None) -> Outcome:
    """The pod part of `_review`: shape, policy, injection, patch; every refusal names the field."""
    def fail(msg: str, label: str = "") -> Outcome:
        return Outcome(_response(out_version, uid, False, message=msg), ERROR, msg, label)

    pod = request.get("object")
    if not isinstance(pod, dict):
        return fail("failed to process pod: request.object is missing or not a JSON object")
    if pod.get("metadata") is not None and not isinstance(pod.get("metadata"), dict):
        return fail("failed to process pod: request.object.metadata: want a JSON object")
    meta = pod.get("metadata") or {}
    namespace = request.get("namespace") or meta.get("namespace") or ""
    if not isinstance(namespace, str):
        return fail("failed to process pod: request.namespace: want a string")
    label = f"{namespace}/{shown(meta.get('name') or meta.get('generateName') or '')[1:-1]}"
    try:
        if not isinstance(pod.get("spec"), dict):
            raise InjectionError("failed to process pod: request.object.spec is missing (a Pod needs containers)")
        validate_meta_shape(pod.get("metadata"))  # what the policy reads; inject_pod checks the rest
        decision: Decision = decide(pod, namespace, settings)
        if not decision.inject:
            return Outcome(_response(out_version, uid, True), SKIPPED, decision.reason, label)
        original = dict(pod)  # the decoded pod as the patch base: managedFields dropped, namespace filled
        if pod.get("metadata") is None:
            original.pop("metadata", None)  # the patch adds /metadata whole: valid on a null or a missing member
        elif "managedFields" in meta or (namespace and not meta.get("namespace")):
            original["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
            if namespace and not meta.get("namespace"):
                original["metadata"]["namespace"] = namespace
        final = inject_pod(original, settings, namespace=namespace, url_env=parse_url_env(path))
        ops = make_patch(original, final)
        patch = _patch_b64(ops, fast and _fast_patch(settings), pod)
    except InjectionError as e:
        return fail(str(e), label)
    except (TypeError, AttributeError, KeyError, ValueError, RecursionError):
        # A shape the validators did not anticipate (a bug): still one clear denial, never a 500 or a traceback.
        return fail("failed to process pod: request.object has a shape the injector cannot read", label)
    return Outcome(_response(out_version, uid, True, patch=patch), INJECTED, decision.reason, label, ops)


class ReplicaCache:
    """Answers for pods already seen, keyed by the decoded review with only `request.uid` taken out (and the config
    generation and path).

    A ReplicaSet's replicas reach the webhook as identical objects (generateName, no name yet), so a scale-up or
    rollout of N replicas costs one injection and N-1 lookups. Bounded LRU; only bodies are stored (bytes).
    The uid is removed structurally, never by searching the body's bytes: a uid chosen to equal a substring of
    another pod's request (an image name, say) must not make two different requests share a key.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, tuple[bytes, Outcome]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def key(self, doc: dict[str, Any], settings: Settings, path: str, fast: bool) -> tuple | None:
        """The review re-encoded without request.uid: equal keys mean equal decoded requests, hence equal answers.

        `fast` (orjson read the body: no NaN, no huge integers) picks orjson, else the json module, which keeps
        NaN apart from null; it is part of the key, so the two encodings never meet."""
        request = doc["request"]
        if self.size <= 0:
            return None
        rest = {**doc, "request": {k: v for k, v in request.items() if k != "uid"}}
        try:
            canon = _orjson.dumps(rest) if fast and _orjson is not None else _encode_exact(rest)
        except (TypeError, ValueError, RecursionError):  # too deep, or not encodable: answer without the cache
            return None
        return settings.generation, id(settings), path, fast, canon

    def get(self, key: tuple) -> tuple[bytes, Outcome] | None:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return hit

    def put(self, key: tuple, value: tuple[bytes, Outcome]) -> None:
        self._entries[key] = value
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)


def review_bytes(body: bytes, settings: Settings, path: str = "/inject",
                 cache: ReplicaCache | None = None) -> tuple[bytes, Outcome]:
    """`review` as the server needs it: response bytes, with identical pods answered from `cache`."""
    try:
        doc, fast = _decode(body)
    except (ValueError, UnicodeDecodeError) as e:
        outcome = _not_json(e)
        return _encode(outcome.response), outcome
    key = uid = None
    if cache is not None:
        req = doc.get("request") if isinstance(doc, dict) else None
        uid = req.get("uid") if isinstance(req, dict) else None
        if isinstance(uid, str) and len(uid) <= MAX_UID_CHARS:
            key = cache.key(doc, settings, path, fast)
        if key is not None:
            hit = cache.get(key)
            if hit is not None:
                template, outcome = hit
                return template.replace(_UID_SLOT, json.dumps(uid).encode()), outcome
    outcome = _review(doc, settings, path, fast, _openers(body) <= MAX_BODY_DEPTH)
    payload = _encode(outcome.response)  # strings and booleans only
    if cache is not None and key is not None and outcome.result != ERROR:   # a key only with a cache
        # The uid is the response's first field: mark it in the serialized answer for reuse.
        template = payload.replace(b'"uid":' + json.dumps(uid).encode(), b'"uid":' + _UID_SLOT, 1)
        if template != payload:
            cache.put(key, (template, Outcome(outcome.response, outcome.result, outcome.reason, outcome.pod)))
    return payload, outcome


_UID_MARK = "\x00uid\x00"
_UID_SLOT = json.dumps(_UID_MARK).encode()
