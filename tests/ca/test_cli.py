"""`python -m ca` as the agent and the local pod runner use it: on 15012 inside a fresh network namespace."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from meshboot import constants as C
from testing.netns import Netns, wait_port
from testing.tokens import Issuer

REPO = Path(__file__).resolve().parents[2]

CLIENT = textwrap.dedent("""
    import json, sys, urllib.request
    import grpc
    from meshboot import constants as C, pki
    from ca import ca_pb2, ca_pb2_grpc
    root, token = open(sys.argv[1]).read(), sys.argv[2]
    # What the agent does with CA_ADDR=localhost:15012: TLS, server name istiod.istio-system.svc, root from file.
    ch = grpc.secure_channel("localhost:15012", grpc.ssl_channel_credentials(root.encode()),
                             options=[("grpc.ssl_target_name_override", C.ISTIOD_SAN)])
    key = pki.generate_key("RSA")
    req = ca_pb2.IstioCertificateRequest(csr=pki.csr_pem(pki.make_csr(key, uris=[sys.argv[3]])).decode(),
                                         validity_duration=86400)
    req.metadata.update({"CertSigner": ""})
    resp = ca_pb2_grpc.IstioCertificateServiceStub(ch).CreateCertificate(
        req, metadata=[("authorization", "Bearer " + token), ("clusterid", "Kubernetes")], timeout=10)
    leaf = pki.load_certs(resp.cert_chain[0].encode())[0]
    mon = lambda p: urllib.request.urlopen("http://127.0.0.1:15014" + p, timeout=5).read().decode()
    print(json.dumps({"n": len(resp.cert_chain), "root_last": resp.cert_chain[-1] == root,
                      "sans": pki.uri_sans(leaf), "healthz": mon("/healthz"),
                      "metrics": [l for l in mon("/metrics").splitlines()
                                  if l.startswith("meshboot_ca_csr_requests_total")]}))
""")


def test_standalone_ca_on_15012_in_netns(netns: Netns, tmp_path: Path) -> None:
    issuer = Issuer()
    (tmp_path / "jwks.json").write_text(json.dumps(issuer.jwks()))
    (tmp_path / "client.py").write_text(CLIENT)
    ca_dir = tmp_path / "ca"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = netns.popen([sys.executable, "-m", "ca", "--ca-dir", str(ca_dir), "--plugin-certs",
                        str(tmp_path / "no-cacerts"), "--jwks", str(tmp_path / "jwks.json"), "--log-level", "info"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert proc.stdout is not None
    line = proc.stdout.readline()                      # the "serving" line comes once the port is bound
    assert line.startswith("meshboot CA serving on 0.0.0.0:15012"), line + (proc.stderr.read() if proc.poll() else "")
    assert f"root={ca_dir}/root-cert.pem" in line
    wait_port(netns, "127.0.0.1", C.MONITORING_PORT)
    me = C.spiffe_id("shop", "cart")
    out = netns.run([sys.executable, str(tmp_path / "client.py"), str(ca_dir / "root-cert.pem"),
                     issuer.token("shop", "cart"), me], env=env, cwd=REPO)
    got = json.loads(out.stdout)
    assert got["n"] == 2 and got["root_last"] and got["sans"] == [me] and got["healthz"] == "ok\n"
    assert 'meshboot_ca_csr_requests_total{result="issued"} 1.0' in got["metrics"]
    os.kill(proc.pid, signal.SIGTERM)    # netns.popen runs `ip netns exec`, which execs: this is the CA itself
    _, err = proc.communicate(timeout=10)     # reads both pipes to the end and closes them
    assert proc.returncode == 0
    logs = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert any(r["msg"] == "CA serving" and r["address"] == "0.0.0.0:15012" for r in logs)


def test_bad_flags_exit_2_with_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "ca", "--ca-dir", str(tmp_path), "--ca-port", "15012"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["meshboot CA: --ca-port 15012: no token verifier: give --jwks FILE|URL, "
                                             "--issuer-pem FILE or --token-review (or disable the CA with --ca-port 0)"]
    assert time.monotonic() - t0 < 10
    bad = tmp_path / "cacerts"
    bad.mkdir()
    (bad / "ca-cert.pem").write_text("junk")
    (tmp_path / "j.json").write_text(json.dumps(Issuer().jwks()))
    r = subprocess.run([sys.executable, "-m", "ca", "--ca-dir", str(tmp_path / "d"), "--ca-port", "1",
                        "--plugin-certs", str(bad), "--jwks", str(tmp_path / "j.json")],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 2 and f"{bad}/ca-cert.pem" in r.stderr and not (tmp_path / "d").exists()
