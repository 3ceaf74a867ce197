"""Flag values -> one validated CaptureConfig (pure). Bad input raises ConfigError naming the flag or env var.

Istio passes list items to iptables verbatim; we check them here instead, so a typo fails with one message that names
the flag rather than with an iptables-restore error about line 7.
"""
from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Mapping

from meshboot import constants as C

from .record import Record

REDIRECT, TPROXY = "REDIRECT", "TPROXY"
LAYOUT_CLASSIC, LAYOUT_CURRENT = "classic", "current"
MAX_OWNER_GROUPS_INCLUDE = 64


class ConfigError(ValueError):
    """Invalid configuration: one message saying what and where (exit code 1)."""


class HostInfo(Record):
    """What the shell learned about the pod's network: non-loopback, non-link-local addresses in kernel order."""

    addresses: tuple[str, ...]          # v4 first (kernel dump order), then v6
    interfaces: frozenset[str] = frozenset()


class CaptureConfig(Record):
    """Everything the rule generator needs, already validated and normalised."""

    envoy_port: str = str(C.OUTBOUND_CAPTURE_PORT)
    inbound_capture_port: str = str(C.INBOUND_CAPTURE_PORT)
    inbound_tunnel_port: str = str(C.INBOUND_TUNNEL_PORT)
    proxy_uids: tuple[str, ...] = (str(C.PROXY_UID),)
    proxy_gids: tuple[str, ...] = (str(C.PROXY_GID),)
    mode: str = REDIRECT
    inbound_ports: str = ""                     # "*", "" or the raw list (see inbound_port_list)
    inbound_port_list: tuple[str, ...] = ()
    inbound_exclude_ports: tuple[str, ...] = ()
    exclude_interfaces: tuple[str, ...] = ()
    include_all_cidrs: bool = False             # -i '*'
    include_cidrs_v4: tuple[str, ...] = ()
    include_cidrs_v6: tuple[str, ...] = ()
    include_has_loopback: bool = False
    exclude_cidrs_v4: tuple[str, ...] = ()
    exclude_cidrs_v6: tuple[str, ...] = ()
    outbound_ports: tuple[str, ...] = ()
    outbound_exclude_ports: tuple[str, ...] = ()
    kube_virt_interfaces: tuple[str, ...] = ()
    tproxy_mark: str = str(C.TPROXY_MARK)
    tproxy_route_table: str = str(C.TPROXY_ROUTE_TABLE)
    loopback_v4: str = "127.0.0.1/32"
    owner_groups_include: tuple[str, ...] | None = None   # None = '*'
    owner_groups_exclude: tuple[str, ...] = ()
    redirect_dns: bool = False
    capture_all_dns: bool = False
    dns_servers_v4: tuple[str, ...] = ()
    dns_servers_v6: tuple[str, ...] = ()
    drop_invalid: bool = False
    enable_ipv6: bool = False
    host_ip: str = ""
    layout: str = LAYOUT_CLASSIC
    # run switches (not rules)
    dry_run: bool = False
    skip_rule_apply: bool = False
    run_validation: bool = False
    probe_port: int = C.IPTABLES_PROBE_PORT
    probe_timeout: float = 5.0
    reconcile: bool = False
    cleanup_only: bool = False
    force_apply: bool = False
    force_iptables_binary: str = ""
    network_namespace: str = ""
    cni_mode: bool = False
    warnings: tuple[str, ...] = ()

    @property
    def tproxy(self) -> bool:
        return self.mode == TPROXY

    @property
    def dns(self) -> bool:
        """Effective DNS capture: redirect-dns and something to capture (Istio disables it with no servers)."""
        return self.redirect_dns and (self.capture_all_dns or bool(self.dns_servers_v4 or self.dns_servers_v6))


def split_list(value: str) -> tuple[str, ...]:
    """Istio's comma lists: split on ',', drop empty items, no trimming."""
    return tuple(item for item in value.split(",") if item)


