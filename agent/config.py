"""The agent's inputs, validated once: command-line flags + env + downward-API files → one `AgentConfig`.

Pure core: `build_config` takes the flags, an env mapping and the text of the files it may need (a `read` callable,
so tests pass a dict) and returns a frozen dataclass, or raises `ConfigError` naming the one input that is wrong.
Defaults and precedence follow pilot-agent (reference/agent.md §8), except that meshboot's built-in
`discoveryAddress` is empty, which means standalone mode.
"""
from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshboot import constants as C
from meshboot.durations import parse_duration as _go_duration
from meshboot.syntax import parse_go_bool

NODE_TYPES = ("sidecar", "router", "waypoint", "ztunnel", "agentgateway")
ENV_DISABLE_ENVOY = "DISABLE_ENVOY"   # pilot-agent's: proxyless gRPC beside the agent, no Envoy (grpc-agent template)
SUPPORTED_NODE_TYPES = ("sidecar", "router")   # router: a gateway (`proxy router`), no capture, config from discovery


class ConfigError(ValueError):
    """One bad or missing input, with what and where."""


MAX_TEXT = 256 * 1024     # any one structured input: meshboot.yamlsafe's bound (the API server's cap on annotations)
MAX_DEPTH = 64            # as meshboot.yamlsafe; that module (PyYAML, ~1 MB RSS) is imported only for YAML input


def show(v: Any, limit: int = 64) -> str:
    """A value quoted for an error message, cut short: tenants choose it, and the message goes to the log."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 128:
        return "<a very large integer>"
    r = repr(v) if isinstance(v, (str, int, float, bool)) or v is None else f"<{_kind(v)}>"
    return r if len(r) <= limit else r[:limit] + "…"


_KINDS: dict[type, str] = {dict: "object", list: "list"}


def _kind(v: Any) -> str:
    return _KINDS.get(type(v), "value")


# ---- small parsers ------------------------------------------------------------------------------------------------

def parse_duration(text: str, where: str) -> float:
    """Go (`1h2m3s`, `100ms`) or protojson (`5s`, `0.5s`) durations, in seconds (meshboot.durations), ≥ 0."""
    if str(text).strip() == "":
        return 0.0
    try:
        v = _go_duration(str(text))
    except ValueError:
        raise ConfigError(f"{where}: invalid duration {show(text)} (want e.g. 5s, 100ms, 1h30m)") from None
    if v < 0:
        raise ConfigError(f"{where}: negative duration {show(text)}")
    return v


def parse_bool(text: str | None, where: str, default: bool) -> bool:
    """Go's strconv.ParseBool, as pilot-agent reads every boolean env var (meshboot.syntax.parse_go_bool: 1/0, t/f,
    true/false in three cases; "yes", "on" and surrounding space are refused); unset or empty means `default`."""
    if text is None or text == "":
        return default
    value = parse_go_bool(text)
    if value is None:
        raise ConfigError(f"{where}: invalid boolean {show(text)} (want true or false)")
    return value


# Numbers as Go's strconv reads them: ASCII digits only (re.ASCII keeps \d to 0-9).
_INTEGER = re.compile(r"[+-]?\d{1,19}", re.ASCII)
_DECIMAL = re.compile(r"[+-]?(\d{1,30}(\.\d{0,30})?|\.\d{1,30})([eE][+-]?\d{1,3})?", re.ASCII)


def parse_int(text: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
    s = str(text).strip()
    if isinstance(text, bool) or not _INTEGER.fullmatch(s):  # int() would take "٨٠", "８０" and "1_000"
        raise ConfigError(f"{where}: invalid integer {show(text)}")
    v = int(s)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(f"{where}: {v} out of range [{lo}, {hi}]")
    return v


def parse_float(text: str, where: str, lo: float = 0.0, hi: float = 1.0) -> float:
    if not _DECIMAL.fullmatch(str(text).strip()):  # float() would take Unicode digits, "1_0", "inf" and "nan"
        raise ConfigError(f"{where}: invalid number {show(text)}")
    v = float(text)
    if not lo <= v <= hi:
        raise ConfigError(f"{where}: {v} out of range [{lo}, {hi}]")
    return v


def parse_downward_api(text: str) -> dict[str, str]:
    """`key="Go-quoted value"` lines, as the kubelet writes labels/annotations files."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=" not in line:
            continue
        k, v = line.split("=", 1)
        v = v.strip()
        if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
            try:
                v = json.loads(v)
            except ValueError:
                v = v[1:-1]
        out[k.strip()] = v
    return out


