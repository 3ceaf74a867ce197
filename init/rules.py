"""CaptureConfig -> rule sets (tables -> chains -> ordered rules) for IPv4 and IPv6, and their iptables-restore text.

Pure. The emission order is Istio's (reference/iptables.md §2): it decides the order of the `-N` lines, of the rules
inside a chain and of the `-I 1` inserts, so the restore text and the kernel's rule order match istio-init's.
"""
from __future__ import annotations

from meshboot import constants as C

from .config import LAYOUT_CLASSIC, CaptureConfig
from .record import Record, factory

NAT, MANGLE, RAW, FILTER = "nat", "mangle", "raw", "filter"
TABLE_ORDER = (FILTER, MANGLE, NAT, RAW)
BUILTIN = frozenset({"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING", "ACCEPT", "RETURN", "DROP"})
V4, V6 = 4, 6
DNS_PORT = "53"

INBOUND, REDIRECT_CHAIN, IN_REDIRECT = C.CHAIN_INBOUND, C.CHAIN_REDIRECT, C.CHAIN_IN_REDIRECT
OUTPUT_CHAIN, OUTPUT_DNS, DROP_CHAIN = C.CHAIN_OUTPUT, C.CHAIN_OUTPUT_DNS, C.CHAIN_DROP
DIVERT, TPROXY_CHAIN = C.CHAIN_DIVERT, C.CHAIN_TPROXY


def is_istio_chain(name: str) -> bool:
    return name.startswith(C.ISTIO_CHAIN_PREFIX)


class Rule(Record):
    """One `-A CHAIN spec` (insert is None) or `-I CHAIN POS spec` in one table."""

    table: str
    chain: str
    spec: tuple[str, ...]
    insert: int | None = None

    @property
    def target(self) -> str | None:
        """The jump target (`-j X` / `-g X`), None for a rule without one."""
        for i in range(len(self.spec) - 2, -1, -1):
            if self.spec[i] in ("-j", "-g", "--jump", "--goto"):
                return self.spec[i + 1]
        return None

    def restore_line(self) -> str:
        pos = f" {self.insert}" if self.insert is not None else ""
        op = "-I" if self.insert is not None else "-A"
        return f"{op} {self.chain}{pos} {' '.join(self.spec)}"

    def check_args(self) -> list[str]:
        """Arguments for `iptables -t T -C CHAIN spec` (position dropped), used by the state check."""
        return ["-t", self.table, "-C", self.chain, *self.spec]


class RuleSet(Record):
    """The ordered rules of one family."""

    family: int
    rules: list[Rule] = factory(list)

    def a(self, table: str, chain: str, spec: str) -> None:
        self.rules.append(Rule(table, chain, tuple(spec.split())))

    def i(self, table: str, chain: str, pos: int, spec: str) -> None:
        self.rules.append(Rule(table, chain, tuple(spec.split()), pos))

    def tables(self) -> list[str]:
        present = {r.table for r in self.rules}
        return [t for t in TABLE_ORDER if t in present]

    def chains(self, table: str) -> list[str]:
        """Non-builtin chains of a table in Istio's `-N` order: owners first, then jump targets."""
        out: list[str] = []
        for r in self.rules:
            if r.table == table and r.chain not in BUILTIN and r.chain not in out:
                out.append(r.chain)
        for r in self.rules:
            t = r.target
            if r.table == table and t and t not in BUILTIN and t not in out and _is_chain_target(r):
                out.append(t)
        return out

    def istio_chains(self) -> dict[tuple[str, str], int]:
        """(table, chain) -> planned rule count, for every ISTIO_* chain (declared ones with 0 rules too)."""
        out: dict[tuple[str, str], int] = {}
        for table in self.tables():
            for chain in self.chains(table):
                if is_istio_chain(chain):
                    out[(table, chain)] = 0
        for r in self.rules:
            if is_istio_chain(r.chain):
                out[(r.table, r.chain)] += 1
        return out

    def restore_text(self) -> str:
        """iptables-restore --noflush input, in Istio's layout (`* nat`, `-N ...`, rules, `COMMIT`)."""
        if not self.rules:
            return ""
        lines: list[str] = []
        for table in self.tables():
            lines.append(f"* {table}")
            lines.extend(f"-N {c}" for c in self.chains(table))
            lines.extend(r.restore_line() for r in self.rules if r.table == table)
            lines.append("COMMIT")
        return "\n".join(lines) + "\n"


def _is_chain_target(rule: Rule) -> bool:
    """True for `-j CHAIN` as the last two tokens (Istio's test): `-j REDIRECT --to-ports N` is not a chain."""
    return len(rule.spec) >= 2 and rule.spec[-2] in ("-j", "-g")


