"""The bootstrap's telemetry as pilot-agent renders it — stats tags and matchers, tracing, stats sinks: pure functions.

Inputs are the pod's annotations (`sidecar.istio.io/statsInclusion{Prefixes,Suffixes,Regexps}`, `extraStatTags`,
`statsHistogramBuckets`, `statsFlushInterval`, `statsEvictionInterval`) and ProxyConfig (`extraStatTags`,
`proxyStatsMatcher`, `tracing`, `statsdUdpAddress`, `envoyMetricsService`, `envoyAccessLogService`). Istio's
`pkg/bootstrap/config.go` and its template (`tools/packaging/common/envoy_bootstrap.json`) are the reference; the
output is checked against Istio's goldens by tests/agent/test_agent_bootstrap_parity.py. Tenants write these
values, so each is type-checked and bounded, and a bad one is one `ConfigError` naming it.
"""
from __future__ import annotations

import json
import re
from typing import Any

from meshboot import constants as C

from .config import AgentConfig, ConfigError, parse_duration, parse_int, show

ANNOTATION_PREFIXES = "sidecar.istio.io/statsInclusionPrefixes"
ANNOTATION_SUFFIXES = "sidecar.istio.io/statsInclusionSuffixes"
ANNOTATION_REGEXPS = "sidecar.istio.io/statsInclusionRegexps"
ANNOTATION_EXTRA_TAGS = "sidecar.istio.io/extraStatTags"
ANNOTATION_BUCKETS = "sidecar.istio.io/statsHistogramBuckets"
ANNOTATION_FLUSH = "sidecar.istio.io/statsFlushInterval"
ANNOTATION_EVICTION = "sidecar.istio.io/statsEvictionInterval"

MAX_PATTERNS = 1024            # stats matcher entries / extra tags / histogram prefixes from one pod
MAX_PATTERN = 1024             # one pattern's length

# Istio's template, in its order (the extra stat tags go after mongo_prefix).
STATS_TAGS_HEAD = [
    {"tag_name": "cluster_name", "regex": r"^cluster(\.(.+);)"},
    {"tag_name": "http_conn_manager_prefix",
     "regex": r"^http\.(((?:[_.[:digit:]\w]*|[_\[\]aAbBcCdDeEfF[:digit:]\w\:]*));\.)"},
    {"tag_name": "thread_name", "regex": r"^server(\.(.+))\.watchdog"},
    {"tag_name": "tcp_prefix", "regex": r"^tcp\.((.*?)\.)\w+?$"},
    {"tag_name": "response_code", "regex": r"_rq(_(\d{3}))$"},
    {"tag_name": "response_code_class", "regex": r"_rq(_(\dxx))$"},
    {"tag_name": "http_conn_manager_listener_prefix",
     "regex": r"^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"},
    {"tag_name": "listener_address", "regex": r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"},
    {"tag_name": "mongo_prefix", "regex": r"^mongo\.(.+?)\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$"},
]
STATS_TAGS_TAIL = [
    {"tag_name": "cache", "regex": r"(cache\.(.+?)\.)"},
    {"tag_name": "component", "regex": r"(component\.(.+?)\.)"},
    {"tag_name": "tag", "regex": r"(tag\.(.+?);\.)"},
    {"tag_name": "wasm_filter", "regex": r"(wasm_filter\.(.+?)\.)"},
    {"tag_name": "authz_enforce_result", "regex": r"rbac(\.(allowed|denied))"},
    {"tag_name": "authz_dry_run_action", "regex": r"(\.istio_dry_run_(allow|deny)_)"},
    {"tag_name": "authz_dry_run_result", "regex": r"(\.shadow_(allowed|denied))"},
]
REQUIRED_PREFIXES = ["cluster_manager", "listener_manager", "server", "cluster.xds-grpc", "wasm"]
RBAC_SUFFIXES = ["rbac.allowed", "rbac.denied", "shadow_allowed", "shadow_denied"]
REQUIRED_REGEXPS = [r"vhost\..*\.route\..*"]
# Standalone mode has no Istio stats filter, so keep Envoy's own passthrough stats (they show captured traffic).
STANDALONE_PREFIXES = ["tcp.", f"cluster.{C.PASSTHROUGH_CLUSTER}.", f"cluster.{C.INBOUND_PASSTHROUGH_CLUSTER}.",
                       f"cluster.{C.BLACKHOLE_CLUSTER}.", "listener.0.0.0.0_15001.", "listener.0.0.0.0_15006."]
_TAG_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}", re.ASCII)   # goes into a regex and a Prometheus label


