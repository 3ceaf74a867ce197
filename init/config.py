"""Flag values -> one validated CaptureConfig (pure). Bad input raises ConfigError naming the flag or env var.

Istio passes list items to iptables verbatim; we check them here instead, so a typo fails with one message that names
the flag rather than with an iptables-restore error about line 7.
"""
from __future__ import annotations

from meshboot import constants as C
from meshboot.syntax import interface_name_error, is_ascii_digits, parse_uint

from .record import Record

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Mapping

REDIRECT, TPROXY = "REDIRECT", "TPROXY"
# The rule layout (MESHBOOT_IPTABLES_LAYOUT): "current" (default) is every current Istio's; "classic" is istio-init
# 1.23's (seed 004), kept for nodes and tests that expect that rule set.
LAYOUT_CLASSIC, LAYOUT_CURRENT = "classic", "current"
MAX_OWNER_GROUPS_INCLUDE = 64
# Bounds on tenant-written lists (annotations become these flags): memory, rule count and iptables-restore time stay
# bounded. CIDR and port lists: MAX_LIST_ITEMS each; interfaces, ids and groups: MAX_SMALL_LIST each; the rules that
# multiply (-k interfaces x -i CIDRs): MAX_PRODUCT_RULES.
MAX_LIST_ITEMS = 4096
MAX_SMALL_LIST = 64
MAX_PRODUCT_RULES = 8192
MAX_ID = 4294967294            # uid/gid: uint32 without (uid_t)-1, which iptables' owner match refuses
MAX_U32 = 4294967295
RESERVED_TABLES = (253, 254, 255)  # default, main, local: a "local default" route there would swallow all traffic
SHOW_CHARS = 60
# iptables-restore reads `"` and `\` as quoting/escapes (and we refuse `'` with them): a name holding one would be
# applied as a different name than the one checked.
_QUOTES = "\"'\\"


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
    layout: str = LAYOUT_CURRENT
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


def show(value: str) -> str:
    """A tenant value for a message: repr'd (no newlines, no control characters) and cut to SHOW_CHARS."""
    return repr(value) if len(value) <= SHOW_CHARS else repr(value[:SHOW_CHARS]) + f"... ({len(value)} chars)"


def _items(flag: str, value: str, limit: int = MAX_LIST_ITEMS, what: str = "items") -> tuple[str, ...]:
    """split_list, bounded: a list longer than `limit` items is refused before anything is built from it."""
    if value.count(",") >= limit * 4:  # cheap pre-check: do not split a megabyte of commas
        raise ConfigError(f"{flag}: too many {what} (at most {limit})")
    items = split_list(value)
    if len(items) > limit:
        raise ConfigError(f"{flag}: {len(items)} {what}, at most {limit} allowed")
    return items


def _uint(text: str, maximum: int) -> int | None:
    """ASCII decimal 0..maximum without leading zeros, else None (int() alone takes "١٥" and "１５"; iptables
    reads "080" as a service name and fails): meshboot.syntax.parse_uint, plus the leading-zero rule."""
    if len(text) > 1 and text[0] == "0":
        return None
    try:
        return parse_uint(text, maximum)
    except ValueError:
        return None


def _ports(flag: str, value: str) -> tuple[str, ...]:
    items = _items(flag, value)
    for item in items:
        lo_s, colon, hi_s = item.partition(":")
        lo, hi = _uint(lo_s, 65535), (_uint(hi_s, 65535) if colon else 0)
        if lo is None or hi is None or (colon and hi < lo):
            raise ConfigError(f"{flag}: invalid port {show(item)} "
                              "(want N or N:M with N <= M, 0-65535, ASCII digits, no leading zeros)")
    return items


def _port(flag: str, value: str) -> str:
    n = _uint(value, 65535)
    if not n:
        raise ConfigError(f"{flag}: invalid port {show(value)} (want 1-65535, ASCII digits, no leading zeros)")
    return value


def _number(flag: str, value: str, minimum: int, maximum: int, reserved: tuple[int, ...] = ()) -> str:
    n = _uint(value, maximum)
    if n is None or n < minimum or n in reserved:
        extra = f", not {', '.join(map(str, reserved))}" if reserved else ""
        raise ConfigError(f"{flag}: {show(value)} is not a decimal number from {minimum} to {maximum}{extra} "
                          "(ASCII digits, no leading zeros)")
    return value


