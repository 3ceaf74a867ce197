"""A discovery server for mesh tests, before the control plane wires one: `AdsServer` over TLS as istiod's name,
serving what `discovery.generate` makes of a `discovery.model.Model`, from inside a network namespace.

`ModelSnapshot` is the smallest honest `Snapshot`: the shared part computed once per model, the proxy's own part
from the model's workload on the proxy's IP (as istiod finds the pod behind a proxy). The event loop runs in a thread
that joined the namespace, so the gRPC port is bound there, reachable from the pods' namespaces.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from discovery import generate
from discovery import model as M
from discovery import protocol as P
from discovery.ads import AdsServer, Authenticate, new_grpc_server
from discovery.push import PushRequest
from discovery.snapshot import push_version

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000


class ModelSnapshot:
    """One model served: the common part built once, each proxy's part built on its first request and kept."""

    def __init__(self, model: M.Model) -> None:
        self.model = model
        self._version = push_version()
        self._shared = generate.common(model)
        self._per_proxy: dict[str, dict[str, dict[str, Message]]] = {}

    @property
    def version(self) -> str:
        return self._version

    def proxy(self, node: P.Proxy) -> M.Proxy:
        """The model's view of a connected proxy: its pod's labels and ports when the model has a workload on its IP."""
        for ep in self.model.endpoints_by_address.get(node.ip, ()):
            w = ep.workload
            if w is not None and w.namespace == node.namespace:
                return M.Proxy(node_id=node.id, pod_name=w.name, namespace=w.namespace, ips=(node.ip,),
                               service_account=w.service_account, labels=w.labels, named_ports=w.named_ports)
        return M.Proxy(node_id=node.id, pod_name=node.name.rsplit(".", 1)[0], namespace=node.namespace,
                       ips=(node.ip,), service_account=node.service_account or "default")

    def resources_for(self, proxy: P.Proxy, type_url: str) -> Mapping[str, Message]:
        if proxy.id not in self._per_proxy:
            self._per_proxy[proxy.id] = generate.for_proxy(self.model, self._shared, self.proxy(proxy)).by_type()
        return self._per_proxy[proxy.id].get(type_url, {})


class NetnsLoop:
    """An asyncio loop in a thread that joined network namespace `netns` (setns moves only that thread)."""

    def __init__(self, netns: str) -> None:
        self.loop = asyncio.new_event_loop()
        joined = threading.Event()
        error: list[OSError] = []

        def run() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    error.append(OSError(ctypes.get_errno(), f"setns({netns})"))
            finally:
                os.close(fd)
                joined.set()
            if not error:
                self.loop.run_forever()

        self.thread = threading.Thread(target=run, name=f"loop-{netns}", daemon=True)
        self.thread.start()
        joined.wait(10)
        if error:
            raise error[0]

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class MeshXds:
    """The ADS server on `host` (in `netns`), TLS with `cert_pem`/`key_pem`, tokens checked by `authenticate`;
    `serve(model)` pushes a new model to every connected proxy."""

    def __init__(self, netns: str, host: str, cert_pem: bytes, key_pem: bytes, authenticate: Authenticate,
                 model: M.Model) -> None:
        self.snapshot = ModelSnapshot(model)
        self.ads = AdsServer(self.snapshot, authenticate)
        self._loop = NetnsLoop(netns)
        creds = grpc.ssl_server_credentials([(key_pem, cert_pem)])
        self.server, self.port = self._loop.call(self._start(f"{host}:0", creds))

    async def _start(self, address: str, creds: grpc.ServerCredentials) -> tuple[grpc.aio.Server, int]:
        server = new_grpc_server()
        self.ads.add_to(server)
        port = server.add_secure_port(address, creds)
        await server.start()
        return server, port

    def serve(self, model: M.Model) -> str:
        """Push `model` (a full push, as a PeerAuthentication change is); returns the new version."""
        self.snapshot = ModelSnapshot(model)
        self._loop.call(self.ads.push(PushRequest(self.snapshot, full=True)))
        return self.snapshot.version

    def acked(self, proxy: str, type_url: str) -> str:
        """The version proxy `<pod>.<namespace>` last ACKed for `type_url` ("" if none or not connected)."""
        for row in self.ads.sync_status():
            if row["proxy"] == proxy:
                return str(row["resources"].get(type_url, {}).get("ackedVersion", ""))
        return ""

    def close(self) -> None:
        self._loop.call(self.server.stop(0))
        self._loop.close()