def _strings(v: Any, where: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{where}: want a list of strings, got {show(v)}")
    return _bounded(v, where)


def _bounded(items: list[str], where: str) -> list[str]:
    if len(items) > MAX_PATTERNS:
        raise ConfigError(f"{where}: more than {MAX_PATTERNS} entries")
    for s in items:
        if len(s) > MAX_PATTERN:
            raise ConfigError(f"{where}: an entry longer than {MAX_PATTERN} characters")
    return items


def _csv(annotations: dict[str, str], key: str) -> list[str] | None:
    """An annotation's comma-separated list (None when the annotation is absent or empty, as Istio's len() > 0)."""
    text = annotations.get(key) or ""
    return _bounded(text.split(","), f"annotation {key}") if text else None


def _inclusion(anno: list[str] | None, from_pc: list[str], required: list[str], ips: list[str]) -> list[str]:
    """Istio's parseOption: the annotation, else ProxyConfig's list (never both), then the required entries;
    `{pod_ip}` expands to one entry per instance IP."""
    out: list[str] = []
    for p in (anno if anno is not None else from_pc) + required:
        out += [p.replace("{pod_ip}", ip) for ip in ips] if "{pod_ip}" in p else [p]
    return out


def extra_stat_tags(cfg: AgentConfig, annotations: dict[str, str]) -> list[str]:
    """ProxyConfig `extraStatTags` then the annotation's, empty ones dropped, first occurrence kept."""
    tags = _strings(cfg.proxy_config.get("extraStatTags"), "ProxyConfig.extraStatTags")
    tags = tags + (_csv(annotations, ANNOTATION_EXTRA_TAGS) or [])
    for t in tags:
        if t and not _TAG_NAME.fullmatch(t):
            raise ConfigError(f"extra stat tag {show(t)}: want letters, digits, '_', '.', '-' (≤ 128)")
    return list(dict.fromkeys(t for t in tags if t))


def histogram_buckets(annotations: dict[str, str]) -> list[dict[str, Any]]:
    """`statsHistogramBuckets`: {"<prefix>": [bounds…]} → Envoy's histogram_bucket_settings, sorted by prefix."""
    text = annotations.get(ANNOTATION_BUCKETS)
    if text is None:
        return []
    where = f"annotation {ANNOTATION_BUCKETS}"
    try:
        data = json.loads(text) if len(text) <= 64 * 1024 else None
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or len(data) > MAX_PATTERNS:
        raise ConfigError(f"{where}: want a JSON object of prefix → list of bucket bounds, got {show(text)}")
    out = []
    for prefix, bounds in sorted(data.items()):
        if not isinstance(bounds, list) or not bounds or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1e300 for b in bounds):
            raise ConfigError(f"{where}: {show(prefix)}: want a non-empty list of positive numbers")
        out.append({"match": {"prefix": prefix}, "buckets": bounds})
    return out


