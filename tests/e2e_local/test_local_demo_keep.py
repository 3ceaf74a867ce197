"""`make demo KEEP=1` leaves the cluster up with a working `kubectl exec` (iptables, sockets, curl inside a pod, as the
container's uid), `make demo-down` removes all of it, and a second `make demo-down` is a no-op."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(env: dict[str, str], *argv: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_keep_exec_down(root_required: None, tmp_path: Path) -> None:
    env = {**os.environ, "MESHBOOT_DEMO_DIR": str(tmp_path / "state")}
    try:
        kept = _run(env, "e2e.local.demo", "--keep")
        assert kept.returncode == 0, kept.stdout[-3000:] + kept.stderr
        assert "make demo-down" in kept.stdout and "-m e2e.local.exec pod-a -c istio-proxy -- <cmd>" in kept.stdout
        state = json.loads((tmp_path / "state" / "state.json").read_text())
        assert _alive(state["holder"])
        save = _run(env, "e2e.local.exec", "pod-a", "--", "iptables-save")
        assert all(f":{c} " in save.stdout for c in ("ISTIO_INBOUND", "ISTIO_OUTPUT", "ISTIO_REDIRECT")), save
        ss = _run(env, "e2e.local.exec", "pod-a", "-c", "istio-proxy", "--", "ss", "-xlp")
        assert "etc/istio/proxy/XDS" in ss.stdout and '"meshboot-agent"' in ss.stdout, ss   # seen as its own uid
        assert _run(env, "e2e.local.exec", "pod-a", "-c", "istio-proxy", "--", "id", "-u").stdout.strip() == "1337"
        curl = _run(env, "e2e.local.exec", "pod-a", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                    f"http://{state['cluster_ip']}/")
        assert curl.stdout == "200", curl
    finally:
        down = _run(env, "e2e.local.demo", "--down")
    assert down.returncode == 0 and "torn down" in down.stdout, down
    listed = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not set(state["netns"]) & listed
    assert not _alive(state["holder"]) and not any(_alive(int(p)) for p in state["pids"])
    assert not Path(state["workdir"]).exists() and not (tmp_path / "state").exists()
    again = _run(env, "e2e.local.demo", "--down")
    assert again.returncode == 0 and "nothing kept" in again.stdout, again