def _too_deep(data: Any, limit: int = MAX_DEPTH) -> bool:
    """Nesting deeper than `limit` (iterative: the check itself must not recurse)."""
    todo = [(data, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return True
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def load_json(text: str, where: str) -> Any:
    """Bounded JSON: size, depth (json.loads recurses, so a deep document is a RecursionError, not a ValueError)."""
    if len(text) > MAX_TEXT:
        raise ConfigError(f"{where}: longer than {MAX_TEXT} bytes")
    try:
        data = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:
        raise ConfigError(f"{where}: invalid JSON: {str(e)[:120]}") from None
    if _too_deep(data):
        raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    return data


def _load_structured(text: str, where: str) -> dict:
    """JSON, else YAML through meshboot.yamlsafe (aliases refused, size and depth bounded)."""
    text = text.strip()
    if not text:
        return {}
    try:
        data = load_json(text, where)               # refuses over MAX_TEXT first, for YAML too
    except ConfigError as e:
        if "invalid JSON" not in str(e):
            raise
        from meshboot import yamlsafe  # noqa: PLC0415 - YAML only when not JSON: keeps the agent's footprint small

        try:
            data = yamlsafe.load(text)
        except yamlsafe.YAMLRefused as y:
            msg = str(y)[:200]
            if msg.startswith("not valid YAML"):
                raise ConfigError(f"{where}: neither JSON nor YAML: {msg[len('not valid YAML: '):]}") from None
            raise ConfigError(f"{where}: {msg}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: want an object, got {_kind(data)}")
    return data


# ---- ProxyConfig ---------------------------------------------------------------------------------------------------

PROXY_CONFIG_DEFAULTS: dict[str, Any] = {
    "configPath": C.CONFIG_PATH,
    "binaryPath": C.ENVOY_BINARY_DEFAULT,
    "serviceCluster": "istio-proxy",
    "drainDuration": "45s",
    "terminationDrainDuration": "5s",
    "discoveryAddress": "",          # meshboot: empty = standalone mode
    "proxyAdminPort": C.ENVOY_ADMIN_PORT,
    "statusPort": C.STATUS_PORT,
    "controlPlaneAuthPolicy": "MUTUAL_TLS",
    "statNameLength": 189,
    "proxyMetadata": {},
}
_STR_FIELDS = {"configPath", "binaryPath", "serviceCluster", "discoveryAddress", "controlPlaneAuthPolicy",
               "customConfigFile", "proxyBootstrapTemplatePath", "interceptionMode", "statsdUdpAddress",
               "tracingServiceName"}
_DUR_FIELDS = {"drainDuration", "terminationDrainDuration", "fileFlushInterval", "parentShutdownDuration"}
_INT_FIELDS = {"proxyAdminPort", "statusPort", "concurrency", "statNameLength", "fileFlushMinSizeKb"}
_MAP_FIELDS = {"proxyMetadata", "runtimeValues"}


def merge_proxy_config(base: dict, overlay: dict, where: str) -> dict:
    """Field-wise replace; `proxyMetadata` maps are merged (as Istio does)."""
    if not isinstance(overlay, dict):
        raise ConfigError(f"{where}: ProxyConfig must be an object")
    out = dict(base)
    for k, v in overlay.items():
        if k in _MAP_FIELDS and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **{str(a): str(b) for a, b in v.items()}}
        else:
            out[k] = v
    return out


def validate_proxy_config(pc: dict, where: str) -> None:
    for k in _STR_FIELDS & pc.keys():
        if not isinstance(pc[k], str):
            raise ConfigError(f"{where}: ProxyConfig.{k} must be a string, got {show(pc[k])}")
    for k in _DUR_FIELDS & pc.keys():
        parse_duration(pc[k], f"{where}: ProxyConfig.{k}")
    for k in _INT_FIELDS & pc.keys():
        if pc[k] is None:
            continue
        parse_int(pc[k], f"{where}: ProxyConfig.{k}", 0, 65535 if k.endswith("Port") else None)
    for k in _MAP_FIELDS & pc.keys():
        if not isinstance(pc[k], dict):
            raise ConfigError(f"{where}: ProxyConfig.{k} must be a map")
    if pc.get("controlPlaneAuthPolicy") not in ("MUTUAL_TLS", "NONE"):
        raise ConfigError(f"{where}: ProxyConfig.controlPlaneAuthPolicy must be MUTUAL_TLS or NONE")
    addr = pc.get("discoveryAddress", "")
    if addr:
        _split_host_port(addr, f"{where}: ProxyConfig.discoveryAddress")


def _split_host_port(addr: str, where: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{where}: {show(addr)} is not host:port")
    return host.strip("[]"), parse_int(port, where, 1, 65535)


# ---- app probes and prometheus annotations -------------------------------------------------------------------------

_PROBE_KEY = re.compile(r"^/(app-health|app-lifecycle)/[^/]+/(livez|readyz|startupz|prestopz|poststartz)$")


@dataclass(frozen=True)
class AppProbe:
    kind: str                      # httpGet | tcpSocket | grpc
    port: int
    path: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    service: str = ""
    timeout: float = 0.0


def parse_app_probers(text: str, where: str = C.ENV_APP_PROBERS) -> dict[str, AppProbe]:
    """The injector's rewritten probes (from the tenant's pod spec): path → probe, each field type-checked."""
    if not text.strip():
        return {}
    data = load_json(text, where)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: want an object of path → probe")
    out: dict[str, AppProbe] = {}
    for key, spec in data.items():
        if not _PROBE_KEY.match(key):
            raise ConfigError(f"{where}: invalid prober path {show(key)}")
        out[key] = _app_probe(spec, f"{where}[{show(key)[1:-1]}]")
    return out


def _want(v: Any, types: tuple[type, ...], where: str, what: str) -> Any:
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
        raise ConfigError(f"{where}: want {what}, got {show(v)}")
    return v


def _app_probe(spec: Any, where: str) -> AppProbe:
    _want(spec, (dict,), where, "an object")
    kinds = [k for k in ("httpGet", "tcpSocket", "grpc") if spec.get(k) is not None]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: want exactly one of httpGet, tcpSocket, grpc")
    kind = kinds[0]
    body = _want(spec[kind], (dict,), f"{where}.{kind}", "an object")
    port = body.get("port")
    if not isinstance(port, int) or isinstance(port, bool):
        raise ConfigError(f"{where}.{kind}.port: want an integer port, got {show(port)}")
    parse_int(port, f"{where}.{kind}.port", 1, 65535)
    timeout = _want(spec.get("timeoutSeconds") or 0, (int, float), f"{where}.timeoutSeconds", "a number of seconds")
    if not 0 <= timeout <= 3600:
        raise ConfigError(f"{where}.timeoutSeconds: {show(timeout)} out of range [0, 3600]")
    path = _want(body.get("path") or "/", (str,), f"{where}.{kind}.path", "a string")
    headers = []
    for h in _want(body.get("httpHeaders") or [], (list,), f"{where}.{kind}.httpHeaders", "a list"):
        h = _want(h, (dict,), f"{where}.{kind}.httpHeaders", "objects with name and value")
        headers.append((_want(h.get("name", ""), (str,), f"{where}.{kind}.httpHeaders.name", "a string"),
                        _want(h.get("value", ""), (str,), f"{where}.{kind}.httpHeaders.value", "a string")))
    scheme = _want(body.get("scheme") or "HTTP", (str,), f"{where}.{kind}.scheme", "a string")
    service = _want(body.get("service") or "", (str,), f"{where}.{kind}.service", "a string")
    return AppProbe(kind=kind, port=port, path=path if path.startswith("/") else "/" + path,
                    scheme=scheme.upper(), headers=tuple(headers), service=service, timeout=float(timeout))


@dataclass(frozen=True)
class ScrapeTarget:
    port: int
    path: str


def parse_prometheus_annotations(text: str | None, status_port: int,
                                 where: str = C.ENV_PROMETHEUS_ANNOTATIONS) -> tuple[ScrapeTarget, ...] | None:
    """None = no app scrape; else the app targets to merge into /stats/prometheus."""
    if text is None:
        return None
    data = _want(load_json(text, where) if text.strip() else {}, (dict,), where, "an object")
    if str(data.get("scrape", "true")).lower() == "false":
        return None
    raw = data.get("targets") or [{"port": data.get("port", "80"), "path": data.get("path", "/metrics")}]
    out = []
    for t in _want(raw, (list,), f"{where}: targets", "a list"):
        t = _want(t, (dict,), f"{where}: targets", "objects with port and path")
        port = parse_int(t.get("port", "80"), f"{where}: port", 1, 65535)
        if port == status_port or port in C.RESERVED_PORTS:
            raise ConfigError(f"{where}: port {port} is reserved for the proxy")
        out.append(ScrapeTarget(port, str(_want(t.get("path") or "/metrics", (str,), f"{where}: path", "a string"))))
    return tuple(out)


# ---- the config ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Flags:
    """`proxy <type>` command-line flags (pilot-agent's names)."""

    node_type: str = "sidecar"
    domain: str = ""
    mesh_config: str = C.MESH_CONFIG_FILE
    proxy_log_level: str = "warning"
    proxy_component_log_level: str = ""
    service_cluster: str = ""
    concurrency: int = 0
    template_file: str = ""
    outlier_log_path: str = ""
    log_output_level: str = "default:info"
    log_as_json: bool = False


@dataclass(frozen=True)
class AgentConfig:
    flags: Flags
    node_type: str
    pod_name: str
    pod_namespace: str
    service_account: str
    instance_ips: tuple[str, ...]
    domain: str
    host_ip: str
    labels: dict[str, str]
    annotations: dict[str, str]
    proxy_config: dict[str, Any]
    env: dict[str, str]
    # identity / CA
    trust_domain: str
    ca_addr: str
    ca_server_name: str
    ca_root_file: str | None          # None = plaintext (:15010) or system roots
    ca_plaintext: bool
    cluster_id: str
    ca_headers: tuple[tuple[str, str], ...]
    cert_signer: str
    key_kind: str                     # RSA | ECDSA
    rsa_bits: int
    ecc_curve: str
    pkcs8: bool
    secret_ttl: float
    grace_ratio: float
    grace_jitter: float
    output_certs: str
    file_certs: tuple[str, str, str] | None   # (chain, key, root) when certificates are file-mounted
    # XDS
    discovery_address: str
    xds_server_name: str
    xds_root_file: str | None
    xds_plaintext: bool
    xds_headers: tuple[tuple[str, str], ...]
    delta_xds: bool
    mtls_mode: str
    # Envoy
    envoy_binary: str
    drain_duration: float
    termination_drain_duration: float
    minimum_drain_duration: float
    exit_on_zero_active: bool
    concurrency: int
    admin_port: int
    status_port: int
    envoy_status_port: int
    envoy_prometheus_port: int
    bootstrap_override: str
    # status
    app_probers: dict[str, AppProbe] = field(default_factory=dict)
    scrape_targets: tuple[ScrapeTarget, ...] | None = None
    probe_localhost: bool = False
    merge_envoy_stats: bool = True
    metrics_localhost_only: bool = False
    disable_envoy: bool = False       # DISABLE_ENVOY: proxyless gRPC, no Envoy (agent/proxyless.py)

    @property
    def standalone(self) -> bool:
        return not self.discovery_address

    @property
    def spiffe_id(self) -> str:
        return C.spiffe_id(self.pod_namespace, self.service_account, self.trust_domain)

    @property
    def node_id(self) -> str:
        return f"{self.node_type}~{self.instance_ips[0]}~{self.pod_name}.{self.pod_namespace}~{self.domain}"

    @property
    def config_path(self) -> str:
        return self.proxy_config["configPath"]

    @property
    def xds_socket(self) -> str:
        return self.config_path.rstrip("/") + "/XDS"

    @property
    def workload_socket(self) -> str:
        return f"{C.WORKLOAD_SOCKET_DIR}/{self.env.get(C.ENV_WORKLOAD_SOCKET_FILE) or 'socket'}"


Reader = Callable[[str], "str | None"]


def _server_name(host: str, env: Mapping[str, str]) -> str:
    if env.get(C.ENV_ISTIOD_SAN):
        return env[C.ENV_ISTIOD_SAN]
    return C.ISTIOD_SAN if "localhost" in host else host


def _headers(env: Mapping[str, str], prefix: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k[len(prefix):], v) for k, v in env.items() if k.startswith(prefix) and len(k) > len(prefix)))


