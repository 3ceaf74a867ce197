"""Knobs of a kind e2e run: cluster name, node image, artifacts directory and the chart release (env vars override)."""
from __future__ import annotations

import os

from meshboot import constants as C

CLUSTER_NAME = os.environ.get("MESHBOOT_KIND_CLUSTER", "meshboot-e2e")
# kindest/node image, e.g. kindest/node:v1.33.1 (empty: kind's default).
NODE_IMAGE = os.environ.get("MESHBOOT_KIND_NODE_IMAGE", "")
# Keep the cluster after the run (MESHBOOT_E2E_KEEP=1).
KEEP = os.environ.get("MESHBOOT_E2E_KEEP") == "1"
# Where a failed run's logs and `kubectl describe` go (default .e2e-artifacts/<cluster>-<UTC time> in the repo).
ARTIFACTS = os.environ.get("MESHBOOT_E2E_ARTIFACTS", "")
HUB = "ghcr.io/meshboot"
# The image tag is computed from the build inputs (e2e/kind/images.py), not set here.
RELEASE, RELEASE_NS = "meshboot", C.ISTIO_NAMESPACE
WEBHOOK_CONFIG = "meshboot-sidecar-injector"
WEBHOOK_DEPLOYMENT = C.WEBHOOK_SERVICE