def _ports(flag: str, value: str) -> tuple[str, ...]:
    items = split_list(value)
    for item in items:
        lo, colon, hi = item.partition(":")
        ok = lo.isdigit() and int(lo) <= 65535 and (not colon or (hi.isdigit() and int(hi) <= 65535))
        if not ok:
            raise ConfigError(f"{flag}: invalid port {item!r} in {value!r} (want N or N:M, 0-65535)")
    return items


def _port(flag: str, value: str) -> str:
    if not value.isdigit() or not 0 < int(value) <= 65535:
        raise ConfigError(f"{flag}: invalid port {value!r} (want 1-65535)")
    return value


def _names(flag: str, value: str, what: str = "interface") -> tuple[str, ...]:
    items = split_list(value)
    for item in items:
        if any(c.isspace() for c in item) or (what == "interface" and ("/" in item or len(item) > 15)):
            raise ConfigError(f"{flag}: invalid {what} name {item!r}")
    return items


def _ids(flag: str, value: str) -> tuple[str, ...]:
    items = split_list(value)
    for item in items:
        if not item.isdigit():
            raise ConfigError(f"{flag}: invalid id {item!r} in {value!r} (want a comma list of numbers)")
    return items


def parse_cidrs(flag: str, value: str) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """A CIDR list -> (v4, v6, any-loopback), canonical like Go's netip.Prefix (host bits kept)."""
    items = split_list(value)
    if not items:
        return (), (), False
    import ipaddress  # only when there are CIDRs: keeps the default path's imports small

    v4: list[str] = []
    v6: list[str] = []
    loopback = False
    for item in items:
        addr_s, slash, bits_s = item.partition("/")
        try:
            if not slash or not bits_s.isdigit() or (len(bits_s) > 1 and bits_s[0] == "0"):
                raise ValueError("want ADDRESS/BITS")
            addr = ipaddress.ip_address(addr_s)
            bits = int(bits_s)
            if bits > addr.max_prefixlen or "%" in addr_s:
                raise ValueError(f"prefix length out of range for {addr_s}")
        except ValueError as e:
            raise ConfigError(f"{flag}: invalid CIDR {item!r} in {value!r}: {e}") from None
        if addr.version == 6 and addr.ipv4_mapped is None:
            v6.append(f"{addr.compressed}/{bits}")
            loopback = loopback or addr == ipaddress.IPv6Address("::1")
        elif addr.version == 6:
            v6.append(f"::ffff:{addr.ipv4_mapped}/{bits}")
        else:
            v4.append(f"{addr}/{bits}")
            loopback = loopback or addr.is_loopback
    return tuple(v4), tuple(v6), loopback


