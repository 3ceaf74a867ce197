"""meshboot-iptables for real: rules installed in fresh network namespaces, and real connections through them.

Topology (testing.netns.pair): "pod" 10.99.0.1 / fd00:99::1 <-veth-> "peer" 10.99.0.2 / fd00:99::2.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from init_helpers import CLASSIC, DEFAULT_ARGS, ISTIO_NAT, SEED_004_NAT, save_lines

from testing.netns import Netns, pair

BIN = Path(sys.executable).parent
PROXY_UID = 1337

# Listens on host,port[,t] specs; answers each connection with "<listen port> <original dst> <local> <peer>".
SERVER = r"""
import selectors, socket, struct, sys
sel = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    host, port, *opts = spec.split(",")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if "t" in opts:
        s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT: accept TPROXY'd connections
    s.bind((host, int(port)))
    s.listen(64)
    sel.register(s, selectors.EVENT_READ, port)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, peer = key.fileobj.accept()
        try:
            if conn.family == socket.AF_INET:
                raw = conn.getsockopt(socket.SOL_IP, 80, 16)
                orig = "%s:%d" % (socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0])
            else:
                raw = conn.getsockopt(socket.IPPROTO_IPV6, 80, 28)
                orig = "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0])
        except OSError:
            orig = "-"
        local = conn.getsockname()
        conn.sendall(("%s %s %s:%d %s" % (key.data, orig, local[0], local[1], peer[0])).encode())
        conn.close()
"""

CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
src = sys.argv[3] if len(sys.argv) > 3 else None
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(3)
try:
    if src:
        s.bind((src, 0))
    s.connect((host, port))
    print(s.recv(300).decode())
except OSError as e:
    print("ERR", e)
"""

# Proves apply is all-or-nothing: the plan gets one rule the kernel rejects at commit time.
ATOMIC_HOOK = r"""
import sys
from init import flags
from init.apply import ApplyError, apply_plan
from init.config import build_config
from init.log import Logger
from init.netinfo import host_info
from init.rules import Rule, build
table, *argv = sys.argv[1:]
cfg = build_config(flags.parse(argv, {}).values, {}, host_info(), None)
plan = build(cfg)
bogus = ("-m", "owner", "--uid-owner", "1337", "-j", "RETURN")  # owner match is invalid in PREROUTING
plan.v4.rules.append(Rule(table, "PREROUTING", bogus))
try:
    apply_plan(cfg, plan, Logger("none"))
except ApplyError as e:
    print(e)
    sys.exit(3)
"""


