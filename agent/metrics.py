"""The agent's own Prometheus metrics, `istio_agent_*`, in the text exposition format 0.0.4.

A deliberately small registry (counters, gauges, histograms with labels, process metrics from /proc) instead of
prometheus_client: the sidecar agent runs in every pod, and that library's import (HTTP servers, WSGI, …) costs
~4 MB RSS and ~25 ms of start-up for what is a few dozen lines of text. The output is checked with
prometheus_client's own parser in the tests.
"""
from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _esc(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _fmt(v: float) -> str:
    return "+Inf" if v == math.inf else repr(float(v))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self._children: dict[tuple[str, ...], Self] = {}

    def labels(self, *values: str) -> Self:
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: want labels {self.labelnames}, got {key}")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._child()
        return child

    def _child(self) -> Self:
        return type(self)(self.name, self.doc)

    def _lines(self, labels: str) -> list[str]:
        raise NotImplementedError

    def render(self) -> str:
        family = self.name + ("_total" if self.kind == "counter" else "")
        out = [f"# HELP {family} {self.doc}", f"# TYPE {family} {self.kind}"]
        if not self.labelnames:
            out += self._lines("")
        for key, child in sorted(self._children.items()):
            out += child._lines(",".join(f'{n}="{_esc(v)}"' for n, v in zip(self.labelnames, key, strict=True)))
        return "\n".join(out) + "\n"


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...] = ()) -> None:
        super().__init__(name, doc, labelnames)
        self.value = 0.0

    def inc(self, n: float = 1.0) -> None:
        self.value += n

    def _lines(self, labels: str) -> list[str]:
        lb = f"{{{labels}}}" if labels else ""
        return [f"{self.name}_total{lb} {_fmt(self.value)}"]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...] = ()) -> None:
        super().__init__(name, doc, labelnames)
        self.value = 0.0

    def set(self, v: float) -> None:
        self.value = float(v)

    def _lines(self, labels: str) -> list[str]:
        lb = f"{{{labels}}}" if labels else ""
        return [f"{self.name}{lb} {_fmt(self.value)}"]


DEFAULT_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, doc, labelnames)
        self.buckets = (*sorted(buckets), math.inf)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0

    def _child(self) -> Self:
        return type(self)(self.name, self.doc, (), self.buckets[:-1])

    def observe(self, v: float) -> None:
        self.sum += v
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break

    def _lines(self, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts, strict=True):
            acc += c
            out.append(f'{self.name}_bucket{{{labels}{sep}le="{_fmt(b)}"}} {_fmt(acc)}')
        lb = f"{{{labels}}}" if labels else ""
        return [*out, f"{self.name}_count{lb} {_fmt(acc)}", f"{self.name}_sum{lb} {_fmt(self.sum)}"]


def _process_lines(prefix: str) -> str:
    """CPU, memory, fds and start time of this process, as prometheus_client's process collector names them."""
    try:
        with open("/proc/self/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            btime = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        cpu = (int(parts[11]) + int(parts[12])) / _TICKS
        vms, rss = int(parts[20]), int(parts[21]) * _PAGE
        start = btime + int(parts[19]) / _TICKS
        fds = len(os.listdir("/proc/self/fd"))
    except (OSError, IndexError, ValueError, StopIteration):
        return ""
    rows = [("cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", cpu),
            ("virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", vms),
            ("resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss),
            ("start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", start),
            ("open_fds", "gauge", "Number of open file descriptors.", fds)]
    return "".join(f"# HELP {prefix}_{n} {d}\n# TYPE {prefix}_{n} {t}\n{prefix}_{n} {_fmt(v)}\n"
                   for n, t, d, v in rows)


class Metrics:
    """The agent's metrics; one instance per agent."""

    def __init__(self) -> None:
        self.outgoing = Counter("istio_agent_num_outgoing_requests", "Requests to the CA.", ("request_type",))
        self.outgoing_failed = Counter("istio_agent_num_failed_outgoing_requests", "Failed requests to the CA.",
                                       ("request_type",))
        self.outgoing_latency = Histogram("istio_agent_outgoing_latency_seconds", "CA request latency.",
                                          ("request_type",))
        self.cert_expiry = Gauge("istio_agent_cert_expiry_seconds",
                                 "Seconds until the workload certificate expires, when it was issued.")
        self.cert_refused = Counter("istio_agent_certificate_refused",
                                    "Chains from the CA refused before serving (expired, not_yet_valid, untrusted, "
                                    "key_mismatch, identity, unparseable).", ("reason",))
        self.cert_rotations = Counter("istio_agent_cert_rotations", "Workload certificate renewals.")
        self.sds_pushes = Counter("istio_agent_sds_pushes", "SDS responses sent to Envoy.", ("resource",))
        self.sds_ack = Histogram("istio_agent_sds_push_ack_seconds", "Time from an SDS push to Envoy's ACK.",
                                 ("resource",), buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.xds_requests = Counter("istio_agent_xds_proxy_requests", "XDS requests from Envoy forwarded upstream.")
        self.xds_responses = Counter("istio_agent_xds_proxy_responses", "XDS responses forwarded to Envoy.")
        self.xds_upstream_errors = Counter("istio_agent_xds_upstream_errors", "Upstream XDS stream failures.")
        # No pilot-agent counterpart (istiod counts them as pilot_total_xds_rejects{type}); type = LDS, CDS, … .
        self.xds_nacks = Counter("istio_agent_xds_proxy_nacks", "XDS responses Envoy rejected (NACKs).", ("type",))
        self.xds_stripped = Counter("istio_agent_xds_stripped_extensions",
                                    "Telemetry-only Istio extensions Envoy lacks, removed from pushed config.",
                                    ("extension",))
        self.scrapes = Counter("istio_agent_scrapes", "Merged metrics scrapes.")
        self.scrape_failures = Counter("istio_agent_scrape_failures", "Failed scrapes of Envoy or the app.",
                                       ("target",))
        self.app_probes = Counter("istio_agent_app_probes", "App probes executed.", ("path", "code"))
        self.startup = Gauge("istio_agent_startup_duration_seconds", "Agent start to Envoy ready.")
        # The DNS proxy (agent/dns): pilot-agent's names (pkg/dns/client/monitoring.go) under its istio_agent_ prefix.
        self.dns_requests = Counter("istio_agent_dns_requests", "Total number of DNS requests.")
        self.dns_upstream_requests = Counter("istio_agent_dns_upstream_requests",
                                             "Total number of DNS requests forwarded to upstream.")
        self.dns_upstream_failures = Counter("istio_agent_dns_upstream_failures", "Total number of DNS failures.")
        self.dns_upstream_duration = Histogram("istio_agent_dns_upstream_request_duration_seconds",
                                               "Total time in seconds Istio takes to get DNS response from upstream.",
                                               buckets=(.001, .005, .01, .1, 1, 5))
        self._all = [v for v in vars(self).values() if isinstance(v, _Metric)]
        self.created = time.time()

    def render(self) -> bytes:
        return ("".join(m.render() for m in self._all) + _process_lines("istio_agent_process")).encode()
