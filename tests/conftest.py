"""Shared fixtures: root/netns availability with a printed reason, and namespaces that clean up after themselves."""
from __future__ import annotations

import os

import pytest

from testing.netns import Netns, have_root


def pytest_report_header(config: pytest.Config) -> str:
    ok, why = have_root()
    return "netns tests: " + ("enabled" if ok else f"SKIPPED ({why})")


@pytest.fixture
def root_required() -> None:
    ok, why = have_root()
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the netns tests, but: {why}")
        pytest.skip(why)


@pytest.fixture
def netns(root_required: None):
    ns = Netns.create("mbt")
    try:
        yield ns
    finally:
        ns.close()