def build_config(flags: Flags, environ: Mapping[str, str], read: Reader,
                 exists: Callable[[str], bool], which: Callable[[str], str | None]) -> AgentConfig:
    """Everything the agent needs, validated. `read(path)` returns the file's text or None if absent.

    In pilot-agent's order and seams: the pod, ProxyConfig, CA settings, XDS settings, Envoy, the status port."""
    if flags.node_type not in NODE_TYPES:
        raise ConfigError(f"proxy type {show(flags.node_type)}: want one of {', '.join(NODE_TYPES)}")
    if flags.node_type not in SUPPORTED_NODE_TYPES:
        raise ConfigError(f"proxy type {show(flags.node_type)} is not supported by meshboot (sidecar and router "
                          "only)")
    pod_name, pod_ns = _need(environ, C.ENV_POD_NAME), _need(environ, C.ENV_POD_NAMESPACE)
    annotations = parse_downward_api(read(C.POD_ANNOTATIONS_FILE) or "")
    labels = parse_downward_api(read(C.POD_LABELS_FILE) or "")
    pc = proxy_config(flags.mesh_config, environ, read, annotations)
    # proxyMetadata behaves like env for the agent; real env wins.
    env = {**{str(k): str(v) for k, v in (pc.get("proxyMetadata") or {}).items()}, **environ}
    ips = _instance_ips(env)
    file_certs = _file_certs(env, exists)
    service_account = env.get(C.ENV_SERVICE_ACCOUNT, "").strip()
    if not service_account and file_certs is None:
        raise ConfigError(f"env {C.ENV_SERVICE_ACCOUNT} is required (the workload identity's service account)")
    ca = ca_settings(env, pc, exists, file_certs)
    xds = xds_settings(env, pc, exists, file_certs)
    if flags.node_type == "router" and not xds.get("discovery_address"):
        raise ConfigError("proxy router needs a discovery address (ProxyConfig discoveryAddress): a gateway's "
                          "listeners come from the control plane, standalone mode serves only a sidecar's")
    no_envoy = parse_bool(env.get(ENV_DISABLE_ENVOY), f"env {ENV_DISABLE_ENVOY}", False)
    if no_envoy and not xds.get("discovery_address"):
        raise ConfigError(f"env {ENV_DISABLE_ENVOY}=true (proxyless gRPC) needs a discovery address (ProxyConfig "
                          "discoveryAddress): standalone mode serves only Envoy's sidecar listeners")
    envoy = envoy_settings(flags, env, pc, exists, which, need=not no_envoy)
    status = status_settings(env, pc)
    return AgentConfig(
        flags=flags, node_type=flags.node_type, pod_name=pod_name, pod_namespace=pod_ns,
        service_account=service_account, instance_ips=ips, domain=flags.domain or f"{pod_ns}.svc.cluster.local",
        host_ip=env.get(C.ENV_HOST_IP, ""), labels=labels, annotations=annotations, proxy_config=pc, env=env,
        file_certs=file_certs, **ca, **xds, **envoy, **status, disable_envoy=no_envoy)