class Plan(Record):
    v4: RuleSet
    v6: RuleSet

    def families(self) -> list[RuleSet]:
        return [rs for rs in (self.v4, self.v6) if rs.rules]


def build(cfg: CaptureConfig) -> Plan:
    """The v4 rule set, and the v6 one when IPv6 is enabled (empty otherwise)."""
    return Plan(build_family(cfg, V4), build_family(cfg, V6) if cfg.enable_ipv6 else RuleSet(V6))


class Family(Record):
    """The per-family values a rule uses: loopback, the inbound passthrough source, host bits, DNS servers, CIDRs."""

    family: int
    lo: str
    passthrough_src: str
    host_bits: str
    dns_servers: tuple[str, ...]
    include_cidrs: tuple[str, ...]
    exclude_cidrs: tuple[str, ...]


def family_values(cfg: CaptureConfig, family: int) -> Family:
    if family == V4:
        return Family(family, cfg.loopback_v4, f"{C.INBOUND_PASSTHROUGH_SRC_V4}/32", "/32", cfg.dns_servers_v4,
                      cfg.include_cidrs_v4, cfg.exclude_cidrs_v4)
    return Family(family, "::1/128", f"{C.INBOUND_PASSTHROUGH_SRC_V6}/128", "/128", cfg.dns_servers_v6,
                  cfg.include_cidrs_v6, cfg.exclude_cidrs_v6)


def build_family(cfg: CaptureConfig, family: int) -> RuleSet:
    """One family's rules in Istio's emission order (reference/iptables.md §2.2 steps 1-23); each helper emits a
    run of consecutive steps, so the order of the calls is the order of the rules."""
    rs = RuleSet(family)
    fam = family_values(cfg, family)
    _excluded_interfaces(rs, cfg)                                       # 1-3
    if cfg.drop_invalid:                                                # 4, 5
        rs.a(MANGLE, "PREROUTING", f"-m conntrack --ctstate INVALID -j {DROP_CHAIN}")
        rs.a(MANGLE, DROP_CHAIN, "-j DROP")
    rs.a(NAT, INBOUND, f"-p tcp --dport {cfg.inbound_tunnel_port} -j RETURN")       # 6, 7, 8
    rs.a(NAT, REDIRECT_CHAIN, f"-p tcp -j REDIRECT --to-ports {cfg.envoy_port}")
    rs.a(NAT, IN_REDIRECT, f"-p tcp -j REDIRECT --to-ports {cfg.inbound_capture_port}")
    if cfg.inbound_ports:                                               # 9-11
        if cfg.tproxy:
            _tproxy_inbound(rs, cfg, fam.lo)
        else:
            _inbound(rs, cfg)
    _proxy_traffic(rs, cfg, fam)                                        # 12-16
    _owner_groups(rs, cfg)                                              # 17
    if cfg.dns:                                                         # 18
        _dns(rs, cfg, fam.dns_servers, fam.host_bits)
    _outbound(rs, cfg, fam)                                             # 19-22
    if cfg.tproxy:                                                      # 23
        _tproxy_marks(rs, cfg, fam.lo, fam.passthrough_src)
    return rs


def _excluded_interfaces(rs: RuleSet, cfg: CaptureConfig) -> None:
    """Steps 1, 2 (+1b): excluded interfaces are never captured; 3: traffic arriving on virtual interfaces is
    outbound, not inbound."""
    for nic in cfg.exclude_interfaces:
        rs.a(NAT, "PREROUTING", f"-i {nic} -j RETURN")
        rs.a(NAT, "OUTPUT", f"-o {nic} -j RETURN")
    if cfg.tproxy:
        for nic in cfg.exclude_interfaces:
            rs.a(MANGLE, "PREROUTING", f"-i {nic} -j RETURN")
            rs.a(MANGLE, "OUTPUT", f"-o {nic} -j RETURN")
    for nic in cfg.kube_virt_interfaces:
        rs.i(NAT, "PREROUTING", 1, f"-i {nic} -j RETURN")


def _inbound(rs: RuleSet, cfg: CaptureConfig) -> None:
    """Steps 9-11, REDIRECT mode: every port but the excluded ones, or only the listed ones, to 15006."""
    rs.a(NAT, "PREROUTING", f"-p tcp -j {INBOUND}")
    if cfg.inbound_ports == "*":
        for port in cfg.inbound_exclude_ports:
            rs.a(NAT, INBOUND, f"-p tcp --dport {port} -j RETURN")
        rs.a(NAT, INBOUND, f"-p tcp -j {IN_REDIRECT}")
    else:
        for port in cfg.inbound_port_list:
            rs.a(NAT, INBOUND, f"-p tcp --dport {port} -j {IN_REDIRECT}")