def _interfaces(flag: str, value: str) -> tuple[str, ...]:
    items = _items(flag, value, MAX_SMALL_LIST)
    for item in items:
        why = interface_name_error(item) or (
            "an interface name has no quotes or backslashes" if any(c in _QUOTES for c in item) else None)
        if why:
            raise ConfigError(f"{flag}: invalid interface name {show(item)}: {why}")
    return items


def _groups(env_name: str, value: str) -> tuple[str, ...]:
    """Owner groups: a gid (ASCII digits) or a group name that exists here, as iptables' owner match resolves it."""
    items = _items(env_name, value, MAX_SMALL_LIST, "groups")
    for item in items:
        if is_ascii_digits(item):
            if _uint(item, MAX_ID) is None:
                raise ConfigError(f"{env_name}: invalid gid {show(item)} (want 0-{MAX_ID})")
            continue
        if not _group_exists(item):
            raise ConfigError(f"{env_name}: invalid group {show(item)} (want a gid or the name of an existing group)")
    return items


def _group_exists(name: str) -> bool:
    ok = (name.isascii() and len(name) <= 32 and name[0] != "-"
          and all(c.isalnum() or c in "._-" for c in name))
    if not ok:
        return False
    import grp  # noqa: PLC0415 - only for group names, not gids (start-up time)

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _ids(flag: str, value: str) -> tuple[str, ...]:
    items = _items(flag, value, MAX_SMALL_LIST)
    for item in items:
        if _uint(item, MAX_ID) is None:
            raise ConfigError(f"{flag}: invalid id {show(item)} (want a comma list of numbers 0-{MAX_ID}, "
                              "ASCII digits, no leading zeros)")
    return items


def parse_cidrs(flag: str, value: str) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """A CIDR list -> (v4, v6, any-loopback), canonical like Go's netip.Prefix (host bits kept)."""
    items = _items(flag, value)
    if not items:
        return (), (), False
    import ipaddress  # noqa: PLC0415 - only when there are CIDRs: keeps the default path's imports small

    v4: list[str] = []
    v6: list[str] = []
    loopback = False
    for item in items:
        addr_s, slash, bits_s = item.partition("/")
        why = "want ADDRESS/BITS (ASCII, no zone, no leading zeros)"
        addr = None
        if slash and addr_s.isascii() and "%" not in addr_s and is_ascii_digits(bits_s) and len(bits_s) <= 3 \
                and not (len(bits_s) > 1 and bits_s[0] == "0"):
            try:
                addr = ipaddress.ip_address(addr_s)
            except ValueError:
                why = "not an IP address"
            if addr is not None and int(bits_s) > addr.max_prefixlen:
                addr, why = None, f"prefix length above {32 if ':' not in addr_s else 128}"
        if addr is None:
            raise ConfigError(f"{flag}: invalid CIDR {show(item)}: {why}")
        bits = int(bits_s)
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
    import ipaddress  # noqa: PLC0415 - only with DNS capture (start-up time)

    v4: list[str] = []
    v6: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            if not fields[1].isascii() or "%" in fields[1]:
                continue  # zoned (fe80::1%eth0) or odd: iptables cannot match it, and Istio skips it too
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
    import pwd  # noqa: PLC0415 - only when -u is empty (start-up time)

    try:
        return str(pwd.getpwnam(env.get(C.ENV_ENVOY_USER, C.PROXY_USER)).pw_uid)
    except KeyError:
        return str(C.PROXY_UID)


