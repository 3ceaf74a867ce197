"""Root distribution: ConfigMap istio-ca-root-cert (key root-cert.pem) in every namespace, kept up to date.

Like istiod's namespace controller: write it into each namespace (except the system ones Istio skips), and watch
both namespaces (new ones get it) and the ConfigMaps themselves (an edited or deleted copy is put back). The
Kubernetes client is synchronous, so the two watches run in threads of their own.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from meshboot import constants as C

from .metrics import ROOT_PUBLISH

log = logging.getLogger("meshboot.ca")

LABELS = {"istio.io/config": "true"}
WATCH_TIMEOUT_SECONDS = 240
RETRY_SECONDS = 2.0


def desired_configmap(namespace: str, root_pem: str) -> dict[str, Any]:
    """The ConfigMap as the API server stores it (pure)."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": C.ROOT_CERT_CONFIGMAP, "namespace": namespace, "labels": dict(LABELS)},
            "data": {C.ROOT_CERT_KEY: root_pem}}


def wanted(namespace: Any) -> bool:
    """Namespaces that get the root: not the system ones Istio skips, not ones being deleted."""
    name = namespace.metadata.name
    phase = getattr(namespace.status, "phase", None) if namespace.status else None
    return name not in C.IGNORED_NAMESPACES and phase != "Terminating"


class RootCertPublisher:
    """Keeps the root ConfigMap in every namespace; `start()` spawns the watches, `stop()` ends them."""

    def __init__(self, core_v1: Any, root_pem: str, watch_timeout: int = WATCH_TIMEOUT_SECONDS) -> None:
        self.api = core_v1
        self.root_pem = root_pem
        self.watch_timeout = watch_timeout
        self._stop = threading.Event()
        self._watches: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.synced = threading.Event()      # set once every existing namespace has been written

    # ---- one namespace ----------------------------------------------------------------------------------------
    def ensure(self, namespace: str) -> str:
        """Create or fix the ConfigMap in one namespace; returns what was done (created/updated/unchanged/...)."""
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415 - kubernetes only when publishing
        try:
            try:
                cm = self.api.read_namespaced_config_map(C.ROOT_CERT_CONFIGMAP, namespace)
            except ApiException as e:
                if e.status != 404:
                    raise
                try:
                    self.api.create_namespaced_config_map(namespace, desired_configmap(namespace, self.root_pem))
                    result = "created"
                except ApiException as e2:
                    if e2.status == 409:          # someone (the other watch) just created it: check it next time
                        result = "conflict"
                    elif e2.status in (403, 404):  # namespace gone or being deleted
                        result = "namespace_gone"
                    else:
                        raise
            else:
                if (cm.data or {}).get(C.ROOT_CERT_KEY) == self.root_pem:
                    result = "unchanged"
                else:
                    self.api.patch_namespaced_config_map(
                        C.ROOT_CERT_CONFIGMAP, namespace,
                        {"metadata": {"labels": dict(LABELS)}, "data": {C.ROOT_CERT_KEY: self.root_pem}})
                    result = "updated"
        except ApiException as e:
            result = "error"
            log.warning("cannot write the root ConfigMap", extra={"namespace": namespace, "status": e.status,
                                                                    "reason": e.reason})
        except OSError as e:
            result = "error"
            log.warning("cannot reach the API server", extra={"namespace": namespace, "error": str(e)})
        ROOT_PUBLISH.labels(result).inc()
        if result in ("created", "updated"):
            log.info(f"root ConfigMap {result}", extra={"namespace": namespace})
        return result

    def publish_all(self) -> str:
        """Write every namespace; returns the namespace list's resourceVersion to watch from."""
        listing = self.api.list_namespace()
        for ns in listing.items:
            if wanted(ns):
                self.ensure(ns.metadata.name)
        return listing.metadata.resource_version

    def set_root(self, root_pem: str) -> None:
        """A new root (rotation, new plug-in certs): rewrite every namespace."""
        self.root_pem = root_pem
        self.publish_all()

    # ---- watches ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        for name, fn in (("namespaces", self._watch_namespaces), ("configmaps", self._watch_configmaps)):
            t = threading.Thread(target=self._loop, args=(fn,), name=f"ca-root-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        """End both watches: closing a watch's connection unblocks its read (retried until the thread is gone,
        since a watch whose request is still in flight has no connection to close yet)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            while t.is_alive() and time.monotonic() < deadline:
                with self._lock:
                    for w in self._watches:
                        w.stop()
                t.join(0.05)

    def _loop(self, fn: Callable[[], None]) -> None:
        while not self._stop.is_set():
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - a watch must survive API hiccups; it relists and resumes
                if self._stop.is_set():
                    return
                log.warning("root ConfigMap watch failed; retrying", extra={"error": str(e)})
                self._stop.wait(RETRY_SECONDS)

    def _stream(self, func: Callable[..., Any], **kw: Any) -> Iterator[dict[str, Any]]:
        from kubernetes import watch  # noqa: PLC0415 - kubernetes only when publishing
        w = watch.Watch()
        with self._lock:
            if self._stop.is_set():
                return
            self._watches.append(w)
        try:
            yield from w.stream(func, timeout_seconds=self.watch_timeout, **kw)
        finally:
            with self._lock:
                self._watches.remove(w)

    def _watch_namespaces(self) -> None:
        rv = self.publish_all()
        self.synced.set()
        while not self._stop.is_set():
            for ev in self._stream(self.api.list_namespace, resource_version=rv):
                obj = ev["object"]
                rv = obj.metadata.resource_version
                if ev["type"] in ("ADDED", "MODIFIED") and wanted(obj):
                    self.ensure(obj.metadata.name)

    def _watch_configmaps(self) -> None:
        selector = f"metadata.name={C.ROOT_CERT_CONFIGMAP}"
        rv = self.api.list_config_map_for_all_namespaces(field_selector=selector).metadata.resource_version
        while not self._stop.is_set():
            for ev in self._stream(self.api.list_config_map_for_all_namespaces, field_selector=selector,
                                   resource_version=rv):
                obj = ev["object"]
                rv = obj.metadata.resource_version
                ns = obj.metadata.namespace
                if ns in C.IGNORED_NAMESPACES:
                    continue
                if ev["type"] == "DELETED" or (obj.data or {}).get(C.ROOT_CERT_KEY) != self.root_pem:
                    self.ensure(ns)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return self.synced.wait(max(0.0, deadline - time.monotonic()))