def _proxy_traffic(rs: RuleSet, cfg: CaptureConfig, fam: Family) -> None:
    """Steps 12-16: the OUTPUT jump, excluded outbound ports, the passthrough source and the proxy's own traffic."""
    tun, classic, dns = cfg.inbound_tunnel_port, cfg.layout == LAYOUT_CLASSIC, cfg.dns
    # 12: classic istio-init jumps with TCP only unless UDP DNS has to reach ISTIO_OUTPUT_DNS.
    rs.a(NAT, "OUTPUT", f"-p tcp -j {OUTPUT_CHAIN}" if classic and not dns else f"-j {OUTPUT_CHAIN}")
    for port in cfg.outbound_exclude_ports:                             # 13
        rs.a(NAT, OUTPUT_CHAIN, f"-p tcp --dport {port} -j RETURN")
        rs.a(NAT, OUTPUT_CHAIN, f"-p udp --dport {port} -j RETURN")
    rs.a(NAT, OUTPUT_CHAIN, f"-o lo -s {fam.passthrough_src} -j RETURN")  # 14: never recaptured
    for kind, ids in (("uid", cfg.proxy_uids), ("gid", cfg.proxy_gids)):  # 15, 16
        for ident in ids:
            if classic:
                ports = "-p tcp ! --dport 53 " if dns and kind == "uid" else ""
            elif dns and kind == "uid":
                ports = f"-p tcp -m multiport ! --dports {DNS_PORT},{tun} "
            else:
                ports = f"-p tcp ! --dport {tun} "
            rs.a(NAT, OUTPUT_CHAIN, f"-o lo ! -d {fam.lo} {ports}-m owner --{kind}-owner {ident} -j {IN_REDIRECT}")
            if not cfg.include_has_loopback:
                not_dns = f"-p tcp ! --dport {DNS_PORT} " if dns else ""
                rs.a(NAT, OUTPUT_CHAIN, f"-o lo {not_dns}-m owner ! --{kind}-owner {ident} -j RETURN")
            rs.a(NAT, OUTPUT_CHAIN, f"-m owner --{kind}-owner {ident} -j RETURN")


def _owner_groups(rs: RuleSet, cfg: CaptureConfig) -> None:
    """Step 17: ISTIO_OUTBOUND_OWNER_GROUPS(_EXCLUDE)."""
    if cfg.owner_groups_include is None:
        for group in cfg.owner_groups_exclude:
            rs.a(NAT, OUTPUT_CHAIN, f"-m owner --gid-owner {group} -j RETURN")
    else:
        matches = " ".join(f"-m owner ! --gid-owner {g}" for g in cfg.owner_groups_include)
        rs.a(NAT, OUTPUT_CHAIN, f"{matches} -j RETURN".strip())


def _outbound(rs: RuleSet, cfg: CaptureConfig, fam: Family) -> None:
    """Steps 19-22: loopback and excluded CIDRs return, included ports and CIDRs (and virtual interfaces) go to
    ISTIO_REDIRECT."""
    rs.a(NAT, OUTPUT_CHAIN, f"-d {fam.lo} -j RETURN")
    for cidr in fam.exclude_cidrs:
        rs.a(NAT, OUTPUT_CHAIN, f"-d {cidr} -j RETURN")
    for port in cfg.outbound_ports:
        rs.a(NAT, OUTPUT_CHAIN, f"-p tcp --dport {port} -j {REDIRECT_CHAIN}")
    if cfg.include_all_cidrs:
        rs.a(NAT, OUTPUT_CHAIN, f"-j {REDIRECT_CHAIN}")
        for nic in cfg.kube_virt_interfaces:
            rs.i(NAT, "PREROUTING", 1, f"-i {nic} -j {REDIRECT_CHAIN}")
    else:
        for cidr in fam.include_cidrs:
            for nic in cfg.kube_virt_interfaces:
                rs.i(NAT, "PREROUTING", 1, f"-i {nic} -d {cidr} -j {REDIRECT_CHAIN}")
            rs.a(NAT, OUTPUT_CHAIN, f"-d {cidr} -j {REDIRECT_CHAIN}")


