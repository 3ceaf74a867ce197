"""Revision and tag routing: which injector the API server calls, from Istio's documented behaviour.

Expected values come from Istio's docs and chart: istio-injection=enabled is the default revision's; istio.io/rev
selects a revision or a tag; istio-injection takes precedence over istio.io/rev ("the istio-injection label must be
removed because it takes precedence", canary upgrade guide); a namespace's istio.io/rev wins over a pod's (the
rev.object. webhook needs the namespace unlabelled); sidecar.istio.io/inject=false is never sent; a disabled
namespace is never injected; a tag routes to its revision and the tag default also takes istio-injection=enabled.
"""
from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import pytest
import yaml
from webhook_fixtures import hello_pod, settings

from webhook import revisions as R
from webhook.cli import main
from webhook.errors import ConfigError
from webhook.policy import NO_WEBHOOK, decide

INJ, REV, POD_INJ = "istio-injection", "istio.io/rev", "sidecar.istio.io/inject"
BOTH = R.planes(["default", "canary"], {"prod-stable": "default", "prod-canary": "canary"})
CANARY_ONLY = R.planes(["canary"], {})
CANARY_DEFAULT_TAG = R.planes(["canary"], {"default": "canary"})
MOVING_DEFAULT = R.planes(["default", "canary"], {"default": "canary"})

