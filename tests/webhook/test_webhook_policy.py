"""The injection decision: reference/injection.md §1.1 (injector policy); §1.2 (with the webhook selectors) is in
test_webhook_revisions.py, through revisions.route as the CLI and the server take it."""
from __future__ import annotations

import pytest
from webhook_fixtures import hello_pod, settings

from webhook import policy as P


def pod(labels: dict | None = None, annotations: dict | None = None, host_network: bool = False) -> dict:
    p = hello_pod()
    p["metadata"]["labels"] = labels or {}
    if annotations is not None:
        p["metadata"]["annotations"] = annotations
    if host_network:
        p["spec"]["hostNetwork"] = True
    return p


INJ = "sidecar.istio.io/inject"
ALWAYS = [{"matchLabels": {"always": "yes"}}]
NEVER = [{"matchExpressions": [{"key": "never", "operator": "Exists"}]}]

# (case, pod kwargs, namespace, injector config, expected inject, expected reason)
POLICY_TABLE = [
    ("hostNetwork skips even with inject=true", dict(labels={INJ: "true"}, host_network=True), "default", {},
     False, P.HOST_NETWORK),
    ("kube-system is ignored", {}, "kube-system", {}, False, P.IGNORED_NAMESPACE),
    ("kube-public is ignored", dict(labels={INJ: "true"}), "kube-public", {}, False, P.IGNORED_NAMESPACE),
    ("kube-node-lease is ignored", {}, "kube-node-lease", {}, False, P.IGNORED_NAMESPACE),
    ("local-path-storage is ignored", {}, "local-path-storage", {}, False, P.IGNORED_NAMESPACE),
    ("default policy enabled injects", {}, "default", {}, True, P.POLICY_ENABLED),
    ("policy disabled skips by default", {}, "default", {"policy": "disabled"}, False, P.POLICY_DISABLED),
    ("label true injects", dict(labels={INJ: "true"}), "default", {}, True, P.LABEL_TRUE),
    ("label false skips", dict(labels={INJ: "false"}), "default", {}, False, P.LABEL_FALSE),
    ("annotation false skips", dict(annotations={INJ: "false"}), "default", {}, False, P.ANNOTATION_FALSE),
    ("annotation true injects under disabled", dict(annotations={INJ: "true"}), "default", {"policy": "disabled"},
     True, P.ANNOTATION_TRUE),
    ("label beats annotation (label false)", dict(labels={INJ: "false"}, annotations={INJ: "true"}), "default", {},
     False, P.LABEL_FALSE),
    ("label beats annotation (label true)", dict(labels={INJ: "true"}, annotations={INJ: "false"}), "default",
     {"policy": "disabled"}, True, P.LABEL_TRUE),
    ("empty label wins over annotation and means default", dict(labels={INJ: ""}, annotations={INJ: "false"}),
     "default", {}, True, P.POLICY_ENABLED),
    ("label true under disabled injects", dict(labels={INJ: "true"}), "default", {"policy": "disabled"}, True,
     P.LABEL_TRUE),
    ("label false under enabled skips", dict(labels={INJ: "false"}), "default", {"policy": "enabled"}, False,
     P.LABEL_FALSE),
    ("neverInjectSelector skips the default", dict(labels={"never": "x"}), "default", {"neverInjectSelector": NEVER},
     False, P.NEVER_SELECTOR),
    ("explicit true beats neverInjectSelector", dict(labels={"never": "x", INJ: "true"}), "default",
     {"neverInjectSelector": NEVER}, True, P.LABEL_TRUE),
    ("alwaysInjectSelector injects under disabled", dict(labels={"always": "yes"}), "default",
     {"policy": "disabled", "alwaysInjectSelector": ALWAYS}, True, P.ALWAYS_SELECTOR),
    ("never wins over always", dict(labels={"always": "yes", "never": "1"}), "default",
     {"policy": "disabled", "alwaysInjectSelector": ALWAYS, "neverInjectSelector": NEVER}, False, P.NEVER_SELECTOR),
    ("explicit false beats alwaysInjectSelector", dict(labels={"always": "yes", INJ: "false"}), "default",
     {"alwaysInjectSelector": ALWAYS}, False, P.LABEL_FALSE),
    ("empty selectors are ignored", {}, "default", {"policy": "disabled", "alwaysInjectSelector": [{}]}, False,
     P.POLICY_DISABLED),
    ("unknown policy skips explicit true", dict(labels={INJ: "true"}), "default", {"policy": "sometimes"}, False,
     P.POLICY_INVALID),
    ("unknown policy skips default", {}, "default", {"policy": "sometimes"}, False, P.POLICY_INVALID),
    ("an existing status annotation does not skip", dict(annotations={"sidecar.istio.io/status": "{}"}), "default",
     {}, True, P.POLICY_ENABLED),
]


@pytest.mark.parametrize("case,kw,ns,inj,want,reason", POLICY_TABLE, ids=[r[0] for r in POLICY_TABLE])
def test_injector_policy(case: str, kw: dict, ns: str, inj: dict, want: bool, reason: str) -> None:
    d = P.decide(pod(**kw), ns, settings(injector=inj))
    assert (d.inject, d.reason) == (want, reason), d.message
    assert d.message.startswith("injected" if want else "skipped")


def test_unrecognised_value_warns_and_uses_default() -> None:
    d = P.decide(pod(labels={INJ: "maybe"}), "default", settings(injector={"policy": "disabled"}))
    assert not d.inject and d.reason == P.POLICY_DISABLED
    assert "maybe" in d.warning
    d = P.decide(pod(annotations={INJ: "maybe"}), "default", settings())
    assert d.inject and "maybe" in d.warning


def test_policy_from_values_auto_inject() -> None:
    s = settings(values={"global": {"proxy": {"autoInject": "disabled"}}})
    assert P.decide(pod(), "default", s).reason == P.POLICY_DISABLED


@pytest.mark.parametrize("sel,labels,want", [
    ({"matchLabels": {"a": "1"}}, {"a": "1"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "1"}, False),
])
def test_label_selector(sel: dict, labels: dict, want: bool) -> None:
    assert P.selector_matches(sel, labels) is want
