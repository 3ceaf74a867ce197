"""Informers: list, then watch from the list's resourceVersion, for each kind discovery reads (the shell).

One thread per kind (the `kubernetes` client is synchronous), each writing into one `Store`:
- a paged list replaces the kind in the store (so anything a broken watch missed shows up as changed), then a
  watch with bookmarks from the list's resourceVersion applies each event in the order the server sent it;
- a watch that ends (its timeoutSeconds) or breaks off resumes from the last resourceVersion it saw; 410 Gone (the
  history was compacted) relists; any other failure backs off (capped) and relists;
- PeerAuthentication and AuthorizationPolicy are security.istio.io v1, else v1beta1; without the CRD (404) the kind
  is empty and synced, checked again every `absent_retry` seconds, and said once in the log.
Bodies and event lines are read with byte caps and parsed with `meshboot.jsonsafe`; objects are cut down by
`discovery.kinds`. The control plane subscribes with `Watcher.subscribe_on_loop` (its asyncio loop).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from meshboot import jsonsafe
from meshboot.kubewatch import Gone, StreamError, event, lines

from . import kinds
from .store import Store, Subscriber, on_loop

log = logging.getLogger("meshboot.discovery")

MAX_PAGE_BYTES = 64 * 1024 * 1024      # one list page (PAGE objects)
MAX_EVENT_BYTES = 4 * 1024 * 1024      # one watch event line (etcd keeps objects under 1.5 MiB)
MAX_DEPTH = 64
PAGE = 250
WATCH_SECONDS = 300                    # the server ends each watch after this; it is then resumed
BACKOFF = (0.2, 30.0)                  # first and largest wait after a failure
ABSENT_RETRY = 30.0                    # how often a missing CRD is looked for again
CONNECT_SECONDS = 10.0


@dataclass(frozen=True)
class Resource:
    """One watched kind: its API versions in order of preference and its plural."""

    kind: str
    versions: tuple[str, ...]
    plural: str
    optional: bool = False              # a 404 means "not installed", not an error


RESOURCES = (
    Resource("Namespace", ("v1",), "namespaces"),
    Resource("Service", ("v1",), "services"),
    Resource("EndpointSlice", ("discovery.k8s.io/v1",), "endpointslices"),
    Resource("Pod", ("v1",), "pods"),
    Resource("PeerAuthentication", ("security.istio.io/v1", "security.istio.io/v1beta1"), "peerauthentications",
             optional=True),
    Resource("AuthorizationPolicy", ("security.istio.io/v1", "security.istio.io/v1beta1"), "authorizationpolicies",
             optional=True),
)


def lister(api_client: Any, resource: Resource, api_version: str) -> Callable[..., Any]:
    """The client's list-or-watch call for `resource` across all namespaces."""
    from kubernetes import client  # noqa: PLC0415 - the kubernetes client only where discovery runs
    plain: dict[str, Callable[..., Any]] = {"namespaces": client.CoreV1Api(api_client).list_namespace,
             "services": client.CoreV1Api(api_client).list_service_for_all_namespaces,
             "pods": client.CoreV1Api(api_client).list_pod_for_all_namespaces,
             "endpointslices": client.DiscoveryV1Api(api_client).list_endpoint_slice_for_all_namespaces}
    if resource.plural in plain:
        return plain[resource.plural]
    group, _, version = api_version.rpartition("/")
    custom = client.CustomObjectsApi(api_client).list_cluster_custom_object

    def call(**kw: Any) -> Any:
        return custom(group, version, resource.plural, **kw)
    return call


def parse(data: bytes, cap: int) -> Any:
    """One JSON document with the shared bounds; StreamError when refused."""
    try:
        return jsonsafe.load(data.decode("utf-8", "replace"), max_bytes=cap, max_depth=MAX_DEPTH)
    except jsonsafe.JSONRefused as e:
        raise StreamError(str(e)) from None


def resource_version(raw: Any) -> str:
    md = raw.get("metadata") if isinstance(raw, dict) else None
    rv = md.get("resourceVersion") if isinstance(md, dict) else None
    return rv if isinstance(rv, str) and 0 < len(rv) <= 64 else ""


