"""The default layout against Istio's own goldens, field by field.

testdata/iptables/istio/<case>.golden are Istio's files unchanged (tools/istio-iptables/pkg/capture/testdata in
istio/istio; commit, date and license in testdata/iptables/istio/README.md): the commands its test stub records, i.e.
the iptables-restore input per family between `iptables-save` lines. Each case below is the same configuration as
Istio's run_test.go case of that name, given to meshboot as istio-init would receive it (flags, env, resolv.conf, the
pod's addresses). They are never refreshed: a difference is a bug here, or Istio changed and the layout must follow.
"""
from __future__ import annotations

import difflib
import re
import shlex

import pytest

from init import flags
from init.config import HostInfo, build_config
from init.rules import build
from testing.golden import TESTDATA

ISTIO = TESTDATA / "iptables" / "istio"
# Istio's test config: ProxyPort 15001, InboundCapturePort 15006, InboundTunnelPort 15008, uid = gid = 1337, no
# inbound ports and no outbound CIDRs unless the case sets them.
BASE = "-p 15001 -z 15006 -e 15008"
V4, DUAL = ("10.0.0.5",), ("fd00::5", "10.0.0.5")  # EnableIPv6 false / true (the first address decides)
# case -> (the rest of the command line, env, resolv.conf, addresses)
CASES: dict[str, tuple[str, dict[str, str], str | None, tuple[str, ...]]] = {
    "empty": ("-u 1337 -g 1337", {}, None, V4),
    "inbound-ports-wildcard": ("-u 1337 -b '*'", {}, None, V4),
    "inbound-ports-include": ("-u 1337 -b 32000,31000", {}, None, V4),
    "drop-invalid": ("-u 1337 --drop-invalid", {}, None, V4),
    "host-ipv4-loopback-cidr": ("-u 1337", {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1/8"}, None, V4),
    "kube-virt-interfaces": ("-u 1337 -k eth1,eth2 -i '*'", {}, None, V4),
    "ipnets-with-kube-virt-interfaces": ("-u 1337 -k eth1,eth2 -i 10.0.0.0/8", {}, None, V4),
    "ipv6-uid-gid": ("-b 4000,5000 -d 6000,7000 -k eth0,eth1 -g 1,2 -u 3,4 -x 2001:db8::/32 -i 2001:db8::/32",
                     {}, None, DUAL),
    "ipv6-outbound-ports": ("-u 1337 -b '' -q 32000,31000", {}, None, DUAL),
    "ip-range": ("-x 1.1.0.0/16 -i 9.9.0.0/16 --redirect-dns -g 1,2 -u 3,4", {}, "nameserver 127.0.0.53\n", V4),
    "dns-uid-gid": ("--redirect-dns -g 1,2 -u 3,4", {}, "nameserver 127.0.0.53\nnameserver ::127.0.0.53\n", DUAL),
    "loopback-outbound-iprange": ("-i 127.1.2.3/32 --redirect-dns -g 1,2 -u 3,4", {}, "nameserver 127.0.0.53\n",
                                  V4),
    "tproxy": ("-u 1337 -m TPROXY -b '*' -x 1.1.0.0/16 -i 9.9.0.0/16 --redirect-dns -c not-istio-nic", {},
               "nameserver 127.0.0.53\n", DUAL),
    "inbound-ports-tproxy": ("-u 1337 -b 32000,31000 -m TPROXY", {}, None, V4),
    "basic-exclude-nic": ("-u 1337 -c not-istio-nic", {}, None, V4),
    # Istio's cases name the groups java and ftp; meshboot resolves names in the container (they must exist), so
    # this host's `daemon` stands in for them (ISTIO_NAMES below maps the expected text the same way).
    "outbound-owner-groups": ("-u 1337", {"ISTIO_OUTBOUND_OWNER_GROUPS": "daemon,202"}, None, V4),
    "outbound-owner-groups-exclude": ("-u 1337", {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "888,daemon"}, None, V4),
}
# Deliberate, representation-only differences, applied to Istio's text: meshboot writes addresses in compressed
# form (ipaddress), Istio copies resolv.conf's text; iptables stores and prints both the same way.
ISTIO_NAMES = (("--gid-owner java ", "--gid-owner daemon "), ("--gid-owner ftp ", "--gid-owner daemon "),
               ("::127.0.0.53/128", "::7f00:35/128"))


def istio_text(case: str) -> str:
    """Istio's golden without the recorded `iptables-save` calls: the restore inputs, v4 then v6."""
    lines = [ln for ln in (ISTIO / f"{case}.golden").read_text().splitlines() if not ln.endswith("tables-save")]
    text = "\n".join(lines) + "\n"
    for theirs, ours in ISTIO_NAMES:
        text = text.replace(theirs, ours)
    return text


def ours(case: str, layout: str | None = None) -> str:
    rest, env, resolv, addresses = CASES[case]
    env = {**env, **({"MESHBOOT_IPTABLES_LAYOUT": layout} if layout else {})}
    values = flags.parse(shlex.split(f"{BASE} {rest}"), env).values
    plan = build(build_config(values, env, HostInfo(addresses), resolv))
    return "".join(rs.restore_text() for rs in plan.families())


def test_every_istio_golden_has_a_case() -> None:
    assert {p.name.removesuffix(".golden") for p in ISTIO.glob("*.golden")} == set(CASES)


def test_istio_goldens_state_their_provenance() -> None:
    """Vendored files carry where they come from: Istio's repository, path, a full commit and the license."""
    readme = (ISTIO / "README.md").read_text()
    assert "tools/istio-iptables/pkg/capture/testdata" in readme and "Apache License 2.0" in readme
    assert re.search(r"`[0-9a-f]{40}`", readme)
    assert all(case in readme for case in CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_default_layout_is_istios(case: str) -> None:
    want, got = istio_text(case), ours(case)
    diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True), "istio", "meshboot"))
    assert got == want, f"{case}:\n{diff}"


@pytest.mark.parametrize("case", ["empty", "ipv6-uid-gid", "ip-range"])
def test_classic_layout_is_not(case: str) -> None:
    """The switch is real: istio-init 1.23's layout differs from today's goldens in exactly its two rules."""
    got = ours(case, "classic")
    assert got != istio_text(case)
    assert "! --dport 15008" not in got and "! --dports 53,15008" not in got
