"""The rule generator, one config family of reference/iptables.md §2-3 at a time (pure: no root needed)."""
from __future__ import annotations

import pytest
from init_helpers import CLASSIC, CURRENT_LINES, DEFAULT_ARGS, ISTIO_RESTORE, SEED_004_RESTORE, config, plan, v4, v6

from init.config import ConfigError
from init.rules import build

CURRENT = {"MESHBOOT_IPTABLES_LAYOUT": "current"}  # the default, also by name
HEAD = ["* nat", "-N ISTIO_INBOUND", "-N ISTIO_REDIRECT", "-N ISTIO_IN_REDIRECT", "-N ISTIO_OUTPUT",
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"]
UID_GID = [  # current Istio: the proxy's own loopback traffic to 15008 (HBONE) is not sent back to 15006
    "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN"]


def test_default_injected_args_write_current_istio_restore_text() -> None:
    assert v4(*DEFAULT_ARGS) == ISTIO_RESTORE
    assert v4(*DEFAULT_ARGS, env=CURRENT) == ISTIO_RESTORE
    assert plan(*DEFAULT_ARGS).v6.rules == []  # no IPv6 address -> no v6 rules


def test_classic_layout_writes_seed_004_restore_text() -> None:
    assert v4(*DEFAULT_ARGS, env=CLASSIC) == SEED_004_RESTORE
    # the layouts differ in exactly the three lines ISTIO_RESTORE replaces
    assert sum(line in CURRENT_LINES for line in SEED_004_RESTORE) == len(CURRENT_LINES) == 3


def test_current_layout_jumps_all_protocols_and_spares_the_tunnel_port() -> None:
    lines = v4(*DEFAULT_ARGS)
    assert "-A OUTPUT -j ISTIO_OUTPUT" in lines
    assert "-A OUTPUT -p tcp -j ISTIO_OUTPUT" not in lines
    assert ("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 "
            "-j ISTIO_IN_REDIRECT") in lines
    assert ("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 "
            "-j ISTIO_IN_REDIRECT") in lines
    # everything else is the same rule for rule
    strip = [ln.replace(" -p tcp ! --dport 15008", "") for ln in lines]
    assert strip == [ln.replace("-A OUTPUT -p tcp -j", "-A OUTPUT -j") for ln in v4(*DEFAULT_ARGS, env=CLASSIC)]


def test_inbound_port_list_redirects_only_those_ports_and_ignores_d() -> None:
    lines = v4("-b", "80,8000:9000", "-d", "15020", "-i", "*")
    assert lines[:9] == [*HEAD, "-A PREROUTING -p tcp -j ISTIO_INBOUND"]
    assert lines[9:11] == ["-A ISTIO_INBOUND -p tcp --dport 80 -j ISTIO_IN_REDIRECT",
                           "-A ISTIO_INBOUND -p tcp --dport 8000:9000 -j ISTIO_IN_REDIRECT"]
    assert not any("15020" in ln for ln in lines)


def test_empty_inbound_ports_capture_nothing_inbound_but_keep_the_chain() -> None:
    lines = v4("-b", "", "-i", "*")
    assert lines == [*HEAD, "-A OUTPUT -j ISTIO_OUTPUT", "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
                    *UID_GID, "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
                    "-A ISTIO_OUTPUT -j ISTIO_REDIRECT", "COMMIT"]


def test_inbound_wildcard_with_excluded_ports_returns_them_in_order() -> None:
    lines = v4("-b", "*", "-d", "22,15090")
    i = lines.index("-A PREROUTING -p tcp -j ISTIO_INBOUND")
    assert lines[i + 1:i + 4] == ["-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN",
                                  "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
                                  "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"]


def test_outbound_cidr_include_and_exclude_split_by_family() -> None:
    args = ("-i", "10.0.0.0/8,2001:DB8::/32", "-x", "10.96.0.1/32,fd00::1/128", "-b", "")
    lines4 = v4(*args)
    tail4 = lines4[lines4.index("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN"):]
    assert tail4 == ["-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN", "-A ISTIO_OUTPUT -d 10.96.0.1/32 -j RETURN",
                     "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT", "COMMIT"]
    lines6 = v6(*args)
    tail6 = lines6[lines6.index("-A ISTIO_OUTPUT -d ::1/128 -j RETURN"):]
    assert tail6 == ["-A ISTIO_OUTPUT -d ::1/128 -j RETURN", "-A ISTIO_OUTPUT -d fd00::1/128 -j RETURN",
                     "-A ISTIO_OUTPUT -d 2001:db8::/32 -j ISTIO_REDIRECT", "COMMIT"]


def test_exclude_cidr_applies_without_include_and_host_bits_are_kept() -> None:
    lines = v4("-i", "", "-x", "10.0.0.1/8")
    assert lines[-3:] == ["-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN", "-A ISTIO_OUTPUT -d 10.0.0.1/8 -j RETURN",
                          "COMMIT"]
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" not in lines


@pytest.mark.parametrize("args, where", [
    (("-x", "*"), "-x/--istio-service-exclude-cidr"),
    (("-i", "10.0.0.0"), "-i/--istio-service-cidr"),
    (("-i", "10.0.0.0/33"), "-i/--istio-service-cidr"),
    (("-i", "*,10.0.0.0/8"), "-i/--istio-service-cidr"),
    (("-b", "80,http"), "-b/--istio-inbound-ports"),
    (("-d", "99999"), "-d/--istio-local-exclude-ports"),
    (("-q", "*"), "-q/--istio-outbound-ports"),
    (("-p", "0"), "-p/--envoy-port"),
    (("-u", "istio-proxy"), "-u/--proxy-uid"),
    (("-t", "0x539"), "-t/--istio-inbound-tproxy-mark"),
    (("-r", "main"), "-r/--istio-inbound-tproxy-route-table"),
    (("-k", "a b"), "-k/--kube-virt-interfaces"),
    (("--force-iptables-binary", "nftables"), "--force-iptables-binary"),
])
def test_bad_values_give_one_error_naming_the_flag(args: tuple[str, ...], where: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(*args)
    assert str(e.value).startswith(where)


def test_outbound_ports_include_and_exclude() -> None:
    lines = v4("-i", "", "-q", "3306,5432", "-o", "25")
    assert lines[lines.index("-A OUTPUT -j ISTIO_OUTPUT") + 1:][:3] == [
        "-A ISTIO_OUTPUT -p tcp --dport 25 -j RETURN", "-A ISTIO_OUTPUT -p udp --dport 25 -j RETURN",
        "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN"]
    assert lines[-3:] == ["-A ISTIO_OUTPUT -p tcp --dport 3306 -j ISTIO_REDIRECT",
                          "-A ISTIO_OUTPUT -p tcp --dport 5432 -j ISTIO_REDIRECT", "COMMIT"]


def test_uid_and_gid_lists_are_processed_in_sequence() -> None:
    lines = v4("-u", "1,2", "-g", "3")
    owner = [ln for ln in lines if "-owner" in ln]
    assert owner == [
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 2 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 2 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 2 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 3 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 3 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 3 -j RETURN"]


def test_gid_defaults_to_uid_and_uid_to_istio_proxy_or_1337() -> None:
    cfg = config("-u", "42")
    assert (cfg.proxy_uids, cfg.proxy_gids) == (("42",), ("42",))
    cfg = config(env={"ENVOY_USER": "no-such-user-here"})
    assert (cfg.proxy_uids, cfg.proxy_gids) == (("1337",), ("1337",))
    cfg = config(env={"ENVOY_USER": "root"})
    assert cfg.proxy_uids == ("0",)


def test_loopback_in_include_drops_the_app_to_self_return() -> None:
    lines = v4("-i", "127.0.0.1/32,10.0.0.0/8", "-u", "1337", "-g", "1337")
    assert not any("! --uid-owner" in ln or "! --gid-owner" in ln for ln in lines)
    assert "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j ISTIO_REDIRECT" in lines


def test_owner_groups_include_and_exclude() -> None:
    inc = v4(env={"ISTIO_OUTBOUND_OWNER_GROUPS": "daemon,1001"})  # a name must exist, as iptables resolves it
    assert "-A ISTIO_OUTPUT -m owner ! --gid-owner daemon -m owner ! --gid-owner 1001 -j RETURN" in inc
    exc = v4(env={"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "888,999"})
    i = exc.index("-A ISTIO_OUTPUT -m owner --gid-owner 888 -j RETURN")
    assert exc[i + 1:i + 3] == ["-A ISTIO_OUTPUT -m owner --gid-owner 999 -j RETURN",
                                "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN"]
    empty = v4(env={"ISTIO_OUTBOUND_OWNER_GROUPS": ""})
    assert empty[empty.index("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN") - 1] == "-A ISTIO_OUTPUT -j RETURN"
    with pytest.raises(ConfigError, match="ISTIO_OUTBOUND_OWNER_GROUPS: 65 groups"):
        config(env={"ISTIO_OUTBOUND_OWNER_GROUPS": ",".join(str(g) for g in range(65))})


def test_loopback_cidr_override_is_v4_only_and_validated() -> None:
    env = {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.0/8"}
    assert "-A ISTIO_OUTPUT -d 127.0.0.0/8 -j RETURN" in v4(env=env)
    assert "-A ISTIO_OUTPUT -d ::1/128 -j RETURN" in v6(env=env)
    with pytest.raises(ConfigError, match="ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"):
        config(env={"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "10.0.0.0/8"})


def test_virtual_interfaces_are_inserted_reversed_above_everything() -> None:
    lines = v4("-k", "veth0,veth1", "-i", "*", "-b", "*")
    assert [ln for ln in lines if "PREROUTING" in ln] == [
        "-I PREROUTING 1 -i veth0 -j RETURN", "-I PREROUTING 1 -i veth1 -j RETURN",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-I PREROUTING 1 -i veth0 -j ISTIO_REDIRECT", "-I PREROUTING 1 -i veth1 -j ISTIO_REDIRECT"]
    cidr = v4("-k", "veth0", "-i", "10.0.0.0/8")
    assert "-I PREROUTING 1 -i veth0 -d 10.0.0.0/8 -j ISTIO_REDIRECT" in cidr
    assert cidr.index("-I PREROUTING 1 -i veth0 -d 10.0.0.0/8 -j ISTIO_REDIRECT") < cidr.index(
        "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT")


def test_excluded_interfaces_come_first_in_nat_and_in_mangle_for_tproxy() -> None:
    lines = v4("-c", "eth1,eth2", "-b", "*")
    assert lines[5:9] == ["-A PREROUTING -i eth1 -j RETURN", "-A OUTPUT -o eth1 -j RETURN",
                          "-A PREROUTING -i eth2 -j RETURN", "-A OUTPUT -o eth2 -j RETURN"]
    tp = v4("-c", "eth1", "-m", "TPROXY", "-b", "*")
    mangle = tp[:tp.index("COMMIT")]
    assert mangle[mangle.index("-N ISTIO_INBOUND") + 1:][:2] == ["-A PREROUTING -i eth1 -j RETURN",
                                                               "-A OUTPUT -o eth1 -j RETURN"]


def test_interface_that_does_not_exist_is_a_warning() -> None:
    cfg = config("-c", "eth9", interfaces=frozenset({"lo", "eth0"}))
    assert any("eth9" in w for w in cfg.warnings)


def test_ipv6_rules_use_v6_loopback_and_passthrough() -> None:
    lines = v6(*DEFAULT_ARGS)
    assert lines == [ln.replace("127.0.0.6/32", "::6/128").replace("127.0.0.1/32", "::1/128")
                     for ln in ISTIO_RESTORE]
    p = plan(*DEFAULT_ARGS, addresses=("fd00::5",))
    assert p.v4.rules and p.v6.rules


@pytest.mark.parametrize("addresses, dual, enabled", [
    (("10.0.0.5",), False, False),
    (("fd00::5",), False, True),
    (("10.0.0.5", "fd00::5"), False, False),   # the first address decides
    (("10.0.0.5", "fd00::5"), True, True),     # --dual-stack: any v6 address
])
def test_ipv6_detection(addresses: tuple[str, ...], dual: bool, enabled: bool) -> None:
    args = ("--dual-stack",) if dual else ()
    assert config(*args, addresses=addresses).enable_ipv6 is enabled
    assert config(addresses=addresses, env={"ISTIO_DUAL_STACK": "true"}).enable_ipv6 is (
        enabled if dual else config(addresses=addresses, env={"ISTIO_DUAL_STACK": "true"}).enable_ipv6)


def test_no_usable_address_is_fatal() -> None:
    with pytest.raises(ConfigError, match="no valid local IP address"):
        config(addresses=())


def test_tproxy_rules() -> None:
    lines = v4("-m", "TPROXY", "-b", "*", "-d", "15020", "-i", "*")
    mangle = lines[:lines.index("COMMIT") + 1]
    assert mangle == [
        "* mangle", "-N ISTIO_DIVERT", "-N ISTIO_TPROXY", "-N ISTIO_INBOUND",
        "-A ISTIO_DIVERT -j MARK --set-mark 1337",
        "-A ISTIO_DIVERT -j ACCEPT",
        "-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY",
        "-A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark",
        "-A OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN",
        "-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338",
        "-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --gid-owner 1337 -j MARK --set-mark 1338",
        "-A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark",
        "-I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN",
        "-I ISTIO_INBOUND 2 -p tcp -s 127.0.0.6/32 -i lo -j RETURN",
        "-I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN",
        "COMMIT"]
    nat = lines[len(mangle):]
    assert "-A PREROUTING -p tcp -j ISTIO_INBOUND" not in nat   # inbound moved to mangle
    assert "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN" in nat  # ...but nat keeps the chain


def test_tproxy_port_list_and_empty_ports() -> None:
    lines = v4("-m", "TPROXY", "-b", "80,443")
    assert [ln for ln in lines if "--dport 80 " in ln or "--dport 443 " in ln] == [
        "-A ISTIO_INBOUND -p tcp --dport 80 -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
        "-A ISTIO_INBOUND -p tcp --dport 80 -j ISTIO_TPROXY",
        "-A ISTIO_INBOUND -p tcp --dport 443 -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
        "-A ISTIO_INBOUND -p tcp --dport 443 -j ISTIO_TPROXY"]
    empty = v4("-m", "TPROXY", "-b", "")
    mangle = empty[:empty.index("COMMIT")]
    assert "-N ISTIO_DIVERT" not in mangle and "-N ISTIO_INBOUND" in mangle
    assert [ln for ln in mangle if ln.startswith("-I ISTIO_INBOUND")] and "-A PREROUTING -p tcp -j ISTIO_INBOUND" \
        not in mangle


def test_tproxy_v6() -> None:
    lines = v6("-m", "TPROXY", "-b", "*")
    assert "-A ISTIO_TPROXY ! -d ::1/128 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006" in lines
    assert "-I ISTIO_INBOUND 2 -p tcp -s ::6/128 -i lo -j RETURN" in lines


def test_drop_invalid() -> None:
    for args, env in ((("--drop-invalid",), {}), ((), {"INVALID_DROP": "true"}), ((), {"DROP_INVALID": "1"})):
        lines = v4(*args, env=env)
        assert lines[:4] == ["* mangle", "-N ISTIO_DROP",
                             "-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP", "-A ISTIO_DROP -j DROP"]
    assert v4("--drop-invalid=false", env={"INVALID_DROP": "true"})[0] == "* nat"  # argv wins over env


def test_dns_capture_all_classic_layout() -> None:
    lines = v4("--redirect-dns", "--capture-all-dns", "-u", "1337", "-g", "1337", env=CLASSIC)
    nat = lines[:lines.index("COMMIT") + 1]
    raw = lines[len(nat):]
    assert "-N ISTIO_OUTPUT_DNS" in nat
    assert "-A OUTPUT -j ISTIO_OUTPUT" in nat  # UDP must reach ISTIO_OUTPUT_DNS
    assert ("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 53 -m owner --uid-owner 1337 "
            "-j ISTIO_IN_REDIRECT") in nat
    assert "-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --gid-owner 1337 -j RETURN" in nat
    i = nat.index("-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS")
    assert nat[i - 1] == "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN"
    assert nat[i + 1] == "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053"
    assert nat[i + 2] == "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053"
    assert raw == [
        "* raw", "-N ISTIO_OUTPUT_DNS", "-N ISTIO_INBOUND",
        "-A OUTPUT -j ISTIO_OUTPUT_DNS",
        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1",
        "-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2",
        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner 1337 -j CT --zone 1",
        "-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --gid-owner 1337 -j CT --zone 2",
        "-A PREROUTING -j ISTIO_INBOUND",
        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j CT --zone 2",
        "-A ISTIO_INBOUND -p udp --sport 53 -j CT --zone 1",
        "COMMIT"]


def test_dns_current_layout_uses_multiport_for_uids_only() -> None:
    lines = v4("--redirect-dns", "--capture-all-dns")
    assert ("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 -m owner "
            "--uid-owner 1337 -j ISTIO_IN_REDIRECT") in lines
    assert ("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 "
            "-j ISTIO_IN_REDIRECT") in lines


def test_dns_servers_from_resolv_conf_per_family() -> None:
    resolv = "search svc\nnameserver 10.96.0.10\nnameserver fd00::a\nnameserver bogus\n"
    lines = v4(env={"ISTIO_META_DNS_CAPTURE": "true"}, resolv=resolv)
    dns = [ln for ln in lines if "ISTIO_OUTPUT_DNS -p" in ln or ln.startswith("-A ISTIO_INBOUND -p udp")]
    assert "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-ports 15053" in dns
    assert "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-port 15053" in dns
    assert "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j CT --zone 2" in dns
    assert "-A ISTIO_INBOUND -p udp --sport 53 -s 10.96.0.10/32 -j CT --zone 1" in dns
    assert not any("fd00::a" in ln for ln in lines)
    lines6 = v6("--redirect-dns", resolv=resolv)
    assert "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d fd00::a/128 -j REDIRECT --to-ports 15053" in lines6


def test_dns_without_servers_is_disabled_with_a_warning() -> None:
    cfg = config("--redirect-dns", resolv="search x\n")
    assert not cfg.dns and any("no nameserver" in w for w in cfg.warnings)
    assert "* raw" not in build(cfg).v4.restore_text()
    with pytest.raises(ConfigError, match=r"resolv.conf"):
        config("--redirect-dns", resolv=None)


def test_v6_only_dns_servers_write_only_the_v6_redirect() -> None:
    lines4 = v4("--redirect-dns", addresses=("10.0.0.5", "fd00::5"), resolv="nameserver fd00::a\n",
                env={"ISTIO_DUAL_STACK": "1"})
    assert "-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS" not in lines4  # no v4 servers
    assert "-A OUTPUT -j ISTIO_OUTPUT_DNS" in lines4             # raw jump is written for both families