def _status_code(exc: BaseException) -> int:
    code = getattr(exc, "status", 0)
    return code if isinstance(code, int) else 0


class Informer:
    """List-and-watch of one kind into the store; `run()` is the thread's body, until `stop()`."""

    def __init__(self, api_client: Any, resource: Resource, store: Store, stop: threading.Event, *,
                 watch_seconds: int = WATCH_SECONDS, page: int = PAGE, absent_retry: float = ABSENT_RETRY,
                 backoff: tuple[float, float] = BACKOFF) -> None:
        self.api_client, self.resource, self.store, self._stop = api_client, resource, store, stop
        self.watch_seconds, self.page, self.absent_retry, self.backoff = watch_seconds, page, absent_retry, backoff
        self.api_version = resource.versions[0]
        self.rv = ""
        self.lists = self.watches = 0          # requests made, for tests and /debug
        self._absent_said = False
        self._resp: Any = None

    def run(self) -> None:
        delay = self.backoff[0]
        while not self._stop.is_set():
            try:
                self._list_and_watch()
                delay = self.backoff[0]
            except Gone as e:
                log.info("discovery watch expired; relisting", extra={"kind": self.resource.kind, "error": str(e)})
            except Exception as e:          # noqa: BLE001 - any failure: wait, then list again
                if self._stop.is_set():
                    break
                if self.resource.optional and _status_code(e) == 404:
                    self._absent()
                    continue
                if _status_code(e) == 410:      # an expired continue token: list again from the start
                    continue
                log.warning("discovery watch failed; relisting", extra={"kind": self.resource.kind,
                                                                        "error": f"{type(e).__name__}: {e}"[:500]})
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff[1])

    def stop(self) -> None:
        """Unblock a read in progress (the thread then sees the stop event)."""
        resp = self._resp
        sock = getattr(getattr(resp, "connection", None), "sock", None)
        try:
            if isinstance(sock, socket.socket):      # what urllib3's HTTPResponse.shutdown() does (2.3+)
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _list_and_watch(self) -> None:
        self.rv = self._relist()
        while not self._stop.is_set():
            self._watch()

    def _absent(self) -> None:
        """No CRD: nothing of this kind exists; say so once, look again later."""
        if not self._absent_said:
            log.warning("discovery: %s is not served by the API server (no CRD?); treating as none, retrying every"
                        " %ss", self.resource.kind, self.absent_retry, extra={"kind": self.resource.kind})
            self._absent_said = True
        self.store.replace(self.resource.kind, {})
        self._stop.wait(self.absent_retry)

    def _relist(self) -> str:
        """The whole kind, page by page, into the store; returns the list's resourceVersion."""
        for api_version in self.resource.versions:
            try:
                return self._list(api_version)
            except Exception as e:
                if not (self.resource.optional and _status_code(e) == 404) or api_version == self.resource.versions[-1]:
                    raise
        raise AssertionError("unreachable")

    def _list(self, api_version: str) -> str:
        call, objects, cont, rv = lister(self.api_client, self.resource, api_version), {}, "", ""
        while True:
            self.lists += 1
            kw: dict[str, Any] = {"limit": self.page, "_continue": cont} if cont else {"limit": self.page}
            body = self._read(call(_preload_content=False, _request_timeout=(CONNECT_SECONDS, 120), **kw))
            items = body.get("items") if isinstance(body, dict) else None
            if not isinstance(items, list):
                raise StreamError("a list without items")
            for raw in items:
                if (kept := self._keep(raw, api_version)) is not None:
                    objects[kinds.key_of(kept)] = kept
            md = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
            cont, rv = md.get("continue") or "", resource_version(body)
            if not isinstance(cont, str) or not cont:
                break
        if self._absent_said:
            log.info("discovery: %s is served again", self.resource.kind, extra={"kind": self.resource.kind})
            self._absent_said = False
        self.api_version = api_version
        self.store.replace(self.resource.kind, objects)
        return rv

    def _read(self, resp: Any) -> Any:
        self._resp = resp
        try:
            buf = bytearray()
            for chunk in resp.stream(65536):
                buf += chunk
                if len(buf) > MAX_PAGE_BYTES:
                    raise StreamError(f"a list page longer than {MAX_PAGE_BYTES} bytes")
            return parse(bytes(buf), MAX_PAGE_BYTES)
        finally:
            self._resp = None
            resp.release_conn()

    def _watch(self) -> None:
        """One watch request from self.rv; returns when the stream ends or breaks off (resume), raises Gone."""
        call = lister(self.api_client, self.resource, self.api_version)
        self.watches += 1
        resp = call(watch=True, resource_version=self.rv, allow_watch_bookmarks=True,
                    timeout_seconds=self.watch_seconds, _preload_content=False,
                    _request_timeout=(CONNECT_SECONDS, self.watch_seconds + 60))
        self._resp = resp
        try:
            for line in lines(resp.stream(65536), MAX_EVENT_BYTES):
                self._event(parse(line, MAX_EVENT_BYTES))
                if self._stop.is_set():
                    return
        except (Gone, StreamError):
            raise
        except Exception as e:        # noqa: BLE001 - the connection broke: resume from the last version
            if self._stop.is_set():
                return
            log.info("discovery watch broke off; resuming", extra={"kind": self.resource.kind,
                                                                  "rv": self.rv, "error": str(e)[:300]})
        finally:
            self._resp = None
            resp.release_conn()

    def _event(self, parsed: Any) -> None:
        """Apply one watch event in order; BOOKMARK only moves the resourceVersion."""
        kind_, raw = event(parsed)
        rv = resource_version(raw)
        if kind_ != "BOOKMARK":
            md = raw.get("metadata")
            name = md.get("name") if isinstance(md, dict) else None
            namespace = md.get("namespace", "") if isinstance(md, dict) else ""
            if isinstance(name, str) and isinstance(namespace, str):
                kept = None if kind_ == "DELETED" else self._keep(raw, self.api_version)
                self.store.put(self.resource.kind, (namespace, name), kept)
        if rv:
            self.rv = rv

    def _keep(self, raw: Any, api_version: str) -> dict[str, Any] | None:
        """The bounded form; None (absent, said in the log) for an object over a bound."""
        if isinstance(raw, dict) and self.resource.optional:
            raw = {**raw, "apiVersion": api_version}
        try:
            return kinds.keep(self.resource.kind, raw)
        except kinds.Refused as e:
            stub = kinds.refused_form(self.resource.kind, raw, e)
            log.warning("discovery ignores an object over a bound" if stub is None else
                        "discovery keeps an object over a bound as a fail-closed stub",
                        extra={"kind": self.resource.kind, "error": str(e)[:300]})
            return stub