def _need(environ: Mapping[str, str], name: str) -> str:
    v = environ.get(name, "").strip()
    if not v:
        raise ConfigError(f"env {name} is required (set it from the downward API)")
    return v


def proxy_config(mesh_config: str, environ: Mapping[str, str], read: Reader,
                 annotations: Mapping[str, str]) -> dict[str, Any]:
    """ProxyConfig: defaults ← mesh file defaultConfig ← PROXY_CONFIG ← annotation proxy.istio.io/config ←
    the discovery-address and status-port annotations; validated."""
    pc = dict(PROXY_CONFIG_DEFAULTS)
    mesh_text = read(mesh_config)
    if mesh_text:
        mesh = _load_structured(mesh_text, f"mesh config {mesh_config}")
        pc = merge_proxy_config(pc, mesh.get("defaultConfig") or {}, f"mesh config {mesh_config}: defaultConfig")
    if environ.get(C.ENV_PROXY_CONFIG, "").strip():
        pc = merge_proxy_config(pc, _load_structured(environ[C.ENV_PROXY_CONFIG], f"env {C.ENV_PROXY_CONFIG}"),
                                f"env {C.ENV_PROXY_CONFIG}")
    if annotations.get(C.ANNOTATION_PROXY_CONFIG, "").strip():
        where = f"annotation {C.ANNOTATION_PROXY_CONFIG}"
        pc = merge_proxy_config(pc, _load_structured(annotations[C.ANNOTATION_PROXY_CONFIG], where), where)
    if annotations.get(C.ANNOTATION_DISCOVERY_ADDRESS):
        pc["discoveryAddress"] = annotations[C.ANNOTATION_DISCOVERY_ADDRESS]
    if annotations.get(C.ANNOTATION_STATUS_PORT):
        pc["statusPort"] = parse_int(annotations[C.ANNOTATION_STATUS_PORT],
                                     f"annotation {C.ANNOTATION_STATUS_PORT}", 0, 65535)
    validate_proxy_config(pc, "ProxyConfig")
    return pc


