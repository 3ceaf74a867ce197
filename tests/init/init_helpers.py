"""Shared helpers for the init tests: build a config from an istio-iptables command line, run the CLI in a netns."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from init import flags
from init.config import CaptureConfig, HostInfo, build_config
from init.rules import Plan, build

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "init"]
# The istio-init args the webhook injects by default.
DEFAULT_ARGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
                "-d", "15090,15021,15020", "--log_output_level=default:info"]

# Seed 004: istio-init's default rules as `iptables-save -t nat` prints them (comments and counters dropped).
SEED_004_NAT = """\
*nat
:PREROUTING ACCEPT
:INPUT ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
:ISTIO_INBOUND -
:ISTIO_IN_REDIRECT -
:ISTIO_OUTPUT -
:ISTIO_REDIRECT -
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
""".splitlines()

# Seed 004: the restore input istio-init logged ("Writing following contents to rules file").
SEED_004_RESTORE = """\
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
""".splitlines()

# The layout switch: the default is current Istio's rule set; "classic" selects istio-init 1.23's (seed 004).
CLASSIC = {"MESHBOOT_IPTABLES_LAYOUT": "classic"}

# Current Istio (1.24+; its tools/istio-iptables/pkg/capture/testdata, e.g. inbound-ports-wildcard.golden, plus the
# injected -d ports and -i '*'): the default restore input for the injected args. Seed 004 with exactly these lines
# replaced: the OUTPUT jump (no -p tcp) and the tunnel-port term of the two proxy-loopback rules.
_LOOPBACK = "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32{} -m owner --{}-owner 1337 -j ISTIO_IN_REDIRECT"
CURRENT_LINES = {"-A OUTPUT -p tcp -j ISTIO_OUTPUT": "-A OUTPUT -j ISTIO_OUTPUT",
                 **{_LOOPBACK.format("", who): _LOOPBACK.format(" -p tcp ! --dport 15008", who)
                    for who in ("uid", "gid")}}
ISTIO_RESTORE = [CURRENT_LINES.get(line, line) for line in SEED_004_RESTORE]

# The same rules as `iptables-save -t nat` prints them (the kernel's order per chain, `-m tcp` added, `! -d` and `-s`
# before `-o`).
ISTIO_NAT = """\
*nat
:PREROUTING ACCEPT
:INPUT ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
:ISTIO_INBOUND -
:ISTIO_IN_REDIRECT -
:ISTIO_OUTPUT -
:ISTIO_REDIRECT -
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
""".splitlines()


def config(*argv: str, env: dict[str, str] | None = None, addresses: tuple[str, ...] = ("10.0.0.5",),
           resolv: str | None = None, interfaces: frozenset[str] = frozenset()) -> CaptureConfig:
    env = env or {}
    parsed = flags.parse(list(argv), env)
    return build_config(parsed.values, env, HostInfo(addresses, interfaces), resolv)


def plan(*argv: str, **kw: Any) -> Plan:
    return build(config(*argv, **kw))


def v4(*argv: str, **kw: object) -> list[str]:
    return plan(*argv, **kw).v4.restore_text().splitlines()


def v6(*argv: str, **kw: object) -> list[str]:
    kw.setdefault("addresses", ("fd00::5",))
    return plan(*argv, **kw).v6.restore_text().splitlines()


def save_lines(text: str, table: str) -> list[str]:
    """One table of `iptables-save` output without comments and counters."""
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("*"):
            inside = line == f"*{table}"
        if inside:
            if line.startswith(":"):
                line = line.rsplit(" [", 1)[0]
            out.append(line)
    return out
