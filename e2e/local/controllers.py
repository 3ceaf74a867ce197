"""The node's control loops besides the kubelet's pod start: the kubelet's status sync (probe results → the pod's
Ready condition in the API server), the EndpointSlice controller (Services + Pods → EndpointSlices) and kube-proxy
(Services + EndpointSlices → the node's DNAT rules). Each reads what it acts on from the API server over HTTP, as in a
cluster, so the control plane watching that API server sees exactly what these loops wrote.

They run in one thread, every `period` seconds (a level-triggered resync; Kubernetes' controllers also resync from
their caches). A tick lists Services, Pods and EndpointSlices once each (the slices again only after the controller
wrote some), and the pod status sync reads a pod only when its readiness flipped. A failing step is recorded in
`errors` and retried on the next tick.
"""
from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from e2e.local import endpoints
from e2e.local.apiserver import Api, ApiError
from e2e.local.kubelet import PodRun
from e2e.local.kubeproxy import KubeProxy

Obj = endpoints.Obj


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_ready_now(run: PodRun) -> bool:
    """The kubelet's view: every counted container running and passing its probes."""
    if run.stopped:
        return False
    try:
        run.check_alive()
    except RuntimeError:
        return False
    return len(run.ready_containers()) == len(run.counted())


@dataclass
class Controllers:
    api: Api
    runs: Callable[[], list[PodRun]]          # the pods the kubelet runs now
    proxy: KubeProxy
    period: float = 0.2
    errors: list[str] = field(default_factory=list)
    _ready: dict[tuple[str, str], bool] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Controllers:
        self.proxy.install()
        self._thread = threading.Thread(target=self._loop, name="local-controllers", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except (OSError, ApiError, RuntimeError) as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                del self.errors[:-20]
            self._stop.wait(self.period)

    def tick(self) -> None:
        """One pass of each loop, in the order a change flows: pod status, slices, node rules."""
        with self._lock:
            self.sync_pod_status()
            services = self.api.list("services")
            self.proxy.sync(services, self.sync_endpoint_slices(services))

    def sync_pod_status(self) -> None:
        """Write a pod's conditions when its readiness flips (and the first time)."""
        for run in self.runs():
            key = (run.namespace, run.name)
            ready = pod_ready_now(run)
            if self._ready.get(key) == ready or run.stopped:
                continue
            try:
                cur = self.api.get("pods", *key)
            except ApiError as e:
                if e.status == 404:
                    continue       # deleted meanwhile
                raise
            old = (cur.get("status") or {}).get("conditions") or []
            self.api.merge_patch("pods", *key, {"status": {"phase": "Running",
                                                           "conditions": endpoints.pod_conditions(ready, _now(), old)}})
            self._ready[key] = ready

    def sync_endpoint_slices(self, services: list[Obj]) -> list[Obj]:
        """Make the managed slices of every Service what `endpoints.endpoint_slices` says; drop orphans. Returns all
        slices as they now stand (listed again only when this pass wrote)."""
        pods, stored = self.api.list("pods"), self.api.list("endpointslices")
        have = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in stored
                if (s["metadata"].get("labels") or {}).get(endpoints.MANAGED_BY_LABEL) == endpoints.MANAGED_BY}
        wrote = False
        wanted: set[tuple[str, str]] = set()
        for svc in services:
            for want in endpoints.endpoint_slices(svc, pods):
                key = (want["metadata"]["namespace"], want["metadata"]["name"])
                wanted.add(key)
                cur = have.get(key)
                if cur is None:
                    self.api.create("endpointslices", want)
                    wrote = True
                elif not endpoints.same_slice(cur, want):
                    want["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
                    self.api.replace("endpointslices", want)
                    wrote = True
        for key in set(have) - wanted:
            self.api.delete("endpointslices", *key)
            wrote = True
        return self.api.list("endpointslices") if wrote else stored
