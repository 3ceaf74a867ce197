"""`python -m ca`: the workload CA alone (for the local pod runner and agent tests), with health+metrics."""
from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
from types import ModuleType

from meshboot import constants as C
from meshboot import logs
from meshboot.monitoring import start_monitoring

from .config import CAConfig, ConfigError, add_ca_arguments
from .server import serve

_uvloop: ModuleType | None
try:  # what uvicorn runs the combined control plane on; grpc.aio is faster on it too
    import uvloop as _uvloop
except ImportError:  # an optional extra: asyncio's own loop then
    _uvloop = None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ca", description=__doc__)
    add_ca_arguments(p)
    p.add_argument("--ca-monitoring-port", type=int, default=C.MONITORING_PORT,
                   help="plain HTTP /metrics, /healthz, /readyz (0 disables)")
    p.add_argument("--ca-monitoring-address", default="0.0.0.0")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    return p


async def run(args: argparse.Namespace) -> int:
    cfg = CAConfig.from_args(args)
    if cfg.port == 0:
        print("meshboot CA disabled (--ca-port 0)", flush=True)
        return 0
    running = await serve(cfg)
    mon = None
    if args.ca_monitoring_port:
        mon = await start_monitoring(args.ca_monitoring_address, args.ca_monitoring_port)
    # Everything built so far lives as long as the process: keep it out of the cyclic GC's full collections.
    gc.collect()
    gc.freeze()
    print(f"meshboot CA serving on {cfg.address}:{running.port} root={running.root_file} ({running.source})",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if mon is not None:
        mon.close()
    await running()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup(args.log_level)          # the control plane's JSON-lines logging
    try:
        if _uvloop is not None:
            return _uvloop.run(run(args))
        return asyncio.run(run(args))
    except (ConfigError, ValueError, OSError) as e:
        print(f"meshboot CA: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
