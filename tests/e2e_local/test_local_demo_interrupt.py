"""Ctrl-C in the middle of `make demo` still removes every namespace, process and directory it made."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from e2e.local import scenario

REPO = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "e2e.local.demo"]


def _processes_under(path: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd").startswith(path):
                    out.append(int(entry))
            except OSError:
                continue
    return out


def test_interrupted_demo_cleans_up(root_required: None) -> None:
    proc = subprocess.Popen(DEMO, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("== kubelet:") or time.monotonic() > deadline:
                break
        kubelet_line = seen[-1]
        assert kubelet_line.startswith("== kubelet:"), "".join(seen[-30:])
        proc.send_signal(signal.SIGINT)                       # pods running, not yet ready: interrupt
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, rest
    node = re.search(r"^== node (mbd[0-9a-f]{6})", "".join(seen), re.M)
    assert node is not None
    names = {node.group(1), *re.findall(r"netns (mbd[0-9a-f]{6})", kubelet_line)}
    assert len(names) == 1 + len(scenario.load_pods())     # the node and each injected pod
    workdir = re.search(r"\[workdir (\S+)\]", kubelet_line)
    assert workdir is not None
    listed = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not names & listed
    assert not Path(workdir.group(1)).exists()
    assert _processes_under(workdir.group(1)) == []
