"""Fuzzing istio-iptables' flags and env: never a traceback, bounded time and output, refusals name the flag or env
var, and whatever is accepted, the real iptables-restore/ip6tables-restore accept too (in a network namespace), and
the rerun fast path finds every applied rule in one save."""
from __future__ import annotations

import io
import os
import re
import time
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st
from init_helpers import config

from init import cli, netinfo
from init.apply import _unmatched
from init.config import ConfigError, HostInfo
from init.rules import build
from init.state import parse_save
from testing.fuzzing import budget

pytestmark = pytest.mark.fuzz

ODD_DIGITS = "0123456789０１２３٣٤²³𝟏"
NAMED = re.compile(r"^(-\w/--[\w-]+|--[\w-]+|[A-Z][A-Z0-9_]+): ")
HOST = HostInfo(("10.0.0.5", "fd00::5"))

# Hostile values: Unicode digits, odd CIDRs, names iptables would misread, out-of-range numbers.
numbers = st.one_of(st.integers(0, 2 ** 33).map(str), st.text(ODD_DIGITS + ",:-+ /", max_size=12))
hostile_ports = st.lists(st.one_of(numbers, st.tuples(st.integers(0, 66000), st.integers(0, 66000))
                                   .map(lambda t: f"{t[0]}:{t[1]}")), min_size=1, max_size=4).map(",".join)
odd_addresses = st.sampled_from(["fe80::1%eth0", "010.0.0.1", "1.2.3", "１.2.3.4", "1.2.3.4 ", "[::1]", "1.2.3.4/8",
                                 "::ffff:1.2.3.4", "::1.2.3.4", "FD00::A", "0.0.0.0", "::"])
hostile_cidrs = st.lists(st.tuples(st.one_of(odd_addresses, st.ip_addresses().map(str)),
                                   st.one_of(st.integers(0, 140).map(str), st.text(ODD_DIGITS, max_size=3)))
                         .map("/".join), min_size=1, max_size=4).map(",".join)
hostile_names = st.lists(st.one_of(st.sampled_from(["-x", "!eth0", "a\"b", "a\\b", "a:b", "x" * 16, "é" * 8, "a b"]),
                                   st.text(max_size=16)), min_size=1, max_size=3).map(",".join)
hostile_groups = st.lists(st.one_of(st.sampled_from(["nosuchgroup", "-x", "a\"b", "4294967295"]), numbers),
                          min_size=1, max_size=3).map(",".join)

# Valid values, so that most examples get as far as the kernel.
ports = st.integers(1, 65535).map(str)
port_lists = st.lists(st.one_of(st.integers(0, 65535).map(str),
                                st.tuples(st.integers(0, 65535), st.integers(0, 65535))
                                .map(lambda t: f"{min(t)}:{max(t)}")), max_size=4).map(",".join)
ids = st.lists(st.integers(0, 4294967294).map(str), min_size=1, max_size=3).map(",".join)
cidrs = st.lists(st.one_of(st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
                           st.tuples(st.ip_addresses(v=6), st.integers(0, 128)))
                 .map(lambda t: f"{t[0]}/{t[1]}"), max_size=4).map(",".join)
IFACE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+@é"
ifaces = st.lists(st.text(IFACE_CHARS, min_size=1, max_size=15)
                  .filter(lambda n: len(n.encode()) <= 15 and n[0] not in "-" and n not in (".", "..")),
                  max_size=3).map(",".join)
groups = st.lists(st.one_of(st.sampled_from(["root", "daemon"]), st.integers(0, 4294967294).map(str)),
                  max_size=3).map(",".join)
u32 = st.integers(1, 4294967295).map(str)