def _instance_ips(env: Mapping[str, str]) -> tuple[str, ...]:
    if not env.get(C.ENV_INSTANCE_IP):
        return ("127.0.0.1",)
    try:
        return (str(ipaddress.ip_address(env[C.ENV_INSTANCE_IP].strip())),)
    except ValueError:
        raise ConfigError(f"env {C.ENV_INSTANCE_IP}: {show(env[C.ENV_INSTANCE_IP])} is not an IP address") from None


def _file_certs(env: Mapping[str, str], exists: Callable[[str], bool]) -> tuple[str, str, str] | None:
    """File-mounted certificates (3 files in workload-spiffe-credentials, or legacy ./etc/certs), else None (CA)."""
    wd = C.WORKLOAD_CREDENTIALS_DIR
    triple = (f"{wd}/cert-chain.pem", f"{wd}/key.pem", f"{wd}/root-cert.pem")
    legacy = (f"{C.LEGACY_CERTS_DIR}/cert-chain.pem", f"{C.LEGACY_CERTS_DIR}/key.pem",
              f"{C.LEGACY_CERTS_DIR}/root-cert.pem")
    if all(exists(p) for p in triple):
        return triple
    output_certs = env.get(C.ENV_OUTPUT_CERTS, "")
    if exists(legacy[0]) and exists(legacy[1]) and output_certs.rstrip("/") not in (C.LEGACY_CERTS_DIR, "/etc/certs"):
        return legacy
    return None


