"""Golden files for istio-iptables: the iptables-restore text for v4 and v6, in both rule layouts (the default is
current Istio's; tests/init/test_init_istio_goldens.py checks it against Istio's own goldens), for a table of flag
sets (testdata/iptables/<case>.golden). A change to any rule shows up as a diff of these files in review;
`REFRESH_GOLDEN=1 pytest tests/init/test_init_golden.py` rewrites them."""
from __future__ import annotations

import shlex

import pytest
from init_helpers import DEFAULT_ARGS

from init import flags
from init.config import HostInfo, build_config
from init.rules import Plan, build
from testing.golden import TESTDATA, check

IPTABLES = TESTDATA / "iptables"
# A v6 address first, so both families get rules (Istio's rule: the first address decides).
ADDRESSES = ("fd00::5", "10.0.0.5")
RESOLV = "nameserver 10.96.0.10\nnameserver fd00::a\n"
DEFAULT = shlex.join(DEFAULT_ARGS)
# case -> (istio-iptables command line, env, resolv.conf)
CASES: dict[str, tuple[str, dict[str, str], str | None]] = {
    "default-injected": (DEFAULT, {}, None),
    "inbound-port-list": ("-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -b 80,8000:9000 -d 15020", {}, None),
    "inbound-none": ("-u 1337 -i '*' -b ''", {}, None),
    "outbound-cidrs": ("-u 1337 -i 10.0.0.0/8,fd00::/8 -x 10.96.0.1/32,fd00:1::/64 -b '*' -d 15090,15021,15020",
                       {}, None),
    "outbound-ports": ("-u 1337 -i '*' -b '*' -q 5432,9000:9100 -o 3306,6379", {}, None),
    "interfaces": ("-u 1337 -i 10.0.0.0/8,fd00::/8 -b '*' -k net1,net2 -c eth1", {}, None),
    "interfaces-include-all": ("-u 1337 -i '*' -b '*' -k net1", {}, None),
    "uids-gids": ("-u 1337,1338 -g 1337,2000 -i '*' -b '*'", {}, None),
    "redirect-dns": (DEFAULT + " --redirect-dns", {}, RESOLV),
    "capture-all-dns": (DEFAULT + " --redirect-dns --capture-all-dns", {}, RESOLV),
    "tproxy": ("-p 15001 -z 15006 -u 1337 -m TPROXY -i '*' -b '*' -d 15090,15021,15020", {}, None),
    "tproxy-port-list": ("-u 1337 -m TPROXY -t 1338 -i '*' -b 80,443", {}, None),
    "drop-invalid": (DEFAULT + " --drop-invalid", {}, None),
    "owner-groups-include": (DEFAULT, {"ISTIO_OUTBOUND_OWNER_GROUPS": "1000,2000"}, None),
    "owner-groups-exclude": (DEFAULT, {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "3000"}, None),
    "loopback-cidr": (DEFAULT, {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.0/8"}, None),
    "ports-and-tunnel": ("-p 16001 -z 16006 -e 16008 -u 1337 -i '*' -b '*'", {}, None),
}


def _plan(argv: str, env: dict[str, str], resolv: str | None) -> Plan:
    parsed = flags.parse(shlex.split(argv), env)
    return build(build_config(parsed.values, env, HostInfo(ADDRESSES), resolv))


def render(argv: str, env: dict[str, str], resolv: str | None) -> str:
    """Both families in both layouts: the default (current Istio's) in full, the classic one (istio-init 1.23,
    MESHBOOT_IPTABLES_LAYOUT=classic) written out only where it differs."""
    head = [f"# istio-iptables {argv}"]
    head += [f"# env {k}={v}" for k, v in sorted(env.items())]
    head += [f"# resolv.conf: {line}" for line in (resolv or "").splitlines()]
    head.append(f"# addresses: {', '.join(ADDRESSES)}")
    current = _plan(argv, env, resolv)
    classic = _plan(argv, {**env, "MESHBOOT_IPTABLES_LAYOUT": "classic"}, resolv)
    out = ["\n".join(head) + "\n"]
    out += [f"### v{rs.family} current (default)\n{rs.restore_text()}" for rs in (current.v4, current.v6)]
    for rs, base in ((classic.v4, current.v4), (classic.v6, current.v6)):
        text = rs.restore_text()
        same = text == base.restore_text()
        out.append(f"### v{rs.family} classic: same as current\n" if same else f"### v{rs.family} classic\n{text}")
    return "".join(out)


def test_every_golden_has_a_case() -> None:
    assert {p.name.removesuffix(".golden") for p in IPTABLES.glob("*.golden")} == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rules_match_golden(case: str) -> None:
    check(IPTABLES / f"{case}.golden", render(*CASES[case]))