FLAG_VALUES = {  # flag: (valid, hostile)
    "-p": (ports, numbers), "-z": (ports, numbers), "-e": (ports, numbers), "-u": (ids, numbers),
    "-g": (ids, numbers), "-b": (st.one_of(st.just("*"), port_lists), hostile_ports), "-d": (port_lists, hostile_ports),
    "-q": (port_lists, hostile_ports), "-o": (port_lists, hostile_ports),
    "-i": (st.one_of(st.just("*"), cidrs), hostile_cidrs), "-x": (cidrs, hostile_cidrs),
    "-c": (ifaces, hostile_names), "-k": (ifaces, hostile_names), "-t": (u32, numbers),
    "-r": (u32.filter(lambda t: t not in ("253", "254", "255")), numbers),
    "-m": (st.sampled_from(["REDIRECT", "TPROXY"]), st.sampled_from(["", "tproxy", "REDIRECT\n"])),
}
ENV_VALUES = {
    "ISTIO_OUTBOUND_OWNER_GROUPS": (st.one_of(st.just("*"), groups), hostile_groups),
    "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": (groups, hostile_groups),
    "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": (st.tuples(st.integers(0, 255), st.integers(8, 32))
                                          .map(lambda t: f"127.0.0.{t[0]}/{t[1]}"), hostile_cidrs),
    "MESHBOOT_IPTABLES_LAYOUT": (st.sampled_from(["classic", "current"]), st.sampled_from(["", "other", "x" * 99])),
}
SWITCHES = ["--redirect-dns", "--capture-all-dns", "--drop-invalid"]


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[list[str], dict[str, str]]:
    """Valid values for a random set of flags and env vars, then, half the time, one of them made hostile."""
    chosen = draw(st.lists(st.sampled_from([*FLAG_VALUES, *ENV_VALUES]), max_size=10, unique=True))
    values = {k: draw((FLAG_VALUES.get(k) or ENV_VALUES[k])[0]) for k in chosen}
    if chosen and draw(st.booleans()):
        k = draw(st.sampled_from(chosen))
        values[k] = draw((FLAG_VALUES.get(k) or ENV_VALUES[k])[1])
    argv = [x for k, v in values.items() if k in FLAG_VALUES for x in (k, v)]
    argv += draw(st.lists(st.sampled_from(SWITCHES), max_size=3, unique=True))
    return argv, {k: v for k, v in values.items() if k in ENV_VALUES}


def _check_refusal(message: str) -> None:
    assert NAMED.match(message), message
    assert "\n" not in message and "Traceback" not in message and "Error(" not in message, message
    assert len(message) < 400, message


@budget(150)
@given(command_lines(), st.lists(st.text(max_size=30), max_size=4),
       st.one_of(st.just(0), st.integers(0, 6000)))
def test_cli_never_crashes_and_refusals_name_the_flag(case: tuple[list[str], dict[str, str]], junk: list[str],
                                                      big: int) -> None:
    argv, env = case
    argv = [*argv, *junk]
    if big:  # huge lists: bounded, refused or accepted within the time limit
        argv += ["-x", ",".join(f"10.{i // 256 % 256}.{i % 256}.0/24" for i in range(big))]
    out, err = io.StringIO(), io.StringIO()
    clean = {k: v for k, v in os.environ.items() if k != "DRY_RUN_FILE_PATH"}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True), \
            mock.patch.object(netinfo, "host_info", lambda: HOST), redirect_stdout(out), redirect_stderr(err):
        t0 = time.monotonic()
        code = cli.main([*argv, "--dry-run", "--run-validation=false", "--skip-rule-apply"])
        elapsed = time.monotonic() - t0
    assert elapsed < 1.0, elapsed
    assert code in (0, 1, 255), code
    text = err.getvalue()
    assert "Traceback" not in text and "Exception" not in text
    assert all(len(line) < 500 for line in text.splitlines()), text[:2000]
    assert len(out.getvalue()) < 2_000_000
    if code == 1:
        _check_refusal(text.splitlines()[-1].split("\t", 2)[-1])
    elif code == 255:
        assert text.startswith("Error: ") and "flag" in text.splitlines()[0], text


@budget(45)
@given(command_lines())
def test_what_is_accepted_iptables_restore_accepts(netns, case: tuple[list[str], dict[str, str]]) -> None:
    argv, env = case
    try:
        cfg = config(*argv, "--dual-stack", env=env, addresses=HOST.addresses,
                     resolv="nameserver 10.96.0.10\nnameserver fd00::a\nnameserver fe80::1%eth0\n")
    except ConfigError as e:
        _check_refusal(str(e))
        return
    plan = build(cfg)
    for family, rs, tool in ((4, plan.v4, "iptables"), (6, plan.v6, "ip6tables")):
        # a full (flushing) restore: the kernel validates every rule, and the previous example's rules go
        res = netns.run([f"{tool}-restore"], input=rs.restore_text(), check=False)
        assert res.returncode == 0, (argv, env, res.stderr)
        live = parse_save(netns.run([f"{tool}-save"]).stdout)
        assert [r.restore_line() for r in _unmatched(rs.rules, live, family)] == [], (argv, env)
