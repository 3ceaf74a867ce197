"""What the tests on the local cluster (tests/e2e_local) share, kept in one place so each module states only its own
scenario: the root check every cluster fixture starts with, a bounded wait, and the plain web pod most of them run.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from testing.netns import have_root, poll

T = TypeVar("T")
SLEEPER = ["python3", "-c", "import time; time.sleep(3600)"]


def require_root(what: str) -> None:
    """Skip without root and network namespaces, except under CI=true, where a skipped cluster test would hide that
    it never ran: there it fails, naming the test and the reason."""
    ok, why = have_root()
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the {what} test, but: {why}")
        pytest.skip(why)


def wait_until(what: str, pred: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll `pred` (every 0.1 s) until it holds; an AssertionError naming `what` after `timeout` seconds. The default
    is generous (the poll ends as soon as `pred` holds): a readiness flip is three probe periods plus a controller
    round, and on CI's two loaded cores each of those stretches."""
    if not poll(pred, bool, timeout):
        raise AssertionError(f"not within {timeout:.0f}s: {what}")


def eventually(what: str, probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 15.0) -> T:
    """Poll `probe` (every 0.2 s) until `done` accepts what it returned; that value, or an AssertionError naming `what`
    and the last value seen after `timeout` seconds (a push, a flushed access log: things that arrive, not steps)."""
    seen = poll(probe, done, timeout, interval=0.2)
    assert done(seen), f"not within {timeout:.0f}s: {what}; last seen: {seen!r}"[:2000]
    return seen


def eventually_equal(what: str, probe: Callable[[], T], want: T, timeout: float = 15.0) -> None:
    """`eventually` for one expected value, the failure showing both it and the last value seen."""
    seen = poll(probe, lambda v: v == want, timeout)
    assert seen == want, f"not within {timeout:.0f}s: {what}: want {want!r}, last seen {seen!r}"


def web_pod(name: str, namespace: str, app: str, sa: str, serve: bool = True) -> dict[str, Any]:
    """A plain pod as a user writes it (injected when its namespace is labelled). `serve`: `http.server` on the
    named port `http` (8080) of its working directory, ready once `/name` answers — the test writes that file, the
    pod's own name, so an answer tells which replica served; otherwise an app that only sleeps (a client)."""
    container: dict[str, Any] = {"name": "app", "image": "python:3.11", "command": SLEEPER}
    if serve:
        container.update(command=["python3", "-m", "http.server", "8080"],
                         ports=[{"name": "http", "containerPort": 8080}],
                         readinessProbe={"httpGet": {"path": "/name", "port": "http"}, "periodSeconds": 1})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
            "spec": {"serviceAccountName": sa, "terminationGracePeriodSeconds": 1, "containers": [container]}}