class Watcher:
    """Every informer, one thread each, into one store. `start()`, `synced` (all listed once), `stop()`."""

    def __init__(self, api_client: Any, resources: Iterable[Resource] = RESOURCES, **informer_options: Any) -> None:
        self.resources = tuple(resources)
        self.store = Store(r.kind for r in self.resources)
        self._stop = threading.Event()
        self.informers = {r.kind: Informer(api_client, r, self.store, self._stop, **informer_options)
                          for r in self.resources}
        self._threads: list[threading.Thread] = []

    def start(self) -> Watcher:
        for kind, informer in self.informers.items():
            t = threading.Thread(target=informer.run, name=f"discovery-watch-{kind}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def synced(self) -> bool:
        """Every kind has been listed (or found absent) at least once."""
        return len(self.store.snapshot().synced) == len(self.resources)

    async def wait_synced(self, poll: float = 0.05) -> None:
        """For the control plane's loop: returns once `synced()`."""
        while not self.synced():
            await asyncio.sleep(poll)

    def subscribe_on_loop(self, loop: asyncio.AbstractEventLoop, fn: Subscriber) -> Callable[[], None]:
        """`fn(Changed)` runs on `loop`, in version order; returns the unsubscribe."""
        return self.store.subscribe(on_loop(loop, fn))

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for _ in range(int(timeout / 0.05)):
            for informer in self.informers.values():
                informer.stop()
            self._threads = [t for t in self._threads if t.is_alive()]
            if not self._threads:
                return
            self._threads[0].join(0.05)