def _root_file(env: Mapping[str, str], var: str, default: Callable[[], str], exists: Callable[[str], bool],
               what: str, peer: str) -> str | None:
    """The root that verifies `peer`: env `var` (SYSTEM = the system roots, None), else `default()`; it must exist."""
    if env.get(var) == "SYSTEM":
        return None
    root = env.get(var) or default()
    if not exists(root):
        raise ConfigError(f"{what} root certificate {root} does not exist (needed to verify {peer})")
    return root


def _ca_root(env: Mapping[str, str], ca_addr: str, exists: Callable[[str], bool]) -> str | None:
    """The root that verifies the CA (pilot-agent's order); None = system roots."""
    provider = env.get(C.ENV_PILOT_CERT_PROVIDER, "istiod")

    def default() -> str:
        if provider == "custom":
            return f"{C.LEGACY_CERTS_DIR}/root-cert.pem"
        if env.get(C.ENV_PROV_CERT):
            return env[C.ENV_PROV_CERT].rstrip("/") + "/root-cert.pem"
        if provider == "none":
            raise ConfigError(f"env {C.ENV_PILOT_CERT_PROVIDER}=none: no root to verify the CA {ca_addr}")
        return C.ROOT_CERT_PATH

    return _root_file(env, C.ENV_CA_ROOT_CA, default, exists, "CA", f"CA {ca_addr}")