def tool(ns: Netns, *args: str, uid: int | None = None, name: str = "meshboot-iptables",
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    argv = [str(BIN / name)] if name != "-m" else [sys.executable, "-m", "init"]
    return ns.run([*argv, *args], uid=uid, check=False, env={**os.environ, **(env or {})})


def save(ns: Netns, v6: bool = False, binary: str | None = None) -> str:
    return ns.run([binary or ("ip6tables-save" if v6 else "iptables-save")]).stdout


def connect(ns: Netns, host: str, port: int, uid: int | None = None, src: str | None = None) -> str:
    args = [host, str(port)] + ([src] if src else [])
    return ns.run([sys.executable, "-c", CLIENT, *args], uid=uid).stdout.strip()


def serve(ns: Netns, *specs: str) -> None:
    p = ns.popen([sys.executable, "-c", SERVER, *specs], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready", f"server {specs} did not start"


@pytest.fixture
def pods(root_required: None) -> Iterator[tuple[Netns, Netns]]:
    with pair("mbi") as (pod, peer):
        yield pod, peer


@pytest.fixture
def pods6(root_required: None) -> Iterator[tuple[Netns, Netns]]:
    with pair("mbi", v6=True) as (pod, peer):
        yield pod, peer


def test_default_args_install_exactly_current_istio(pods: tuple[Netns, Netns]) -> None:
    pod, _ = pods
    res = tool(pod, *DEFAULT_ARGS)
    assert res.returncode == 0, res.stderr
    assert save_lines(save(pod), "nat") == ISTIO_NAT
    assert "ISTIO" not in save(pod, v6=True)  # no IPv6 address in the pod -> no v6 rules
    assert "iptables rules applied" in res.stdout


def test_classic_layout_installs_exactly_seed_004(pods: tuple[Netns, Netns]) -> None:
    pod, _ = pods
    res = tool(pod, *DEFAULT_ARGS, env=CLASSIC)
    assert res.returncode == 0, res.stderr
    assert save_lines(save(pod), "nat") == SEED_004_NAT


def test_both_program_names_and_python_m_work(pods: tuple[Netns, Netns]) -> None:
    pod, _ = pods
    for name in ("istio-iptables", "-m"):
        res = tool(pod, *DEFAULT_ARGS, "--dry-run", name=name)
        assert res.returncode == 0, res.stderr
        assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in res.stdout
    assert "ISTIO" not in save(pod)  # dry-run changed nothing
    res = tool(pod, *DEFAULT_ARGS, name="istio-iptables")
    assert res.returncode == 0 and save_lines(save(pod), "nat") == ISTIO_NAT


@pytest.mark.parametrize("layout", ["current", "classic"])
def test_redirect_capture_outbound_inbound_and_exemptions(pods: tuple[Netns, Netns], layout: str) -> None:
    pod, peer = pods
    assert tool(pod, *DEFAULT_ARGS, env={"MESHBOOT_IPTABLES_LAYOUT": layout}).returncode == 0
    serve(pod, "0.0.0.0,15001", "0.0.0.0,15006", "0.0.0.0,8080", "0.0.0.0,15020", "0.0.0.0,15008")
    serve(peer, "0.0.0.0,8080")
    # outbound from an app (uid 0): lands on 15001, SO_ORIGINAL_DST is the address it dialled
    out = connect(pod, "10.99.0.2", 8080).split()
    assert out[:2] == ["15001", "10.99.0.2:8080"], out
    # the proxy's own connection (uid 1337) is not redirected: it reaches the peer
    assert connect(pod, "10.99.0.2", 8080, uid=PROXY_UID).split()[:1] == ["8080"]
    assert connect(pod, "10.99.0.2", 8080, uid=PROXY_UID).split()[2] == "10.99.0.2:8080"
    # inbound from the second namespace to 8080 lands on 15006 with the original destination
    inb = connect(peer, "10.99.0.1", 8080).split()
    assert inb[:2] == ["15006", "10.99.0.1:8080"] and inb[3] == "10.99.0.2", inb
    # excluded inbound port: delivered to the app as is
    assert connect(peer, "10.99.0.1", 15020).split()[0] == "15020"
    # proxy traffic to the pod's own IP goes to inbound capture, unless it comes from 127.0.0.6
    assert connect(pod, "10.99.0.1", 8080, uid=PROXY_UID).split()[:2] == ["15006", "10.99.0.1:8080"]
    assert connect(pod, "10.99.0.1", 8080, uid=PROXY_UID, src="127.0.0.6").split()[0] == "8080"
    # the one behavioural difference: current Istio leaves the proxy's own HBONE dial (15008) alone
    hbone = connect(pod, "10.99.0.1", 15008, uid=PROXY_UID).split()[0]
    assert hbone == ("15008" if layout == "current" else "15006")


def test_ipv6_capture(pods6: tuple[Netns, Netns]) -> None:
    pod, peer = pods6
    res = tool(pod, *DEFAULT_ARGS, env={"ISTIO_DUAL_STACK": "true"})
    assert res.returncode == 0, res.stderr
    v6_nat = save_lines(save(pod, v6=True), "nat")
    assert v6_nat == [ln.replace("127.0.0.6/32", "::6/128").replace("127.0.0.1/32", "::1/128")
                      for ln in ISTIO_NAT]
    assert "inet6 ::6/128" in pod.ip("-6", "addr", "show", "dev", "lo")
    serve(pod, "::,15001", "::,15006", "::,8080", "::,15020")
    serve(peer, "::,8080")
    assert connect(pod, "fd00:99::2", 8080).split()[:2] == ["15001", "[fd00:99::2]:8080"]
    assert connect(pod, "fd00:99::2", 8080, uid=PROXY_UID).split()[0] == "8080"
    assert connect(peer, "fd00:99::1", 8080).split()[:2] == ["15006", "[fd00:99::1]:8080"]
    assert connect(peer, "fd00:99::1", 15020).split()[0] == "15020"
    assert connect(pod, "fd00:99::1", 8080, uid=PROXY_UID).split()[0] == "15006"
    assert connect(pod, "fd00:99::1", 8080, uid=PROXY_UID, src="::6").split()[0] == "8080"


def test_tproxy_inbound_delivers_to_15006_with_the_original_destination(pods: tuple[Netns, Netns]) -> None:
    pod, peer = pods
    res = tool(pod, "-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "*", "-b", "*",
               "-d", "15090,15021,15020")
    assert res.returncode == 0, res.stderr
    assert "fwmark 0x539 lookup 133" in pod.ip("rule")
    assert "local default dev lo" in pod.ip("route", "show", "table", "133")
    serve(pod, "0.0.0.0,15006,t", "0.0.0.0,15020")
    got = connect(peer, "10.99.0.1", 8080).split()
    # TPROXY does not NAT: the accepted socket's local address *is* the original destination
    assert got[0] == "15006" and got[2] == "10.99.0.1:8080" and got[3] == "10.99.0.2", got
    assert connect(peer, "10.99.0.1", 15020).split()[0] == "15020"
    # a rerun is a no-op (rules and the ip rule are not duplicated)
    assert tool(pod, "-m", "TPROXY", "-i", "*", "-b", "*", "-d", "15090,15021,15020").returncode == 0
    assert pod.ip("rule").count("lookup 133") == 1


def test_run_twice_changes_nothing(pods: tuple[Netns, Netns]) -> None:
    pod, _ = pods
    assert tool(pod, *DEFAULT_ARGS).returncode == 0
    first = save_lines(save(pod), "nat")
    res = tool(pod, *DEFAULT_ARGS)
    assert res.returncode == 0 and "already in place" in res.stdout
    assert save_lines(save(pod), "nat") == first


def test_other_config_is_drift_and_reconcile_replaces(pods: tuple[Netns, Netns]) -> None:
    pod, _ = pods
    assert tool(pod, *DEFAULT_ARGS).returncode == 0
    before = save(pod)
    other = ["-p", "15001", "-z", "15006", "-u", "1337", "-i", "10.0.0.0/8", "-b", "8080", "--drop-invalid"]
    res = tool(pod, *other)
    assert res.returncode == 1
    assert "differ from this configuration" in res.stderr and "ISTIO_INBOUND has 5 rules" in res.stderr
    assert "--reconcile" in res.stderr
    assert save_lines(save(pod), "nat") == save_lines(before, "nat")  # nothing changed
    res = tool(pod, *other, "--reconcile")
    assert res.returncode == 0, res.stderr
    nat = save_lines(save(pod), "nat")
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 8080 -j ISTIO_IN_REDIRECT" in nat
    assert "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT" in nat
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" not in nat
    assert nat.count("-A PREROUTING -p tcp -j ISTIO_INBOUND") == 1
    assert "-A ISTIO_DROP -j DROP" in save_lines(save(pod), "mangle")
    assert tool(pod, *other).returncode == 0  # and the new config is now "in place"
    # back again, and the stale mangle ISTIO_DROP goes too
    assert tool(pod, *DEFAULT_ARGS, "--reconcile").returncode == 0
    assert save_lines(save(pod), "nat") == ISTIO_NAT
    assert "ISTIO" not in "\n".join(save_lines(save(pod), "mangle"))


def test_cleanup_only_leaves_no_istio_trace(pods6: tuple[Netns, Netns]) -> None:
    pod, _ = pods6
    args = ["-m", "TPROXY", "-i", "*", "-b", "*", "-c", "lo", "--redirect-dns", "--capture-all-dns",
            "--drop-invalid", "--dual-stack"]
    assert tool(pod, *args).returncode == 0
    assert "ISTIO_TPROXY" in save(pod) and "ISTIO_OUTPUT_DNS" in save(pod, v6=True)
    res = tool(pod, *args, "--cleanup-only")
    assert res.returncode == 0, res.stderr
    for v6 in (False, True):
        text = save(pod, v6=v6)
        assert "ISTIO" not in text
        assert "CONNMARK" not in text and "-i lo -j RETURN" not in text  # the builtin-chain rules too
    assert tool(pod, "--cleanup-only").returncode == 0  # nothing left: still fine


@pytest.mark.parametrize("table, args", [
    ("nat", ["-m", "TPROXY", "-i", "*", "-b", "*"]),       # mangle commits first, then nat fails: rolled back
    ("mangle", DEFAULT_ARGS),                             # mangle fails before nat
])
def test_one_invalid_rule_leaves_the_namespace_untouched(pods: tuple[Netns, Netns], table: str,
                                                         args: list[str]) -> None:
    pod, _ = pods
    # something that was there before must survive exactly
    pod.run(["iptables-restore", "--noflush"], input="*mangle\n-A OUTPUT -p udp --dport 9 -j RETURN\nCOMMIT\n")
    before = save(pod)
    res = pod.run([sys.executable, "-c", ATOMIC_HOOK, table, *args], check=False)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "nothing was changed" in res.stdout
    after = save(pod)
    for t in ("mangle", "nat", "filter", "raw"):
        assert save_lines(after, t) == save_lines(before, t), t
    assert "ISTIO" not in after
    # and the real tool applies cleanly afterwards
    assert tool(pod, *args).returncode == 0


def test_crash_between_families_or_tables_is_completed_by_the_next_run(pods6: tuple[Netns, Netns]) -> None:
    pod, _ = pods6
    args = [*DEFAULT_ARGS, "--dual-stack"]
    dry = tool(pod, *args, "-n").stdout
    v4_text = dry.split("# ip6tables-restore")[0]
    pod.run(["iptables-restore", "--noflush"], input=v4_text)  # "crashed" after the v4 restore
    res = tool(pod, *args)
    assert res.returncode == 0, res.stderr
    assert save_lines(save(pod, v6=True), "nat")[-2] == "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"
    # a TPROXY run killed after its mangle commit: the next run completes it without --reconcile
    assert tool(pod, *args, "--cleanup-only").returncode == 0
    targs = ["-m", "TPROXY", "-i", "*", "-b", "*"]
    text = tool(pod, *targs, "-n").stdout
    pod.run(["iptables-restore", "--noflush"], input=text[:text.index("* nat")])
    res = tool(pod, *targs)
    assert res.returncode == 0, res.stderr
    assert "completing a partially applied rule set" in res.stdout
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN" in save_lines(save(pod), "nat")


def test_legacy_backend_forced_then_detected(pods: tuple[Netns, Netns]) -> None:
    pod, _ = pods
    res = tool(pod, *DEFAULT_ARGS, "--force-iptables-binary=legacy")
    assert res.returncode == 0 and "legacy" in res.stdout, res.stderr
    assert save_lines(save(pod, binary="iptables-legacy-save"), "nat") == ISTIO_NAT
    assert "ISTIO" not in save(pod, binary="iptables-nft-save")
    res = tool(pod, *DEFAULT_ARGS)  # auto: legacy holds rules, so legacy is chosen again
    assert res.returncode == 0 and "already in place" in res.stdout
    assert tool(pod, "--cleanup-only").returncode == 0
    assert "ISTIO" not in save(pod, binary="iptables-legacy-save")


def test_no_usable_backend_is_a_clear_error(pods: tuple[Netns, Netns]) -> None:
    pod, _ = pods
    res = pod.run(["env", "PATH=/nonexistent", sys.executable, "-m", "init", *DEFAULT_ARGS], check=False)
    assert res.returncode == 1
    assert "no usable IPv4 iptables backend" in res.stderr and "not found" in res.stderr


def test_run_validation(pods: tuple[Netns, Netns]) -> None:
    pod, _ = pods
    res = tool(pod, "--run-validation", "--skip-rule-apply", "--probe-timeout=1s", uid=PROXY_UID, name="-m")
    assert res.returncode == 126
    assert "iptables validation failed; workload is not ready for Istio." in res.stderr
    assert tool(pod, *DEFAULT_ARGS).returncode == 0
    res = tool(pod, "--run-validation", "--skip-rule-apply", "--probe-timeout=5s", uid=PROXY_UID, name="-m")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "iptables validation passed" in res.stdout


def test_bad_flag_exits_255_and_bad_value_exits_1_without_changes(pods: tuple[Netns, Netns]) -> None:
    pod, _ = pods
    res = tool(pod, "--bogus")
    assert res.returncode == 255 and "unknown flag: --bogus" in res.stderr
    res = tool(pod, *DEFAULT_ARGS, "-x", "*")
    assert res.returncode == 1 and "-x/--istio-service-exclude-cidr" in res.stderr
    assert "ISTIO" not in save(pod)


def test_legacy_waits_for_the_xtables_lock(pods: tuple[Netns, Netns], tmp_path: Path) -> None:
    import fcntl
    import time

    pod, _ = pods
    lock = tmp_path / "xtables.lock"  # XTABLES_LOCKFILE: a private lock, so no other iptables user is held up
    env = {**os.environ, "XTABLES_LOCKFILE": str(lock)}
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t0 = time.monotonic()
        proc = subprocess.Popen(pod.argv([str(BIN / "meshboot-iptables"), *DEFAULT_ARGS,
                                          "--force-iptables-binary=legacy"]),
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert proc.poll() is None, "the restore did not wait for the xtables lock"
        fcntl.flock(held, fcntl.LOCK_UN)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 >= 1.0
    assert save_lines(save(pod, binary="iptables-legacy-save"), "nat") == ISTIO_NAT