# (id, planes, namespace labels, pod labels) -> (revision or None, configuration of the last call, webhook prefix,
# words the reason must contain)
CASES: list[tuple[str, R.ControlPlanes, dict[str, str], dict[str, str], Any, str, str, str]] = [
    ("injection-enabled", BOTH, {INJ: "enabled"}, {}, "default", "meshboot-sidecar-injector", "namespace.", ""),
    ("rev-canary", BOTH, {REV: "canary"}, {}, "canary", "meshboot-sidecar-injector-canary", "rev.namespace.", ""),
    ("rev-default", BOTH, {REV: "default"}, {}, "default", "meshboot-sidecar-injector", "rev.namespace.", ""),
    ("both-labels-injection-wins", BOTH, {INJ: "enabled", REV: "canary"}, {}, "default",
     "meshboot-sidecar-injector", "namespace.", ""),
    ("pod-opt-out", BOTH, {INJ: "enabled"}, {POD_INJ: "false"}, None, "", "", "sidecar.istio.io/inject=false"),
    ("pod-opt-out-rev", BOTH, {REV: "canary"}, {POD_INJ: "false"}, None, "", "", "sidecar.istio.io/inject=false"),
    ("ns-disabled", BOTH, {INJ: "disabled"}, {}, None, "", "", "istio-injection=disabled"),
    ("ns-disabled-pod-true", BOTH, {INJ: "disabled"}, {POD_INJ: "true"}, None, "", "", "istio-injection=disabled"),
    ("ns-disabled-pod-rev", BOTH, {INJ: "disabled"}, {REV: "canary"}, None, "", "", "istio-injection=disabled"),
    ("pod-true", BOTH, {}, {POD_INJ: "true"}, "default", "meshboot-sidecar-injector", "object.", ""),
    ("pod-rev", BOTH, {}, {REV: "canary"}, "canary", "meshboot-sidecar-injector-canary", "rev.object.", ""),
    ("pod-rev-and-true", BOTH, {}, {REV: "canary", POD_INJ: "true"}, "canary",
     "meshboot-sidecar-injector-canary", "rev.object.", ""),
    ("ns-rev-beats-pod-rev", BOTH, {REV: "canary"}, {REV: "default"}, "canary",
     "meshboot-sidecar-injector-canary", "rev.namespace.", ""),
    ("tag-to-canary", BOTH, {REV: "prod-canary"}, {}, "canary", "istio-revision-tag-prod-canary",
     "rev.namespace.", ""),
    ("tag-to-default", BOTH, {REV: "prod-stable"}, {}, "default", "istio-revision-tag-prod-stable",
     "rev.namespace.", ""),
    ("pod-tag", BOTH, {}, {REV: "prod-canary"}, "canary", "istio-revision-tag-prod-canary", "rev.object.", ""),
    ("unknown-rev", BOTH, {REV: "1-99-0"}, {}, None, "", "", "istio.io/rev=1-99-0 names no installed"),
    ("unknown-pod-rev", BOTH, {}, {REV: "1-99-0"}, None, "", "", "istio.io/rev=1-99-0 names no installed"),
    ("nothing", BOTH, {}, {}, None, "", "", "no webhook selects it"),
    ("no-default-installed", CANARY_ONLY, {INJ: "enabled"}, {}, None, "", "", "none is installed nor tagged"),
    ("no-default-pod-true", CANARY_ONLY, {}, {POD_INJ: "true"}, None, "", "", "none is installed nor tagged"),
    ("default-tag-takes-injection", CANARY_DEFAULT_TAG, {INJ: "enabled"}, {}, "canary",
     "istio-revision-tag-default", "namespace.", ""),
    ("default-tag-takes-pod-true", CANARY_DEFAULT_TAG, {}, {POD_INJ: "true"}, "canary",
     "istio-revision-tag-default", "object.", ""),
    ("default-tag-takes-rev-default", CANARY_DEFAULT_TAG, {REV: "default"}, {}, "canary",
     "istio-revision-tag-default", "rev.namespace.", ""),
    # While the unrevisioned release is still installed, both are called; configurations are called in name order
    # and each re-injects, so meshboot-sidecar-injector (after istio-revision-tag-default) wins.
    ("default-tag-beside-old-default", MOVING_DEFAULT, {INJ: "enabled"}, {}, "default",
     "meshboot-sidecar-injector", "namespace.", "also called before it: istio-revision-tag-default (canary)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_routing_table(case: tuple[Any, ...]) -> None:
    _, cp, ns_labels, pod_labels, want_rev, want_config, want_prefix, want_words = case
    r = R.route("apps", ns_labels, pod_labels, cp)
    assert r.revision == want_rev, r.reason
    if want_rev is not None:
        assert r.called[-1].configuration == want_config
        assert r.called[-1].name == want_prefix + R.WEBHOOK_SUFFIX
    assert want_words in r.reason


def test_enable_namespaces_by_default_skips_system_namespaces() -> None:
    cp = R.planes(["default", "canary"], {}, enable_namespaces_by_default=True)
    assert R.route("apps", {}, {}, cp).called[-1].name == "auto." + R.WEBHOOK_SUFFIX
    for ns in ("kube-system", "kube-public", "kube-node-lease", "local-path-storage", "istio-system"):
        assert R.route(ns, {}, {}, cp).revision is None, ns
    # a label still opts out, and a revisioned control plane alone never takes unlabelled namespaces
    assert R.route("apps", {}, {POD_INJ: "false"}, cp).revision is None
    assert R.route("apps", {}, {}, R.planes(["canary"], {}, enable_namespaces_by_default=True)).revision is None


LABEL_VALUES = {INJ: (None, "enabled", "disabled"), REV: (None, "default", "canary", "prod-canary", "other")}
POD_VALUES = {POD_INJ: (None, "true", "false"), REV: (None, "default", "canary", "prod-canary", "other")}


def _combos(domain: dict[str, tuple[str | None, ...]]) -> list[dict[str, str]]:
    keys = list(domain)
    return [{k: v for k, v in zip(keys, vals, strict=True) if v is not None}
            for vals in itertools.product(*(domain[k] for k in keys))]


@pytest.mark.parametrize("cp", [BOTH, CANARY_ONLY, CANARY_DEFAULT_TAG], ids=["both", "canary", "canary+default"])
def test_each_configuration_calls_at_most_once_and_opt_outs_hold(cp: R.ControlPlanes) -> None:
    """Istio's entries within one configuration are disjoint; `false` and `disabled` are never injected."""
    for ns_labels, pod_labels in itertools.product(_combos(LABEL_VALUES), _combos(POD_VALUES)):
        r = R.route("apps", ns_labels, pod_labels, cp)
        configs = [w.configuration for w in r.called]
        assert len(configs) == len(set(configs)), (ns_labels, pod_labels, configs)
        if pod_labels.get(POD_INJ) == "false" or ns_labels.get(INJ) == "disabled":
            assert r.revision is None, (ns_labels, pod_labels)
        if r.revision is None:
            assert r.reason


def test_gate_and_explain() -> None:
    canary = R.route("apps", {REV: "canary"}, {}, BOTH)
    assert R.gate(canary, "canary") is None
    other = R.gate(canary, "default")
    assert other is not None and not other.inject and other.reason == R.OTHER_REVISION
    none = R.gate(R.route("apps", {REV: "gone"}, {}, BOTH), "default")
    assert none is not None and none.reason == NO_WEBHOOK and "gone" in none.message
    assert R.explain_line(canary).startswith("revision canary: webhook rev.namespace.")
    assert R.explain_line(R.route("apps", {}, {}, BOTH)).startswith("no injector: no webhook selects it")


# reference/injection.md §1.2: namespace labels x pod labels, the default revision alone -> injected? Gate A is
# route, gate B the injector's own policy, combined as the CLI and the server do.
P_ANN = "_ann"       # a pod annotation sidecar.istio.io/inject instead of the label (webhook selectors see labels only)
NS_TABLE = [
    ("no labels anywhere", {}, {}, False, "apps", False),
    ("auto webhook when namespaces are on by default", {}, {}, True, "apps", True),
    ("auto webhook never in kube-system", {}, {}, True, "kube-system", False),
    ("pod inj=true, no ns labels: object webhook", {}, {POD_INJ: "true"}, False, "apps", True),
    ("pod rev=default: rev.object webhook", {}, {REV: "default"}, False, "apps", True),
    ("pod rev=canary: not our revision", {}, {REV: "canary"}, False, "apps", False),
    ("ns istio-injection=enabled", {INJ: "enabled"}, {}, False, "apps", True),
    ("ns enabled + pod rev=canary: namespace label wins", {INJ: "enabled"}, {REV: "canary"}, False, "apps", True),
    ("ns istio-injection=disabled, even pod inj=true", {INJ: "disabled"}, {POD_INJ: "true"}, False, "apps", False),
    ("ns istio-injection=other value", {INJ: "yes"}, {}, False, "apps", False),
    ("ns rev=default", {REV: "default"}, {}, False, "apps", True),
    ("ns rev=default + pod rev=canary: namespace wins", {REV: "default"}, {REV: "canary"}, False, "apps", True),
    ("ns rev=canary: another revision", {REV: "canary"}, {REV: "default"}, False, "apps", False),
    ("ns enabled + rev=X: namespace webhook", {INJ: "enabled", REV: "x"}, {}, False, "apps", True),
    ("ns enabled, pod label inj=false", {INJ: "enabled"}, {POD_INJ: "false"}, False, "apps", False),
    ("ns enabled, annotation-only inj=false: webhook fires, injector skips", {INJ: "enabled"}, {P_ANN: "false"},
     False, "apps", False),
    ("no ns labels, annotation-only inj=true: no webhook", {}, {P_ANN: "true"}, False, "apps", False),
]


@pytest.mark.parametrize("case,ns_labels,pod_labels,by_default,ns,want", NS_TABLE, ids=[r[0] for r in NS_TABLE])
def test_combined_outcome(case: str, ns_labels: dict, pod_labels: dict, by_default: bool, ns: str,
                          want: bool) -> None:
    labels = dict(pod_labels)
    ann = labels.pop(P_ANN, None)
    pod = hello_pod()
    pod["metadata"]["labels"] = labels
    if ann:
        pod["metadata"]["annotations"] = {POD_INJ: ann}
    routing = R.route(ns, ns_labels, labels, R.planes(["default"], {}, enable_namespaces_by_default=by_default))
    d = R.gate(routing, R.DEFAULT) or decide(pod, ns, settings())
    assert d.inject is want, d.message


def test_no_webhook_reason_names_the_namespace_label() -> None:
    d = R.gate(R.route("apps", {INJ: "disabled"}, {}, R.planes(["default"], {})), R.DEFAULT)
    assert d is not None and d.reason == NO_WEBHOOK and "istio-injection=disabled" in d.message


@pytest.mark.parametrize(("revs", "tags", "needle"), [
    ([], {}, "revisions: at least one"),
    (["Canary"], {}, "revisions: 'Canary'"),
    (["canary"], {"prod": "stable"}, "tags: tag 'prod' points at revision 'stable', which is not installed"),
    (["default", "canary"], {"canary": "default"}, "tags: tag 'canary' has the name of an installed revision"),
    (["default"], {"default": "default"}, "tags: tag 'default' on the default revision"),
    (["canary"], {"a" * 31: "canary"}, "tags: 'aaaa"),
    (["canary"], {"-x": "canary"}, "tags: '-x'"),
])
def test_bad_planes_are_one_clear_message(revs: list[str], tags: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match="^" + needle.replace("(", r"\(")):
        R.planes(revs, tags)


@pytest.mark.parametrize(("ns_labels", "pod_labels", "needle"), [
    ({INJ: True}, {}, "namespace label 'istio-injection': value True is not a string"),
    ({}, {POD_INJ: False}, "pod label 'sidecar.istio.io/inject': value False is not a string"),
    ({}, ["x"], "pod labels: want a map"),
])
def test_hostile_labels_name_the_label(ns_labels: Any, pod_labels: Any, needle: str) -> None:
    with pytest.raises(ConfigError, match="^" + needle):
        R.route("apps", ns_labels, pod_labels, BOTH)


def test_tag_configuration_outside_istio_system_carries_the_namespace() -> None:
    cp = R.planes(["canary"], {"prod": "canary"}, namespace="mesh")
    assert {w.configuration for w in R.webhooks(cp)} == {"meshboot-sidecar-injector-canary",
                                                         "istio-revision-tag-prod-mesh"}


# ---- meshboot-inject --revision / --revisions / --tags / --explain -------------------------------------------------

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "apps"},
       "spec": {"containers": [{"name": "app", "image": "app:1"}]}}