def ca_settings(env: Mapping[str, str], pc: Mapping[str, Any], exists: Callable[[str], bool],
                file_certs: tuple[str, str, str] | None) -> dict[str, Any]:
    """The CA and the workload key: address, TLS root, headers, key kind and size, TTL and rotation."""
    ca_addr = env.get(C.ENV_CA_ADDR, "").strip() or str(pc.get("discoveryAddress") or "") or C.DEFAULT_CA_ADDR
    ca_host, ca_port = _split_host_port(ca_addr, f"env {C.ENV_CA_ADDR}")
    ca_plaintext = ca_port == C.PLAINTEXT_XDS_PORT
    ca_root = None if ca_plaintext or file_certs is not None else _ca_root(env, ca_addr, exists)
    ecc = env.get(C.ENV_ECC_SIGNATURE_ALGORITHM, "")
    if ecc not in ("", "ECDSA"):
        raise ConfigError(f"env {C.ENV_ECC_SIGNATURE_ALGORITHM}: {show(ecc)}, want ECDSA or empty")
    curve = env.get(C.ENV_ECC_CURVE) or "P256"
    if curve not in ("P256", "P384"):
        raise ConfigError(f"env {C.ENV_ECC_CURVE}: {show(curve)}, want P256 or P384")
    return {
        "trust_domain": env.get(C.ENV_TRUST_DOMAIN) or C.DEFAULT_TRUST_DOMAIN, "ca_addr": ca_addr,
        "ca_server_name": _server_name(ca_host, env), "ca_root_file": ca_root, "ca_plaintext": ca_plaintext,
        "cluster_id": env.get(C.ENV_CLUSTER_ID, ""), "ca_headers": _headers(env, C.CA_HEADER_PREFIX),
        "cert_signer": env.get(C.ENV_CERT_SIGNER, ""), "key_kind": "ECDSA" if ecc == "ECDSA" else "RSA",
        "rsa_bits": parse_int(env.get(C.ENV_RSA_KEY_SIZE) or 2048, f"env {C.ENV_RSA_KEY_SIZE}", 2048, 8192),
        "ecc_curve": curve, "pkcs8": parse_bool(env.get(C.ENV_PKCS8_KEY), f"env {C.ENV_PKCS8_KEY}", False),
        "secret_ttl": parse_duration(env.get(C.ENV_SECRET_TTL) or "24h", f"env {C.ENV_SECRET_TTL}"),
        "grace_ratio": parse_float(env.get(C.ENV_SECRET_GRACE_RATIO) or "0.5", f"env {C.ENV_SECRET_GRACE_RATIO}"),
        "grace_jitter": parse_float(env.get(C.ENV_SECRET_GRACE_JITTER) or "0.01", f"env {C.ENV_SECRET_GRACE_JITTER}"),
        "output_certs": env.get(C.ENV_OUTPUT_CERTS, "")}


def _xds_root(env: Mapping[str, str], discovery: str, exists: Callable[[str], bool],
              file_certs: tuple[str, str, str] | None) -> str | None:
    """The root that verifies the discovery server (pilot-agent's order); None = system roots."""
    def default() -> str:
        if exists(f"{C.LEGACY_CERTS_DIR}/root-cert.pem"):
            return f"{C.LEGACY_CERTS_DIR}/root-cert.pem"
        if env.get(C.ENV_PROV_CERT):
            return env[C.ENV_PROV_CERT].rstrip("/") + "/root-cert.pem"
        return file_certs[2] if file_certs is not None else C.ROOT_CERT_PATH

    return _root_file(env, C.ENV_XDS_ROOT_CA, default, exists, "XDS", discovery)


def xds_settings(env: Mapping[str, str], pc: Mapping[str, Any], exists: Callable[[str], bool],
                 file_certs: tuple[str, str, str] | None) -> dict[str, Any]:
    """Proxy mode's upstream (discovery address, TLS, headers, Delta or SotW), or standalone mode's mTLS policy."""
    discovery = str(pc.get("discoveryAddress") or "")
    xds_root: str | None = None
    xds_plain = False
    xds_name = ""
    if discovery:
        xhost, xport = _split_host_port(discovery, "ProxyConfig.discoveryAddress")
        xds_plain = pc.get("controlPlaneAuthPolicy") == "NONE" or xport == C.PLAINTEXT_XDS_PORT
        xds_name = _server_name(xhost, env)
        if not xds_plain:
            xds_root = _xds_root(env, discovery, exists, file_certs)
    mtls = (env.get(C.ENV_MTLS_MODE) or C.MTLS_PERMISSIVE).upper()
    if mtls not in (C.MTLS_PERMISSIVE, C.MTLS_STRICT):
        raise ConfigError(f"env {C.ENV_MTLS_MODE}: {show(mtls)}, want PERMISSIVE or STRICT")
    return {"discovery_address": discovery, "xds_server_name": xds_name, "xds_root_file": xds_root,
                "xds_plaintext": xds_plain, "xds_headers": _headers(env, C.XDS_HEADER_PREFIX),
                "delta_xds": parse_bool(env.get(C.ENV_DELTA_XDS), f"env {C.ENV_DELTA_XDS}", True), "mtls_mode": mtls}


