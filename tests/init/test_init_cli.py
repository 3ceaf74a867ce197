"""The CLI in-process: dry-run output and record file, help, exit codes (no root: dry-run changes nothing)."""
from __future__ import annotations

from pathlib import Path

import pytest
from init_helpers import DEFAULT_ARGS, ISTIO_RESTORE

from init.cli import main


def test_dry_run_prints_the_restore_input_and_records_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "dry.txt"
    monkeypatch.setenv("DRY_RUN_FILE_PATH", str(record))
    assert main([*DEFAULT_ARGS, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# iptables-restore --noflush (IPv4)"
    assert out[1:1 + len(ISTIO_RESTORE)] == ISTIO_RESTORE
    lines = record.read_text().splitlines()
    assert lines[:2] == ["iptables-save", "ip6tables-save"] and lines[2] == "* nat"
    assert lines[-1] in ("iptables-save", "ip6tables-save")


def test_help_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--istio-inbound-ports" in capsys.readouterr().out
    assert main(["-b"]) == 255
    assert "flag needs an argument: -b, --istio-inbound-ports" in capsys.readouterr().err
    assert main(["--log_output_level=default:loud", "-n"]) == 255
    assert main(["-n", "-x", "*"]) == 1
    assert "-x/--istio-service-exclude-cidr" in capsys.readouterr().err
    assert main(["-n", "--native-nftables"]) == 1