def build_config(values: Mapping[str, object], env: Mapping[str, str], host: HostInfo,
                 resolv_conf: str | None = None) -> CaptureConfig:
    """Turn parsed flag values (init.flags.parse) + env-only variables + host facts into a CaptureConfig.
    Every value that reaches a rule is checked here; the first bad one raises ConfigError naming its flag/env."""
    v = values
    warnings: list[str] = []
    fields = _rule_fields(v, env, warnings)
    fields.update(_dns_fields(v, resolv_conf, warnings))
    enable_ipv6, host_ip = decide_ipv6(host.addresses, bool(v["dual_stack"]))
    for flag, names in (("-c/--istio-exclude-interfaces", fields["exclude_interfaces"]),
                        ("-k/--kube-virt-interfaces", fields["kube_virt_interfaces"])):
        for name in names if isinstance(names, tuple) else ():  # always a tuple (_rule_fields); narrows `object`
            if host.interfaces and name not in host.interfaces:
                warnings.append(f"{flag}: interface {name!r} does not exist (yet) in this network namespace")
    force = str(v["force_iptables_binary"])
    if force not in ("", "legacy", "nft"):
        raise ConfigError(f"--force-iptables-binary: {show(force)} is not one of '', legacy, nft")
    if v["native_nftables"] and not v["skip_rule_apply"]:
        # Writing nft rules is not implemented; validating them is (the probe does not care what wrote the rules),
        # so CNI mode's istio-validation, which Istio renders with this flag too, runs.
        raise ConfigError("--native-nftables: the native nftables implementation is not supported by "
                          "meshboot-iptables; use the iptables backends (nft or legacy)")
    return CaptureConfig(
        **fields,
        enable_ipv6=enable_ipv6,
        host_ip=host_ip,
        dry_run=bool(v["dry_run"]),
        skip_rule_apply=bool(v["skip_rule_apply"]),
        run_validation=bool(v["run_validation"]),
        probe_port=int(v["iptables_probe_port"]),  # type: ignore[call-overload]  # an int: flags.parse, UINT16
        probe_timeout=float(v["probe_timeout"]),  # type: ignore[arg-type]  # a float: flags.parse, DURATION
        reconcile=bool(v["reconcile"]),
        cleanup_only=bool(v["cleanup_only"]),
        force_apply=bool(v["force_apply"]),
        force_iptables_binary=force,
        network_namespace=str(v["network_namespace"]),
        cni_mode=bool(v["cni_mode"]),
        warnings=tuple(warnings),
    )


def _rule_fields(v: Mapping[str, object], env: Mapping[str, str], warnings: list[str]) -> dict[str, object]:
    """The values that end up inside iptables rules and netlink requests, each validated."""
    def s(key: str) -> str:
        return str(v[key])

    uid_s = resolve_uid(s("proxy_uid"), env)
    uids = _ids("-u/--proxy-uid", uid_s)
    gids = _ids("-g/--proxy-gid", s("proxy_gid") or uid_s)
    if not uids:
        raise ConfigError("-u/--proxy-uid: no UID given")
    mode_raw = s("istio_inbound_interception_mode")
    if mode_raw not in ("", REDIRECT, TPROXY):
        warnings.append(f"-m/--istio-inbound-interception-mode {show(mode_raw)} is neither REDIRECT nor TPROXY; "
                        "using REDIRECT")
    inbound = s("istio_inbound_ports")
    exclude_cidr = s("istio_service_exclude_cidr")
    if exclude_cidr == "*":
        raise ConfigError("-x/--istio-service-exclude-cidr: '*' is not allowed "
                          "(invalid value for OUTBOUND_IP_RANGES_EXCLUDE)")
    ex4, ex6, _ = parse_cidrs("-x/--istio-service-exclude-cidr", exclude_cidr)
    include = s("istio_service_cidr")
    in4, in6, in_lo = ((), (), False) if include == "*" else parse_cidrs("-i/--istio-service-cidr", include)
    kube_virt = _interfaces("-k/--kube-virt-interfaces", s("kube_virt_interfaces"))
    if len(kube_virt) * max(len(in4), len(in6)) > MAX_PRODUCT_RULES:
        raise ConfigError(f"-k/--kube-virt-interfaces: {len(kube_virt)} interfaces x {max(len(in4), len(in6))} "
                          f"CIDRs of -i/--istio-service-cidr make too many rules (at most {MAX_PRODUCT_RULES})")
    return dict(
        envoy_port=_port("-p/--envoy-port", s("envoy_port")),
        inbound_capture_port=_port("-z/--inbound-capture-port", s("inbound_capture_port")),
        inbound_tunnel_port=_port("-e/--inbound-tunnel-port", s("inbound_tunnel_port")),
        proxy_uids=uids,
        proxy_gids=gids,
        mode=TPROXY if mode_raw == TPROXY else REDIRECT,
        inbound_ports=inbound,
        inbound_port_list=() if inbound in ("", "*") else _ports("-b/--istio-inbound-ports", inbound),
        inbound_exclude_ports=_ports("-d/--istio-local-exclude-ports", s("istio_local_exclude_ports")),
        exclude_interfaces=_interfaces("-c/--istio-exclude-interfaces", s("istio_exclude_interfaces")),
        include_all_cidrs=include == "*",
        include_cidrs_v4=in4,
        include_cidrs_v6=in6,
        include_has_loopback=in_lo,
        exclude_cidrs_v4=ex4,
        exclude_cidrs_v6=ex6,
        outbound_ports=_ports("-q/--istio-outbound-ports", s("istio_outbound_ports")),
        outbound_exclude_ports=_ports("-o/--istio-local-outbound-ports-exclude",
                                      s("istio_local_outbound_ports_exclude")),
        kube_virt_interfaces=kube_virt,
        tproxy_mark=_number("-t/--istio-inbound-tproxy-mark", s("istio_inbound_tproxy_mark"), 1, MAX_U32),
        tproxy_route_table=_number("-r/--istio-inbound-tproxy-route-table", s("istio_inbound_tproxy_route_table"),
                                   1, MAX_U32, RESERVED_TABLES),
        **_env_fields(env),
    )


