"""The webhook's serving certificate signed by the mesh CA: what it covers, how it is written, and one-line refusals."""
from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from ca import store, webhook_cert
from ca.store import bundle_from_pems
from meshboot import constants as C
from meshboot import pki
from meshboot.files import stamps
from testing.fakekube import FakeKube
from testing.tokens import Issuer

ROOT = Path(__file__).resolve().parents[2]


def test_issue_covers_the_service_names_and_chains_to_the_root(tmp_path: Path) -> None:
    authority = bundle_from_pems(store.generate("ECDSA", "cluster.local"), "generated")
    names = webhook_cert.service_dns_names("meshboot-webhook", "istio-system")
    assert names == ["meshboot-webhook", "meshboot-webhook.istio-system", "meshboot-webhook.istio-system.svc",
                     "meshboot-webhook.istio-system.svc.cluster.local"]
    key_pem, chain = webhook_cert.issue(authority, names, 3600)
    leaf = pki.load_certs(chain)[0]
    leaf.verify_directly_issued_by(authority.root)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == names
    assert (leaf.not_valid_after_utc - pki.now()).total_seconds() <= 3600
    # What the API server does with the caBundle: verify the chain for the Service's name.
    ctx = ssl.create_default_context(cadata=authority.root_pem)
    cert_file, key_file = webhook_cert.write_pair(tmp_path / "tls", chain, key_pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_write_pair_swaps_key_and_cert_in_one_step(tmp_path: Path) -> None:
    """Both files go through the `..data` symlink, swapped atomically; only the previous version is kept (so its inodes
    are not reused and the server's stamp always changes); the key is 0600."""
    authority = bundle_from_pems(store.generate("ECDSA", "cluster.local"), "generated")
    d = tmp_path / "tls"
    seen = []
    for _ in range(6):
        key_pem, chain = webhook_cert.issue(authority, ["svc"], 60)
        cert_file, key_file = webhook_cert.write_pair(d, chain, key_pem)
        assert os.readlink(cert_file) == "..data/tls.crt" and os.readlink(key_file) == "..data/tls.key"
        assert Path(cert_file).read_bytes() == chain and Path(key_file).read_bytes() == key_pem
        assert oct(os.stat(key_file).st_mode & 0o777) == "0o600"
        stamp = stamps((cert_file, key_file))
        assert not seen or stamp != seen[-1], "each renewal changes the server's stat stamp"
        seen.append(stamp)
        assert len(list(d.glob("..v.*"))) <= 2, "the previous version only"


@pytest.mark.parametrize("flag", ["2 fortnights", "0s", "9000h"])
def test_bad_ttl_is_refused_naming_the_flag(flag: str) -> None:
    with pytest.raises(webhook_cert.ConfigError, match="--serving-cert-ttl"):
        webhook_cert.parse_ttl(flag)


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlplane", "--port", "0", "--monitoring-port", "0", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


def test_mesh_ca_without_the_ca_is_one_line(tmp_path: Path) -> None:
    r = _run("--serving-cert", "mesh-ca", "--ca-port", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--serving-cert=mesh-ca" in r.stderr and "--ca-port" in r.stderr
    r = _run("--serving-cert", "mesh-ca", "--tls-cert", "a", "--tls-key", "b")
    assert r.returncode == 2 and "choose one" in r.stderr and "Traceback" not in r.stderr


def test_mesh_ca_with_an_unreadable_secret_is_one_line(tmp_path: Path) -> None:
    """The API server refuses the CA Secret (403): the replica exits 2 with one line, no traceback, no HTTP dump."""
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(Issuer().jwks()))
    with FakeKube() as kube:
        kube.add_namespace(C.ISTIO_NAMESPACE)
        kube.fail_next("GET", f"/api/v1/namespaces/{C.ISTIO_NAMESPACE}/secrets/{C.CA_SECRET_NAME}", 403)
        env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig(tmp_path / "kubeconfig")),
               C.ENV_POD_NAMESPACE: C.ISTIO_NAMESPACE}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        r = _run("--serving-cert", "mesh-ca", "--self-signed-dir", str(tmp_path / "tls"), "--ca-port", "15999",
                 "--ca-dir", str(tmp_path / "ca"), "--plugin-certs", str(tmp_path / "none"),
                 "--ca-secret", C.CA_SECRET_NAME, "--jwks", str(jwks), env=env)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--serving-cert=mesh-ca" in r.stderr and "403 Forbidden" in r.stderr
    assert f"secret {C.ISTIO_NAMESPACE}/{C.CA_SECRET_NAME}" in r.stderr
    assert not (tmp_path / "tls" / "tls.key").exists(), "nothing half-made"
