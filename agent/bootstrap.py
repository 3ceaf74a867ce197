"""Envoy's bootstrap (`envoy-rev.json`), the proxyless gRPC bootstrap and Envoy's command line — pure functions.

The shape follows Istio's bootstrap template (reference/agent.md §5): node identity and metadata, admin on
127.0.0.1:15000, ADS over the agent's XDS socket, SDS over the workload socket, static listeners 15090 and 15021.
Tests check the result with `envoy --mode validate`, so Envoy's own schema is the judge.
"""
from __future__ import annotations

import json
from typing import Any

from meshboot import constants as C

from . import __version__
from .config import AgentConfig, parse_duration

LOG_FORMAT = "%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t"

# Istio's default stat tags (a subset: the ones our config emits stats for).
STATS_TAGS = [
    {"tag_name": "cluster_name", "regex": r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)"},
    {"tag_name": "tcp_prefix", "regex": r"^tcp\.((.*?)\.)\w+?$"},
    {"tag_name": "response_code", "regex": r"_rq(_(\d{3}))$"},
    {"tag_name": "response_code_class", "regex": r"_rq(_(\dxx))$"},
    {"tag_name": "http_conn_manager_listener_prefix",
     "regex": r"^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"},
    {"tag_name": "http_conn_manager_prefix", "regex": r"^http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"},
    {"tag_name": "listener_address", "regex": r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"},
]
INCLUSION_PREFIXES = ["reporter=", "cluster_manager", "listener_manager", "server", "cluster.xds-grpc", "wasm",
                      "component", "istio"]
# Standalone mode has no Istio stats filter, so keep Envoy's own passthrough stats (they show captured traffic).
STANDALONE_PREFIXES = ["tcp.", f"cluster.{C.PASSTHROUGH_CLUSTER}.", f"cluster.{C.INBOUND_PASSTHROUGH_CLUSTER}.",
                       f"cluster.{C.BLACKHOLE_CLUSTER}.", "listener.0.0.0.0_15001.", "listener.0.0.0.0_15006."]
INCLUSION_SUFFIXES = ["rbac.allowed", "rbac.denied", "shadow_allowed", "shadow_denied"]


def node_metadata(cfg: AgentConfig) -> dict[str, Any]:
    """ISTIO_META_* (prefix stripped), ISTIO_METAJSON_* merged, then the typed keys the agent owns."""
    meta: dict[str, Any] = {}
    for k, v in sorted(cfg.env.items()):
        if k.startswith(C.ISTIO_META_PREFIX) and len(k) > len(C.ISTIO_META_PREFIX):
            meta[k[len(C.ISTIO_META_PREFIX):]] = v
    for k, v in sorted(cfg.env.items()):
        if k.startswith(C.ISTIO_METAJSON_PREFIX):
            try:
                val = json.loads(v)
            except (ValueError, RecursionError):   # best effort, as in Istio; deep nesting is a RecursionError
                continue
            key = k[len(C.ISTIO_METAJSON_PREFIX):]
            if isinstance(val, dict) and isinstance(meta.get(key), dict):
                meta[key] = {**meta[key], **val}
            else:
                meta[key] = val
    labels = {k: v for k, v in cfg.labels.items() if k != "pod-template-hash"}
    if isinstance(meta.get("LABELS"), dict):
        labels = {**labels, **meta["LABELS"]}
    meta.update({
        "PROXY_CONFIG": cfg.proxy_config,
        "ISTIO_VERSION": __version__,
        "INSTANCE_IPS": ",".join(cfg.instance_ips),
        "LABELS": labels,
        "ANNOTATIONS": cfg.annotations,
        "NAMESPACE": cfg.pod_namespace,
        "NAME": cfg.pod_name,
        "SERVICE_ACCOUNT": cfg.service_account,
        "ENVOY_STATUS_PORT": cfg.envoy_status_port,
        "ENVOY_PROMETHEUS_PORT": cfg.envoy_prometheus_port,
        "ENVOY_SKIP_DEPRECATED_LOGS": "true",
        "METADATA_DISCOVERY": "false",
        "WORKLOAD_IDENTITY_SOCKET_FILE": cfg.env.get(C.ENV_WORKLOAD_SOCKET_FILE) or "socket",
    })
    if cfg.discovery_address and not cfg.xds_plaintext:
        meta["PILOT_SAN"] = [cfg.xds_server_name]
    if cfg.exit_on_zero_active:
        meta["EXIT_ON_ZERO_ACTIVE_CONNECTIONS"] = "true"
    if cfg.flags.outlier_log_path:
        meta["OUTLIER_LOG_PATH"] = cfg.flags.outlier_log_path
    return meta


def service_cluster(cfg: AgentConfig) -> str:
    sc = cfg.flags.service_cluster or cfg.proxy_config.get("serviceCluster") or "istio-proxy"
    if sc != "istio-proxy":
        return sc
    app = cfg.labels.get("app") or cfg.labels.get("app.kubernetes.io/name")
    if app:
        return f"{app}.{cfg.pod_namespace}"
    wl = cfg.env.get(C.ENV_WORKLOAD_NAME)
    return f"{wl}.{cfg.pod_namespace}" if wl else f"istio-proxy.{cfg.pod_namespace}"


def _locality(cfg: AgentConfig) -> dict[str, str]:
    loc = cfg.labels.get("topology.istio.io/locality") or cfg.labels.get("istio-locality") or ""
    parts = loc.replace("/", ".").split(".") if loc else []
    return {k: v for k, v in zip(("region", "zone", "sub_zone"), parts, strict=False) if v}


def _static_cluster(name: str, address: dict, timeout: str, http2: bool = False) -> dict:
    c: dict[str, Any] = {
        "name": name, "alt_stat_name": name + ";", "type": "STATIC", "connect_timeout": timeout,
        "load_assignment": {"cluster_name": name,
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]},
    }
    if http2:
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return c


