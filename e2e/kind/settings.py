"""Knobs of a kind e2e run: cluster name, node image, image tag and the chart release (env vars override)."""
from __future__ import annotations

import os

from meshboot import constants as C

CLUSTER_NAME = os.environ.get("MESHBOOT_KIND_CLUSTER", "meshboot-e2e")
# kindest/node image, e.g. kindest/node:v1.33.1 (empty: kind's default).
NODE_IMAGE = os.environ.get("MESHBOOT_KIND_NODE_IMAGE", "")
# Keep the cluster after the run (MESHBOOT_E2E_KEEP=1).
KEEP = os.environ.get("MESHBOOT_E2E_KEEP") == "1"
HUB = "ghcr.io/meshboot"
TAG = "e2e"
RELEASE, RELEASE_NS = "meshboot", C.ISTIO_NAMESPACE
WEBHOOK_CONFIG = "meshboot-sidecar-injector"
WEBHOOK_DEPLOYMENT = C.WEBHOOK_SERVICE
