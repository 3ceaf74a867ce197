"""The long-lived agent process never loads ssl, cryptography, protobuf or prometheus_client (the 40 MB RSS budget:
docs/agent.md "Footprint"); the helpers that need them are separate, short-lived processes.

The real agent (`meshboot-agent proxy sidecar`, the launcher's `python -I`) runs its whole start-up against the real CA
(`python -m ca` on a free port): key + CSR helper, the CA call over TLS, the issued-chain check helper, the standalone
config helper, the status port, SDS and XDS. The test then plays Envoy on both sockets (the secrets and the LDS/CDS
it serves, and their ACKs) and reads what the agent process has loaded: its sys.modules, through a watcher thread the
test wraps around `agent.cli.main` (no debug switch in the agent), and the shared libraries in /proc/<pid>/maps.
No root and no fixed ports: Envoy is a stand-in that only sleeps, so nothing binds 15001/15006/15090.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from meshboot import constants as C
from testing.tokens import Issuer
from tests.agent.test_agent_servers import free_port

PY = sys.executable
FORBIDDEN_MODULES = ("ssl", "_ssl", "cryptography", "google.protobuf", "prometheus_client")
FORBIDDEN_LIBS = ("/libssl.so", "/_ssl.", "/cryptography/", "/google/_upb/", "/google/protobuf/")

# The agent's own entry point (what the meshboot-agent launcher runs), plus a test-only watcher thread: when the
# trigger file appears it writes the process's sys.modules next to it. It imports only what the agent has loaded.
WRAPPER = """
import os, sys, threading, time
def watch(trigger, out):
    while not os.path.exists(trigger):
        time.sleep(0.02)
    with open(out + ".tmp", "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
    os.rename(out + ".tmp", out)
threading.Thread(target=watch, args=(sys.argv[1], sys.argv[2]), daemon=True).start()
from agent.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _wait(pred, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s; agent log:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _pod_dir(d: Path, issuer: Issuer) -> None:
    for sub in ("var/run/secrets/tokens", "var/run/secrets/istio", "etc/istio/pod", "etc/istio/proxy", "ca"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "jwks.json").write_text(json.dumps(issuer.jwks()))
    (d / C.TOKEN_PATH).write_text(issuer.token("default", "web", pod="web-1"))
    (d / "etc/istio/pod/labels").write_text('app="web"\n')
    envoy = d / "envoy"
    envoy.write_text("#!/bin/sh\nexec sleep 600\n")           # Envoy stand-in: the agent supervises it
    envoy.chmod(0o755)


def _play_envoy(d: Path) -> dict[str, int]:
    """SDS (default, ROOTCA) and ADS (CDS, LDS) as Envoy asks, each response ACKed; names → resource counts."""
    got: dict[str, int] = {}
    sds_reqs = [discovery_pb2.DiscoveryRequest(type_url=C.SDS_TYPE_URL, resource_names=["default", "ROOTCA"])]
    with grpc.insecure_channel(f"unix:{d / C.WORKLOAD_SOCKET_DIR / 'socket'}") as ch:
        call = ch.stream_stream("/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
                                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                                response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
        stream = call(iter(sds_reqs), timeout=30)
        r = next(stream)
        got["sds"] = len(r.resources)
        stream.cancel()
    types = ("type.googleapis.com/envoy.config.cluster.v3.Cluster",
             "type.googleapis.com/envoy.config.listener.v3.Listener")
    with grpc.insecure_channel(f"unix:{d / 'etc/istio/proxy/XDS'}") as ch:
        call = ch.stream_stream("/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
                                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                                response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
        reqs = [discovery_pb2.DiscoveryRequest(type_url=t) for t in types]
        stream = call(iter(reqs), timeout=30)
        for _ in types:
            r = next(stream)
            got[r.type_url.rsplit(".", 1)[-1]] = len(r.resources)
        stream.cancel()
    return got


@pytest.fixture
def running_agent(tmp_path: Path):
    """The CA and the agent (as the launcher starts it), up to serving status, SDS and XDS; yields (pid, dir)."""
    d = tmp_path
    issuer, ca_port = Issuer(), free_port()
    _pod_dir(d, issuer)
    log = d / "agent.log"
    with open(d / "ca.log", "wb") as ca_log:                 # the child keeps its own copy of the fd
        ca = subprocess.Popen([PY, "-m", "ca", "--ca-port", str(ca_port), "--ca-address", "127.0.0.1", "--ca-dir",
                               str(d / "ca"), "--jwks", str(d / "jwks.json"), "--trust-domain", C.DEFAULT_TRUST_DOMAIN,
                               "--ca-monitoring-port", "0"], stdout=subprocess.DEVNULL, stderr=ca_log)
    agent = None
    try:
        _wait(lambda: _listening(ca_port), 30, "the CA listening", d / "ca.log")
        shutil.copy(d / "ca/root-cert.pem", d / C.ROOT_CERT_PATH)
        status_port = free_port()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(d), "POD_NAME": "web-1",
               "POD_NAMESPACE": "default", "SERVICE_ACCOUNT": "web", "INSTANCE_IP": "127.0.0.1",
               "CA_ADDR": f"localhost:{ca_port}", "ENVOY_BINARY": str(d / "envoy"),
               "PROXY_CONFIG": json.dumps({"statusPort": status_port, "proxyAdminPort": free_port()})}
        with open(log, "wb") as out:
            agent = subprocess.Popen([PY, "-I", "-c", WRAPPER, str(d / "dump"), str(d / "modules"), "proxy",
                                      "sidecar"], cwd=d, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        _wait(lambda: _listening(status_port) and (d / "etc/istio/proxy/XDS").exists()
              and (d / C.WORKLOAD_SOCKET_DIR / "socket").exists(), 30, "status, SDS and XDS up", log)
        yield agent.pid, d
    finally:
        for p in (agent, ca):
            if p is not None and p.poll() is None:
                if p is agent:
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.kill()
                p.wait()


def test_the_long_lived_agent_never_loads_tls_crypto_protobuf_or_prometheus(running_agent) -> None:
    pid, d = running_agent
    served = _play_envoy(d)
    assert served["sds"] == 2 and served["Cluster"] > 0 and served["Listener"] > 0, served
    (d / "dump").touch()
    _wait(lambda: (d / "modules").exists(), 10, "the module list", d / "agent.log")
    modules = (d / "modules").read_text().split()
    assert "agent.identity.secrets" in modules and "agent.xds.ads" in modules and "grpc" in modules
    loaded = [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_MODULES)]
    assert not loaded, f"the long-lived agent imported {loaded}: keep them in helper processes (docs/agent.md)"
    maps = Path(f"/proc/{pid}/maps").read_text()
    libs = sorted({path for path in (line.split()[-1] for line in maps.splitlines() if "/" in line)
                   if any(f in path for f in FORBIDDEN_LIBS)})
    assert not libs, f"the long-lived agent mapped {libs}"
