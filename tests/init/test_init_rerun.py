"""Reruns and concurrent runs in one real network namespace: a rerun costs about what the first run costs, and two
istio-init processes racing in one pod both end with the right rules and exit 0."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from init_helpers import DEFAULT_ARGS, ISTIO_NAT, save_lines

from testing.netns import Netns, pair

BIN = Path(sys.executable).parent
TOOL = str(BIN / "meshboot-iptables")


@pytest.fixture
def pod(root_required: None) -> Iterator[Netns]:
    with pair("mbr", v6=True) as (pod, _peer):
        yield pod


def _run(ns: Netns, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    res = ns.run([TOOL, *args], check=False, timeout=120)
    return time.perf_counter() - t0, res


def test_rerun_with_2000_excluded_cidrs_costs_about_the_first_run(pod: Netns) -> None:
    cidrs = ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(2000))
    args = [*DEFAULT_ARGS, "-x", cidrs]
    first, res = _run(pod, *args)
    assert res.returncode == 0 and "iptables rules applied" in res.stdout, res.stderr
    again, res = _run(pod, *args)
    assert res.returncode == 0 and "already in place" in res.stdout, res.stderr
    assert again <= 2 * first + 0.1, f"first run {first:.2f}s, rerun {again:.2f}s"
    # one excluded CIDR removed by hand is still found (and named) on the rerun
    pod.run(["iptables", "-t", "nat", "-D", "ISTIO_OUTPUT", "-d", "10.7.207.0/24", "-j", "RETURN"])
    pod.run(["iptables", "-t", "nat", "-A", "ISTIO_OUTPUT", "-d", "10.99.99.0/24", "-j", "RETURN"])
    _, res = _run(pod, *args)
    assert res.returncode == 1 and "rule missing: -t nat -A ISTIO_OUTPUT -d 10.7.207.0/24 -j RETURN" in res.stderr
    assert res.stderr.count("\n") == 1


# TPROXY + dual stack: two tables and two families, so a loser that rolled back "its" tables would wipe the winner's.
RACE_ARGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "*", "-b", "*",
             "-d", "15090,15021,15020", "--dual-stack"]


def test_two_concurrent_runs_both_succeed_with_the_same_rules(pod: Netns) -> None:
    _, res = _run(pod, *RACE_ARGS)
    assert res.returncode == 0, res.stderr
    want = {v6: {t: save_lines(pod.run(["ip6tables-save" if v6 else "iptables-save"]).stdout, t)
                 for t in ("nat", "mangle")} for v6 in (False, True)}
    for attempt in range(4):
        assert pod.run([TOOL, *RACE_ARGS, "--cleanup-only"], check=False).returncode == 0
        procs = [subprocess.Popen(pod.argv([TOOL, *RACE_ARGS]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=os.environ) for _ in range(2)]
        outs = [p.communicate(timeout=60) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, f"attempt {attempt}: {err}"
        assert sum("already in place" in out for out, _ in outs) == 1, outs
        for v6 in (False, True):
            text = pod.run(["ip6tables-save" if v6 else "iptables-save"]).stdout
            for t in ("nat", "mangle"):
                assert save_lines(text, t) == want[v6][t], (attempt, v6, t)
        assert pod.ip("rule").count("lookup 133") == 1


def test_default_args_still_install_current_istio(pod: Netns) -> None:
    _, res = _run(pod, *DEFAULT_ARGS)
    assert res.returncode == 0, res.stderr
    assert save_lines(pod.run(["iptables-save"]).stdout, "nat") == ISTIO_NAT


@pytest.mark.parametrize("layout", ["classic", "current"])
def test_every_rule_shape_is_found_in_one_save(pod: Netns, layout: str) -> None:
    """The rerun fast path (init/canon.py) predicts the save form of every rule shape rules.py writes, so a rerun
    of any configuration needs no per-rule -C at all."""
    from init_helpers import config

    from init.apply import _unmatched
    from init.rules import build
    from init.state import parse_save

    cfg = config("-m", "TPROXY", "-b", "*", "-d", "15090,15021", "-i", "10.0.0.1/8,fd00::5/64,::ffff:1.2.3.4/120",
                 "-x", "192.168.1.1/32,fe80::1:0:0:0/10,0.0.0.0/0,::/0", "-c", "veth0,eth+", "-k", "veth9",
                 "-q", "80,81:90,7:7,0:65535",
                 "-o", "22", "-u", "1337,1338", "-g", "5", "--redirect-dns", "--drop-invalid", "--dual-stack",
                 env={"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "daemon,5", "MESHBOOT_IPTABLES_LAYOUT": layout},
                 addresses=("10.99.0.1", "fd00:99::1"), resolv="nameserver 10.96.0.10\nnameserver fd00::a\n")
    other = config("-b", "8080", "-i", "10.0.0.0/8", "--redirect-dns", "--dual-stack",
                   env={"ISTIO_OUTBOUND_OWNER_GROUPS": "daemon,7", "MESHBOOT_IPTABLES_LAYOUT": layout},
                   addresses=("10.99.0.1", "fd00:99::1"), resolv="nameserver 10.96.0.10\n")
    for c in (cfg, other):
        plan = build(c)
        for family, rs, tool in ((4, plan.v4, "iptables"), (6, plan.v6, "ip6tables")):
            pod.run([f"{tool}-restore", "--noflush"], input=rs.restore_text())
            live = parse_save(pod.run([f"{tool}-save"]).stdout)
            assert [r.restore_line() for r in _unmatched(rs.rules, live, family)] == [], (family, layout)
        assert pod.run([TOOL, "--cleanup-only"], check=False).returncode == 0


def test_lock_is_exclusive_times_out_with_one_line_and_is_freed_on_close() -> None:
    from init import lock

    name = b"\0meshboot-iptables-test-" + os.urandom(4).hex().encode()
    held = lock.acquire(name=name)
    t0 = time.monotonic()
    with pytest.raises(lock.LockTimeout, match=r"held its lock for more than 0.3s; nothing was changed"):
        lock.acquire(wait=0.3, name=name)
    assert time.monotonic() - t0 >= 0.3
    held.close()
    lock.acquire(wait=0.3, name=name).close()


@pytest.mark.parametrize("binary", ["legacy", "nft"])
def test_batched_check_names_the_missing_rules_on_both_backends(pod: Netns, binary: str) -> None:
    """The -C fallback (rules the save lookup did not find): one restore, then one per missing rule."""
    from init.backend import Backend

    args = [*DEFAULT_ARGS, f"--force-iptables-binary={binary}"]
    assert pod.run([TOOL, *args], check=False).returncode == 0
    b = Backend(4, f"iptables-{binary}", binary == "legacy", binary == "legacy")
    checks = [["-t", "nat", "-C", "ISTIO_OUTPUT", "-d", "127.0.0.1/32", "-j", "RETURN"],
              ["-t", "nat", "-C", "ISTIO_OUTPUT", "-d", "10.1.0.0/16", "-j", "RETURN"],
              ["-t", "nat", "-C", "ISTIO_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"],
              ["-t", "nat", "-C", "ISTIO_OUTPUT", "-d", "10.2.0.0/16", "-j", "RETURN"],
              ["-t", "nat", "-C", "ISTIO_INBOUND", "-p", "tcp", "--dport", "15020", "-j", "RETURN"]]
    script = ("import json, sys\nfrom init.backend import Backend, check_all\n"
              f"print(json.dumps(check_all(Backend(*{[b.family, b.cmd, b.legacy, b.wait]!r}), {checks!r})))")
    out = pod.run([sys.executable, "-c", script]).stdout
    assert out.strip() == "[true, false, true, false, true]"
