"""Write Envoy's bootstraps and start Envoy — synchronously, first thing after the config is read.

Envoy's own start-up (~50–100 ms) then overlaps the agent's (importing asyncio, gRPC and the xDS messages, binding
the SDS/XDS sockets); the bootstrap asks Envoy to retry its XDS stream quickly, so it connects as soon as the
agent's socket is up. Nothing here imports asyncio.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from meshboot.files import write_atomic

from . import bootstrap
from .config import AgentConfig
from .envoy import EnvoyProcess


@dataclass
class Launched:
    envoy: EnvoyProcess
    bootstrap_path: str
    custom: bool                 # customConfigFile: given to Envoy as is, never deleted
    grpc_bootstrap_path: str


def write_json(path: str, data: dict) -> None:
    """Atomically (meshboot.files): Envoy and proxyless gRPC never read half a bootstrap."""
    write_atomic(path, json.dumps(data, indent=2).encode())


def launch(cfg: AgentConfig) -> Launched:
    """Raises OSError when a file cannot be written or Envoy cannot be started."""
    os.makedirs(cfg.config_path, mode=0o700, exist_ok=True)
    grpc_boot = os.path.join(cfg.config_path, "grpc-bootstrap.json")
    write_json(grpc_boot, bootstrap.grpc_bootstrap(cfg))
    custom = str(cfg.proxy_config.get("customConfigFile") or "")
    boot_path = custom or os.path.join(cfg.config_path, "envoy-rev.json")
    if not custom:
        write_json(boot_path, bootstrap.envoy_bootstrap(cfg))
    override = None
    if cfg.bootstrap_override:
        with open(cfg.bootstrap_override) as f:
            override = f.read().replace("$(HOST_IP)", cfg.host_ip)
    envoy = EnvoyProcess.spawn(bootstrap.envoy_args(cfg, boot_path, override))
    return Launched(envoy, boot_path, bool(custom), grpc_boot)
