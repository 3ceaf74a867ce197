"""Wall time of `meshboot-iptables` with the injected default args in a fresh network namespace, against its floor;
and the rerun (rules already in place), with the default args and with 2,000 excluded CIDRs.

The floor is what any Python tool that programs these rules must pay: starting the interpreter (`python -c pass`,
same interpreter and site-packages) plus `iptables-restore --noflush` of the very same rules, fed by hand into a fresh
namespace. Both are timed from inside the namespace (setns on this thread), so `ip netns exec` is not counted.

Usage: sudo .venv/bin/python bench/init.py [--runs 25]
"""
from __future__ import annotations

import argparse
import compileall
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from testing.netns import Netns, veth

CLONE_NEWNET = 0x40000000
ARGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
        "-d", "15090,15021,15020", "--log_output_level=default:info"]
TARGET_RATIO, TARGET_MS = 1.5, 100.0
BIG_CIDRS, BIG_RUNS = 2000, 5  # the rerun figure: an istio-init restarted over its own 2,000-CIDR rule set
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({path})")
    finally:
        os.close(fd)


@contextmanager
def inside(ns: Netns) -> Iterator[None]:
    home = f"/proc/{os.getpid()}/task/{os.getpid()}/ns/net"
    home_fd = os.open(home, os.O_RDONLY)
    try:
        _setns(f"/run/netns/{ns.name}")
        yield
    finally:
        _libc.setns(home_fd, CLONE_NEWNET)
        os.close(home_fd)


@contextmanager
def fresh_pod() -> Iterator[Netns]:
    """A new "pod" namespace with an address (istio-iptables needs a non-loopback one) and a peer."""
    pod, peer = Netns.create("mbi"), Netns.create("mbi")
    try:
        veth(pod, peer, "10.99.0.1/24", "10.99.0.2/24")
        yield pod
    finally:
        pod.close()
        peer.close()


def timed(argv: list[str], stdin: str | None = None) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    elapsed = (time.perf_counter() - t0) * 1000
    if res.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {res.stderr.strip()}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=25)
    opts = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/init.py needs root (network namespaces, iptables)", file=sys.stderr)
        return 1
    # Byte-compile the tool as an image build (pip install) would: with PYTHONDONTWRITEBYTECODE set, a source
    # checkout would otherwise recompile every module on every run and the figure would measure the compiler.
    root = Path(__file__).resolve().parents[1]
    compileall.compile_dir(str(root / "init"), quiet=1)
    compileall.compile_dir(str(root / "meshboot"), quiet=1)
    tool = str(Path(sys.executable).parent / "meshboot-iptables")
    rules = subprocess.run([tool, *ARGS, "--dry-run"], capture_output=True, text=True, check=True).stdout
    for _ in range(3):  # warm the page cache and .pyc files
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        with fresh_pod() as pod, inside(pod):
            timed([tool, *ARGS])

    tool_ms, pass_ms, restore_ms = [], [], []
    for _ in range(opts.runs):
        with fresh_pod() as pod, inside(pod):
            tool_ms.append(timed([tool, *ARGS]))
        pass_ms.append(timed([sys.executable, "-c", "pass"]))
        with fresh_pod() as pod, inside(pod):
            restore_ms.append(timed(["iptables-restore", "--noflush"], stdin=rules))

    rerun_ms, big_first_ms, big_rerun_ms = [], [], []
    big = [*ARGS, "-x", ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(BIG_CIDRS))]
    for i in range(opts.runs):
        with fresh_pod() as pod, inside(pod):
            timed([tool, *ARGS])
            rerun_ms.append(timed([tool, *ARGS]))
        if i < BIG_RUNS:
            with fresh_pod() as pod, inside(pod):
                big_first_ms.append(timed([tool, *big]))
                big_rerun_ms.append(timed([tool, *big]))

    med = statistics.median
    floor = med(pass_ms) + med(restore_ms)
    ratio = med(tool_ms) / floor
    print(f"meshboot-iptables (default args, fresh netns): median {med(tool_ms):.1f} ms "
          f"(min {min(tool_ms):.1f}, max {max(tool_ms):.1f}, {opts.runs} runs)")
    print(f"floor: python -c pass {med(pass_ms):.1f} ms + iptables-restore by hand {med(restore_ms):.1f} ms "
          f"= {floor:.1f} ms")
    min_ratio = min(tool_ms) / (min(pass_ms) + min(restore_ms))
    print(f"best-case (min) ratio {min_ratio:.2f}x: the machine is shared, so medians move with other load")
    print(f"ratio {ratio:.2f}x (target <= {TARGET_RATIO}x), absolute target <= {TARGET_MS:.0f} ms: "
          f"{'met' if ratio <= TARGET_RATIO and med(tool_ms) <= TARGET_MS else 'NOT met'}")
    print(f"rerun (rules already in place): median {med(rerun_ms):.1f} ms; with {BIG_CIDRS} excluded CIDRs: "
          f"first run {med(big_first_ms):.1f} ms, rerun {med(big_rerun_ms):.1f} ms "
          f"(ratio {med(big_rerun_ms) / med(big_first_ms):.2f}x, target <= 2x)")
    print(json.dumps({
        "bench": "init", "runs": opts.runs,
        "tool_median_ms": round(med(tool_ms), 2),
        "floor_ms": round(floor, 2),
        "floor_python_pass_ms": round(med(pass_ms), 2),
        "floor_iptables_restore_ms": round(med(restore_ms), 2),
        "ratio": round(ratio, 3),
        "rerun_median_ms": round(med(rerun_ms), 2),
        "big_cidrs": BIG_CIDRS,
        "big_first_median_ms": round(med(big_first_ms), 2),
        "big_rerun_median_ms": round(med(big_rerun_ms), 2),
        "min_ratio": round(min_ratio, 3),
        "target_ratio": TARGET_RATIO, "target_ms": TARGET_MS,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
