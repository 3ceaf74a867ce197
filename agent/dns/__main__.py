"""`python -m agent.dns`: the DNS proxy alone, as the agent runs it (for tests and debugging).

    python -m agent.dns --namespace NS [--domain NS.svc.cluster.local] [--table FILE] [--resolv-conf FILE]
                        [--listen 127.0.0.1:15053 ...] [--upstream-port 53]

FILE holds a NameTable in NDS wire form (meshboot.nds.encode). Prints `ready <proto> <host> <port>...` once
listening, then serves until SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from meshboot import nds

from ..log import setup
from ..metrics import Metrics
from .config import DEFAULT_ADDR, listen_addresses, parse_resolv_conf
from .resolver import Scope
from .server import DnsServer


async def _run(a: argparse.Namespace) -> int:
    with open(a.resolv_conf, "rb") as f:
        rc = parse_resolv_conf(f.read(64 * 1024).decode("utf-8", "replace"))
    table = None
    if a.table:
        with open(a.table, "rb") as f:
            table = nds.decode(f.read(nds.MAX_BYTES + 1))      # more is refused by decode's bound
    server = DnsServer(Scope(a.namespace, a.domain or f"{a.namespace}.svc.cluster.local", rc.search), rc.servers,
                       Metrics(), timeout=a.timeout, upstream_port=a.upstream_port)
    server.set_table(table)
    addrs = [x for spec in (a.listen or [DEFAULT_ADDR]) for x in listen_addresses(spec, rc)]
    await server.start(addrs)
    print("ready", *(f"{p} {h} {port}" for p, h, port in server.addresses), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.dns")
    p.add_argument("--namespace", required=True)
    p.add_argument("--domain", default="")
    p.add_argument("--table", default="")
    p.add_argument("--resolv-conf", default="/etc/resolv.conf")
    p.add_argument("--listen", action="append")
    p.add_argument("--upstream-port", type=int, default=53)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--log_output_level", default="default:info")
    a = p.parse_args(argv)
    setup(a.log_output_level)
    return asyncio.run(_run(a))


if __name__ == "__main__":
    sys.exit(main())