def envoy_binary(env: Mapping[str, str], pc: Mapping[str, Any], exists: Callable[[str], bool],
                 which: Callable[[str], str | None]) -> str:
    """ENVOY_BINARY, else ProxyConfig binaryPath if set, else `envoy` on PATH, else the default binaryPath."""
    envoy = env.get(C.ENV_ENVOY_BINARY) or ""
    if envoy:
        if not exists(envoy):
            raise ConfigError(f"env {C.ENV_ENVOY_BINARY}: {envoy} does not exist")
        return envoy
    if pc["binaryPath"] != C.ENVOY_BINARY_DEFAULT and exists(pc["binaryPath"]):
        return str(pc["binaryPath"])
    envoy = which("envoy") or (pc["binaryPath"] if exists(pc["binaryPath"]) else "")
    if not envoy:
        raise ConfigError(f"no Envoy binary: set env {C.ENV_ENVOY_BINARY}, put envoy on PATH, "
                          f"or install it at {pc['binaryPath']}")
    return envoy


def envoy_settings(flags: Flags, env: Mapping[str, str], pc: Mapping[str, Any], exists: Callable[[str], bool],
                   which: Callable[[str], str | None], need: bool = True) -> dict[str, Any]:
    """Envoy's binary, concurrency, ports and drain; `need` False (DISABLE_ENVOY): no binary is looked for."""
    concurrency = flags.concurrency or int(pc.get("concurrency") or 0)
    if not concurrency and env.get(C.ENV_CPU_LIMIT):
        concurrency = max(0, int(-(-float(parse_float(env[C.ENV_CPU_LIMIT], f"env {C.ENV_CPU_LIMIT}", 0, 1e6))
                                   // 1)))
    return {
        "envoy_binary": envoy_binary(env, pc, exists, which) if need else "",
        "drain_duration": parse_duration(pc["drainDuration"], "ProxyConfig.drainDuration"),
        "termination_drain_duration": parse_duration(pc["terminationDrainDuration"],
                                                  "ProxyConfig.terminationDrainDuration"),
        "minimum_drain_duration": parse_duration(env.get(C.ENV_MINIMUM_DRAIN) or "5s", f"env {C.ENV_MINIMUM_DRAIN}"),
        "exit_on_zero_active": parse_bool(env.get(C.ENV_EXIT_ON_ZERO), f"env {C.ENV_EXIT_ON_ZERO}", False),
        "concurrency": concurrency,
        "admin_port": parse_int(pc["proxyAdminPort"], "ProxyConfig.proxyAdminPort", 1, 65535),
        "envoy_status_port": parse_int(env.get("ENVOY_STATUS_PORT") or C.ENVOY_STATUS_PORT, "env ENVOY_STATUS_PORT",
                                    1, 65535),
        "envoy_prometheus_port": parse_int(env.get("ENVOY_PROMETHEUS_PORT") or C.ENVOY_PROMETHEUS_PORT,
                                        "env ENVOY_PROMETHEUS_PORT", 1, 65535),
        "bootstrap_override": env.get(C.ENV_ISTIO_BOOTSTRAP_OVERRIDE, "")}


def status_settings(env: Mapping[str, str], pc: Mapping[str, Any]) -> dict[str, Any]:
    """The status port: app probes, metrics merging and scraping."""
    status_port = parse_int(pc.get("statusPort", C.STATUS_PORT), "ProxyConfig.statusPort", 0, 65535)
    return {
        "status_port": status_port, "app_probers": parse_app_probers(env.get(C.ENV_APP_PROBERS, "")),
        "scrape_targets": parse_prometheus_annotations(env.get(C.ENV_PROMETHEUS_ANNOTATIONS), status_port),
        "probe_localhost": parse_bool(env.get(C.ENV_REWRITE_PROBE_LOCALHOST), f"env {C.ENV_REWRITE_PROBE_LOCALHOST}",
                                   False),
        "merge_envoy_stats": parse_bool(env.get(C.ENV_MERGE_ENVOY_STATS), f"env {C.ENV_MERGE_ENVOY_STATS}", True),
        "metrics_localhost_only": parse_bool(env.get(C.ENV_METRICS_LOCALHOST_ONLY),
                                          f"env {C.ENV_METRICS_LOCALHOST_ONLY}", False)}