def _cli(tmp_path: Any, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    f = tmp_path / "pod.yaml"
    f.write_text(yaml.safe_dump(POD))
    rc = main(["-f", str(f), "--kubernetes-version", "1.33", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_revision_injects_as_that_revision(tmp_path: Any, capsys: pytest.CaptureFixture) -> None:
    rc, out, err = _cli(tmp_path, capsys, "--revision", "canary")
    assert rc == 0, err
    ann = yaml.safe_load(out)["metadata"]["annotations"]
    # Istio's sidecar template: the istio.io/rev annotation and the status's revision name the injecting revision
    assert ann["istio.io/rev"] == "canary" and json.loads(ann["sidecar.istio.io/status"])["revision"] == "canary"
    rc, out, _ = _cli(tmp_path, capsys, "--revision", "default")
    ann = yaml.safe_load(out)["metadata"]["annotations"]
    assert ann["istio.io/rev"] == "default" and json.loads(ann["sidecar.istio.io/status"])["revision"] == "default"


@pytest.mark.parametrize(("args", "want"), [
    (["--revision", "canary", "--revisions", "default,canary", "--namespace-labels", "istio.io/rev=canary"],
     "WILL be injected"),
    (["--revisions", "default,canary", "--namespace-labels", "istio.io/rev=canary"], "[other_revision]"),
    (["--revision", "canary", "--revisions", "default,canary", "--tags", "prod=canary",
      "--namespace-labels", "istio.io/rev=prod"], "called: revision canary: webhook rev.namespace."),
    (["--revision", "canary", "--namespace-labels", "istio-injection=enabled"], "none is installed nor tagged"),
    (["--revision", "canary", "--tags", "default=canary", "--namespace-labels", "istio-injection=enabled"],
     "of istio-revision-tag-default (tag default -> revision canary)"),
    (["--namespace-labels", "istio.io/rev=1-99-0"], "istio.io/rev=1-99-0 names no installed revision or tag"),
])
def test_cli_explain_names_the_revision_or_tag(tmp_path: Any, capsys: pytest.CaptureFixture, args: list[str],
                                               want: str) -> None:
    rc, out, err = _cli(tmp_path, capsys, "--explain", *args)
    assert rc == 0, err
    assert want in out, out


@pytest.mark.parametrize(("args", "needle"), [
    (["--revision", "Canary"], "--revision: 'Canary' is not a revision/tag name"),
    (["--revision", "canary", "--revisions", "default"], "--revisions: default leaves out this injector's revision"),
    (["--tags", "prod"], "--tags: 'prod' is not KEY=VALUE"),
    (["--tags", "prod=canary"], "tags: tag 'prod' points at revision 'canary', which is not installed"),
])
def test_cli_bad_revision_flags_are_one_line(tmp_path: Any, capsys: pytest.CaptureFixture, args: list[str],
                                             needle: str) -> None:
    rc, out, err = _cli(tmp_path, capsys, *args)
    assert rc == 1 and out == ""
    assert err.startswith("meshboot-inject: ") and needle in err and err.count("\n") == 1, err


# ---- the server keeps the caBundle of the revision's and its tags' configurations -------------------------------

def test_webhook_config_name_list_patches_every_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart passes --webhook-config-name=<revision's>,istio-revision-tag-<tag>: each gets the bundle, and the
    injector is ready only when all are right (one gate each)."""
    from meshboot import pki
    from testing.fakekube import FakeKube
    from webhook import server

    bundle, _ = pki.self_signed_serving(["meshboot-webhook-canary.istio-system.svc"])
    b64 = base64.b64encode(bundle).decode()
    gates: list[Any] = []
    monkeypatch.setattr(server, "add_ready_gate", gates.append)
    names = ["meshboot-sidecar-injector-canary", "istio-revision-tag-prod"]
    hook = {"name": "rev.namespace." + R.WEBHOOK_SUFFIX, "sideEffects": "None", "admissionReviewVersions": ["v1"],
            "clientConfig": {"service": {"name": "meshboot-webhook-canary", "namespace": "istio-system"}}}
    with FakeKube() as kube:
        for n in [*names, "someone-elses"]:
            kube.put_object("mutatingwebhookconfigurations", {"metadata": {"name": n}, "webhooks": [hook]})
        patchers = server.watch_webhook_ca_bundles(kube.api_client(), " , ".join(names) + ",", lambda: bundle)
        try:
            assert [p.name for p in patchers] == names and len(gates) == 2
            for n in names:
                assert kube.wait_for(lambda k, n=n: k.get("mutatingwebhookconfigurations", "", n)["webhooks"][0][
                    "clientConfig"].get("caBundle") == b64), n
            assert kube.wait_for(lambda k: all(g() is None for g in gates))
            other = kube.get("mutatingwebhookconfigurations", "", "someone-elses")
            assert other is not None and "caBundle" not in other["webhooks"][0]["clientConfig"]
        finally:
            for p in patchers:
                p.stop()
