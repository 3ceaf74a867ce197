"""A recorded-fake Kubernetes API server: the real JSON wire format over HTTP, for the parts that talk to one.

No API server runs on these machines, so code that uses the `kubernetes` client (TokenReview, ConfigMaps,
Secrets, namespace watches, MutatingWebhookConfigurations) is tested against this instead. It speaks what
kube-apiserver speaks for those paths: objects with metadata.resourceVersion/uid/creationTimestamp, `*List`
kinds, `Status` errors (404 NotFound, 409 AlreadyExists/Conflict, 403 Forbidden for terminating namespaces),
JSON Patch / merge patch / strategic merge patch (maps only), and chunked `?watch=true` streams of
`{"type","object"}` lines from a resourceVersion. Every request is recorded for assertions.

    with FakeKube() as kube:
        kube.add_namespace("default")
        api = kube.api_client()          # a kubernetes.client.ApiClient pointing at it
        kube.kubeconfig(path)            # or a kubeconfig file for a subprocess
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonpatch

# resource plural -> (apiVersion, kind, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "namespaces": ("v1", "Namespace", False),
    "configmaps": ("v1", "ConfigMap", True),
    "secrets": ("v1", "Secret", True),
    "serviceaccounts": ("v1", "ServiceAccount", True),
    "mutatingwebhookconfigurations": ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration", False),
    "nodes": ("v1", "Node", False),
    "services": ("v1", "Service", True),
    "pods": ("v1", "Pod", True),
    "endpointslices": ("discovery.k8s.io/v1", "EndpointSlice", True),
    "peerauthentications": ("security.istio.io/v1", "PeerAuthentication", True),   # also served as v1beta1
    "authorizationpolicies": ("security.istio.io/v1", "AuthorizationPolicy", True),
}
_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[a-z0-9.-]+/v1(?:beta1)?))"
    r"(?:/namespaces/(?P<ns>[a-z0-9-]+)(?=/))?"
    r"/(?P<plural>[a-z]+)(?:/(?P<name>[A-Za-z0-9._-]+))?$")


def _group(api_version: str) -> str:
    """The API group of an apiVersion ("" for the core group's `v1`)."""
    return api_version.rpartition("/")[0]


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str
    body: Any
    authorization: str
    status: int = 0


@dataclass
class Event:
    rv: int
    type: str
    plural: str
    obj: dict[str, Any]


TokenReviewer = Callable[[dict[str, Any]], dict[str, Any]]


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str, kind: str = "", name: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code}
    if kind or name:
        body["details"] = {"name": name, "kind": kind}
    return body


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also what strategic merge does for plain maps such as data and labels)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class _Server(ThreadingHTTPServer):
    """A listen backlog like a real API server's: the socketserver default of 5 overflows when the local runner's
    controllers, the control plane's informers and a test all connect at once."""

    daemon_threads = True
    request_queue_size = 128


