"""The one place for values the three parts must agree on: ports, paths, uid, annotation and label keys, env names.

Every value follows Istio's, so Istio docs, habits and a real istiod keep working. Paths are relative to the
working directory (the proxy image sets WORKDIR /), exactly as pilot-agent resolves them.
"""
from __future__ import annotations

# ---- identity of the proxy -------------------------------------------------------------------------------------
PROXY_UID = 1337
PROXY_GID = 1337
PROXY_USER = "istio-proxy"
TPROXY_MARK = 1337
TPROXY_ROUTE_TABLE = 133
INBOUND_PASSTHROUGH_SRC_V4 = "127.0.0.6"
INBOUND_PASSTHROUGH_SRC_V6 = "::6"

# ---- versions ------------------------------------------------------------------------------------------------
# The Istio release meshboot follows (docs and istiod behaviour are this minor's: ../shared/reference describes
# istio/istio at VERSION 1.32). The agent reports it as node metadata ISTIO_VERSION, as pilot-agent reports its own
# build's version, so istiod picks the code paths of a current proxy; `ISTIO_META_ISTIO_VERSION` overrides it (as in
# Istio). meshboot's own release goes in the separate node metadata key MESHBOOT_VERSION.
ISTIO_VERSION = "1.32.0"
MESHBOOT_VERSION_META = "MESHBOOT_VERSION"

# ---- ports -----------------------------------------------------------------------------------------------------
ENVOY_ADMIN_PORT = 15000
OUTBOUND_CAPTURE_PORT = 15001      # -p, ISTIO_REDIRECT, virtualOutbound
IPTABLES_PROBE_PORT = 15002
DEBUG_PORT = 15004
INBOUND_CAPTURE_PORT = 15006       # -z, ISTIO_IN_REDIRECT, virtualInbound
INBOUND_TUNNEL_PORT = 15008        # HBONE
CA_PORT = 15012                    # istiod XDS + CA over TLS
INJECTOR_PORT = 15017              # istiod's webhook port (Service 443 targets it)
STATUS_PORT = 15020                # agent status server
ENVOY_STATUS_PORT = 15021          # Envoy static listener, /healthz/ready -> agent
DNS_PROXY_PORT = 15053
ENVOY_PROMETHEUS_PORT = 15090
WEBHOOK_PORT = 9443                # meshboot-webhook's admission port (chart Service 443 -> 9443)
RESERVED_PORTS = frozenset({15000, 15001, 15004, 15006, 15008, 15020, 15021, 15053, 15090})

# ---- paths (relative: resolved against CWD like pilot-agent) ---------------------------------------------------
CONFIG_PATH = "./etc/istio/proxy"
XDS_SOCKET = "./etc/istio/proxy/XDS"
ENVOY_BOOTSTRAP = "./etc/istio/proxy/envoy-rev.json"
GRPC_BOOTSTRAP = "./etc/istio/proxy/grpc-bootstrap.json"
WORKLOAD_SOCKET_DIR = "./var/run/secrets/workload-spiffe-uds"
WORKLOAD_SOCKET = "./var/run/secrets/workload-spiffe-uds/socket"
LEGACY_SDS_SOCKET = "./etc/istio/proxy/SDS"
WORKLOAD_CREDENTIALS_DIR = "./var/run/secrets/workload-spiffe-credentials"
TOKEN_PATH = "./var/run/secrets/tokens/istio-token"
ROOT_CERT_PATH = "./var/run/secrets/istio/root-cert.pem"
POD_INFO_DIR = "./etc/istio/pod"
POD_LABELS_FILE = "./etc/istio/pod/labels"
POD_ANNOTATIONS_FILE = "./etc/istio/pod/annotations"
MESH_CONFIG_FILE = "./etc/istio/config/mesh"
LEGACY_CERTS_DIR = "./etc/certs"
CUSTOM_BOOTSTRAP_FILE = "/etc/istio/custom-bootstrap/custom_bootstrap.json"
ENVOY_BINARY_DEFAULT = "/usr/local/bin/envoy"

# Absolute mount paths used in the injected pod spec.
MOUNT_WORKLOAD_SOCKET = "/var/run/secrets/workload-spiffe-uds"
MOUNT_WORKLOAD_CERTS = "/var/run/secrets/workload-spiffe-credentials"
MOUNT_CREDENTIAL_UDS = "/var/run/secrets/credential-uds"
MOUNT_ISTIOD_CA = "/var/run/secrets/istio"
MOUNT_ISTIO_DATA = "/var/lib/istio/data"
MOUNT_ISTIO_ENVOY = "/etc/istio/proxy"
MOUNT_ISTIO_TOKEN = "/var/run/secrets/tokens"
MOUNT_ISTIO_PODINFO = "/etc/istio/pod"

