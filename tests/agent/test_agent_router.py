"""`proxy router`: the agent of a gateway pod (the webhook's `gateway` template). pilot-agent's node id and type,
listeners from the control plane only (no standalone sidecar config), no DNS capture, and a drain of every listener
rather than the inbound ones (pilot-agent drains inbound only when the proxy is a sidecar)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from agent import bootstrap
from agent.cli import _load_config, proxy_parser
from agent.config import ConfigError, Flags, build_config
from agent.dns.config import dns_env, dns_settings
from agent.sidecar import Sidecar
from meshboot import constants as C

ENV = {"POD_NAME": "istio-ingressgateway-7d4b9c8f6-x2k9q", "POD_NAMESPACE": "istio-ingress",
       "INSTANCE_IP": "10.1.2.3", "SERVICE_ACCOUNT": "istio-ingressgateway", "ENVOY_BINARY": "/bin/envoy",
       "PROXY_CONFIG": '{"discoveryAddress": "meshboot-webhook.istio-system.svc:15012"}\n'}
FILES = {C.ROOT_CERT_PATH: "root", "/bin/envoy": "elf"}


def cfg_of(node_type: str, **env: str) -> Any:
    args, _ = proxy_parser().parse_known_args([node_type, "--domain", "istio-ingress.svc.cluster.local"])
    flags = Flags(node_type=args.type, domain=args.domain)
    return build_config(flags, {**ENV, **env}, FILES.get, lambda p: p in FILES, lambda n: None)


def test_router_node_id_and_bootstrap() -> None:
    cfg = cfg_of("router")
    assert cfg.node_type == "router"
    assert cfg.node_id == ("router~10.1.2.3~istio-ingressgateway-7d4b9c8f6-x2k9q.istio-ingress~"
                           "istio-ingress.svc.cluster.local")
    assert not cfg.standalone
    assert bootstrap.envoy_bootstrap(cfg)["node"]["id"] == cfg.node_id
    assert cfg_of("sidecar").node_id.startswith("sidecar~10.1.2.3~")


def test_router_needs_the_control_plane() -> None:
    with pytest.raises(ConfigError, match="proxy router needs a discovery address"):
        cfg_of("router", PROXY_CONFIG="{}\n")


@pytest.mark.parametrize("node_type", ["waypoint", "ztunnel", "agentgateway"])
def test_other_istio_types_refused(node_type: str) -> None:
    with pytest.raises(ConfigError, match=f"proxy type '{node_type}' is not supported by meshboot"):
        cfg_of(node_type)


def test_router_has_no_dns_capture_but_may_serve_dns() -> None:
    """pilot-agent: DNS capture is a sidecar's; a gateway runs the DNS proxy only with ISTIO_META_ENABLE_DNS_SERVER."""
    assert dns_settings(dns_env("sidecar", cfg_of("sidecar", ISTIO_META_DNS_CAPTURE="true").env)).enabled
    assert not dns_settings(dns_env("router", cfg_of("router", ISTIO_META_DNS_CAPTURE="true").env)).enabled
    assert dns_settings(dns_env("router", cfg_of("router", ISTIO_META_ENABLE_DNS_SERVER="true").env)).enabled


class _Admin:
    def __init__(self) -> None:
        self.posted: list[str] = []

    async def post(self, path: str, timeout: float = 5.0) -> Any:
        self.posted.append(path)
        return SimpleNamespace(status=200)


@pytest.mark.parametrize(("node_type", "want"), [
    ("router", ["/drain_listeners?graceful&skip_exit"]),
    ("sidecar", ["/drain_listeners?inboundonly&graceful&skip_exit", "/drain_listeners?inboundonly&skip_exit"]),
])
def test_drain_scope(node_type: str, want: list[str]) -> None:
    agent = Sidecar.__new__(Sidecar)
    agent.cfg = cfg_of(node_type)
    agent.admin = _Admin()
    asyncio.run(agent._drain_listeners(skip_exit=True))
    assert agent.admin.posted == want


def test_a_router_is_not_stopped_by_dns_env_it_does_not_use() -> None:
    """The start-up check reads the DNS env as the router's DNS proxy would: with DNS capture ignored (and no DNS
    server asked for) the proxy is off, so DNS_* values cannot stop the gateway; a sidecar with capture is stopped."""
    cfg = cfg_of("router", ISTIO_META_DNS_CAPTURE="true", DNS_FORWARD_TIMEOUT="1h", DNS_PROXY_ADDR="nope")
    assert _load_config(cfg) is cfg
    with pytest.raises(ConfigError, match="DNS_FORWARD_TIMEOUT"):
        _load_config(cfg_of("sidecar", ISTIO_META_DNS_CAPTURE="true", DNS_FORWARD_TIMEOUT="1h"))
    with pytest.raises(ConfigError, match="DNS_PROXY_ADDR"):
        _load_config(cfg_of("router", ISTIO_META_ENABLE_DNS_SERVER="true", DNS_PROXY_ADDR="nope"))