def _route_listener(name: str, port: int, stat_prefix: str, path: str, cluster: str) -> dict:
    return {
        "name": name,
        "address": {"socket_address": {"protocol": "TCP", "address": "0.0.0.0", "port_value": port}},
        "ignore_global_conn_limit": True,
        "bypass_overload_manager": True,
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                         ".HttpConnectionManager",
                "codec_type": "AUTO", "stat_prefix": stat_prefix,
                "route_config": {"virtual_hosts": [{"name": "backend", "domains": ["*"], "routes": [
                    {"match": {"prefix": path}, "route": {"cluster": cluster}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}]}],
    }


def _runtime(pc: dict[str, Any]) -> dict[str, Any]:
    """Istio's static runtime layer, with ProxyConfig runtimeValues applied ("" removes a key)."""
    runtime: dict[str, Any] = {
        "re2.max_program_size.error_level": "32768",
        "envoy.deprecated_features:envoy.config.listener.v3.Listener.hidden_envoy_deprecated_use_original_dst": True,
        "envoy.reloadable_features.http_reject_path_with_fragment": False,
        "envoy.reloadable_features.fixed_heap_use_allocated": True,
        "envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update": False,
    }
    for k, v in (pc.get("runtimeValues") or {}).items():
        if v == "":
            runtime.pop(k, None)
        else:
            runtime[k] = {"true": True, "false": False}.get(v, v)
    return runtime


def _stats_patterns(cfg: AgentConfig) -> list[dict[str, Any]]:
    """The stats inclusion list (standalone mode keeps Envoy's passthrough stats too)."""
    prefixes = list(INCLUSION_PREFIXES)
    if cfg.standalone:
        prefixes += STANDALONE_PREFIXES
    suffixes = list(INCLUSION_SUFFIXES)
    if cfg.exit_on_zero_active:
        suffixes.append("downstream_cx_active")
    return ([{"prefix": p} for p in prefixes] + [{"suffix": s} for s in suffixes]
            + [{"safe_regex": {"regex": r"vhost\..*\.route\..*"}}])


def _static_resources(cfg: AgentConfig) -> dict[str, Any]:
    """Clusters prometheus_stats, agent, sds-grpc, xds-grpc; listeners 15090 and (with a status port) 15021."""
    xds = _static_cluster(C.XDS_CLUSTER, {"pipe": {"path": cfg.xds_socket}}, "1s", http2=True)
    xds["circuit_breakers"] = {"thresholds": [
        {"priority": "DEFAULT", "max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000},
        {"priority": "HIGH", "max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}]}
    xds["upstream_connection_options"] = {"tcp_keepalive": {"keepalive_time": 300}}
    xds["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
        "common_http_protocol_options"] = {"max_requests_per_connection": 1}
    localhost = "127.0.0.1"
    clusters = [
        _static_cluster("prometheus_stats", {"socket_address": {"protocol": "TCP", "address": localhost,
                                                                 "port_value": cfg.admin_port}}, "0.250s"),
        _static_cluster("agent", {"socket_address": {"protocol": "TCP", "address": localhost,
                                                      "port_value": cfg.status_port}}, "0.250s"),
        _static_cluster(C.SDS_CLUSTER, {"pipe": {"path": cfg.workload_socket}}, "1s", http2=True),
        xds,
    ]
    listeners = [_route_listener(f"0.0.0.0_{cfg.envoy_prometheus_port}", cfg.envoy_prometheus_port, "stats",
                                 C.PROMETHEUS_STATS_PATH, "prometheus_stats")]
    if cfg.status_port:
        listeners.append(_route_listener(f"0.0.0.0_{cfg.envoy_status_port}", cfg.envoy_status_port, "agent",
                                         C.HEALTHZ_READY_PATH, "agent"))
    return {"clusters": clusters, "listeners": listeners}


def envoy_bootstrap(cfg: AgentConfig) -> dict[str, Any]:
    """The rendered bootstrap, as the JSON object Envoy loads."""
    ads_source = {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}
    localhost = "127.0.0.1"
    node: dict[str, Any] = {"id": cfg.node_id, "cluster": service_cluster(cfg), "metadata": node_metadata(cfg)}
    loc = _locality(cfg)
    if loc:
        node["locality"] = loc
    fmt = ({"json_format": {"level": "%l", "time": "%Y-%m-%dT%T.%fZ", "scope": "envoy %n", "msg": "%v",
                            "caller": "%g:%#", "thread": "%t"}}
           if cfg.flags.log_as_json else {"text_format": LOG_FORMAT})
    return {
        "node": node,
        "application_log_config": {"log_format": fmt},
        "layered_runtime": {"layers": [{"name": "global config", "static_layer": _runtime(cfg.proxy_config)},
                                       {"name": "admin", "admin_layer": {}}]},
        "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
            "buffer_size_kb": 64}}],
        "stats_config": {"use_all_default_tags": False, "stats_tags": STATS_TAGS,
                         "stats_matcher": {"inclusion_list": {"patterns": _stats_patterns(cfg)}}},
        "admin": {
            "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": "/dev/null"}}],
            "profile_path": "/var/lib/istio/data/envoy.prof",
            "address": {"socket_address": {"protocol": "TCP", "address": localhost, "port_value": cfg.admin_port}},
        },
        "dynamic_resources": {
            "lds_config": ads_source, "cds_config": ads_source,
            "ads_config": {"api_type": "DELTA_GRPC" if cfg.delta_xds else "GRPC",
                           "set_node_on_first_message_only": True, "transport_api_version": "V3",
                           # Envoy starts before the agent's XDS socket is up (launch.py): retry the stream
                           # quickly; it is a local socket, the agent paces the real upstream.
                           "grpc_services": [{"envoy_grpc": {"cluster_name": C.XDS_CLUSTER, "retry_policy": {
                               "retry_back_off": {"base_interval": "0.02s", "max_interval": "1s"}}}}]},
        },
        "static_resources": _static_resources(cfg),
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections"
                                      ".v3.DownstreamConnectionsConfig",
                             "max_active_downstream_connections": 2147483647}}]},
    }


