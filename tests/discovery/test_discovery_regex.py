"""discovery/regex.py: RE2's full match on the subset istiod's RBAC matchers use, in linear time, checked against
Python's re on the patterns authz renders; anything else refused."""
from __future__ import annotations

import re
import time

import pytest

from discovery import authz, regex

PRINCIPALS = ["spiffe://cluster.local/ns/demo/sa/web", "spiffe://td/ns/dev/sa/x/extra", "spiffe://a/ns//sa/", "",
              "cluster.local/ns/demo/sa/web", "spiffe://cluster.local/ns/demo-1/sa/web\n"]


@pytest.mark.parametrize("pattern", [
    ".+", "spiffe://.*/sa/web", ".*/ns/demo/.*", ".*/ns/de.*o/.*", ".*/ns/.*/.*",
    "spiffe://.+/ns/demo/(.+/|)sa/web(/.+)?", "spiffe://.+/ns/demo\\-1/(.+/|)sa/web(/.+)?", "a|b|", "(a|b)*c+d?",
])
def test_agrees_with_python_re(pattern: str) -> None:
    for text in PRINCIPALS:
        assert regex.fullmatch(pattern, text) == (re.fullmatch(pattern, text) is not None), (pattern, text)


@pytest.mark.parametrize("pattern", ["(", "a)", "[a-z]", "^a$", "a{2}", "\\d", "(?i)a", "a\\", "x" * 4097])
def test_other_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(regex.Unsupported):
        regex.fullmatch(pattern, "a")


def test_a_tenants_namespace_wildcards_take_linear_time() -> None:
    """`namespaces: ["*a*a*…b"]` renders `.*/ns/.*a.*a…b/.*`: Python's re backtracks for minutes on it."""
    policies, _ = authz.compile([{"metadata": {"name": "p", "namespace": "demo"}, "spec": {"rules": [
        {"from": [{"source": {"namespaces": ["*a" * 12 + "*b"]}}]}]}}])
    filters = authz.for_workload(policies, "demo", {}, "cluster.local")
    source = authz.Source("spiffe://cluster.local/ns/" + "a" * 60 + "/sa/default", "10.0.0.1")
    started = time.monotonic()
    verdict = authz.explain(filters, source, authz.Destination(8080))
    assert verdict.verdict == authz.DENY and time.monotonic() - started < 2.0


def test_a_pattern_explain_cannot_read_is_an_explain_error() -> None:
    policies, _ = authz.compile([{"metadata": {"name": "p", "namespace": "demo"}, "spec": {"rules": [
        {"from": [{"source": {"principals": ["*"]}}]}]}}])
    filters = authz.for_workload(policies, "demo", {}, "cluster.local")
    rbac = filters[0]
    config = authz.network_rbac_pb2.RBAC()
    rbac.typed_config.Unpack(config)
    for policy in config.rules.policies.values():
        policy.principals[0].and_ids.ids[0].or_ids.ids[0].authenticated.principal_name.safe_regex.regex = "("
    rbac.typed_config.Pack(config)
    with pytest.raises(authz.ExplainError, match="regex"):
        authz.explain([rbac], authz.Source("spiffe://cluster.local/ns/a/sa/b", "10.0.0.1"), authz.Destination(1))
