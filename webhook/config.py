"""Injection configuration: Istio's chart `values`, MeshConfig and the injector config, read into one typed object.

The files keep Istio's own layouts (the `values` key of the `istio-sidecar-injector` ConfigMap, MeshConfig with its
`defaultConfig`), so an Istio user's settings carry over unchanged. Absent keys take Istio's defaults, except the few
meshboot defaults documented in docs/webhook.md (hold on, no discovery address, meshboot images).
"""
from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import yaml

from meshboot import constants as C
from meshboot.durations import parse_duration
from meshboot.files import stamp
from meshboot.syntax import is_ascii_digits
from webhook import templates as tpl_mod
from webhook.errors import ConfigError

# Istio's chart defaults for the keys the sidecar template reads, with meshboot's documented differences.
DEFAULT_VALUES: dict[str, Any] = {
    "revision": "",
    "global": {
        "hub": "ghcr.io/meshboot",
        "tag": "0.1.0",
        "variant": "",
        "imagePullPolicy": "",
        "imagePullSecrets": [],
        "istioNamespace": C.ISTIO_NAMESPACE,
        "caAddress": "",
        "pilotCertProvider": "istiod",
        "logging": {"level": "default:info"},
        "logAsJson": False,
        "meshID": "",
        "network": "",
        "multiCluster": {"clusterName": ""},
        "trustDomain": "",
        "sds": {"token": {"aud": C.TOKEN_AUDIENCE}},
        "sts": {"servicePort": 0},
        "mountMtlsCerts": False,
        "trustBundleName": "",
        "nativeNftables": False,
        "proxy": {
            "image": "meshboot-agent",
            "autoInject": "enabled",
            "clusterDomain": "cluster.local",
            "componentLogLevel": "misc:error",
            "logLevel": "warning",
            "privileged": False,
            "readinessInitialDelaySeconds": 0,
            "readinessPeriodSeconds": 15,
            "readinessFailureThreshold": 4,
            "startupProbe": {"enabled": True, "failureThreshold": 600},
            "statusPort": C.STATUS_PORT,
            "includeIPRanges": "*",
            "excludeIPRanges": "",
            "includeInboundPorts": "*",
            "excludeInboundPorts": "",
            "includeOutboundPorts": "",
            "excludeOutboundPorts": "",
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                          "limits": {"cpu": "2000m", "memory": "1024Mi"}},
            "lifecycle": {},
            "holdApplicationUntilProxyStarts": True,   # meshboot default (Istio: false)
            "capNetBindService": False,
            "seccompProfile": {},
            "outlierLogPath": "",
        },
        "proxy_init": {"image": "meshboot-agent", "forceApplyIptables": False},
    },
    "sidecarInjectorWebhook": {
        "rewriteAppHTTPProbe": True,
        "enableNamespacesByDefault": False,
        "neverInjectSelector": [],
        "alwaysInjectSelector": [],
        "injectedAnnotations": {},
        "reinvocationPolicy": "Never",
    },
}

# ProxyConfig fields equal to these are left out of PROXY_CONFIG (the agent has the same built-in defaults).
# discoveryAddress is deliberately absent: meshboot's default is empty (standalone agent), so a set value is kept.
PROXY_CONFIG_DEFAULTS: dict[str, Any] = {
    "configPath": "./etc/istio/proxy",
    "binaryPath": "/usr/local/bin/envoy",
    "serviceCluster": "istio-proxy",
    "drainDuration": "45s",
    "terminationDrainDuration": "5s",
    "proxyAdminPort": C.ENVOY_ADMIN_PORT,
    "controlPlaneAuthPolicy": "MUTUAL_TLS",
    "statNameLength": 189,
    "statusPort": C.STATUS_PORT,
    "interceptionMode": "REDIRECT",
}

DEFAULT_MESH: dict[str, Any] = {
    "proxyListenPort": C.OUTBOUND_CAPTURE_PORT,
    "proxyInboundListenPort": C.INBOUND_CAPTURE_PORT,
    "enablePrometheusMerge": True,
    "trustDomain": C.DEFAULT_TRUST_DOMAIN,
    "inboundTrafficPolicy": {"mode": "PASSTHROUGH"},
    "defaultConfig": {},
}

