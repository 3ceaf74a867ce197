"""meshboot-webhook: Istio's sidecar injector (pure core in policy/inject/probes/prometheus, shells in server/cli)."""
