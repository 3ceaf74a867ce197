"""Keep the webhook configuration's caBundle right, as istiod's webhook cert patcher does.

Patching once at start is not enough: Helm may create the MutatingWebhookConfiguration after the Deployment, the API
server may fail a request, and a `helm upgrade` rewrites the webhook entries (empty caBundle) without restarting the
pod; with `failurePolicy: Fail` every pod creation in an injected namespace is then refused. So each named
configuration is listed, then watched from the list's resourceVersion (a fieldSelector on its name, which RBAC's
resourceNames allows), and whenever any entry's caBundle differs from the current bundle, every entry is patched (one
JSON Patch; a `test` of each entry's name, so a concurrent edit fails the patch instead of being undone). A watch that
ends resumes from the last resourceVersion; 410 Gone, a dropped stream or any failure relists after a bounded back-off
(which is also how a failed patch is retried). The injector is not ready until the bundle was found right once.

Pure core: `stale`, `patch_ops`, `api_error`; the shell is `CABundlePatcher`, one thread per configuration.
"""
from __future__ import annotations

import base64
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from meshboot import jsonsafe
from meshboot.kubewatch import Gone, StreamError, event, lines

log = logging.getLogger("meshboot.webhook.cabundle")

MAX_BODY_BYTES = 4 * 1024 * 1024       # a list of one configuration, or one watch event (etcd keeps < 1.5 MiB)
MAX_DEPTH = 64
WATCH_SECONDS = 300                    # the server ends each watch after this; it is then resumed
BACKOFF = (0.2, 30.0)                  # first and largest wait after a failure
CONNECT_SECONDS = 10.0

PATCHES = Counter("meshboot_webhook_cabundle_patches",
                  "caBundle patches of the webhook configuration, by result (ok, error)", ["result"])


# ---- pure core --------------------------------------------------------------------------------------------------

def _entries(obj: Any) -> list[dict[str, Any]]:
    hooks = obj.get("webhooks") if isinstance(obj, dict) else None
    return [h for h in hooks if isinstance(h, dict)] if isinstance(hooks, list) else []


def stale(obj: Any, bundle_b64: str) -> bool:
    """True when some webhook entry's caBundle is not `bundle_b64` (the configuration needs a patch)."""
    for hook in _entries(obj):
        cfg = hook.get("clientConfig")
        if not isinstance(cfg, dict) or cfg.get("caBundle") != bundle_b64:
            return True
    return False


def patch_ops(obj: Any, bundle_b64: str) -> list[dict[str, Any]]:
    """A JSON Patch setting caBundle on every entry, each guarded by a `test` of the entry's name."""
    ops: list[dict[str, Any]] = []
    hooks = obj.get("webhooks") if isinstance(obj, dict) else None
    for i, hook in enumerate(hooks if isinstance(hooks, list) else []):
        if not isinstance(hook, dict):
            continue            # indexes stay those of the stored list
        ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook.get("name")})
        ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle_b64})
    return ops


def api_error(e: BaseException) -> str:
    """One short line for a failed API call: the HTTP status and the API server's message when it sent a Status."""
    status = getattr(e, "status", None)
    if not isinstance(status, int) or not status:
        return f"{type(e).__name__}: {e}"[:300]
    message = ""
    try:
        body = jsonsafe.load(str(getattr(e, "body", "") or "")[:65536], max_depth=MAX_DEPTH)
        message = str(body.get("message", ""))[:200] if isinstance(body, dict) else ""
    except jsonsafe.JSONRefused:
        pass
    return f"{status} {getattr(e, 'reason', '') or ''}{': ' + message if message else ''}".strip()[:300]


def parse(data: bytes) -> Any:
    try:
        return jsonsafe.load(data.decode("utf-8", "replace"), max_bytes=MAX_BODY_BYTES, max_depth=MAX_DEPTH)
    except jsonsafe.JSONRefused as e:
        raise StreamError(str(e)) from None


def _resource_version(raw: Any) -> str:
    md = raw.get("metadata") if isinstance(raw, dict) else None
    rv = md.get("resourceVersion") if isinstance(md, dict) else None
    return rv if isinstance(rv, str) and 0 < len(rv) <= 64 else ""


# ---- the shell --------------------------------------------------------------------------------------------------

