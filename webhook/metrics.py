"""The injector's Prometheus metrics, in the default registry (so /metrics also shows the CA's, same process).

Names follow istiod's sidecar_injection_* so existing dashboards and alerts keep working.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from meshboot import constants as C

REQUESTS = Counter("sidecar_injection_requests", "AdmissionReview requests received by the injector")
SUCCESS = Counter("sidecar_injection_success", "Requests answered with an AdmissionReview (injected or skipped)")
INJECTED = Counter("meshboot_sidecar_injections", "Pods that got a sidecar")
SKIPS = Counter("sidecar_injection_skip", "Pods not injected, by the policy rule that decided", ["reason"])
FAILURES = Counter("sidecar_injection_failure", "Requests denied or refused, by kind of failure", ["type"])
LATENCY = Histogram(C.METRIC_INJECTION_TIME, "Time to decide, render and patch one AdmissionReview",
                    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
CONFIG_RELOADS = Counter("meshboot_injector_config_reloads", "Injection config reloads, by result", ["result"])
CERT_RELOADS = Counter("meshboot_webhook_cert_reloads", "Serving certificate reloads, by result", ["result"])
CONFIG_GENERATION = Gauge("meshboot_injector_config_generation", "Generation of the injection config in use")
CONNECTIONS_CLOSED = Counter("meshboot_webhook_connections_closed",
                             "HTTPS connections the server closed on a bound, by reason (header_timeout, body_timeout, "
                             "max_connections)", ["reason"])
DRAINING = Gauge("meshboot_webhook_draining", "1 from the first SIGTERM until exit: not ready, still serving")