def _tproxy_inbound(rs: RuleSet, cfg: CaptureConfig, lo: str) -> None:
    mark = cfg.tproxy_mark
    rs.a(MANGLE, DIVERT, f"-j MARK --set-mark {mark}")
    rs.a(MANGLE, DIVERT, "-j ACCEPT")
    rs.a(MANGLE, TPROXY_CHAIN,
         f"! -d {lo} -p tcp -j TPROXY --tproxy-mark {mark}/0xffffffff --on-port {cfg.inbound_capture_port}")
    rs.a(MANGLE, "PREROUTING", f"-p tcp -j {INBOUND}")
    if cfg.inbound_ports == "*":
        for port in cfg.inbound_exclude_ports:
            rs.a(MANGLE, INBOUND, f"-p tcp --dport {port} -j RETURN")
        rs.a(MANGLE, INBOUND, f"-p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j {DIVERT}")
        rs.a(MANGLE, INBOUND, f"-p tcp -j {TPROXY_CHAIN}")
    else:
        for port in cfg.inbound_port_list:
            rs.a(MANGLE, INBOUND, f"-p tcp --dport {port} -m conntrack --ctstate RELATED,ESTABLISHED -j {DIVERT}")
            rs.a(MANGLE, INBOUND, f"-p tcp --dport {port} -j {TPROXY_CHAIN}")


def _tproxy_marks(rs: RuleSet, cfg: CaptureConfig, lo: str, src6: str) -> None:
    mark, lo_mark = cfg.tproxy_mark, C.TPROXY_OUTPUT_MARK
    rs.a(MANGLE, "PREROUTING", f"-p tcp -m mark --mark {mark} -j CONNMARK --save-mark")
    rs.a(MANGLE, "OUTPUT", f"-p tcp -o lo -m mark --mark {mark} -j RETURN")
    for kind, ids in (("uid", cfg.proxy_uids), ("gid", cfg.proxy_gids)):
        for ident in ids:
            rs.a(MANGLE, "OUTPUT",
                 f"! -d {lo} -p tcp -o lo -m owner --{kind}-owner {ident} -j MARK --set-mark {lo_mark}")
    rs.a(MANGLE, "OUTPUT", f"-p tcp -m connmark --mark {mark} -j CONNMARK --restore-mark")
    rs.i(MANGLE, INBOUND, 1, f"-p tcp -m mark --mark {mark} -j RETURN")
    rs.i(MANGLE, INBOUND, 2, f"-p tcp -s {src6} -i lo -j RETURN")
    rs.i(MANGLE, INBOUND, 3, f"-p tcp -i lo -m mark ! --mark {lo_mark} -j RETURN")


def _dns(rs: RuleSet, cfg: CaptureConfig, servers: tuple[str, ...], host_bits: str) -> None:
    dns_port = C.DNS_PROXY_PORT
    capture_all = cfg.capture_all_dns
    rs.a(RAW, "OUTPUT", f"-j {OUTPUT_DNS}")
    if capture_all or servers:
        rs.a(NAT, OUTPUT_CHAIN, f"-j {OUTPUT_DNS}")
    if capture_all:
        rs.a(NAT, OUTPUT_DNS, f"-p tcp --dport {DNS_PORT} -j REDIRECT --to-ports {dns_port}")
        rs.a(NAT, OUTPUT_DNS, f"-p udp --dport {DNS_PORT} -j REDIRECT --to-port {dns_port}")
    else:
        for s in servers:
            rs.a(NAT, OUTPUT_DNS, f"-p tcp --dport {DNS_PORT} -d {s}{host_bits} -j REDIRECT --to-ports {dns_port}")
        for s in servers:
            rs.a(NAT, OUTPUT_DNS, f"-p udp --dport {DNS_PORT} -d {s}{host_bits} -j REDIRECT --to-port {dns_port}")
    for kind, ids in (("uid", cfg.proxy_uids), ("gid", cfg.proxy_gids)):
        for ident in ids:
            rs.a(RAW, OUTPUT_DNS, f"-p udp --dport {DNS_PORT} -m owner --{kind}-owner {ident} -j CT --zone 1")
            rs.a(RAW, OUTPUT_DNS, f"-p udp --sport {dns_port} -m owner --{kind}-owner {ident} -j CT --zone 2")
    if capture_all:
        rs.a(RAW, "PREROUTING", f"-j {INBOUND}")
        rs.a(RAW, OUTPUT_DNS, f"-p udp --dport {DNS_PORT} -j CT --zone 2")
        rs.a(RAW, INBOUND, f"-p udp --sport {DNS_PORT} -j CT --zone 1")
    elif servers:
        rs.a(RAW, "PREROUTING", f"-j {INBOUND}")
        for s in servers:
            rs.a(RAW, OUTPUT_DNS, f"-p udp --dport {DNS_PORT} -d {s}{host_bits} -j CT --zone 2")
            rs.a(RAW, INBOUND, f"-p udp --sport {DNS_PORT} -s {s}{host_bits} -j CT --zone 1")
