"""--run-validation: prove that capture works (the CNI-mode istio-validation container).

A server listens on loopback:<envoy-port> and loopback:<inbound-capture-port> and answers each connection with the
port it was originally sent to (SO_ORIGINAL_DST). A client, running as the proxy uid, dials 127.0.0.6:<probe port>
from 127.0.0.1 every second: only the proxy-loopback rule (ISTIO_OUTPUT -> ISTIO_IN_REDIRECT) can bring it to 15006.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

from .config import CaptureConfig
from .log import Logger

SO_ORIGINAL_DST = 80
FAILURE = ("iptables validation failed; workload is not ready for Istio.\n"
           "When using Istio CNI, this can occur if a pod is scheduled before the node is ready.\n"
           "If installed with 'cni.repair.deletePods=true', this pod should automatically be deleted and retry.\n"
           "Otherwise, this pod will need to be manually removed so that it is scheduled on a node with istio-cni "
           "running, allowing iptables rules to be established.")


def original_port(conn: socket.socket, v6: bool) -> int:
    if v6:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    else:
        raw = conn.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, 16)
    return struct.unpack("!H", raw[2:4])[0]


def validate(cfg: CaptureConfig, log: Logger) -> bool:
    v6 = ":" in cfg.host_ip
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    loopback, passthrough = ("::1", "::6") if v6 else ("127.0.0.1", "127.0.0.6")
    passed = threading.Event()
    stop = threading.Event()
    listeners: list[socket.socket] = []
    for port in {int(cfg.envoy_port), int(cfg.inbound_capture_port)}:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((loopback, port))
            s.listen(16)
        except OSError as e:
            log.warn("validation listener failed", address=f"{loopback}:{port}", error=str(e))
            s.close()
            continue
        s.settimeout(0.2)
        listeners.append(s)
    if not listeners:
        log.error("no listener available for the validation probe")
        return False

    def serve(s: socket.socket) -> None:
        while not stop.is_set():
            try:
                conn, _ = s.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                try:
                    port = original_port(conn, v6)
                except OSError:
                    continue
                conn.sendall(str(port).encode())
                if port == cfg.probe_port:
                    passed.set()

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in listeners]
    for t in threads:
        t.start()
    deadline = time.monotonic() + cfg.probe_timeout
    try:
        while not passed.is_set() and time.monotonic() < deadline:
            try:
                with socket.socket(fam, socket.SOCK_STREAM) as c:
                    c.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
                    c.bind((loopback, 0))
                    c.connect((passthrough, cfg.probe_port))
                    c.recv(16)
            except OSError as e:
                log.debug("validation probe attempt failed", error=str(e))
            if passed.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                break
    finally:
        stop.set()
        for s in listeners:
            s.close()
    if passed.is_set():
        log.info("iptables validation passed", original=f"{passthrough}:{cfg.probe_port}")
        return True
    log.error(FAILURE + f"\nvalidation timeout after {cfg.probe_timeout}s")
    return False
