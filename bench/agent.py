"""Agent benchmarks (needs root: runs in network namespaces).

1. Start → ready: agent start → `:15021/healthz/ready` 200 with the CA already up in the pod (median of N), beside
   the floor: Envoy's own cold start to admin `/ready` = LIVE with a static config (median of N). Target: ≤ floor +
   250 ms.
2. Agent RSS 60 s after start (Envoy's not included). Target ≤ 40 MB.
3. Rotation → ACK: with short-lived certificates, the time from the agent pushing a new `default` secret to
   Envoy's ACK on the SDS stream (the agent's `istio_agent_sds_push_ack_seconds` histogram). Target ≤ 100 ms.

`python bench/agent.py [--runs 10] [--rss-wait 60]` prints the figures, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from meshboot import constants as C
from testing.netns import Netns, user_argv
from tests.agent.pod import PY, Pod, envoy_binary

# Runs inside the netns: spawn argv, poll url every 2 ms, print the ms to the first 200 (or -1), leave it running.
INNER = r"""
import subprocess, sys, time, urllib.request, json
url, argv, env, cwd, log = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
t0 = time.monotonic()
p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
while time.monotonic() - t0 < 30:
    try:
        if urllib.request.urlopen(url, timeout=0.5).status == 200:
            print(round((time.monotonic() - t0) * 1000, 1), p.pid, flush=True)
            break
    except Exception:
        pass
    time.sleep(0.002)
else:
    print(-1, p.pid, flush=True)
"""

STATIC_ENVOY = """
admin: {address: {socket_address: {address: 127.0.0.1, port_value: 15000}}}
static_resources:
  listeners:
  - name: static
    address: {socket_address: {address: 0.0.0.0, port_value: 15006}}
    filter_chains: [{filters: [{name: envoy.filters.network.tcp_proxy, typed_config: {
      "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy,
      stat_prefix: s, cluster: c}}]}]
  clusters: [{name: c, type: STATIC, connect_timeout: 1s}]
"""


def timed_start(ns: Netns, url: str, argv: list[str], env: dict, cwd: str, log: str) -> tuple[float, int]:
    out = ns.run([PY, "-c", INNER, url, json.dumps(argv), json.dumps(env), cwd, log], timeout=60).stdout.split()
    return float(out[0]), int(out[1])


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


def envoy_floor(runs: int) -> list[float]:
    ns = Netns.create("mba")
    d = tempfile.mkdtemp(prefix="mbab", dir="/tmp")
    os.chmod(d, 0o755)
    cfg = Path(d, "static.yaml")
    cfg.write_text(STATIC_ENVOY)
    out = []
    try:
        for _ in range(runs):
            argv = [*user_argv(C.PROXY_UID), envoy_binary(), "-c", str(cfg), "--concurrency", "1",
                    "--disable-hot-restart", "-l", "warning"]
            ms, pid = timed_start(ns, f"http://127.0.0.1:{C.ENVOY_ADMIN_PORT}/ready", argv, {"PATH": "/usr/bin:/bin"},
                                  d, str(Path(d, "envoy.log")))
            kill_group(pid)
            out.append(ms)
    finally:
        ns.close()
        shutil.rmtree(d, ignore_errors=True)
    return out


def agent_argv(pod: Pod) -> list[str]:
    return [*user_argv(C.PROXY_UID), PY, "-m", "agent", "proxy", "sidecar", "--domain",
            f"{pod.namespace}.svc.cluster.local", "--proxyLogLevel=warning", "--proxyComponentLogLevel=misc:error",
            "--log_output_level=default:info", "--concurrency", "1"]


def agent_start(runs: int) -> list[float]:
    from tests.agent.pod import chown_tree
    pod = Pod(Netns.create("mba"))
    out = []
    try:
        pod.start_ca()
        chown_tree(pod.dir)
        for _ in range(runs):
            ms, pid = timed_start(pod.ns, f"http://127.0.0.1:{C.ENVOY_STATUS_PORT}{C.HEALTHZ_READY_PATH}",
                                  agent_argv(pod), pod.env(), pod.dir, pod.agent_log)
            kill_group(pid)
            if ms < 0:
                raise SystemExit(f"agent did not get ready; log:\n{pod.log()[-3000:]}")
            out.append(ms)
    finally:
        pod.close()
    return out


def rss_after(wait: float) -> float:
    pod = Pod(Netns.create("mba"))
    try:
        pod.start_ca()
        proc = pod.start_agent()
        pod.wait_ready(30)
        time.sleep(wait)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    finally:
        pod.close()


def ack_hist(pod: Pod) -> tuple[float, float]:
    _, body = pod.http(f"http://127.0.0.1:{C.STATUS_PORT}/stats/prometheus")
    s = re.search(r'istio_agent_sds_push_ack_seconds_sum\{resource="default"\} (\S+)', body)
    c = re.search(r'istio_agent_sds_push_ack_seconds_count\{resource="default"\} (\S+)', body)
    return (float(s.group(1)), float(c.group(1))) if s and c else (0.0, 0.0)


def rotation_ack(rotations: int) -> tuple[float, int]:
    pod = Pod(Netns.create("mba"))
    try:
        pod.start_ca()
        pod.start_agent(SECRET_TTL="4s")           # 4 s certificates: renewal every ~2 s
        pod.wait_ready(30)
        time.sleep(0.5)
        s0, c0 = ack_hist(pod)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            s1, c1 = ack_hist(pod)
            if c1 - c0 >= rotations:
                return (s1 - s0) / (c1 - c0) * 1000, int(c1 - c0)
            time.sleep(0.5)
        raise SystemExit(f"only {c1 - c0} rotations ACKed; log:\n{pod.log()[-3000:]}")
    finally:
        pod.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--rss-wait", type=float, default=60)
    ap.add_argument("--rotations", type=int, default=5)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/agent.py needs root (network namespaces)", file=sys.stderr)
        return 2
    floor = envoy_floor(a.runs)
    agent = agent_start(a.runs)
    f_med, a_med = statistics.median(floor), statistics.median(agent)
    print(f"envoy cold start → /ready (static config), ms: {sorted(floor)}  median {f_med:.1f}")
    print(f"agent start → :15021/healthz/ready 200, ms: {sorted(agent)}  median {a_med:.1f}")
    print(f"overhead over the floor: {a_med - f_med:.1f} ms (target ≤ 250)")
    ack_ms, n = rotation_ack(a.rotations)
    print(f"rotation push → Envoy ACK: mean {ack_ms:.2f} ms over {n} rotations (target ≤ 100)")
    rss = rss_after(a.rss_wait)
    print(f"agent RSS {a.rss_wait:.0f} s after start (Envoy excluded): {rss:.1f} MB (target ≤ 40)")
    print(json.dumps({
        "agent_ready_ms_median": round(a_med, 1), "envoy_ready_ms_median": round(f_med, 1),
        "floor": "envoy cold start to /ready, static config", "overhead_ms": round(a_med - f_med, 1),
        "overhead_target_ms": 250, "ratio": round(a_med / f_med, 2),
        "agent_rss_mb": round(rss, 1), "rss_target_mb": 40, "rss_ratio": round(rss / 40, 2),
        "rotation_ack_ms": round(ack_ms, 2), "rotation_ack_target_ms": 100,
        "rotation_ack_ratio": round(ack_ms / 100, 3),
        "runs": a.runs, "rotations": n,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