NATIVE_MODES = ("auto", "true", "false")
# Operator files (values, mesh config, injector config) may use YAML aliases, but are bounded in size: a ConfigMap
# holds at most 1 MiB, so a larger file is a mistake or an attack.
MAX_CONFIG_FILE_BYTES = 1024 * 1024
NATIVE_SIDECAR_MIN_MINOR = 33


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: maps merge key by key, anything else replaces (Helm's values semantics)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def normalize_duration(value: Any, where: str) -> str:
    """Go/protojson durations ("1m", "1m30s", "23s") to protojson's seconds form ("60s", "90s", "23s")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}s"
    try:
        total = parse_duration(str(value))
    except ValueError:
        raise ConfigError(f"{where}: invalid duration {value!r} (want e.g. 45s, 1m30s)") from None
    return f"{total:.9f}".rstrip("0").rstrip(".") + "s"


def parse_kubernetes_version(text: str | None) -> tuple[int, int] | None:
    """'1.33', 'v1.33.2', '1.33+' -> (1, 33); None or '' -> None (unknown)."""
    if not text:
        return None
    m = re.match(r"^v?([0-9]+)\.([0-9]+)", str(text).strip())
    if not m:
        raise ConfigError(f"kubernetes version {text!r}: want MAJOR.MINOR, e.g. 1.33")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class Settings:
    """Everything the pure injection core reads: merged values and mesh config plus injector options."""

    values: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_VALUES))
    mesh: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_MESH))
    policy: str = "enabled"
    always_inject_selector: tuple[dict, ...] = ()
    never_inject_selector: tuple[dict, ...] = ()
    injected_annotations: dict[str, str] = field(default_factory=dict)
    native_sidecars: str = "auto"
    kubernetes_version: tuple[int, int] | None = None
    generation: int = 0
    # Templates (Istio's injector config `templates`, `aliases`, `defaultTemplates`): the custom ones compiled.
    templates: dict[str, tpl_mod.Template] = field(default_factory=tpl_mod.builtin_templates)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    default_templates: tuple[str, ...] = (tpl_mod.SIDECAR,)
    # True when the values set global.proxy.holdApplicationUntilProxyStarts (Istio: it ORs with the pod's
    # ProxyConfig); meshboot's own default (on) is instead a default a pod's proxy.istio.io/config can turn off.
    hold_explicit: bool = False

    # ---- typed accessors (validated once in `build_settings`) ----
    @property
    def g(self) -> dict[str, Any]:
        return self.values["global"]

    @property
    def proxy(self) -> dict[str, Any]:
        return self.values["global"]["proxy"]

    @property
    def revision(self) -> str:
        return self.values.get("revision") or ""

    @property
    def default_proxy_config(self) -> dict[str, Any]:
        return self.mesh.get("defaultConfig") or {}

    @property
    def trust_domain(self) -> str:
        return self.mesh.get("trustDomain") or self.g.get("trustDomain") or C.DEFAULT_TRUST_DOMAIN

    def has_template(self, name: str) -> bool:
        return name in tpl_mod.PROXY_TEMPLATES or name in self.templates

    def template_names(self) -> list[str]:
        return sorted({*tpl_mod.PROXY_TEMPLATES, *self.templates})

    def native_default(self) -> bool:
        """The injector-wide native sidecar choice before the pod annotation (auto: by Kubernetes version)."""
        if self.native_sidecars == "true":
            return True
        if self.native_sidecars == "false":
            return False
        v = self.kubernetes_version
        return v is not None and (v[0] > 1 or v[1] >= NATIVE_SIDECAR_MIN_MINOR)


def _load_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_CONFIG_FILE_BYTES + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {getattr(e, 'strerror', None) or 'not UTF-8 text'}") from None
    if len(text) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_FILE_BYTES} bytes")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML/JSON: {e}") from None
    except (RecursionError, ValueError, TypeError, OverflowError):
        raise ConfigError(f"{path}: not valid YAML/JSON: a value cannot be built (too deep, or out of range)") from None


def _unwrap_configmap(doc: Any, key: str, path: str) -> Any:
    """Accept either the file's own layout or the whole ConfigMap holding it under data.<key>."""
    if isinstance(doc, Mapping) and doc.get("kind") == "ConfigMap":
        data = doc.get("data") or {}
        if key not in data:
            raise ConfigError(f"{path}: ConfigMap has no data.{key}")
        if not isinstance(data[key], str):
            raise ConfigError(f"{path}: data.{key}: want a string holding YAML/JSON")
        try:
            return yaml.safe_load(data[key])
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: data.{key} is not valid YAML/JSON: {e}") from None
        except (RecursionError, ValueError, TypeError, OverflowError):
            raise ConfigError(f"{path}: data.{key} is not valid YAML/JSON: a value cannot be built") from None
    return doc


def _want_map(doc: Any, path: str) -> dict[str, Any]:
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{path}: want a mapping at the top level, got {type(doc).__name__}")
    return dict(doc)


def load_values(path: str) -> dict[str, Any]:
    doc = _want_map(_unwrap_configmap(_load_yaml(path), "values", path), path)
    # Accept a file that nests the values under a `values` key (e.g. an IstioOperator-ish snippet).
    if set(doc) == {"values"} and isinstance(doc["values"], Mapping):
        doc = dict(doc["values"])
    return doc


def load_mesh(path: str) -> dict[str, Any]:
    return _want_map(_unwrap_configmap(_load_yaml(path), "mesh", path), path)


def load_injector_config(path: str) -> dict[str, Any]:
    return _want_map(_unwrap_configmap(_load_yaml(path), "config", path), path)


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


_KINDS: dict[type, str] = {dict: "mapping", list: "list"}


def shown(value: Any, limit: int = 64) -> str:
    """A value as it may appear in a message: repr'd, cut to `limit` characters, so an echo stays small."""
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else "a " + _KINDS.get(
        type(value), "value of another kind")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _coerce_int(d: dict[str, Any], key: str, where: str, lo: int = 0, hi: int = 2**31 - 1) -> None:
    v = d.get(key)
    if isinstance(v, str) and is_ascii_digits(v.strip()) and len(v.strip()) <= 20:
        v = d[key] = int(v)
    _check(_is_int(v) and lo <= v <= hi, f"{where}.{key}", f"want an integer in {lo}..{hi} (ASCII digits), got "
           f"{shown(v)}")


def _coerce_bool(d: dict[str, Any], key: str, where: str) -> None:
    v = d.get(key)
    if isinstance(v, str) and v.lower() in ("true", "false"):
        v = d[key] = v.lower() == "true"
    _check(isinstance(v, bool), f"{where}.{key}", f"want true or false, got {shown(v)}")


def _mapping_at(v: Any, where: str) -> dict[str, Any]:
    """`v`, which must be a mapping (YAML makes dicts)."""
    _check(isinstance(v, Mapping), where, "want a mapping")
    return v


def _validate_values(values: dict[str, Any], src: str) -> None:
    g = _mapping_at(values.get("global"), f"{src}: global")
    p = _mapping_at(g.get("proxy"), f"{src}: global.proxy")
    for k in ("statusPort",):
        _coerce_int(p, k, f"{src}: global.proxy", 0, 65535)
    for k in ("readinessInitialDelaySeconds", "readinessPeriodSeconds", "readinessFailureThreshold"):
        _coerce_int(p, k, f"{src}: global.proxy")
    for k in ("privileged", "holdApplicationUntilProxyStarts"):
        _coerce_bool(p, k, f"{src}: global.proxy")
    sp = _mapping_at(p.get("startupProbe"), f"{src}: global.proxy.startupProbe")
    _coerce_bool(sp, "enabled", f"{src}: global.proxy.startupProbe")
    _coerce_int(sp, "failureThreshold", f"{src}: global.proxy.startupProbe")
    _check(p.get("resources") is None or isinstance(p.get("resources"), Mapping),
           f"{src}: global.proxy.resources", "want a mapping")
    for k in ("hub", "tag"):
        _check(isinstance(g.get(k), (str, int, float)), f"{src}: global.{k}", f"want a string, got {g.get(k)!r}")
    g["tag"] = str(g["tag"])
    _check(isinstance(g.get("imagePullSecrets") or [], list), f"{src}: global.imagePullSecrets", "want a list")
    for k in ("image",):
        _check(isinstance(p.get(k), str) and p[k], f"{src}: global.proxy.{k}", "want a non-empty string")
        _check(isinstance(g["proxy_init"].get(k), str) and g["proxy_init"][k],
               f"{src}: global.proxy_init.{k}", "want a non-empty string")
    sw = _mapping_at(values.get("sidecarInjectorWebhook"), f"{src}: sidecarInjectorWebhook")
    _coerce_bool(sw, "rewriteAppHTTPProbe", f"{src}: sidecarInjectorWebhook")
    _coerce_bool(sw, "enableNamespacesByDefault", f"{src}: sidecarInjectorWebhook")


def _validate_mesh(mesh: dict[str, Any], src: str) -> None:
    _coerce_int(mesh, "proxyListenPort", src, 1, 65535)
    _coerce_int(mesh, "proxyInboundListenPort", src, 1, 65535)
    _coerce_bool(mesh, "enablePrometheusMerge", src)
    pc = mesh.get("defaultConfig")
    if pc is None:
        mesh["defaultConfig"] = pc = {}
    _check(isinstance(pc, Mapping), f"{src}: defaultConfig", "want a mapping")
    mesh["defaultConfig"] = normalize_proxy_config(pc, f"{src}: defaultConfig")


_PC_DURATIONS = ("drainDuration", "terminationDrainDuration", "parentShutdownDuration", "discoveryRefreshDelay",
                 "connectTimeout", "fileFlushInterval")
# ProxyConfig's integer fields (int32 / Int32Value in Istio's proto) and their ranges.
_PC_INTS = {"statusPort": (0, 65535), "proxyAdminPort": (0, 65535), "concurrency": (0, 2**31 - 1),
            "statNameLength": (0, 2**31 - 1)}
# Kubernetes' env var names (C_IDENTIFIER-ish, as the API server validates them): proxyMetadata keys become env names.
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def normalize_proxy_config(pc: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate the ProxyConfig fields the injector interprets; durations in protojson form."""
    out = dict(pc)
    for k in _PC_DURATIONS:
        if k in out and out[k] is not None:
            out[k] = normalize_duration(out[k], f"{where}.{k}")
    for k, (lo, hi) in _PC_INTS.items():
        if k in out:
            _coerce_int(out, k, where, lo, hi)
    if "interceptionMode" in out:
        _check(out["interceptionMode"] in ("REDIRECT", "TPROXY", "NONE"), f"{where}.interceptionMode",
               f"want REDIRECT, TPROXY or NONE, got {out['interceptionMode']!r}")
    if "holdApplicationUntilProxyStarts" in out:
        _coerce_bool(out, "holdApplicationUntilProxyStarts", where)
    image = out.get("image")
    _check(image is None or (isinstance(image, Mapping) and isinstance(image.get("imageType", ""), str)),
           f"{where}.image", "want a mapping with a string imageType")
    md = out.get("proxyMetadata")
    if md is not None:
        _check(isinstance(md, Mapping), f"{where}.proxyMetadata", "want a map of strings")
        for k, v in md.items():
            _check(isinstance(k, str) and bool(_ENV_NAME.match(k)) and len(k) <= 253, f"{where}.proxyMetadata",
                   f"{shown(k)} is not an environment variable name")
            _check(not isinstance(v, (Mapping, list)), f"{where}.proxyMetadata.{k}", "want a string")
        out["proxyMetadata"] = {str(k): "" if v is None else _scalar_text(v) for k, v in md.items()}
    return out


def _scalar_text(v: Any) -> str:
    """proxyMetadata values as Go's YAML-to-string would write them: booleans lower-case."""
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _selectors(raw: Any, where: str) -> tuple[dict, ...]:
    if raw is None:
        return ()
    _check(isinstance(raw, list) and all(isinstance(s, Mapping) for s in raw), where, "want a list of LabelSelectors")
    return tuple(dict(s) for s in raw)


def build_settings(values: Mapping[str, Any] | None = None, mesh: Mapping[str, Any] | None = None,
                   injector: Mapping[str, Any] | None = None, *, native_sidecars: str | None = None,
                   kubernetes_version: str | tuple[int, int] | None = None, generation: int = 0,
                   sources: tuple[str, str, str] = ("values", "mesh config", "injector config")) -> Settings:
    """Merge user layers over the defaults, validate, and return the Settings (raises ConfigError)."""
    vals = deep_merge(copy.deepcopy(DEFAULT_VALUES), values or {})
    _validate_values(vals, sources[0])
    m = deep_merge(copy.deepcopy(DEFAULT_MESH), mesh or {})
    _validate_mesh(m, sources[1])
    inj = dict(injector or {})
    sw = vals["sidecarInjectorWebhook"]
    policy = str(inj.get("policy", vals["global"]["proxy"].get("autoInject", "enabled")))
    native = native_sidecars or str(inj.get("nativeSidecars") or os.environ.get("ENABLE_NATIVE_SIDECARS") or "auto")
    native = native.lower()
    _check(native in NATIVE_MODES, "native sidecars", f"want auto, true or false, got {native!r}")
    kv = kubernetes_version if isinstance(kubernetes_version, tuple) else parse_kubernetes_version(
        kubernetes_version or inj.get("kubernetesVersion"))
    ann = inj.get("injectedAnnotations", sw.get("injectedAnnotations")) or {}
    _check(isinstance(ann, Mapping), f"{sources[2]}: injectedAnnotations", "want a map of strings")
    templates, aliases, defaults = _templates(inj, sw, sources)
    user_g = (values or {}).get("global")
    user_p = user_g.get("proxy") if isinstance(user_g, Mapping) else None
    hold_explicit = isinstance(user_p, Mapping) and "holdApplicationUntilProxyStarts" in user_p
    return Settings(
        values=vals, mesh=m, policy=policy,
        always_inject_selector=_selectors(inj.get("alwaysInjectSelector", sw.get("alwaysInjectSelector")),
                                          f"{sources[2]}: alwaysInjectSelector"),
        never_inject_selector=_selectors(inj.get("neverInjectSelector", sw.get("neverInjectSelector")),
                                         f"{sources[2]}: neverInjectSelector"),
        injected_annotations={str(k): str(v) for k, v in ann.items()},
        native_sidecars=native, kubernetes_version=kv, generation=generation,
        templates=templates, aliases=aliases, default_templates=defaults, hold_explicit=hold_explicit)


def _templates(inj: Mapping[str, Any], sw: Mapping[str, Any], sources: tuple[str, str, str]
               ) -> tuple[dict[str, tpl_mod.Template], dict[str, tuple[str, ...]], tuple[str, ...]]:
    """Custom templates from the values (`sidecarInjectorWebhook.templates`) and the injector config (`templates`,
    which wins), `aliases` and `defaultTemplates`, all checked now so a bad one fails the load, not a pod."""
    templates = tpl_mod.builtin_templates()
    templates.update(tpl_mod.load_templates(sw.get("templates"), f"{sources[0]}: sidecarInjectorWebhook"))
    templates.update(tpl_mod.load_templates(inj.get("templates"), sources[2]))
    _check(len(templates) <= tpl_mod.MAX_TEMPLATES + 1, f"{sources[2]}: templates",
           f"more than {tpl_mod.MAX_TEMPLATES} templates")
    aliases = tpl_mod.load_aliases(inj.get("aliases"), sources[2])
    raw = inj.get("defaultTemplates") or [tpl_mod.SIDECAR]
    _check(isinstance(raw, list) and 0 < len(raw) <= tpl_mod.MAX_SELECTED and all(isinstance(n, str) for n in raw),
           f"{sources[2]}: defaultTemplates", f"want a list of at most {tpl_mod.MAX_SELECTED} template names")
    for name in (n for names in aliases.values() for n in names):
        _check(name in tpl_mod.PROXY_TEMPLATES or name in templates, f"{sources[2]}: aliases",
               f"{shown(name)} is not a template")
    for name in raw:
        _check(name in tpl_mod.PROXY_TEMPLATES or name in templates or name in aliases,
               f"{sources[2]}: defaultTemplates", f"{shown(name)} is not a template")
    return templates, aliases, tuple(raw)


def _stamp(path: str | None) -> tuple | None:
    """None for an unset path; ("missing",) for a configured file that is absent (absent ≠ unset when it appears)."""
    if not path:
        return None
    return stamp(path) or ("missing",)


class ConfigSource:
    """Settings read from files, reloaded when a file changes (mounted ConfigMaps swap a symlink: inode changes).

    A reload that fails keeps the last good Settings and records the error, so a bad edit never stops injection.
    """

    def __init__(self, values_path: str | None = None, mesh_path: str | None = None,
                 injector_path: str | None = None, *, native_sidecars: str | None = None,
                 kubernetes_version: str | None = None) -> None:
        self.paths = (values_path, mesh_path, injector_path)
        self.native_sidecars = native_sidecars
        self.kubernetes_version = kubernetes_version
        self.generation = 0
        self.last_error: str | None = None
        self._stamps = tuple(_stamp(p) for p in self.paths)
        self.settings = self._load()

    def _load(self) -> Settings:
        vp, mp, ip = self.paths
        # A missing file means "Istio's defaults" (an optional ConfigMap not mounted yet).
        values = load_values(vp) if vp and os.path.exists(vp) else {}
        mesh = load_mesh(mp) if mp and os.path.exists(mp) else {}
        inj = load_injector_config(ip) if ip and os.path.exists(ip) else {}
        self.generation += 1
        return build_settings(values, mesh, inj, native_sidecars=self.native_sidecars,
                              kubernetes_version=self.kubernetes_version, generation=self.generation,
                              sources=(vp or "values", mp or "mesh config", ip or "injector config"))

    def changed(self) -> bool:
        return tuple(_stamp(p) for p in self.paths) != self._stamps

    def reload_if_changed(self) -> bool:
        """Returns True when new Settings were loaded; raises nothing (errors go to `last_error`)."""
        stamps = tuple(_stamp(p) for p in self.paths)
        if stamps == self._stamps:
            return False
        self._stamps = stamps
        try:
            self.settings = self._load()
        except ConfigError as e:
            self.last_error = str(e)
            return False
        self.last_error = None
        return True


def dumps_compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
