"""istio-iptables' command line: short/long/env forms, precedence, booleans, durations, errors (pure)."""
from __future__ import annotations

import pytest

from init import flags
from init.flags import FlagError, parse, parse_duration

EXPECTED = {  # long: (short, env names, default) from reference/iptables.md §1
    "envoy-port": ("p", (), "15001"),
    "inbound-capture-port": ("z", ("INBOUND_CAPTURE_PORT",), "15006"),
    "inbound-tunnel-port": ("e", ("INBOUND_TUNNEL_PORT",), "15008"),
    "proxy-uid": ("u", ("PROXY_UID",), ""),
    "proxy-gid": ("g", ("PROXY_GID",), ""),
    "istio-inbound-interception-mode": ("m", ("ISTIO_INBOUND_INTERCEPTION_MODE",), ""),
    "istio-inbound-ports": ("b", ("ISTIO_INBOUND_PORTS",), ""),
    "istio-local-exclude-ports": ("d", ("ISTIO_LOCAL_EXCLUDE_PORTS",), ""),
    "istio-exclude-interfaces": ("c", ("ISTIO_EXCLUDE_INTERFACES",), ""),
    "istio-service-cidr": ("i", ("ISTIO_SERVICE_CIDR",), ""),
    "istio-service-exclude-cidr": ("x", ("ISTIO_SERVICE_EXCLUDE_CIDR",), ""),
    "istio-outbound-ports": ("q", ("ISTIO_OUTBOUND_PORTS",), ""),
    "istio-local-outbound-ports-exclude": ("o", ("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",), ""),
    "kube-virt-interfaces": ("k", ("KUBE_VIRT_INTERFACES",), ""),
    "istio-inbound-tproxy-mark": ("t", ("ISTIO_INBOUND_TPROXY_MARK",), "1337"),
    "istio-inbound-tproxy-route-table": ("r", ("ISTIO_INBOUND_TPROXY_ROUTE_TABLE",), "133"),
    "dry-run": ("n", ("DRY_RUN",), False),
    "iptables-probe-port": (None, ("IPTABLES_PROBE_PORT",), 15002),
    "probe-timeout": (None, ("PROBE_TIMEOUT",), 5.0),
    "skip-rule-apply": (None, ("SKIP_RULE_APPLY",), False),
    "run-validation": (None, ("RUN_VALIDATION",), False),
    "redirect-dns": (None, ("REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"), False),
    "drop-invalid": (None, ("DROP_INVALID", "INVALID_DROP"), False),
    "dual-stack": (None, ("DUAL_STACK", "ISTIO_DUAL_STACK"), False),
    "capture-all-dns": (None, ("CAPTURE_ALL_DNS",), False),
    "network-namespace": (None, ("NETWORK_NAMESPACE",), ""),
    "cni-mode": (None, ("CNI_MODE",), False),
    "reconcile": (None, ("RECONCILE",), False),
    "cleanup-only": (None, ("CLEANUP_ONLY",), False),
    "force-apply": (None, ("FORCE_APPLY",), False),
    "native-nftables": (None, ("NATIVE_NFTABLES",), False),
    "force-iptables-binary": (None, ("FORCE_IPTABLES_BINARY",), ""),
    "log_output_level": (None, (), "default:info"),
}


def test_every_istio_flag_with_its_short_letter_env_and_default() -> None:
    table = {f.long: f for f in flags.FLAGS}
    for long, (short, env, default) in EXPECTED.items():
        f = table[long]
        assert (f.short, f.env, f.default) == (short, env, default), long


def test_short_long_and_inline_forms() -> None:
    for argv in (["-p", "1"], ["-p1"], ["-p=1"], ["--envoy-port", "1"], ["--envoy-port=1"]):
        assert parse(argv, {}).values["envoy_port"] == "1", argv
    v = parse(["-x", "", "-i", "*", "-n"], {}).values
    assert (v["istio_service_exclude_cidr"], v["istio_service_cidr"], v["dry_run"]) == ("", "*", True)


def test_precedence_default_env_alias_argv() -> None:
    assert parse([], {}).values["redirect_dns"] is False
    assert parse([], {"REDIRECT_DNS": "true"}).values["redirect_dns"] is True
    # the alias is read after the primary, so it wins over it
    assert parse([], {"REDIRECT_DNS": "true", "ISTIO_META_DNS_CAPTURE": "false"}).values["redirect_dns"] is False
    assert parse(["--redirect-dns=false"], {"ISTIO_META_DNS_CAPTURE": "true"}).values["redirect_dns"] is False
    assert parse(["-b", "80"], {"ISTIO_INBOUND_PORTS": "*"}).values["istio_inbound_ports"] == "80"
    assert parse([], {"ISTIO_INBOUND_PORTS": "*"}).values["istio_inbound_ports"] == "*"


@pytest.mark.parametrize("text, value", [("true", True), ("1", True), ("t", True), ("T", True), ("TRUE", True),
                                         ("false", False), ("0", False), ("f", False), ("False", False)])
def test_bool_forms(text: str, value: bool) -> None:
    assert parse([f"--reconcile={text}"], {}).values["reconcile"] is value


def test_malformed_env_is_the_zero_value_with_a_warning() -> None:
    p = parse([], {"DRY_RUN": "yes", "PROBE_TIMEOUT": "soon", "IPTABLES_PROBE_PORT": "70000"})
    assert (p.values["dry_run"], p.values["probe_timeout"], p.values["iptables_probe_port"]) == (False, 0.0, 0)
    assert len(p.env_warnings) == 3 and "DRY_RUN" in p.env_warnings[0]


@pytest.mark.parametrize("argv, message", [
    (["--no-such-flag"], "unknown flag: --no-such-flag"),
    (["-Z"], "unknown shorthand flag: 'Z'"),
    (["-p"], "flag needs an argument: -p, --envoy-port"),
    (["--reconcile=maybe"], "'--reconcile' flag"),
    (["--iptables-probe-port", "x"], "'--iptables-probe-port' flag"),
    (["--probe-timeout", "5"], "'--probe-timeout' flag"),
])
def test_bad_argv_names_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(FlagError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(argv, {})


@pytest.mark.parametrize("text, seconds", [("5s", 5.0), ("250ms", 0.25), ("1m30s", 90.0), ("1h", 3600.0),
                                           ("0", 0.0), ("1.5s", 1.5), ("2us", 2e-6)])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_positional_args_are_collected_not_fatal() -> None:
    assert parse(["-p", "1", "extra", "--", "-b"], {}).extra_args == ("extra", "-b")
