"""Envoy's bootstrap (`envoy-rev.json`), the proxyless gRPC bootstrap and Envoy's command line — pure functions.

The output is pilot-agent's for the same ProxyConfig and pod: Istio's template
(`tools/packaging/common/envoy_bootstrap.json`) and `pkg/bootstrap/config.go` are the reference, and
tests/agent/test_agent_bootstrap_parity.py compares it with Istio's own goldens (`pkg/bootstrap/testdata`). The node
is nodemeta.py's, the telemetry (stats tags and matchers, tracing, sinks) telemetry.py's. Tests check the result
with `envoy --mode validate`, so Envoy's own schema is the judge. Where meshboot differs on purpose, docs/agent.md
lists it.
"""
from __future__ import annotations

from typing import Any

from meshboot import constants as C
from meshboot.syntax import parse_go_bool

from . import nodemeta, telemetry
from .config import AgentConfig, ConfigError, load_json, parse_duration, parse_int, show

LOG_FORMAT = "%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t"
MAX_CONNECTIONS = 2147483647          # Go's math.MaxInt32: the overload manager's "unlimited"
GLOBAL_MAX_CONNECTIONS_META = "ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS"
STATS_COMPRESSORS = (("brotli", "Brotli"), ("zstd", "Zstd"), ("gzip", "Gzip"))
HTTP2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {"http2_protocol_options": {}}}}


def node_metadata(cfg: AgentConfig) -> dict[str, Any]:
    """The node metadata (nodemeta.py)."""
    return nodemeta.node_metadata(cfg)


def service_cluster(cfg: AgentConfig) -> str:
    return nodemeta.service_cluster(cfg, nodemeta.node_metadata(cfg))


def addresses(cfg: AgentConfig) -> tuple[str, str, str]:
    """(localhost, wildcard, DNS family) by the instance IPs' family, as Istio's: IPv6 only when all are IPv6."""
    if all(":" in ip for ip in cfg.instance_ips):
        return "::1", "::", "V6_ONLY"
    return "127.0.0.1", "0.0.0.0", "V4_ONLY"


def _static_cluster(name: str, address: dict, timeout: str, http2: bool = False) -> dict:
    c: dict[str, Any] = {"name": name, "alt_stat_name": name + ";", "type": "STATIC"}
    if http2:
        c["typed_extension_protocol_options"] = HTTP2
    c.update({"connect_timeout": timeout, "lb_policy": "ROUND_ROBIN", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]}})
    return c


def _compressor(name: str, kind: str) -> dict[str, Any]:
    return {"name": f"envoy.filters.http.compressor.{name}", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor",
        "compressor_library": {"name": f"stats_{name}", "typed_config": {
            "@type": f"type.googleapis.com/envoy.extensions.compression.{name}.compressor.v3.{kind}"}},
        "response_direction_config": {"common_config": {"content_type": [
            "text/plain", "application/vnd.google.protobuf", "application/openmetrics-text",
            "application/openmetrics-protobuf"]}}}}


def _route_listener(name: str, address: str, port: int, stat_prefix: str, path: str, cluster: str,
                    filters: list[dict[str, Any]] | None = None) -> dict:
    return {
        "name": name,
        "address": {"socket_address": {"protocol": "TCP", "address": address, "port_value": port}},
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
                "http_filters": (filters or []) + [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}]}],
    }