def parse_resolv_conf(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The nameservers of /etc/resolv.conf split into v4 and v6, canonical; non-IP entries dropped."""
    import ipaddress

    v4: list[str] = []
    v6: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(fields[1])
            except ValueError:
                continue
            (v4 if addr.version == 4 else v6).append(addr.compressed)
    return tuple(v4), tuple(v6)


def decide_ipv6(addresses: tuple[str, ...], dual_stack: bool) -> tuple[bool, str]:
    """Istio's rule: the first usable address decides (v6 -> on); with --dual-stack any v6 address does."""
    if not addresses:
        raise ConfigError("no valid local IP address found (need a non-loopback, non-link-local address)")
    first = addresses[0]
    if dual_stack:
        return any(":" in a for a in addresses), first
    return ":" in first, first


def resolve_uid(value: str, env: Mapping[str, str]) -> str:
    """-u empty -> the UID of $ENVOY_USER (istio-proxy) if that user exists here, else 1337."""
    if value:
        return value
    import pwd

    try:
        return str(pwd.getpwnam(env.get(C.ENV_ENVOY_USER, C.PROXY_USER)).pw_uid)
    except KeyError:
        return str(C.PROXY_UID)


def build_config(values: Mapping[str, object], env: Mapping[str, str], host: HostInfo,
                 resolv_conf: str | None = None) -> CaptureConfig:
    """Turn parsed flag values (init.flags.parse) + env-only variables + host facts into a CaptureConfig."""
    v = values
    warnings: list[str] = []

    def s(key: str) -> str:
        return str(v[key])

    uid_s = resolve_uid(s("proxy_uid"), env)
    uids = _ids("-u/--proxy-uid", uid_s)
    gids = _ids("-g/--proxy-gid", s("proxy_gid") or uid_s)
    if not uids:
        raise ConfigError("-u/--proxy-uid: no UID given")

    mode_raw = s("istio_inbound_interception_mode")
    mode = TPROXY if mode_raw == TPROXY else REDIRECT
    if mode_raw not in ("", REDIRECT, TPROXY):
        warnings.append(f"-m/--istio-inbound-interception-mode {mode_raw!r} is neither REDIRECT nor TPROXY; using REDIRECT")

    inbound = s("istio_inbound_ports")
    inbound_list = () if inbound in ("", "*") else _ports("-b/--istio-inbound-ports", inbound)

    exclude_cidr = s("istio_service_exclude_cidr")
    if exclude_cidr == "*":
        raise ConfigError("-x/--istio-service-exclude-cidr: '*' is not allowed "
                          "(invalid value for OUTBOUND_IP_RANGES_EXCLUDE)")
    ex4, ex6, _ = parse_cidrs("-x/--istio-service-exclude-cidr", exclude_cidr)
    include = s("istio_service_cidr")
    in4, in6, in_lo = ((), (), False) if include == "*" else parse_cidrs("-i/--istio-service-cidr", include)

    mark = s("istio_inbound_tproxy_mark")
    table = s("istio_inbound_tproxy_route_table")
    if not mark.isdigit():
        raise ConfigError(f"-t/--istio-inbound-tproxy-mark: {mark!r} is not a decimal number")
    if not table.isdigit():
        raise ConfigError(f"-r/--istio-inbound-tproxy-route-table: {table!r} is not a decimal number")

    groups_inc_raw = env.get(C.ENV_OUTBOUND_OWNER_GROUPS, "*")
    groups_include = None if groups_inc_raw == "*" else _names(C.ENV_OUTBOUND_OWNER_GROUPS, groups_inc_raw, "group")
    if groups_include is not None and len(groups_include) > MAX_OWNER_GROUPS_INCLUDE:
        raise ConfigError(f"{C.ENV_OUTBOUND_OWNER_GROUPS}: {len(groups_include)} groups, at most "
                          f"{MAX_OWNER_GROUPS_INCLUDE} allowed")
    groups_exclude = _names(C.ENV_OUTBOUND_OWNER_GROUPS_EXCLUDE,
                            env.get(C.ENV_OUTBOUND_OWNER_GROUPS_EXCLUDE, ""), "group")

    loopback = env.get(C.ENV_OUTBOUND_IPV4_LOOPBACK_CIDR, "127.0.0.1/32")
    lo4, _, _ = parse_cidrs(C.ENV_OUTBOUND_IPV4_LOOPBACK_CIDR, loopback)
    bits = loopback.partition("/")[2]
    if len(lo4) != 1 or not loopback.startswith("127.") or not 8 <= int(bits) <= 32:
        raise ConfigError(f"{C.ENV_OUTBOUND_IPV4_LOOPBACK_CIDR}: {loopback!r} is not an IPv4 loopback prefix "
                          "with a mask of 8..32")

    force = s("force_iptables_binary")
    if force not in ("", "legacy", "nft"):
        raise ConfigError(f"--force-iptables-binary: {force!r} is not one of '', legacy, nft")
    if v["native_nftables"]:
        raise ConfigError("--native-nftables: the native nftables implementation is not supported by "
                          "meshboot-iptables; use the iptables backends (nft or legacy)")

    layout = env.get(C.ENV_IPTABLES_LAYOUT, LAYOUT_CLASSIC) or LAYOUT_CLASSIC
    if layout not in (LAYOUT_CLASSIC, LAYOUT_CURRENT):
        raise ConfigError(f"{C.ENV_IPTABLES_LAYOUT}: {layout!r} is not one of {LAYOUT_CLASSIC}, {LAYOUT_CURRENT}")

    redirect_dns = bool(v["redirect_dns"])
    capture_all = bool(v["capture_all_dns"])
    dns4: tuple[str, ...] = ()
    dns6: tuple[str, ...] = ()
    if redirect_dns and not capture_all:
        if resolv_conf is None:
            raise ConfigError("--redirect-dns: cannot read /etc/resolv.conf for the DNS servers")
        dns4, dns6 = parse_resolv_conf(resolv_conf)
        if not dns4 and not dns6:
            warnings.append("--redirect-dns: no nameserver in /etc/resolv.conf; DNS capture disabled")

    enable_ipv6, host_ip = decide_ipv6(host.addresses, bool(v["dual_stack"]))

    interfaces = host.interfaces
    for flag, names in (("-c/--istio-exclude-interfaces", s("istio_exclude_interfaces")),
                        ("-k/--kube-virt-interfaces", s("kube_virt_interfaces"))):
        for name in _names(flag, names):
            if interfaces and name not in interfaces:
                warnings.append(f"{flag}: interface {name!r} does not exist (yet) in this network namespace")

    return CaptureConfig(
        envoy_port=_port("-p/--envoy-port", s("envoy_port")),
        inbound_capture_port=_port("-z/--inbound-capture-port", s("inbound_capture_port")),
        inbound_tunnel_port=_port("-e/--inbound-tunnel-port", s("inbound_tunnel_port")),
        proxy_uids=uids,
        proxy_gids=gids,
        mode=mode,
        inbound_ports=inbound,
        inbound_port_list=inbound_list,
        inbound_exclude_ports=_ports("-d/--istio-local-exclude-ports", s("istio_local_exclude_ports")),
        exclude_interfaces=_names("-c/--istio-exclude-interfaces", s("istio_exclude_interfaces")),
        include_all_cidrs=include == "*",
        include_cidrs_v4=in4,
        include_cidrs_v6=in6,
        include_has_loopback=in_lo,
        exclude_cidrs_v4=ex4,
        exclude_cidrs_v6=ex6,
        outbound_ports=_ports("-q/--istio-outbound-ports", s("istio_outbound_ports")),
        outbound_exclude_ports=_ports("-o/--istio-local-outbound-ports-exclude",
                                      s("istio_local_outbound_ports_exclude")),
        kube_virt_interfaces=_names("-k/--kube-virt-interfaces", s("kube_virt_interfaces")),
        tproxy_mark=mark,
        tproxy_route_table=table,
        loopback_v4=loopback,
        owner_groups_include=groups_include,
        owner_groups_exclude=groups_exclude,
        redirect_dns=redirect_dns,
        capture_all_dns=capture_all,
        dns_servers_v4=dns4,
        dns_servers_v6=dns6,
        drop_invalid=bool(v["drop_invalid"]),
        enable_ipv6=enable_ipv6,
        host_ip=host_ip,
        layout=layout,
        dry_run=bool(v["dry_run"]),
        skip_rule_apply=bool(v["skip_rule_apply"]),
        run_validation=bool(v["run_validation"]),
        probe_port=int(v["iptables_probe_port"]),  # type: ignore[call-overload]
        probe_timeout=float(v["probe_timeout"]),  # type: ignore[arg-type]
        reconcile=bool(v["reconcile"]),
        cleanup_only=bool(v["cleanup_only"]),
        force_apply=bool(v["force_apply"]),
        force_iptables_binary=force,
        network_namespace=s("network_namespace"),
        cni_mode=bool(v["cni_mode"]),
        warnings=tuple(warnings),
    )