def _env_fields(env: Mapping[str, str]) -> dict[str, object]:
    """The env-only settings: owner groups, the IPv4 loopback CIDR, the rule layout."""
    groups_inc_raw = env.get(C.ENV_OUTBOUND_OWNER_GROUPS, "*")
    groups_include = None if groups_inc_raw == "*" else _groups(C.ENV_OUTBOUND_OWNER_GROUPS, groups_inc_raw)
    if groups_include is not None and len(groups_include) > MAX_OWNER_GROUPS_INCLUDE:
        raise ConfigError(f"{C.ENV_OUTBOUND_OWNER_GROUPS}: {len(groups_include)} groups, at most "
                          f"{MAX_OWNER_GROUPS_INCLUDE} allowed")
    groups_exclude = _groups(C.ENV_OUTBOUND_OWNER_GROUPS_EXCLUDE, env.get(C.ENV_OUTBOUND_OWNER_GROUPS_EXCLUDE, ""))
    loopback = env.get(C.ENV_OUTBOUND_IPV4_LOOPBACK_CIDR, "127.0.0.1/32")
    lo4, _, _ = parse_cidrs(C.ENV_OUTBOUND_IPV4_LOOPBACK_CIDR, loopback)
    if len(lo4) != 1 or not lo4[0].startswith("127.") or not 8 <= int(lo4[0].partition("/")[2]) <= 32:
        raise ConfigError(f"{C.ENV_OUTBOUND_IPV4_LOOPBACK_CIDR}: {show(loopback)} is not one IPv4 loopback prefix "
                          "with a mask of 8..32")
    layout = env.get(C.ENV_IPTABLES_LAYOUT, LAYOUT_CURRENT) or LAYOUT_CURRENT
    if layout not in (LAYOUT_CURRENT, LAYOUT_CLASSIC):
        raise ConfigError(f"{C.ENV_IPTABLES_LAYOUT}: {show(layout)} is not one of {LAYOUT_CURRENT}, "
                          f"{LAYOUT_CLASSIC}")
    return dict(loopback_v4=lo4[0], owner_groups_include=groups_include, owner_groups_exclude=groups_exclude,
                layout=layout)


def _dns_fields(v: Mapping[str, object], resolv_conf: str | None, warnings: list[str]) -> dict[str, object]:
    redirect_dns = bool(v["redirect_dns"])
    capture_all = bool(v["capture_all_dns"])
    dns4: tuple[str, ...] = ()
    dns6: tuple[str, ...] = ()
    if redirect_dns and not capture_all:
        if resolv_conf is None:
            raise ConfigError("--redirect-dns: cannot read /etc/resolv.conf for the DNS servers")
        dns4, dns6 = parse_resolv_conf(resolv_conf)
        if max(len(dns4), len(dns6)) > MAX_SMALL_LIST:  # the cap is per family: so is the test
            warnings.append(f"--redirect-dns: {len(dns4) + len(dns6)} nameservers in /etc/resolv.conf; capturing "
                            f"DNS to the first {MAX_SMALL_LIST} of each family only")
            dns4, dns6 = dns4[:MAX_SMALL_LIST], dns6[:MAX_SMALL_LIST]
        if not dns4 and not dns6:
            warnings.append("--redirect-dns: no nameserver in /etc/resolv.conf; DNS capture disabled")
    return dict(redirect_dns=redirect_dns, capture_all_dns=capture_all, dns_servers_v4=dns4, dns_servers_v6=dns6,
                drop_invalid=bool(v["drop_invalid"]))