def grpc_bootstrap(cfg: AgentConfig) -> dict[str, Any]:
    """Proxyless gRPC's bootstrap: same node, ADS over the agent's XDS socket."""
    xds_abs = cfg.xds_socket[1:] if cfg.xds_socket.startswith("./") else cfg.xds_socket
    meta = {**node_metadata(cfg), "GENERATOR": "grpc"}
    out: dict[str, Any] = {
        "xds_servers": [{"server_uri": f"unix:///{xds_abs.lstrip('/')}", "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}],
        "node": {"id": cfg.node_id, "locality": _locality(cfg), "metadata": meta},
        "server_listener_resource_name_template": "xds.istio.io/grpc/lds/inbound/%s",
    }
    if cfg.output_certs:
        d = cfg.output_certs.rstrip("/")
        out["certificate_providers"] = {"default": {"plugin_name": "file_watcher", "config": {
            "certificate_file": f"{d}/cert-chain.pem", "private_key_file": f"{d}/key.pem",
            "ca_certificate_file": f"{d}/root-cert.pem", "refresh_interval": "900s"}}}
    return out


def envoy_args(cfg: AgentConfig, bootstrap_path: str, override_json: str | None = None) -> list[str]:
    """Envoy's command line in pilot-agent's order (reference/agent.md §6.1)."""
    pc = cfg.proxy_config
    flush_ms = int(parse_duration(pc.get("fileFlushInterval") or "1s", "ProxyConfig.fileFlushInterval") * 1000)
    args = [cfg.envoy_binary, "-c", bootstrap_path,
            "--drain-time-s", str(int(cfg.drain_duration)), "--drain-strategy", "immediate",
            "--local-address-ip-version", "v6" if all(":" in ip for ip in cfg.instance_ips) else "v4",
            "--file-flush-interval-msec", str(flush_ms),
            "--disable-hot-restart", "--allow-unknown-static-fields"]
    if int(pc.get("fileFlushMinSizeKb") or 0) > 0:
        args += ["--file-flush-min-size-kb", str(int(pc["fileFlushMinSizeKb"]))]
    level, components = "", []
    for tok in (cfg.flags.proxy_log_level or "").split(","):
        tok = tok.strip()
        if not tok:
            continue
        if ":" in tok:
            components.append(tok)
        else:
            level = tok
    args += ["-l", level or "warning"]
    if components:
        args += ["--component-log-level", ",".join(components)]
    elif cfg.flags.proxy_component_log_level:
        args += ["--component-log-level", cfg.flags.proxy_component_log_level]
    args.append("--skip-deprecated-logs")
    if override_json:
        args += ["--config-yaml", override_json]
    if cfg.concurrency > 0:
        args += ["--concurrency", str(cfg.concurrency)]
    return args