def stats_config(cfg: AgentConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """stats_config: Istio's tags (+ extra), the inclusion list in the template's order, histogram buckets."""
    annotations: dict[str, str] = meta.get("ANNOTATIONS") or {}
    pc = cfg.proxy_config
    matcher = pc.get("proxyStatsMatcher") or {}
    if not isinstance(matcher, dict):
        raise ConfigError(f"ProxyConfig.proxyStatsMatcher: want an object, got {show(matcher)}")
    ips = list(dict.fromkeys(cfg.instance_ips))

    def pc_list(name: str) -> list[str]:
        return _strings(matcher.get(name), f"ProxyConfig.proxyStatsMatcher.{name}")

    prefixes = _inclusion(_csv(annotations, ANNOTATION_PREFIXES), pc_list("inclusionPrefixes"),
                          REQUIRED_PREFIXES + (STANDALONE_PREFIXES if cfg.standalone else []), ips)
    suffixes = _inclusion(_csv(annotations, ANNOTATION_SUFFIXES), pc_list("inclusionSuffixes"),
                          RBAC_SUFFIXES + (["downstream_cx_active"] if cfg.exit_on_zero_active else []), ips)
    regexps = _inclusion(_csv(annotations, ANNOTATION_REGEXPS), pc_list("inclusionRegexps"), REQUIRED_REGEXPS, ips)
    tags = [{"tag_name": t, "regex": f"({t}=\\.=(.*?);\\.;)"} for t in extra_stat_tags(cfg, annotations)]
    out: dict[str, Any] = {"use_all_default_tags": False, "stats_tags": STATS_TAGS_HEAD + tags + STATS_TAGS_TAIL}
    buckets = histogram_buckets(annotations)
    if buckets:
        out["histogram_bucket_settings"] = buckets
    patterns = ([{"prefix": "reporter="}] + [{"prefix": p} for p in prefixes] + [{"suffix": s} for s in suffixes]
                + [{"safe_regex": {"regex": r}} for r in regexps] + [{"prefix": "component"}, {"prefix": "istio"}])
    out["stats_matcher"] = {"inclusion_list": {"patterns": patterns}}
    return out


def stats_intervals(annotations: dict[str, str]) -> dict[str, str]:
    """stats_flush_interval / stats_eviction_interval from the annotations; an eviction interval that is not a
    multiple of the flush interval (5 s by default) is left out, as Istio does (it logs a warning)."""
    out: dict[str, str] = {}
    flush = 5.0
    if ANNOTATION_FLUSH in annotations:
        flush = parse_duration(annotations[ANNOTATION_FLUSH], f"annotation {ANNOTATION_FLUSH}")
        if not 0 < flush <= 86400:
            raise ConfigError(f"annotation {ANNOTATION_FLUSH}: want a duration in (0, 24h]")
        out["stats_flush_interval"] = _seconds(flush)
    if ANNOTATION_EVICTION in annotations:
        ev = parse_duration(annotations[ANNOTATION_EVICTION], f"annotation {ANNOTATION_EVICTION}")
        if ev > 86400 * 365:
            raise ConfigError(f"annotation {ANNOTATION_EVICTION}: longer than a year")
        if round(ev * 1e9) % round(flush * 1e9) == 0:
            out["stats_eviction_interval"] = f"{int(ev)}s"
    return out


def _seconds(v: float) -> str:
    return f"{int(v)}s" if v == int(v) else f"{v:.9f}".rstrip("0") + "s"


# ---- upstream services: tracing, metrics service, access log service, statsd ---------------------------------------

def socket_address(addr: Any, where: str, host_ip: str) -> dict[str, Any]:
    """`host:port` (Go's net.SplitHostPort) → {address, port_value}; host `$(HOST_IP)` is the node's IP."""
    if not isinstance(addr, str) or len(addr) > 512:
        raise ConfigError(f"{where}: want host:port, got {show(addr)}")
    host, sep, port = addr.rpartition(":")
    if not sep or (":" in host and not (host.startswith("[") and host.endswith("]"))):
        raise ConfigError(f"{where}: {show(addr)} is not host:port")
    host = host[1:-1] if host.startswith("[") else host
    if host == "$(HOST_IP)" and host_ip:
        host = host_ip
    return {"address": host, "port_value": parse_int(port, where, 0, 65535)}


def _sds(name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": {"api_config_source": {
        "api_type": "GRPC", "grpc_services": [{"envoy_grpc": {"cluster_name": C.SDS_CLUSTER}}],
        "set_node_on_first_message_only": True, "transport_api_version": "V3"}, "resource_api_version": "V3"}}


