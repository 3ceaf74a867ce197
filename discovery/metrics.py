"""Discovery's Prometheus metrics, with istiod's names so its dashboards and alerts work unchanged.

istiod's counters carry no `_total` suffix (`pilot_xds_pushes{type="cds"}`); prometheus_client's Counter always
adds one, so those are a small collector exposed as untyped samples under the exact name. All live in the default
registry, so the control plane's `/metrics` (meshboot/monitoring.py) shows them once the part is wired in.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector


class IstioCounter(Collector):
    """A monotonic counter exposed under its exact name (no `_total`), labelled like istiod's."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None = REGISTRY) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def describe(self) -> Iterator[Metric]:
        yield Metric(self.name, self.doc, "unknown")

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.doc, "unknown")
        with self._lock:
            for labels, value in sorted(self._values.items()):
                metric.add_sample(self.name, dict(zip(self.labelnames, labels, strict=True)), value)
        yield metric


XDS_CLIENTS = Gauge("pilot_xds", "Number of endpoints connected to this pilot using XDS", ["version"])
PUSHES = IstioCounter("pilot_xds_pushes", "Pilot build and send errors for lds, rds, cds and eds", ["type"])
REJECTS = IstioCounter("pilot_total_xds_rejects", "Total number of XDS responses from pilot rejected by proxy",
                       ["type"])
EXPIRED_NONCE = IstioCounter("pilot_xds_expired_nonce", "Total number of XDS requests with an expired nonce",
                             ["type"])
PUSH_TRIGGERS = IstioCounter("pilot_push_triggers", "Total number of times a push was triggered", ["type"])
PUSH_TIME = Histogram("pilot_xds_push_time", "Total time in seconds Pilot takes to push lds, rds, cds and eds",
                      ["type"], buckets=(0.01, 0.1, 1, 3, 5, 10, 20, 30))
CONVERGENCE = Histogram("pilot_proxy_convergence_time",
                        "Delay in seconds between config change and a proxy receiving all required configuration",
                        buckets=(0.1, 0.5, 1, 3, 5, 10, 20, 30))
DEBOUNCE_TIME = Histogram("pilot_debounce_time", "Delay in seconds between the first config enters debouncing "
                          "and the merged push request is pushed into the push queue",
                          buckets=(0.01, 0.1, 1, 3, 5, 10, 20, 30))