class CABundlePatcher:
    """List + watch one MutatingWebhookConfiguration and keep every entry's caBundle equal to `bundle()`.

    `start()` runs it on a daemon thread until `stop()`; `not_ready_reason()` is the readiness gate: None once the
    bundle has been found right (or patched) once, else why not."""

    def __init__(self, api_client: Any, name: str, bundle: Callable[[], bytes], *,
                 watch_seconds: int = WATCH_SECONDS, backoff: tuple[float, float] = BACKOFF) -> None:
        self.api_client, self.name, self.bundle = api_client, name, bundle
        self.watch_seconds, self.backoff = watch_seconds, backoff
        self.synced_once = False
        self.problem = "not listed yet"
        self.lists = self.watches = 0          # requests made, for tests
        self._stop = threading.Event()
        self._resp: Any = None
        self._thread: threading.Thread | None = None

    def not_ready_reason(self) -> str | None:
        if self.synced_once:
            return None
        return f"caBundle of MutatingWebhookConfiguration {self.name!r} not patched yet: {self.problem}"

    def start(self) -> CABundlePatcher:
        self._thread = threading.Thread(target=self.run, name=f"cabundle-{self.name}"[:40], daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Set the stop event and unblock a read in progress."""
        self._stop.set()
        sock = getattr(getattr(self._resp, "connection", None), "sock", None)
        try:
            if isinstance(sock, socket.socket):
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """List, reconcile, watch; on any failure back off (doubling, capped) and list again."""
        delay = self.backoff[0]
        while not self._stop.is_set():
            try:
                rv = self._relist()
                delay = self.backoff[0]
                while not self._stop.is_set():
                    rv = self._watch(rv)
            except Gone as e:
                log.info("webhook configuration watch expired; relisting", extra={"webhook_config": self.name,
                                                                               "error": str(e)[:300]})
            except Exception as e:  # noqa: BLE001 - any failure: say it, wait, list again
                if self._stop.is_set():
                    break
                self.problem = api_error(e)
                log.warning("caBundle watch or patch failed; retrying", extra={
                    "webhook_config": self.name, "error": self.problem, "retry_in_s": delay})
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff[1])

    def reconcile(self, obj: Any) -> None:
        """Patch every entry when one differs from the current bundle; None (deleted or not yet created) waits."""
        if obj is None:
            self.problem = "the configuration does not exist (yet)"
            return
        md = obj.get("metadata") if isinstance(obj, dict) else None
        if not isinstance(md, dict) or md.get("name") != self.name:
            raise StreamError("an object that is not the watched configuration")
        bundle = base64.b64encode(self.bundle()).decode()
        if not stale(obj, bundle):
            self._synced()
            return
        from kubernetes import client  # noqa: PLC0415 - kubernetes only in a cluster, when asked to patch
        api = client.AdmissionregistrationV1Api(self.api_client)
        try:
            api.patch_mutating_webhook_configuration(self.name, patch_ops(obj, bundle),
                                                     _content_type="application/json-patch+json",
                                                     _request_timeout=(CONNECT_SECONDS, 60))
        except Exception:
            PATCHES.labels("error").inc()
            raise
        PATCHES.labels("ok").inc()
        log.info("patched caBundle", extra={"webhook_config": self.name, "webhooks": len(_entries(obj))})
        self._synced()

    def _synced(self) -> None:
        if not self.synced_once:
            log.info("caBundle in place", extra={"webhook_config": self.name})
        self.synced_once, self.problem = True, ""

    def _call(self, **kw: Any) -> Any:
        from kubernetes import client  # noqa: PLC0415 - as above
        return client.AdmissionregistrationV1Api(self.api_client).list_mutating_webhook_configuration(
            field_selector=f"metadata.name={self.name}", _preload_content=False, **kw)

    def _relist(self) -> str:
        """The configuration (or its absence) reconciled; returns the list's resourceVersion."""
        self.lists += 1
        resp = self._call(_request_timeout=(CONNECT_SECONDS, 60))
        buf = bytearray()
        try:
            for chunk in resp.stream(65536):
                buf += chunk
                if len(buf) > MAX_BODY_BYTES:
                    raise StreamError(f"a list longer than {MAX_BODY_BYTES} bytes")
        finally:
            resp.release_conn()
        body = parse(bytes(buf))
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise StreamError("a list without items")
        self.reconcile(next((i for i in items if isinstance(i, dict)), None))
        return _resource_version(body)

    def _watch(self, rv: str) -> str:
        """One watch from `rv`; returns the last resourceVersion seen when the server ends it. Gone on 410; a
        broken stream raises (the caller relists)."""
        self.watches += 1
        resp = self._call(watch=True, resource_version=rv, allow_watch_bookmarks=True,
                          timeout_seconds=self.watch_seconds,
                          _request_timeout=(CONNECT_SECONDS, self.watch_seconds + 60))
        self._resp = resp
        try:
            for line in lines(resp.stream(65536), MAX_BODY_BYTES):
                rv = self._event(parse(line)) or rv
                if self._stop.is_set():
                    break
        finally:
            self._resp = None
            resp.release_conn()
        return rv

    def _event(self, parsed: Any) -> str:
        """Reconcile on ADDED/MODIFIED/DELETED; returns the event's resourceVersion."""
        kind, raw = event(parsed)
        if kind != "BOOKMARK":
            self.reconcile(None if kind == "DELETED" else raw)
        return _resource_version(raw)