def tls_transport_socket(tls: Any, where: str, sni_default: str, meta: dict[str, Any],
                         h2: bool) -> dict[str, Any] | None:
    """A ClientTLSSettings → Envoy's TLS transport socket with SDS secrets (`file-cert:`/`file-root:` served by the
    agent, `default`/`ROOTCA` for ISTIO_MUTUAL), as Istio's tlsContextConvert; None for DISABLE/unset."""
    if tls is None:
        return None
    if not isinstance(tls, dict):
        raise ConfigError(f"{where}: want an object, got {show(tls)}")
    mode = tls.get("mode") or "DISABLE"
    if mode not in ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"):
        raise ConfigError(f"{where}.mode: want DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL, got {show(mode)}")
    if mode == "DISABLE":
        return None

    def field(name: str, meta_key: str = "") -> str:
        v = (meta.get(meta_key) if meta_key else "") or tls.get(name) or ""
        if not isinstance(v, str) or len(v) > 4096:
            raise ConfigError(f"{where}.{name}: want a string, got {show(v)}")
        return v

    sans = _strings(tls.get("subjectAltNames"), f"{where}.subjectAltNames")
    common: dict[str, Any] = {}
    if mode == "ISTIO_MUTUAL":
        cert, root, alpn = "default", "ROOTCA", ["istio", "h2"]
    else:
        c, k = field("clientCertificate", "TLS_CLIENT_CERT_CHAIN"), field("privateKey", "TLS_CLIENT_KEY")
        ca = field("caCertificates", "TLS_CLIENT_ROOT_CERT")
        cert = f"file-cert:{c}~{k}" if mode == "MUTUAL" and c and k else ""
        root, alpn = (f"file-root:{ca}" if ca else ""), ["h2"]
    if h2:
        common["alpn_protocols"] = alpn
    validation: dict[str, Any] = {"default_validation_context": (
        {"match_subject_alt_names": [{"exact": s} for s in sans]} if sans else {})}
    if root:
        validation["validation_context_sds_secret_config"] = _sds(root)
    common["combined_validation_context"] = validation
    if cert:
        common["tls_certificate_sds_secret_configs"] = [_sds(cert)]
    ctx: dict[str, Any] = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                           "common_tls_context": common}
    sni = field("sni") or (sni_default if mode == "ISTIO_MUTUAL" else "")
    if sni:
        ctx["sni"] = sni
    return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}


def _dns_cluster(name: str, address: dict[str, Any], family: str, tls: dict[str, Any] | None = None,
                 h2: bool = False, refresh: bool = False, keepalive: dict[str, Any] | None = None) -> dict[str, Any]:
    """A STRICT_DNS cluster as the template writes the tracer/metrics/access-log ones."""
    c: dict[str, Any] = {"name": name, "alt_stat_name": f"{name};", "type": "STRICT_DNS"}
    if tls:
        c["transport_socket"] = tls
    if keepalive:
        c["upstream_connection_options"] = keepalive
    c.update({"respect_dns_ttl": True, "dns_lookup_family": family})
    if refresh:
        c["dns_refresh_rate"] = "30s"
    c.update({"connect_timeout": "1s", "lb_policy": "ROUND_ROBIN"})
    if h2:
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    c["load_assignment"] = {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
        "socket_address": address}}}]}]}
    return c


