"""`make demo KEEP=1` / `make demo-down`: a kept demo's state file, its launcher and its teardown.

The cluster's API server and controllers are threads of the demo process, so a kept cluster needs that process alive:
`--keep` starts the demo detached (its own session, output to a log the launcher relays), the demo writes the state
file once everything is up and then waits for SIGTERM, which runs its normal cleanup. `--down` sends it, then removes
whatever the state file names that is still there (a holder killed with -9 leaves netns, processes, the temp dir).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from meshboot import constants as C
from testing.netns import user_argv

REPO = Path(__file__).resolve().parents[2]


def state_dir() -> Path:
    """Well-known place of the kept demo's state (MESHBOOT_DEMO_DIR overrides it, for tests)."""
    return Path(os.environ.get("MESHBOOT_DEMO_DIR", "/run/meshboot-demo"))


def state_file() -> Path:
    return state_dir() / "state.json"


def load_state() -> dict[str, Any] | None:
    try:
        return dict(json.loads(state_file().read_text()))
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Running (not a zombie) and still the demo, so a reused pid is never signalled."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z" and b"e2e.local.demo" in cmd


def pod_state(run: Any) -> dict[str, Any]:
    """What `e2e.local.exec` needs of one pod: its netns and, per running container, uid, gid, cwd and env."""
    meta = run.pod["metadata"]
    names = [c["name"] for c in run.pod["spec"].get("containers") or []]
    default = (meta.get("annotations") or {}).get(C.ANNOTATION_DEFAULT_CONTAINER) or names[0]
    return {"namespace": run.namespace, "netns": run.netns.name, "ip": run.ip, "default": default,
            "containers": {c.name: {"uid": c.uid, "gid": c.gid, "cwd": str(c.cwd), "env": c.env}
                           for c in run.containers.values() if c.running()}}


def write_state(cluster: Any, facts: Any, rc: int) -> None:
    """Atomically, so the launcher never reads half a file."""
    state = {"holder": os.getpid(), "rc": rc, "workdir": str(cluster.workdir),
             "netns": [cluster.node.ns.name, *(r.netns.name for r in cluster.pods)],
             "bridge": cluster.node.bridge, "pids": {str(k): v for k, v in facts.pids.items()},
             "api": cluster.apiserver.url, "kubeconfig": str(cluster.apiserver.kubeconfig),
             "cluster_ip": facts.cluster_ip, "pods": {r.name: pod_state(r) for r in cluster.pods}}
    tmp = state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(state_file())


def instructions(state: dict[str, Any]) -> str:
    """The `kubectl exec` equivalents (helper and raw form per container) and the teardown."""
    py = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable
    helper = f"{py} -m e2e.local.exec"
    lines = ["\n== kept: control plane, API server and pods stay up (STRICT mTLS is on in namespace demo)",
             f"   API server {state['api']}  (kubeconfig {state['kubeconfig']}); state {state_file()}",
             f"   kubectl exec, from {REPO}:   {helper} <pod> [-c <container>] -- <cmd>",
             "   per pod and container (the helper also sets the container's cwd and env):"]
    for name, p in state["pods"].items():
        for cname, c in p["containers"].items():
            raw = " ".join(["ip netns exec", p["netns"], *user_argv(c["uid"], c["gid"])])
            mark = " (default)" if cname == p["default"] else ""
            lines.append(f"     {name}/{cname}{mark} uid {c['uid']}:  {helper} {name} -c {cname} -- <cmd>"
                         f"   = {raw} <cmd>")
    url = f"http://{state['cluster_ip']}/"
    lines += ["   e.g.", f"     {helper} pod-a -- iptables-save", f"     {helper} pod-a -c istio-proxy -- ss -xlp",
              f"     {helper} pod-a -- curl -s {url}      (through both Envoys, mTLS)",
              f"     {helper} plain-client -- curl -s {url}   (no sidecar: refused under STRICT)",
              "   tear down: make demo-down   (or: python -m e2e.local.demo --down)"]
    return "\n".join(lines)


def hold() -> None:
    """Block until SIGTERM (`make demo-down`), which the demo's handler turns into KeyboardInterrupt."""
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            signal.pause()


def launch(argv: list[str]) -> int:
    """Start the demo detached and relay its log until it has kept the cluster (its exit code then) or exited."""
    old = load_state()
    if old and _alive(int(old["holder"])):
        print(f"a kept demo is already running (pid {old['holder']}): `make demo-down` first", file=sys.stderr)
        return 1
    if old:
        down()                                          # stale: its holder is gone
    state_dir().mkdir(parents=True, exist_ok=True)
    (state_dir() / "ready").unlink(missing_ok=True)
    log = state_dir() / "demo.log"
    with log.open("wb") as out:
        child = subprocess.Popen([sys.executable, "-m", "e2e.local.demo", *argv], cwd=REPO, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return _relay(child, log)
    except KeyboardInterrupt:
        child.send_signal(signal.SIGTERM)
        child.wait()
        return 130


def _relay(child: subprocess.Popen, log: Path) -> int:
    with log.open("rb") as f:
        while True:
            kept = load_state() if (state_dir() / "ready").exists() else None
            done = child.poll()
            sys.stdout.buffer.write(f.read())
            sys.stdout.flush()
            if kept and int(kept["holder"]) == child.pid:
                return int(kept["rc"])
            if done is not None:
                sys.stdout.buffer.write(f.read())
                return done
            time.sleep(0.1)


def down() -> int:
    """Stop the holder (its own cleanup), then remove what is left of what the state file names; idempotent."""
    state = load_state()
    if state is None:
        print(f"nothing kept ({state_file()} absent): nothing to tear down")
        shutil.rmtree(state_dir(), ignore_errors=True)
        return 0
    holder = int(state["holder"])
    if _alive(holder):
        os.kill(holder, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(holder) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(holder):
            os.kill(holder, signal.SIGKILL)
    listed = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    left = [n for n in state["netns"] if n in listed]
    for ns in left:          # the bridge, veths and the node's iptables live in these namespaces and go with them
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for ns in state["netns"]:      # a pod's resolv.conf (kubelet.ETC_NETNS), when the holder could not remove it
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
    shutil.rmtree(state["workdir"], ignore_errors=True)
    shutil.rmtree(state_dir(), ignore_errors=True)
    print(f"torn down the kept demo (pid {holder}): netns {', '.join(state['netns'])}, bridge {state['bridge']}, "
          f"{len(state['pids'])} processes, {state['workdir']}" + (f" (removed leftovers: {left})" if left else ""))
    return 0