@dataclass
class FakeKube:
    """The fake API server. Thread-safe; start with `with FakeKube() as kube` (binds 127.0.0.1, a free port)."""

    token: str = ""                                      # if set, requests must carry "Bearer <token>"
    token_reviewer: TokenReviewer | None = None
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)   # (plural, ns, name)
    events: list[Event] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    rv: int = 100
    version: dict[str, str] = field(default_factory=lambda: {"major": "1", "minor": "34", "gitVersion": "v1.34.0-fake"})
    host: str = "127.0.0.1"                              # the address to bind (the local node's bridge IP, say)

    def __post_init__(self) -> None:
        self.cond = threading.Condition()
        self.stopping = False
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.failures: dict[tuple[str, str], list[int]] = {}   # (method, path) -> statuses to answer first
        self.unserved: set[str] = set()     # "<group>/<version>/<plural>" answered 404, as without the CRD
        self.compacted = 0                  # watches from an older resourceVersion get 410 Gone (Expired)
        self.drops = 0                      # bumped by drop_watches(): open watch streams break off

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> FakeKube:
        fake = self

        class Handler(_Handler):
            kube = fake

        self.httpd = _Server((self.host, 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fakekube", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self.httpd is not None, "start() first"
        return f"http://{self.host}:{self.httpd.server_address[1]}"

    def api_client(self) -> Any:
        """A kubernetes.client.ApiClient talking to this server."""
        from kubernetes import client
        cfg = client.Configuration(host=self.url)
        if self.token:
            cfg.api_key = {"authorization": self.token}
            cfg.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(cfg)

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig file for this server (a subprocess finds it through $KUBECONFIG)."""
        user: dict[str, Any] = {"token": self.token} if self.token else {}
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
               "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
               "users": [{"name": "fake", "user": user}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}
        path.write_text(json.dumps(doc))
        return path

    # ---- state -----------------------------------------------------------------------------------------------
    def _stamp(self, plural: str, obj: dict[str, Any], new: bool) -> None:
        api_version, kind, _ = RESOURCES[plural]
        obj["apiVersion"], obj["kind"] = api_version, kind
        md = obj.setdefault("metadata", {})
        if new:
            md["uid"] = str(uuid.uuid4())
            md["creationTimestamp"] = _now()
        self.rv += 1
        md["resourceVersion"] = str(self.rv)

    def _emit(self, type_: str, plural: str, obj: dict[str, Any]) -> None:
        self.events.append(Event(self.rv, type_, plural, copy.deepcopy(obj)))
        self.cond.notify_all()

    def put_object(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object directly (test setup); watchers see ADDED/MODIFIED."""
        with self.cond:
            md = obj.setdefault("metadata", {})
            key = (plural, md.get("namespace", "") if RESOURCES[plural][2] else "", md["name"])
            existed = key in self.objects
            obj = copy.deepcopy(obj)
            if existed:
                old = self.objects[key]["metadata"]
                obj["metadata"].update(uid=old["uid"], creationTimestamp=old["creationTimestamp"])
            self._stamp(plural, obj, not existed)
            self.objects[key] = obj
            self._emit("MODIFIED" if existed else "ADDED", plural, obj)
            return copy.deepcopy(obj)

    def add_namespace(self, name: str, labels: dict[str, str] | None = None, phase: str = "Active") -> dict:
        return self.put_object("namespaces", {"metadata": {"name": name, "labels": labels or {}},
                                              "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": phase}})

    def delete_object(self, plural: str, namespace: str, name: str) -> None:
        with self.cond:
            obj = self.objects.pop((plural, namespace, name))
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self._emit("DELETED", plural, obj)

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects.get((plural, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def compact(self) -> int:
        """Forget the event history (etcd compaction): a watch from an older resourceVersion gets 410 Gone."""
        with self.cond:
            self.compacted = self.rv
            self.events.clear()
            return self.compacted

    def drop_watches(self) -> None:
        """Break every open watch stream off mid-stream (no final chunk), as a dropped connection does."""
        with self.cond:
            self.drops += 1
            self.cond.notify_all()

    def fail_next(self, method: str, path: str, *statuses: int) -> None:
        """Answer the next requests to (method, path) with these error statuses (e.g. 500, 409)."""
        with self.cond:
            self.failures.setdefault((method, path), []).extend(statuses)

    def recorded(self, method: str | None = None, path_prefix: str = "") -> list[Recorded]:
        with self.cond:
            return [r for r in self.requests
                    if (method is None or r.method == method) and r.path.startswith(path_prefix)]

    def wait_for(self, pred: Callable[[FakeKube], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.2))
        return True


def _selected(obj: dict[str, Any], namespace: str, field_selector: str) -> bool:
    md = obj.get("metadata", {})
    if namespace and md.get("namespace") != namespace:
        return False
    for term in filter(None, field_selector.split(",")):
        k, _, v = term.partition("=")
        neg = k.endswith("!")
        k = k.rstrip("!")
        actual = {"metadata.name": md.get("name"), "metadata.namespace": md.get("namespace")}.get(k)
        if (actual == v.lstrip("=")) == neg:
            return False
    return True


def _event_line(type_: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": type_, "object": obj}).encode() + b"\n"


class _Handler(BaseHTTPRequestHandler):
    kube: FakeKube
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:   # quiet
        pass

    # ---- plumbing --------------------------------------------------------------------------------------------
    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if self._rec:
            self._rec.status = code

    def _error(self, code: int, reason: str, message: str, kind: str = "", name: str = "") -> None:
        self._send(code, status_body(code, reason, message, kind, name))

    def _dispatch(self, method: str) -> None:
        k = self.kube
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
            self._rec = None
            return self._error(400, "BadRequest", "the request body is not JSON")
        self._rec = Recorded(method, url.path, query, ctype, body, self.headers.get("Authorization") or "")
        with k.cond:
            k.requests.append(self._rec)
            k.cond.notify_all()
            injected = k.failures.get((method, url.path))
            fail = injected.pop(0) if injected else None
        if k.token and self._rec.authorization != f"Bearer {k.token}":
            return self._error(401, "Unauthorized", "Unauthorized")
        if fail:
            return self._error(fail, {409: "Conflict", 404: "NotFound", 403: "Forbidden"}.get(fail, "InternalError"),
                               f"injected failure {fail}")
        if url.path == "/apis/authentication.k8s.io/v1/tokenreviews" and method == "POST":
            return self._token_review(body)
        if url.path in ("/version", "/version/"):
            return self._send(200, k.version)
        m = _PATH.match(url.path)
        if not m or m.group("plural") not in RESOURCES:
            return self._error(404, "NotFound", "the server could not find the requested resource")
        plural, ns, name = m.group("plural"), m.group("ns") or "", m.group("name")
        if _group(m.group("group") or "v1") != _group(RESOURCES[plural][0]):
            # kube-apiserver serves a resource under its own group only (no pods under /apis/..., no CRD under /api/v1)
            return self._error(404, "NotFound", "the server could not find the requested resource")
        if f"{m.group('group') or 'v1'}/{plural}" in k.unserved:
            return self._error(404, "NotFound", "the server could not find the requested resource")
        namespaced = RESOURCES[plural][2]
        if plural == "namespaces" and ns:
            return self._error(404, "NotFound", "the server could not find the requested resource")
        if namespaced is False and ns:
            return self._error(404, "NotFound", "the server could not find the requested resource")
        if name is None:
            if method == "GET":
                return self._watch(plural, ns, query) if query.get("watch", [""])[0] in ("true", "1") \
                    else self._list(plural, ns, query)
            if method == "POST":
                return self._create(plural, ns, body)
            return self._error(405, "MethodNotAllowed", f"{method} is not supported on a collection")
        key = (plural, ns if namespaced else "", name)
        if method == "GET":
            with k.cond:
                obj = k.objects.get(key)
            if obj is None:
                return self._error(404, "NotFound", f'{plural} "{name}" not found', plural, name)
            return self._send(200, obj)
        if method == "PUT":
            return self._replace(key, body)
        if method == "PATCH":
            return self._patch(key, ctype, body)
        if method == "DELETE":
            with k.cond:
                if key not in k.objects:
                    return self._error(404, "NotFound", f'{plural} "{name}" not found', plural, name)
                k.delete_object(*key)
            return self._send(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                    "details": {"name": name, "kind": plural}})
        return self._error(405, "MethodNotAllowed", f"{method} is not supported")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ---- verbs -----------------------------------------------------------------------------------------------
    def _namespace_problem(self, plural: str, ns: str) -> bool:
        if not RESOURCES[plural][2]:
            return False
        nso = self.kube.objects.get(("namespaces", "", ns))
        if nso is None:
            self._error(404, "NotFound", f'namespaces "{ns}" not found', "namespaces", ns)
            return True
        if nso.get("status", {}).get("phase") == "Terminating":
            self._error(403, "Forbidden", f"{plural} is forbidden: unable to create new content in namespace {ns} "
                                          "because it is being terminated")
            return True
        return False

    def _create(self, plural: str, ns: str, body: Any) -> None:
        k = self.kube
        if not isinstance(body, dict) or not body.get("metadata", {}).get("name"):
            return self._error(422, "Invalid", f"{plural}: metadata.name: Required value")
        md = body["metadata"]
        if RESOURCES[plural][2]:
            if md.get("namespace", ns) != ns:
                return self._error(400, "BadRequest", "the namespace of the provided object does not match the "
                                                      "namespace sent on the request")
            md["namespace"] = ns
        key = (plural, ns, md["name"])
        with k.cond:
            if self._namespace_problem(plural, ns):
                return None
            if key in k.objects:
                return self._error(409, "AlreadyExists", f'{plural} "{md["name"]}" already exists', plural,
                                   md["name"])
            obj = copy.deepcopy(body)
            k._stamp(plural, obj, True)
            k.objects[key] = obj
            k._emit("ADDED", plural, obj)
        return self._send(201, obj)

    def _replace(self, key: tuple[str, str, str], body: Any) -> None:
        k = self.kube
        with k.cond:
            cur = k.objects.get(key)
            if cur is None:
                return self._error(404, "NotFound", f'{key[0]} "{key[2]}" not found', key[0], key[2])
            want_rv = (body or {}).get("metadata", {}).get("resourceVersion")
            if want_rv and want_rv != cur["metadata"]["resourceVersion"]:
                return self._error(409, "Conflict", f'Operation cannot be fulfilled on {key[0]} "{key[2]}": the '
                                                    "object has been modified; please apply your changes to the "
                                                    "latest version and try again", key[0], key[2])
            obj = copy.deepcopy(body)
            obj["metadata"].update({"uid": cur["metadata"]["uid"],
                                    "creationTimestamp": cur["metadata"]["creationTimestamp"]})
            k._stamp(key[0], obj, False)
            k.objects[key] = obj
            k._emit("MODIFIED", key[0], obj)
        return self._send(200, obj)

    def _patch(self, key: tuple[str, str, str], ctype: str, body: Any) -> None:
        k = self.kube
        with k.cond:
            cur = k.objects.get(key)
            if cur is None:
                return self._error(404, "NotFound", f'{key[0]} "{key[2]}" not found', key[0], key[2])
            try:
                if ctype == "application/json-patch+json":
                    obj = jsonpatch.apply_patch(cur, body)
                elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                    obj = merge_patch(cur, body)
                else:
                    return self._error(415, "UnsupportedMediaType", f"the body of the request was in an unknown "
                                                                     f"format - accepted media types include: "
                                                                     f"application/json-patch+json, application/"
                                                                     f"merge-patch+json, application/strategic-"
                                                                     f"merge-patch+json ({ctype!r})")
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                return self._error(422, "Invalid", f"the server rejected our request due to an error in our "
                                                   f"request: {e}")
            k._stamp(key[0], obj, False)
            k.objects[key] = obj
            k._emit("MODIFIED", key[0], obj)
        return self._send(200, obj)

    def _list(self, plural: str, ns: str, query: dict[str, list[str]]) -> None:
        k = self.kube
        sel = query.get("fieldSelector", [""])[0]
        with k.cond:
            items = [copy.deepcopy(o) for (p, _, _), o in sorted(k.objects.items()) if p == plural and
                     _selected(o, ns, sel)]
            rv = str(k.rv)
        api_version, kind, _ = RESOURCES[plural]
        return self._send(200, {"apiVersion": api_version, "kind": f"{kind}List",
                                "metadata": {"resourceVersion": rv}, "items": items})

    def _watch(self, plural: str, ns: str, query: dict[str, list[str]]) -> None:
        k = self.kube
        sel = query.get("fieldSelector", [""])[0]
        timeout = float(query.get("timeoutSeconds", ["1800"])[0])
        bookmarks = query.get("allowWatchBookmarks", [""])[0] == "true"
        with k.cond:
            since = int(query.get("resourceVersion", ["0"])[0] or 0) or k.rv
            expired, drops = since < k.compacted, k.drops
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self._rec:
            self._rec.status = 200
        deadline = time.monotonic() + timeout
        try:
            if expired:
                return self._watch_end([_event_line("ERROR", status_body(
                    410, "Expired", f"too old resource version: {since} ({k.compacted})"))])
            while True:
                with k.cond:
                    if k.drops != drops:
                        self.close_connection = True
                        return self.connection.shutdown(2)   # socket.SHUT_RDWR: no final chunk
                    pending = [e for e in k.events if e.rv > since and e.plural == plural and
                               _selected(e.obj, ns, sel)]
                    since = max(since, k.rv)
                    if not pending:
                        if k.stopping or time.monotonic() >= deadline:
                            break
                        if k.drops != drops:
                            continue
                        k.cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                        continue
                self._chunks([_event_line(e.type, e.obj) for e in pending])
            api_version, kind, _ = RESOURCES[plural]
            self._watch_end([_event_line("BOOKMARK", {"apiVersion": api_version, "kind": kind, "metadata": {
                "resourceVersion": str(since)}})] if bookmarks else [])
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        self.close_connection = True

    def _chunks(self, lines: list[bytes]) -> None:
        for line in lines:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()

    def _watch_end(self, lines: list[bytes]) -> None:
        self._chunks(lines)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        self.close_connection = True

    def _token_review(self, body: Any) -> None:
        k = self.kube
        if not isinstance(body, dict) or not isinstance(body.get("spec"), dict) or not body["spec"].get("token"):
            return self._error(422, "Invalid", "TokenReview.authentication.k8s.io: spec.token: Required value")
        spec = body["spec"]
        if k.token_reviewer is None:
            return self._error(500, "InternalError", "no token reviewer configured in the fake API server")
        status = k.token_reviewer(spec)
        return self._send(201, {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                                "metadata": {"creationTimestamp": None}, "spec": spec, "status": status})


def jwks_token_reviewer(jwks: dict[str, Any], issuer: str, api_audiences: tuple[str, ...] = (
        "https://kubernetes.default.svc.cluster.local",)) -> TokenReviewer:
    """What kube-apiserver does for a projected token: verify it with its signing keys and the audiences."""
    import jwt

    keys = {k["kid"]: jwt.PyJWK(k).key for k in jwks["keys"]}

    def review(spec: dict[str, Any]) -> dict[str, Any]:
        wanted = spec.get("audiences") or list(api_audiences)
        token = spec["token"]
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            claims = jwt.decode(token, keys[kid], algorithms=["RS256", "ES256"], issuer=issuer, audience=wanted)
        except (KeyError, jwt.InvalidTokenError) as e:
            return {"authenticated": False, "user": {}, "error": f"[invalid bearer token, {e}]"}
        k8s = claims.get("kubernetes.io", {})
        ns, sa = k8s.get("namespace"), k8s.get("serviceaccount", {})
        got = [a for a in claims["aud"] if a in wanted] if isinstance(claims["aud"], list) else [claims["aud"]]
        return {"authenticated": True,
                "user": {"username": f"system:serviceaccount:{ns}:{sa.get('name')}", "uid": sa.get("uid"),
                         "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}",
                                    "system:authenticated"],
                         "extra": {"authentication.kubernetes.io/pod-name": [k8s.get("pod", {}).get("name")],
                                   "authentication.kubernetes.io/pod-uid": [k8s.get("pod", {}).get("uid")]}},
                "audiences": got}

    return review