def _secure_listener(wildcard: str, port: int, stat_prefix: str, routes: list[tuple[str, str]]) -> dict[str, Any]:
    """An mTLS metrics listener (ENVOY_SECURE_[MERGED_]METRICS_PORT): the workload certificate over SDS, a client
    certificate from the mesh required."""
    lst = _route_listener(f"{wildcard}_{port}", wildcard, port, stat_prefix, routes[0][0], routes[0][1])
    chain = lst["filter_chains"][0]
    chain["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"] = [
        {"match": {"prefix": path}, "route": {"cluster": cluster}} for path, cluster in routes]
    sds = {"api_config_source": {"api_type": "GRPC", "grpc_services": [{"envoy_grpc": {"cluster_name": C.SDS_CLUSTER}}],
                                 "set_node_on_first_message_only": True, "transport_api_version": "V3"},
           "resource_api_version": "V3"}
    lst["listener_filters"] = [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]
    lst["filter_chains"] = [{"filter_chain_match": {"transport_protocol": "tls"}, "transport_socket": {
        "name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True, "common_tls_context": {
                "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds}],
                "combined_validation_context": {
                    "default_validation_context": {},
                    "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds}}}}},
        "filters": chain["filters"]}]
    return lst


def _runtime(cfg: AgentConfig) -> dict[str, Any]:
    """Istio's static runtime layer (FIPS and fragment-stripping variants from the env), with ProxyConfig
    runtimeValues applied ("" removes a key, "true"/"false" become booleans)."""
    runtime: dict[str, Any] = {
        "re2.max_program_size.error_level": "32768",
        "envoy.deprecated_features:envoy.config.listener.v3.Listener.hidden_envoy_deprecated_use_original_dst": True,
        "envoy.reloadable_features.http_reject_path_with_fragment": False,
        "envoy.reloadable_features.fixed_heap_use_allocated": True,
        "envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update": False,
    }
    if cfg.env.get("COMPLIANCE_POLICY") == "fips-140-2":
        runtime["envoy.reloadable_features.google_grpc_disable_tls_13"] = True
    if parse_go_bool(cfg.env.get("HTTP_STRIP_FRAGMENT_FROM_PATH_UNSAFE_IF_DISABLED") or "true") is False:
        runtime["envoy.reloadable_features.http_strip_fragment_from_path_unsafe_if_disabled"] = "false"
    for k, v in (cfg.proxy_config.get("runtimeValues") or {}).items():
        if v == "":
            runtime.pop(k, None)
        else:
            runtime[k] = {"true": True, "false": False}.get(v, v)
    return dict(sorted(runtime.items()))


def max_connections(cfg: AgentConfig) -> int:
    """The overload manager's global connection limit, in Istio's precedence: ProxyConfig
    connectionSettings.globalDownstreamConnectionLimit, proxyMetadata ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS,
    runtimeValues overload.global_downstream_max_connections, else unlimited."""
    pc = cfg.proxy_config
    settings = pc.get("connectionSettings") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"ProxyConfig.connectionSettings: want an object, got {show(settings)}")
    limit = settings.get("globalDownstreamConnectionLimit")
    if limit not in (None, 0, "0", ""):
        return parse_int(limit, "ProxyConfig.connectionSettings.globalDownstreamConnectionLimit", 1, MAX_CONNECTIONS)
    for where, text in ((f"ProxyConfig.proxyMetadata.{GLOBAL_MAX_CONNECTIONS_META}",
                         (pc.get("proxyMetadata") or {}).get(GLOBAL_MAX_CONNECTIONS_META)),
                        ("ProxyConfig.runtimeValues.overload.global_downstream_max_connections",
                         (pc.get("runtimeValues") or {}).get("overload.global_downstream_max_connections"))):
        if text:
            return parse_int(text, where, 0, MAX_CONNECTIONS)
    return MAX_CONNECTIONS


def _stats_compression(cfg: AgentConfig) -> bool:
    v = cfg.proxy_config.get("statsCompression", True)
    if not isinstance(v, bool):
        raise ConfigError(f"ProxyConfig.statsCompression: want true or false, got {show(v)}")
    return v


def _static_resources(cfg: AgentConfig, meta: dict[str, Any], extra: list[dict[str, Any]]) -> dict[str, Any]:
    """Clusters prometheus_stats, agent, sds-grpc, xds-grpc (+ tracer/metrics/access-log services); listeners
    15090 and (with a status port) 15021."""
    localhost, wildcard, _ = addresses(cfg)
    xds = _static_cluster(C.XDS_CLUSTER, {"pipe": {"path": cfg.xds_socket}}, "1s")
    xds["circuit_breakers"] = {"thresholds": [
        {"priority": "DEFAULT", "max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000},
        {"priority": "HIGH", "max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}]}
    xds["upstream_connection_options"] = {"tcp_keepalive": {"keepalive_time": 300}}
    xds["max_requests_per_connection"] = 1
    xds["typed_extension_protocol_options"] = HTTP2
    clusters = [
        _static_cluster("prometheus_stats", {"socket_address": {"protocol": "TCP", "address": localhost,
                                                                 "port_value": cfg.admin_port}}, "0.250s"),
        _static_cluster("agent", {"socket_address": {"protocol": "TCP", "address": localhost,
                                                      "port_value": cfg.status_port}}, "0.250s"),
        _static_cluster(C.SDS_CLUSTER, {"pipe": {"path": cfg.workload_socket}}, "1s", http2=True),
        xds, *extra]
    metrics_addr = localhost if cfg.metrics_localhost_only else wildcard
    compressors = [_compressor(n, k) for n, k in STATS_COMPRESSORS] if _stats_compression(cfg) else []
    port = cfg.envoy_prometheus_port
    listeners = [_route_listener(f"{metrics_addr}_{port}", metrics_addr, port, "stats", C.PROMETHEUS_STATS_PATH,
                                 "prometheus_stats", compressors)]
    secure, merged = nodemeta.secure_metrics_ports(cfg)
    if secure:
        listeners.append(_secure_listener(wildcard, secure, "secure_stats",
                                          [(C.PROMETHEUS_STATS_PATH, "prometheus_stats")]))
    if merged:
        listeners.append(_secure_listener(wildcard, merged, "secure_merged_stats",
                                          [(C.PROMETHEUS_STATS_PATH, "agent"), ("/metrics", "agent")]))
    if cfg.status_port:
        status = _route_listener(f"{wildcard}_{cfg.envoy_status_port}", wildcard, cfg.envoy_status_port, "agent",
                                 C.HEALTHZ_READY_PATH, "agent")
        if _env_bool(cfg, "ENVOY_STATUS_PORT_ENABLE_PROXY_PROTOCOL"):   # kubelet probes through a PROXY-protocol LB
            status["listener_filters"] = [{"name": "envoy.listener.proxy_protocol", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol",
                "allow_requests_without_proxy_protocol": True}}]
        listeners.append(status)
    if meta.get("ENABLE_SELF_DISCOVERY") == "true":
        clusters.append(_local_cluster())
    return {"clusters": clusters, "listeners": listeners}


def _env_bool(cfg: AgentConfig, name: str) -> bool:
    value = parse_go_bool(cfg.env.get(name) or "false")
    if value is None:
        raise ConfigError(f"env {name}: invalid boolean {show(cfg.env[name])} (want true or false)")
    return value


def _local_cluster() -> dict[str, Any]:
    """ISTIO_META_ENABLE_SELF_DISCOVERY: the workload's own endpoints over EDS, for zone-aware load balancing."""
    return {"name": "local_cluster", "alt_stat_name": "local_cluster;", "type": "EDS", "connect_timeout": "1s",
            "load_balancing_policy": {"policies": [{"typed_extension_config": {
                "name": "envoy.load_balancing_policies.least_request", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3"
                             ".LeastRequest",
                    "locality_lb_config": {"zone_aware_lb_config": {"min_cluster_size": "1"}}}}}]},
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"},
                                   "service_name": "local_cluster"}}


def _cluster_manager(cfg: AgentConfig, meta: dict[str, Any]) -> dict[str, Any] | None:
    """Outlier event log (`--outlierLogPath`) and LRS (ISTIO_META_LOAD_STATS_CONFIG_JSON), as Istio's template."""
    out: dict[str, Any] = {}
    if meta.get("ENABLE_SELF_DISCOVERY") == "true":
        out["local_cluster_name"] = "local_cluster"
    if cfg.flags.outlier_log_path:
        out["outlier_detection"] = {"event_log_path": cfg.flags.outlier_log_path}
    lrs = meta.get("LOAD_STATS_CONFIG_JSON")
    if lrs:
        where = "env ISTIO_META_LOAD_STATS_CONFIG_JSON"
        data = load_json(lrs, where) if isinstance(lrs, str) else lrs
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: want a JSON object (an ApiConfigSource), got {show(lrs)}")
        out["load_stats_config"] = data
    if not out:
        return None
    return {**out, "enable_deferred_cluster_creation": True}


def envoy_bootstrap(cfg: AgentConfig) -> dict[str, Any]:
    """The rendered bootstrap, as the JSON object Envoy loads. Raises ConfigError for a bad tenant value."""
    meta = nodemeta.node_metadata(cfg)
    cluster = nodemeta.service_cluster(cfg, meta)
    localhost, _, family = addresses(cfg)
    tracer_clusters, tracing = telemetry.tracing(cfg, meta, cluster, family)
    service_clusters, sinks = telemetry.services(cfg, meta, family)
    ads_source = {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}
    fmt = ({"json_format": {"time": "%Y-%m-%dT%T.%fZ", "level": "%l", "scope": "envoy %n", "msg": "%j",
                            "caller": "%g:%#", "thread": "%t"}}
           if cfg.flags.log_as_json else {"text_format": LOG_FORMAT})
    boot: dict[str, Any] = {
        "application_log_config": {"log_format": fmt},
        "node": {"id": cfg.node_id, "cluster": cluster, "locality": nodemeta.locality(meta.get("LABELS") or {}),
                 "metadata": meta},
        "layered_runtime": {"layers": [{"name": "global config", "static_layer": _runtime(cfg)},
                                       {"name": "admin", "admin_layer": {}}]},
        "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener", "typed_config": {
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
            "value": {"buffer_size_kb": 64}}}],
        **telemetry.stats_intervals(meta.get("ANNOTATIONS") or {}),
        "stats_config": telemetry.stats_config(cfg, meta),
        "admin": {
            "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": "/dev/null"}}],
            "profile_path": "/var/lib/istio/data/envoy.prof",
            "address": {"socket_address": {"address": localhost, "port_value": cfg.admin_port}},
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
        "static_resources": _static_resources(cfg, meta, tracer_clusters + service_clusters),
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections"
                                      ".v3.DownstreamConnectionsConfig",
                             "max_active_downstream_connections": max_connections(cfg)}}]},
    }
    if tracing:
        boot["tracing"] = tracing
    if sinks:
        boot["stats_sinks"] = sinks
    manager = _cluster_manager(cfg, meta)
    if manager:
        boot["cluster_manager"] = manager
    boot["deferred_stat_options"] = {"enable_deferred_creation_stats": True}
    return boot


def grpc_bootstrap(cfg: AgentConfig) -> dict[str, Any]:
    """Proxyless gRPC's bootstrap: same node, ADS over the agent's XDS socket."""
    xds_abs = cfg.xds_socket[1:] if cfg.xds_socket.startswith("./") else cfg.xds_socket
    meta = {**nodemeta.node_metadata(cfg), "GENERATOR": "grpc"}
    out: dict[str, Any] = {
        "xds_servers": [{"server_uri": f"unix:///{xds_abs.lstrip('/')}", "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}],
        "node": {"id": cfg.node_id, "locality": nodemeta.locality(meta.get("LABELS") or {}), "metadata": meta},
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