# ---- mesh identity ---------------------------------------------------------------------------------------------
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_CLUSTER_ID = "Kubernetes"
TOKEN_AUDIENCE = "istio-ca"
TOKEN_EXPIRATION_SECONDS = 43200
ISTIO_NAMESPACE = "istio-system"
DEFAULT_CA_ADDR = "istiod.istio-system.svc:15012"
DEFAULT_DISCOVERY_ADDR = "istiod.istio-system.svc:15012"
ISTIOD_SAN = "istiod.istio-system.svc"
ROOT_CERT_CONFIGMAP = "istio-ca-root-cert"
ROOT_CERT_KEY = "root-cert.pem"
CA_SERVICE = "istio.v1.auth.IstioCertificateService"
CA_METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
SDS_DEFAULT = "default"
SDS_ROOTCA = "ROOTCA"


def spiffe_id(namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


# ---- injection: labels and annotations -------------------------------------------------------------------------
LABEL_INJECTION_NS = "istio-injection"           # namespace label: enabled | disabled
LABEL_REV = "istio.io/rev"
LABEL_INJECT = "sidecar.istio.io/inject"          # pod label (wins) or annotation
ANNOTATION_INJECT = "sidecar.istio.io/inject"
ANNOTATION_STATUS = "sidecar.istio.io/status"
ANNOTATION_TEMPLATES = "inject.istio.io/templates"
ANNOTATION_INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"
ANNOTATION_PROXY_IMAGE = "sidecar.istio.io/proxyImage"
ANNOTATION_PROXY_IMAGE_TYPE = "sidecar.istio.io/proxyImageType"
ANNOTATION_PROXY_CPU = "sidecar.istio.io/proxyCPU"
ANNOTATION_PROXY_MEMORY = "sidecar.istio.io/proxyMemory"
ANNOTATION_PROXY_CPU_LIMIT = "sidecar.istio.io/proxyCPULimit"
ANNOTATION_PROXY_MEMORY_LIMIT = "sidecar.istio.io/proxyMemoryLimit"
ANNOTATION_LOG_LEVEL = "sidecar.istio.io/logLevel"
ANNOTATION_COMPONENT_LOG_LEVEL = "sidecar.istio.io/componentLogLevel"
ANNOTATION_AGENT_LOG_LEVEL = "sidecar.istio.io/agentLogLevel"
ANNOTATION_NATIVE_SIDECAR = "sidecar.istio.io/nativeSidecar"
ANNOTATION_REWRITE_PROBES = "sidecar.istio.io/rewriteAppHTTPProbers"
ANNOTATION_BOOTSTRAP_OVERRIDE = "sidecar.istio.io/bootstrapOverride"
ANNOTATION_CAP_NET_BIND = "sidecar.istio.io/capNetBindService"
ANNOTATION_DISCOVERY_ADDRESS = "sidecar.istio.io/discoveryAddress"
ANNOTATION_STATUS_PORT = "status.sidecar.istio.io/port"
ANNOTATION_READINESS_PREFIX = "readiness.status.sidecar.istio.io/"
ANNOTATION_PROXY_CONFIG = "proxy.istio.io/config"
ANNOTATION_INCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/includeOutboundIPRanges"
ANNOTATION_EXCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
ANNOTATION_INCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/includeInboundPorts"
ANNOTATION_EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
ANNOTATION_INCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/includeOutboundPorts"
ANNOTATION_EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
ANNOTATION_KUBEVIRT_INTERFACES = "traffic.sidecar.istio.io/kubevirtInterfaces"
ANNOTATION_EXCLUDE_INTERFACES = "traffic.sidecar.istio.io/excludeInterfaces"
ANNOTATION_REROUTE_VIRTUAL_INTERFACES = "istio.io/reroute-virtual-interfaces"
ANNOTATION_PROMETHEUS_MERGE = "prometheus.istio.io/merge-metrics"
ANNOTATION_PROMETHEUS_SCRAPE_TARGETS = "prometheus.istio.io/scrape-targets"
ANNOTATION_PROMETHEUS_SCRAPE = "prometheus.io/scrape"
ANNOTATION_PROMETHEUS_PORT = "prometheus.io/port"
ANNOTATION_PROMETHEUS_PATH = "prometheus.io/path"
ANNOTATION_DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
ANNOTATION_DEFAULT_LOGS_CONTAINER = "kubectl.kubernetes.io/default-logs-container"
LABEL_SECURITY_TLS_MODE = "security.istio.io/tlsMode"
LABEL_CANONICAL_NAME = "service.istio.io/canonical-name"
LABEL_CANONICAL_REVISION = "service.istio.io/canonical-revision"
LABEL_WORKLOAD_NAME = "service.istio.io/workload-name"
IGNORED_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease", "local-path-storage")

# ---- container names ---------------------------------------------------------------------------------------------
INIT_CONTAINER = "istio-init"
VALIDATION_CONTAINER = "istio-validation"
PROXY_CONTAINER = "istio-proxy"

# ---- env names set by the injector and read by the agent / init -------------------------------------------------
ENV_POD_NAME = "POD_NAME"
ENV_POD_NAMESPACE = "POD_NAMESPACE"
ENV_INSTANCE_IP = "INSTANCE_IP"
ENV_SERVICE_ACCOUNT = "SERVICE_ACCOUNT"
ENV_HOST_IP = "HOST_IP"
ENV_PROXY_CONFIG = "PROXY_CONFIG"
ENV_CA_ADDR = "CA_ADDR"
ENV_TRUST_DOMAIN = "TRUST_DOMAIN"
ENV_PILOT_CERT_PROVIDER = "PILOT_CERT_PROVIDER"
ENV_CLUSTER_ID = "ISTIO_META_CLUSTER_ID"
ENV_APP_PROBERS = "ISTIO_KUBE_APP_PROBERS"
ENV_PROMETHEUS_ANNOTATIONS = "ISTIO_PROMETHEUS_ANNOTATIONS"
ENV_ENVOY_BINARY = "ENVOY_BINARY"
ENV_POD_PORTS = "ISTIO_META_POD_PORTS"
ENV_APP_CONTAINERS = "ISTIO_META_APP_CONTAINERS"
ENV_INTERCEPTION_MODE = "ISTIO_META_INTERCEPTION_MODE"
ENV_WORKLOAD_NAME = "ISTIO_META_WORKLOAD_NAME"
ENV_OWNER = "ISTIO_META_OWNER"
ENV_MESH_ID = "ISTIO_META_MESH_ID"
ENV_NODE_NAME = "ISTIO_META_NODE_NAME"
ENV_CPU_LIMIT = "ISTIO_CPU_LIMIT"
ENV_GOMEMLIMIT = "GOMEMLIMIT"

# ---- metrics names shared by dashboards --------------------------------------------------------------------------
METRIC_INJECTION_TIME = "sidecar_injection_time_seconds"

# ---- control plane: workload CA (ca) ---------------------------------------------------------------------
WEBHOOK_SERVICE = "meshboot-webhook"              # the control plane's Service name (chart)
MONITORING_PORT = 15014                           # istiod's monitoring port: plain HTTP /metrics, /healthz
PLUGIN_CERTS_DIR = "/etc/cacerts"                 # operator-provided CA (Istio's plug-in layout)
CA_DIR_DEFAULT = "./var/lib/meshboot/ca"          # where a generated root is kept outside a cluster
CA_SECRET_NAME = "istio-ca-secret"                # istiod's self-signed root Secret
CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
CA_ROOT_FILE = "root-cert.pem"
CA_CHAIN_FILE = "cert-chain.pem"
CA_MAX_REQUEST_BYTES = 64 * 1024                  # max gRPC message the CA accepts

# ---- agent (pilot-agent) env names and defaults: read by agent/, set by the injector / tests ---------------------
ENV_MTLS_MODE = "MESHBOOT_MTLS_MODE"             # standalone mode inbound policy: PERMISSIVE (default) | STRICT
MTLS_PERMISSIVE = "PERMISSIVE"
MTLS_STRICT = "STRICT"
ENV_SECRET_TTL = "SECRET_TTL"
ENV_SECRET_GRACE_RATIO = "SECRET_GRACE_PERIOD_RATIO"
ENV_SECRET_GRACE_JITTER = "SECRET_GRACE_PERIOD_RATIO_JITTER"
ENV_ECC_SIGNATURE_ALGORITHM = "ECC_SIGNATURE_ALGORITHM"
ENV_ECC_CURVE = "ECC_CURVE"
ENV_RSA_KEY_SIZE = "WORKLOAD_RSA_KEY_SIZE"
ENV_PKCS8_KEY = "PKCS8_KEY"
ENV_OUTPUT_CERTS = "OUTPUT_CERTS"
ENV_ISTIOD_SAN = "ISTIOD_SAN"
ENV_CA_ROOT_CA = "CA_ROOT_CA"
ENV_XDS_ROOT_CA = "XDS_ROOT_CA"
ENV_PROV_CERT = "PROV_CERT"
ENV_CERT_SIGNER = "ISTIO_META_CERT_SIGNER"
ENV_DELTA_XDS = "ISTIO_DELTA_XDS"
ENV_EXIT_ON_ZERO = "EXIT_ON_ZERO_ACTIVE_CONNECTIONS"
ENV_MINIMUM_DRAIN = "MINIMUM_DRAIN_DURATION"
ENV_REWRITE_PROBE_LOCALHOST = "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION"
ENV_MERGE_ENVOY_STATS = "PILOT_AGENT_MERGE_ENVOY_STATS"
ENV_METRICS_LOCALHOST_ONLY = "METRICS_LOCALHOST_ACCESS_ONLY"
ENV_WORKLOAD_SOCKET_FILE = "WORKLOAD_IDENTITY_SOCKET_FILE"
ENV_ISTIO_BOOTSTRAP_OVERRIDE = "ISTIO_BOOTSTRAP_OVERRIDE"
CA_HEADER_PREFIX = "CA_HEADER_"
XDS_HEADER_PREFIX = "XDS_HEADER_"
ISTIO_META_PREFIX = "ISTIO_META_"
ISTIO_METAJSON_PREFIX = "ISTIO_METAJSON_"
PLAINTEXT_XDS_PORT = 15010
DEFAULT_TERMINATION_DRAIN_SECONDS = 5.0
DEFAULT_DRAIN_SECONDS = 45.0
HEALTHZ_READY_PATH = "/healthz/ready"
PROMETHEUS_STATS_PATH = "/stats/prometheus"
XDS_CLUSTER = "xds-grpc"
SDS_CLUSTER = "sds-grpc"
SDS_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
LISTENER_TYPE_URL = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"
PASSTHROUGH_CLUSTER = "PassthroughCluster"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"

# ---- init (istio-iptables): chain names, env names, the rule layout switch -------------------------------------
CHAIN_INBOUND = "ISTIO_INBOUND"
CHAIN_REDIRECT = "ISTIO_REDIRECT"
CHAIN_IN_REDIRECT = "ISTIO_IN_REDIRECT"
CHAIN_OUTPUT = "ISTIO_OUTPUT"
CHAIN_OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
CHAIN_DROP = "ISTIO_DROP"
CHAIN_DIVERT = "ISTIO_DIVERT"
CHAIN_TPROXY = "ISTIO_TPROXY"
ISTIO_CHAIN_PREFIX = "ISTIO_"
TPROXY_OUTPUT_MARK = 1338                         # hard-coded mark for proxy-owned lo traffic in TPROXY mode
ENV_DNS_CAPTURE = "ISTIO_META_DNS_CAPTURE"        # alias of --redirect-dns (set from proxyMetadata)
ENV_DUAL_STACK = "ISTIO_DUAL_STACK"               # alias of --dual-stack
ENV_INVALID_DROP = "INVALID_DROP"                 # alias of --drop-invalid
ENV_ENVOY_USER = "ENVOY_USER"
ENV_OUTBOUND_OWNER_GROUPS = "ISTIO_OUTBOUND_OWNER_GROUPS"
ENV_OUTBOUND_OWNER_GROUPS_EXCLUDE = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"
ENV_OUTBOUND_IPV4_LOOPBACK_CIDR = "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"
ENV_DRY_RUN_FILE_PATH = "DRY_RUN_FILE_PATH"
# meshboot-only: "current" (default) writes today's Istio layout (`-A OUTPUT -j ISTIO_OUTPUT`, `-p tcp ! --dport
# 15008` in the proxy loopback rule); "classic" writes the rules exactly as istio-init 1.23 does (seed 004: `-A OUTPUT
# -p tcp -j ISTIO_OUTPUT`, no tunnel-port term in the proxy loopback rule).
ENV_IPTABLES_LAYOUT = "MESHBOOT_IPTABLES_LAYOUT"

# ---- injector (webhook/) additions ------------------------------------------------------------------------------
ANNOTATION_PROXY_OVERRIDES = "proxy.istio.io/overrides"   # user's own istio-proxy/istio-init, kept for re-injection
ANNOTATION_USER_VOLUME = "sidecar.istio.io/userVolume"
ANNOTATION_USER_VOLUME_MOUNT = "sidecar.istio.io/userVolumeMount"
LABEL_NETWORK = "topology.istio.io/network"
LABEL_TUNNEL = "networking.istio.io/tunnel"
ENV_NETWORK = "ISTIO_META_NETWORK"
MOUNT_ISTIO_CA_CRL = "/var/run/secrets/istio/crl"
