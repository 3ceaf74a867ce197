"""Hypothesis settings for the fuzz suites: a bounded, repeatable budget in `make test`, a longer random one in
`make fuzz` (MESHBOOT_FUZZ=long). Every fuzz test takes its settings from `budget()`."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

LONG = os.environ.get("MESHBOOT_FUZZ") == "long"
SCALE = int(os.environ.get("MESHBOOT_FUZZ_SCALE", "20")) if LONG else 1


def budget(examples: int) -> settings:
    """`examples` cases in make test (derandomized, so CI is repeatable), SCALE times as many random ones in make
    fuzz. No per-example deadline here: the tests assert their own 1 s bound on the code under test."""
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=not LONG, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
