"""Backend choice on kernels without nf_tables: the decision as a table, the kernel's real answer for an absent
nfnetlink subsystem, and the fallback end to end in a network namespace (the nf_tables question is asked of a
subsystem no kernel has, so the kernel itself refuses it exactly as one built without nf_tables does)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from init import backend as B
from testing.netns import Netns, call_in

RULES = "*nat\n:MESHBOOT_PROBE - [0:0]\n-A OUTPUT -p tcp --dport 9 -j MESHBOOT_PROBE\nCOMMIT\n"
ABSENT_SUBSYS = 31          # beyond NFNL_SUBSYS_COUNT on every kernel: "no such subsystem", as nf_tables missing


@pytest.mark.parametrize("force,legacy_tables,nft,want", [
    ("", False, "present", ["nft", "iptables"]),            # Istio: a fresh pod on a modern node
    ("", False, "unknown", ["nft", "iptables"]),            # netlink could not tell (EPERM): Istio's order
    ("", True, "present", ["legacy", "nft", "iptables"]),   # Istio: legacy already holds rules
    ("", False, "absent", ["legacy", "nft", "iptables"]),   # the kernel has no nf_tables: legacy first
    ("", True, "absent", ["legacy", "nft", "iptables"]),
    ("nft", False, "absent", ["nft"]),                      # forced is forced
    ("legacy", False, "present", ["legacy"]),
])
def test_order(force: str, legacy_tables: bool, nft: str, want: list[str]) -> None:
    assert B.order(force, legacy_tables, nft) == want


@pytest.mark.parametrize("errno,want", [(93, "absent"), (22, "absent"), (95, "absent"), (1, "unknown"),
                                        (-1, "unknown"), (11, "unknown")])
def test_what_a_refused_dump_says(errno: int, want: str) -> None:
    assert B.nft_support(errno) == want


@pytest.fixture
def ns(root_required: None) -> Iterator[Netns]:
    for tool in ("iptables-legacy", "iptables-legacy-save", "iptables-nft-save"):
        if B.which(tool) is None:
            pytest.skip(f"needs {tool}")
    with Netns.create("mbb") as n:
        yield n


def test_kernel_answers_absent_for_a_missing_subsystem_and_present_for_nf_tables(ns: Netns,
                                                                                  monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    tables, errno = call_in(ns.name, B._nft_dump, B.V4)
    assert tables == set() and errno == 0, "a fresh netns: nf_tables answers with no tables"
    monkeypatch.setattr(B, "NFT_SUBSYS", ABSENT_SUBSYS)
    tables, errno = call_in(ns.name, B._nft_dump, B.V4)
    assert tables is None and B.nft_support(errno) == "absent", errno


def test_fresh_pod_on_a_kernel_without_nf_tables_gets_legacy(ns: Netns, monkeypatch: pytest.MonkeyPatch) -> None:
    b, text = call_in(ns.name, B.detect_and_save, B.V4, "")
    assert (b.cmd, b.legacy) == ("iptables-nft", False), "with nf_tables: Istio's choice for a fresh pod"
    monkeypatch.setattr(B, "NFT_SUBSYS", ABSENT_SUBSYS)
    b, text = call_in(ns.name, B.detect_and_save, B.V4, "")
    assert (b.cmd, b.legacy) == ("iptables-legacy", True), b
    call_in(ns.name, B.restore, b, RULES)
    legacy = ns.run(["iptables-legacy-save", "-t", "nat"]).stdout
    assert "-A OUTPUT -p tcp -m tcp --dport 9 -j MESHBOOT_PROBE" in legacy
    assert "MESHBOOT_PROBE" not in ns.run(["iptables-nft-save"]).stdout
    # legacy now holds rules: chosen by Istio's own rule from here on, whatever the kernel says
    monkeypatch.setattr(B, "NFT_SUBSYS", 10)
    b, text = call_in(ns.name, B.detect_and_save, B.V4, "")
    assert b.legacy and "MESHBOOT_PROBE" in text


def test_no_backend_names_the_missing_nf_tables(ns: Netns, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(B, "NFT_SUBSYS", ABSENT_SUBSYS)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(B.BackendError) as e:
        call_in(ns.name, B.detect_and_save, B.V4, "")
    assert "(the kernel has no nf_tables)" in str(e.value) and "iptables: not found on PATH" in str(e.value)