def _object(v: Any, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: want an object, got {show(v)}")
    return v


def tracing(cfg: AgentConfig, meta: dict[str, Any], cluster: str,
            family: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """ProxyConfig `tracing` → (the collector's cluster, the bootstrap's `tracing`): zipkin and datadog as Istio's
    template; lightstep and stackdriver are refused (upstream Envoy has no Lightstep tracer any more; Stackdriver
    needs GCP platform metadata, which meshboot does not detect); other settings (sampling, custom tags) are
    istiod's, for the listeners it pushes."""
    tr = _object(cfg.proxy_config.get("tracing"), "ProxyConfig.tracing")
    for refused, why in (("lightstep", "Envoy no longer has the Lightstep tracer"),
                         ("stackdriver", "it needs GCP platform metadata, which meshboot does not detect")):
        if tr.get(refused) is not None:
            raise ConfigError(f"ProxyConfig.tracing.{refused}: not supported ({why}); use meshConfig "
                              "extensionProviders (opentelemetry, zipkin) instead")
    for name, cname, h2 in (("zipkin", "zipkin", False), ("datadog", "datadog_agent", False)):
        spec = _object(tr.get(name), f"ProxyConfig.tracing.{name}")
        if tr.get(name) is None:
            continue
        addr = socket_address(spec.get("address"), f"ProxyConfig.tracing.{name}.address", cfg.host_ip)
        tls = tls_transport_socket(tr.get("tlsSettings"), "ProxyConfig.tracing.tlsSettings", "tracer", meta, h2)
        if name == "zipkin":
            return [_dns_cluster(cname, addr, family, tls, refresh=True)], {"http": {
                "name": "envoy.tracers.zipkin", "typed_config": {
                    "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig", "collector_cluster": cname,
                    "collector_endpoint": "/api/v2/spans", "collector_endpoint_version": "HTTP_JSON",
                    "trace_id_128bit": True, "shared_span_context": False}}}
        c = _dns_cluster(cname, addr, family, tls)
        return [c], {"http": {"name": "envoy.tracers.datadog", "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.DatadogConfig", "collector_cluster": cname,
            "service_name": cluster}}}
    return [], None


def _keepalive(v: Any, where: str) -> dict[str, Any] | None:
    """ConnectionPoolSettings.TCPSettings.TcpKeepalive → upstream_connection_options (only the set fields)."""
    ka = _object(v, where)
    if v is None:
        return None
    out: dict[str, Any] = {}
    if ka.get("probes"):
        out["keepalive_probes"] = parse_int(ka["probes"], f"{where}.probes", 0, 2**32 - 1)
    for key, name in (("time", "keepalive_time"), ("interval", "keepalive_interval")):
        if ka.get(key):
            secs = int(parse_duration(ka[key], f"{where}.{key}"))
            if secs > 0:
                out[name] = min(secs, 2**32 - 1)
    return {"tcp_keepalive": out}


def services(cfg: AgentConfig, meta: dict[str, Any], family: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(clusters, stats_sinks) for ProxyConfig `envoyMetricsService`, `envoyAccessLogService`, `statsdUdpAddress`."""
    pc = cfg.proxy_config
    clusters: list[dict[str, Any]] = []
    sinks: list[dict[str, Any]] = []
    for field, name in (("envoyMetricsService", "envoy_metrics_service"),
                        ("envoyAccessLogService", "envoy_accesslog_service")):
        spec = _object(pc.get(field), f"ProxyConfig.{field}")
        if not spec.get("address"):
            continue
        addr = socket_address(spec["address"], f"ProxyConfig.{field}.address", cfg.host_ip)
        tls = tls_transport_socket(spec.get("tlsSettings"), f"ProxyConfig.{field}.tlsSettings", name, meta, True)
        keepalive = _keepalive(spec.get("tcpKeepalive"), f"ProxyConfig.{field}.tcpKeepalive")
        clusters.append(_dns_cluster(name, addr, family, tls, h2=True, keepalive=keepalive))
        if field == "envoyMetricsService":
            sinks.append({"name": "envoy.stat_sinks.metrics_service", "typed_config": {
                "@type": "type.googleapis.com/envoy.config.metrics.v3.MetricsServiceConfig",
                "transport_api_version": "V3", "grpc_service": {"envoy_grpc": {"cluster_name": name}}}})
    statsd = pc.get("statsdUdpAddress") or ""
    if statsd:
        sinks.append({"name": "envoy.stat_sinks.statsd", "typed_config": {
            "@type": "type.googleapis.com/envoy.config.metrics.v3.StatsdSink",
            "address": {"socket_address": socket_address(statsd, "ProxyConfig.statsdUdpAddress", cfg.host_ip)}}})
    return clusters, sinks
