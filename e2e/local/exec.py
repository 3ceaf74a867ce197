"""`kubectl exec` into a kept demo's pod: `python -m e2e.local.exec <pod> [-c container] -- <cmd>` runs cmd in the pod's
network namespace as the container's uid/gid, in its root dir with its env, as `PodRun.exec` does while the demo
runs; the pod comes from the state file `make demo KEEP=1` wrote."""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from e2e.local import keep, kube
from testing.netns import user_argv


def argv_for(pod: str, container: str | None, cmd: list[str]) -> tuple[list[str], str, dict[str, str]]:
    """The argv, cwd and env that run cmd inside the container (LookupError if there is no such pod/container)."""
    state = keep.load_state()
    if state is None:
        raise LookupError(f"no kept demo ({keep.state_file()} absent): run `make demo KEEP=1` first")
    if pod not in state["pods"]:
        raise LookupError(f"pod {pod!r} not found (have {', '.join(state['pods'])})")
    p = state["pods"][pod]
    name = container or p["default"]
    if name not in p["containers"]:
        raise LookupError(f"container {name!r} not running in {pod} (have {', '.join(p['containers'])})")
    c = p["containers"][name]
    env = dict(c["env"])
    resolved = kube.which(cmd[0], env.get("PATH", "")) or cmd[0]
    user = user_argv(c["uid"], c["gid"])
    if user:
        user[0] = shutil.which("setpriv") or user[0]
    return [shutil.which("ip") or "ip", "netns", "exec", p["netns"], *user, resolved, *cmd[1:]], c["cwd"], env


def main(args: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m e2e.local.exec", description=__doc__)
    ap.add_argument("pod")
    ap.add_argument("-c", "--container", help="default: the pod's kubectl.kubernetes.io/default-container")
    args = sys.argv[1:] if args is None else args
    split = args.index("--") if "--" in args else len(args)
    ns, cmd = ap.parse_args(args[:split]), args[split + 1:]
    if not cmd:
        ap.error("no command: <pod> [-c container] -- <cmd>")
    try:
        argv, cwd, env = argv_for(ns.pod, ns.container, cmd)
    except LookupError as e:
        print(e.args[0], file=sys.stderr)
        return 1
    os.chdir(cwd)
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    sys.exit(main())
