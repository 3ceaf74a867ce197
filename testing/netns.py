"""Network namespaces that stand in for pods: create, wire with veth, run commands inside as a given uid.

Shared by the tests (init, agent, whole pod) and the local pod runner, so every one of them sets up and tears
down namespaces the same way and leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def have_root() -> tuple[bool, str]:
    """Whether netns tests can run here, and if not, why (printed by the skip)."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables-restore", "setpriv"):
        if shutil.which(tool) is None:
            return False, f"needs {tool!r} on PATH (make test installs it with apt-get)"
    return True, ""


def unique_name(prefix: str) -> str:
    """Netns and link names must be unique across concurrent runs and short (IFNAMSIZ is 16)."""
    return f"{prefix}{secrets.token_hex(3)}"


def user_argv(uid: int | None, gid: int | None = None) -> list[str]:
    """argv prefix to run as uid/gid, the way a container's securityContext would.

    The project (venv, Envoy binary) may live under a directory only root can traverse (/root), so the process gets
    the ambient CAP_DAC_READ_SEARCH: it can read the "image" files, while its uid — which is what iptables' owner
    match sees — is the one asked for.
    """
    if uid is None or uid == os.geteuid():
        return []
    gid = uid if gid is None else gid
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


@dataclass
class Netns:
    """A named network namespace with loopback up; deleted (with every process in it) on close."""

    name: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def create(cls, prefix: str = "mb") -> Netns:
        name = unique_name(prefix)
        subprocess.run(["ip", "netns", "add", name], check=True)
        ns = cls(name)
        ns.ip("link", "set", "lo", "up")
        return ns

    def argv(self, cmd: Sequence[str], uid: int | None = None, gid: int | None = None) -> list[str]:
        return ["ip", "netns", "exec", self.name, *user_argv(uid, gid), *cmd]

    def run(self, cmd: Sequence[str], uid: int | None = None, check: bool = True, timeout: float = 60,
            **kw: Any) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(cmd, uid), check=check, capture_output=True, text=True, timeout=timeout, **kw)

    def popen(self, cmd: Sequence[str], uid: int | None = None, gid: int | None = None, **kw: Any) -> subprocess.Popen:
        p = subprocess.Popen(self.argv(cmd, uid, gid), start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def ip(self, *args: str) -> str:
        return subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True, text=True).stdout

    def python(self, code: str, uid: int | None = None, **kw: Any) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-c", code], uid=uid, **kw)

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
            for pipe in (p.stdin, p.stdout, p.stderr):       # PIPEs the caller asked for and did not drain
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def veth(a: Netns, b: Netns, addr_a: str, addr_b: str, addr6_a: str | None = None,
         addr6_b: str | None = None) -> tuple[str, str]:
    """A veth pair between two namespaces with v4 (and optionally v6, nodad) addresses; returns the link names."""
    la, lb = unique_name("va"), unique_name("vb")
    subprocess.run(["ip", "link", "add", la, "netns", a.name, "type", "veth", "peer", "name", lb, "netns", b.name],
                   check=True)
    for ns, link, v4, v6 in ((a, la, addr_a, addr6_a), (b, lb, addr_b, addr6_b)):
        ns.ip("addr", "add", v4, "dev", link)
        if v6:
            ns.ip("addr", "add", v6, "dev", link, "nodad")
        ns.ip("link", "set", link, "up")
    return la, lb


@contextlib.contextmanager
def pair(prefix: str = "mb", v6: bool = False) -> Iterator[tuple[Netns, Netns]]:
    """Two namespaces ("pod" 10.x.0.1, "peer" 10.x.0.2) joined by a veth; both removed afterwards."""
    a = Netns.create(prefix)
    b = Netns.create(prefix)
    try:
        veth(a, b, "10.99.0.1/24", "10.99.0.2/24",
             "fd00:99::1/64" if v6 else None, "fd00:99::2/64" if v6 else None)
        yield a, b
    finally:
        a.close()
        b.close()


def wait_port(ns: Netns, host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts on host:port inside ns: one process dials in a loop from within (a process per
    attempt would spend most of the wait starting Python)."""
    code = (f"import socket,time\nd=time.time()+{timeout}\n"
            "while True:\n"
            f"  try: socket.create_connection(({host!r},{port}),timeout=0.5).close(); break\n"
            "  except OSError:\n"
            "    if time.time()>d: raise SystemExit(1)\n"
            "    time.sleep(0.02)\n")
    if ns.run([sys.executable, "-c", code], check=False, timeout=timeout + 5).returncode != 0:
        raise TimeoutError(f"nothing listening on {host}:{port} in netns {ns.name}")


def poll(probe: Callable[[], T], done: Callable[[T], bool], timeout: float, interval: float = 0.1) -> T:
    """Call `probe` until `done` says yes to what it returned or `timeout` seconds passed; the last result (the caller
    decides whether a timeout is a failure)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = probe()
        if done(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(interval)


def bridge(ns: Netns, name: str, addr: str) -> str:
    """A Linux bridge inside `ns` (the "node") with `addr` (e.g. 10.244.0.1/24), the pods' gateway."""
    ns.ip("link", "add", name, "type", "bridge")
    ns.ip("addr", "add", addr, "dev", name)
    ns.ip("link", "set", name, "up")
    return name


def plug(node: Netns, bridge_name: str, pod: Netns, addr: str, gateway: str, ifname: str = "eth0") -> str:
    """A veth from `pod` (as `ifname`, with `addr` and a default route via `gateway`) into the node's bridge, the way
    a CNI bridge plugin wires a pod; returns the node-side link name."""
    host_side = unique_name("vp")
    subprocess.run(["ip", "link", "add", ifname, "netns", pod.name, "type", "veth", "peer", "name", host_side,
                    "netns", node.name], check=True)
    node.ip("link", "set", host_side, "master", bridge_name)
    node.ip("link", "set", host_side, "up")
    pod.ip("addr", "add", addr, "dev", ifname)
    pod.ip("link", "set", ifname, "up")
    pod.ip("route", "add", "default", "via", gateway)
    return host_side


_CLONE_NEWNET = 0x40000000


def call_in(ns_name: str, fn: Callable[..., T], *args: object, **kw: object) -> T:
    """Run `fn` in a new thread that has joined netns `ns_name` (setns(2) moves only the calling thread), so sockets
    it opens live in that namespace while the rest of the process stays where it is."""
    import ctypes
    import threading

    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{ns_name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns_name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn(*args, **kw))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(e)

    t = threading.Thread(target=target, name=f"netns-{ns_name}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]
