"""Golden files for the injector: testdata/inject/<case>.yaml in, <case>.golden.yaml (the injected pod, sorted keys)
out, for a table of pods and settings. A change to the injected shape shows up as a diff of these files in review;
`REFRESH_GOLDEN=1 pytest tests/webhook/test_webhook_golden.py` rewrites them."""
from __future__ import annotations

from typing import Any

import pytest
from webhook_fixtures import golden_input, golden_inputs, render_golden, settings

from testing.golden import TESTDATA, check
from webhook.inject import inject_pod

INJECT = TESTDATA / "inject"
CLASSIC = {"kubernetes_version": "1.29"}
NO_HOLD = {"global": {"proxy": {"holdApplicationUntilProxyStarts": False}}}
# case -> the settings it is injected with (webhook_fixtures.settings: Kubernetes 1.33, i.e. native sidecars).
CASES: dict[str, dict[str, Any]] = {
    "plain-deployment": {},
    "traffic-annotations": {},
    "proxy-config": {},
    "native-sidecars": {},
    "classic-sidecars": CLASSIC,
    "native-annotation-off": {},
    "hold-off": {**CLASSIC, "values": NO_HOLD},
    "user-overrides": {},
    "user-volumes": {},
    "probes": {},
    "prometheus-merge": {},
    "tproxy": {},
    "interception-none": {},
    "reinject": {},
}


def test_every_input_has_a_case() -> None:
    assert golden_inputs(INJECT) == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_injected_pod_matches_golden(case: str) -> None:
    pod = golden_input(INJECT, case)
    check(INJECT / f"{case}.golden.yaml", render_golden(inject_pod(pod, settings(**CASES[case]))))


def test_reinjection_golden_is_its_input() -> None:
    """The re-injection input is an injected pod: injecting it again changes nothing."""
    pod = golden_input(INJECT, "reinject")
    assert inject_pod(pod, settings()) == pod
