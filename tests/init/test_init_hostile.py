"""Hostile flag and env values: every one is refused up front with one line naming the flag or env var, before
anything reaches iptables-restore, netlink or a file (pure: build_config and the CLI's dry-run, no root)."""
from __future__ import annotations

import pytest
from init_helpers import DEFAULT_ARGS, config

from init import flags
from init.cli import MAX_RESOLV_CONF, _read, main
from init.config import MAX_SMALL_LIST, ConfigError

UNICODE_DIGITS = ["１５００１", "١٥٠٠١", "²", "15００1", "𝟏𝟓"]


@pytest.mark.parametrize("digits", UNICODE_DIGITS)
@pytest.mark.parametrize("flag, label", [
    ("-p", "-p/--envoy-port"), ("-z", "-z/--inbound-capture-port"), ("-e", "-e/--inbound-tunnel-port"),
    ("-u", "-u/--proxy-uid"), ("-g", "-g/--proxy-gid"), ("-t", "-t/--istio-inbound-tproxy-mark"),
    ("-r", "-r/--istio-inbound-tproxy-route-table"), ("-b", "-b/--istio-inbound-ports"),
    ("-d", "-d/--istio-local-exclude-ports"), ("-q", "-q/--istio-outbound-ports"),
    ("-o", "-o/--istio-local-outbound-ports-exclude"),
])
def test_non_ascii_digits_are_refused_naming_the_flag(flag: str, label: str, digits: str) -> None:
    with pytest.raises(ConfigError) as e:
        config("-m", "TPROXY", "-b", "*", flag, digits)
    msg = str(e.value)
    assert msg.startswith(label) and "\n" not in msg, msg


@pytest.mark.parametrize("env, digits", [("INBOUND_CAPTURE_PORT", "１５００６"), ("PROXY_UID", "٣"),
                                          ("ISTIO_INBOUND_TPROXY_MARK", "²"), ("ISTIO_LOCAL_EXCLUDE_PORTS", "٨٠")])
def test_non_ascii_digits_in_env_are_refused_naming_the_flag(env: str, digits: str) -> None:
    with pytest.raises(ConfigError) as e:
        config("-m", "TPROXY", "-b", "*", env={env: digits})
    assert "--" in str(e.value).split(":")[0]


def test_probe_port_flag_refuses_unicode_digits_without_python_internals() -> None:
    with pytest.raises(flags.FlagError) as e:
        flags.parse(["--iptables-probe-port=²"], {})
    assert "--iptables-probe-port" in str(e.value) and "int()" not in str(e.value)


@pytest.mark.parametrize("value, label", [
    ("10.0.0.0/８", "-x/--istio-service-exclude-cidr"), ("fe80::1%eth0/64", "-x/--istio-service-exclude-cidr"),
    ("１0.0.0.0/8", "-x/--istio-service-exclude-cidr"), ("10.0.0.0/08", "-x/--istio-service-exclude-cidr"),
    ("010.0.0.0/8", "-x/--istio-service-exclude-cidr"), ("10.0.0.0/33", "-x/--istio-service-exclude-cidr"),
])
def test_odd_cidrs_are_refused(value: str, label: str) -> None:
    with pytest.raises(ConfigError) as e:
        config("-x", value)
    assert str(e.value).startswith(label)


def test_loopback_cidr_env_with_unicode_bits_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        config(env={"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1/³²"})
    assert str(e.value).startswith("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR")


@pytest.mark.parametrize("name", ["-x", "!eth0", 'a"b', "a\\b", "a'b", "eth0:1", "a/b", "a\tb", ".", "x" * 16,
                                  "é" * 8, "a\x7fb"])
@pytest.mark.parametrize("flag, label", [("-c", "-c/--istio-exclude-interfaces"), ("-k", "-k/--kube-virt-interfaces")])
def test_bad_interface_names_are_refused(flag: str, label: str, name: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(flag, f"eth0,{name}")
    assert str(e.value).startswith(label)


@pytest.mark.parametrize("flag, value", [("-u", "4294967295"), ("-g", "99999999999999999999999"),
                                         ("-t", "0"), ("-t", "4294967296"), ("-r", "0"), ("-r", "254"),
                                         ("-b", "100:50"), ("-q", "65536"),
                                         ("-d", "080"), ("-u", "01337"), ("-p", "015001")])
def test_out_of_range_numbers_are_refused(flag: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        config("-m", "TPROXY", "-b", "*", flag, value)
    assert str(e.value).startswith(flag + "/")


@pytest.mark.parametrize("env, value", [("ISTIO_OUTBOUND_OWNER_GROUPS", "-x"),
                                        ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "no-such-group-here"),
                                        ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", 'a"b'),
                                        ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "4294967295")])
def test_bad_owner_groups_are_refused(env: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(env={env: value})
    assert str(e.value).startswith(env + ":")


def test_huge_values_are_not_echoed_whole() -> None:
    bad = ",".join(["10.0.0.0/8"] * 3000 + ["nope"])
    with pytest.raises(ConfigError) as e:
        config("-x", bad)
    assert len(str(e.value)) < 300 and "nope" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config("-x", ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(20000)))
    assert "-x/--istio-service-exclude-cidr" in str(e.value) and "at most" in str(e.value)


def test_resolv_conf_scoped_nameserver_is_skipped() -> None:
    cfg = config("--redirect-dns", resolv="nameserver fe80::1%eth0\nnameserver 10.96.0.10\n")
    assert cfg.dns_servers_v4 == ("10.96.0.10",) and cfg.dns_servers_v6 == ()


def test_cli_dry_run_file_error_names_the_env_var(tmp_path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRY_RUN_FILE_PATH", str(tmp_path))  # a directory: cannot be opened for writing
    assert main([*DEFAULT_ARGS, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "DRY_RUN_FILE_PATH" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_cli_unicode_port_is_one_line_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-n", "-z", "²"]) == 1
    err = capsys.readouterr().err
    assert "-z/--inbound-capture-port" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_resolv_conf_nameservers_are_capped_per_family_with_a_warning() -> None:
    many = "".join(f"nameserver 10.0.{i // 256}.{i % 256}\n" for i in range(500)) + "nameserver fd00::a\n"
    cfg = config("--redirect-dns", resolv=many)
    assert len(cfg.dns_servers_v4) == MAX_SMALL_LIST and cfg.dns_servers_v6 == ("fd00::a",)
    assert any(w.startswith("--redirect-dns") and f"first {MAX_SMALL_LIST}" in w for w in cfg.warnings)


def test_resolv_conf_under_the_cap_per_family_is_kept_whole_without_a_warning() -> None:
    half = MAX_SMALL_LIST * 3 // 4  # each family under the cap, both together over it
    text = "".join(f"nameserver 10.0.0.{i + 1}\nnameserver fd00::{i + 1:x}\n" for i in range(half))
    cfg = config("--redirect-dns", resolv=text)
    assert len(cfg.dns_servers_v4) == half and len(cfg.dns_servers_v6) == half
    assert not any("nameservers" in w for w in cfg.warnings)


def test_resolv_conf_is_read_as_a_bounded_prefix(tmp_path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_bytes(b"nameserver 10.96.0.10\n" + b"#" * (4 * MAX_RESOLV_CONF) + b"\xff\n")
    text = _read(str(path))
    assert text is not None and len(text) == MAX_RESOLV_CONF and text.startswith("nameserver 10.96.0.10\n")
