"""CNI mode (values pilot.cni.enabled) and global.nativeNftables, against what Istio's injector renders.

Expected values are read from Istio's goldens (pkg/kube/inject/testdata/inject: hello.yaml.cni.injected,
proxy-override-runas.yaml.cni.injected, hello-cncf-networks.yaml.injected, hello-existing-cncf-networks*.yaml.injected;
TestAppendMultusNetwork in inject_test.go) and its sidecar template (files/injection-template.yaml).
"""
from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from webhook_fixtures import (
    arg,
    golden_input,
    golden_inputs,
    hello_pod,
    named,
    names,
    render_golden,
    review_body,
    settings,
    validate_pod,
)

from testing.golden import TESTDATA, check
from webhook import cni
from webhook.admission import review
from webhook.errors import InjectionError
from webhook.inject import inject_pod

CNI = {"pilot": {"cni": {"enabled": True}}}
MULTUS = {"pilot": {"cni": {"enabled": True, "provider": "multus"}}}
GOLDEN = TESTDATA / "inject" / "cni"
# hello.yaml.cni.injected: istio-validation's args and securityContext.
ISTIO_VALIDATION_ARGS = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*",
                         "-x", "", "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info",
                         "--run-validation", "--skip-rule-apply"]
ISTIO_VALIDATION_SC = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "privileged": False,
                       "readOnlyRootFilesystem": True, "runAsGroup": 1337, "runAsNonRoot": True, "runAsUser": 1337}
# ... and the annotations the template adds for the plugin (the hello pod has none of its own).
ISTIO_CNI_ANNOTATIONS = {"sidecar.istio.io/interceptionMode": "REDIRECT",
                         "traffic.sidecar.istio.io/excludeInboundPorts": "15020",
                         "traffic.sidecar.istio.io/includeInboundPorts": "*",
                         "traffic.sidecar.istio.io/includeOutboundIPRanges": "*"}


def inject(pod: dict[str, Any], values: dict[str, Any], **kw: Any) -> dict[str, Any]:
    out = inject_pod(pod, settings(values=values, **kw))
    validate_pod(out)  # Kubernetes 1.29 and 1.33 schemas, strict
    return out


def with_annotations(**ann: str) -> dict[str, Any]:
    pod = hello_pod()
    pod["metadata"]["annotations"] = dict(ann)
    return pod


def status(pod: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(pod["metadata"]["annotations"]["sidecar.istio.io/status"])


def test_native_sidecars_get_istio_validation_first_exactly_as_istio() -> None:
    out = inject(hello_pod(), CNI)
    inits = out["spec"]["initContainers"]
    assert names(inits) == ["istio-validation", "istio-proxy"]
    v = inits[0]
    assert v["args"] == ISTIO_VALIDATION_ARGS
    assert v["securityContext"] == ISTIO_VALIDATION_SC
    assert v["image"] == named(inits, "istio-proxy")["image"]  # the proxy image runs istio-iptables
    assert "istio-init" not in names(inits)
    ann = out["metadata"]["annotations"]
    assert {k: ann[k] for k in ISTIO_CNI_ANNOTATIONS} == ISTIO_CNI_ANNOTATIONS
    assert "k8s.v1.cni.cncf.io/networks" not in ann  # provider default: no Multus
    assert "traffic.sidecar.istio.io/excludeOutboundIPRanges" not in ann  # `with`: empty values are left out
    assert status(out)["initContainers"] == ["istio-validation", "istio-proxy"]
    assert status(out)["containers"] is None


def test_classic_sidecars_put_istio_validation_before_the_users_inits() -> None:
    """Istio's reorderPod: the validation goes first to hold the user's init containers back (istio-init goes
    last, so they run before capture)."""
    pod = hello_pod()
    pod["spec"]["initContainers"] = [{"name": "migrate", "image": "busybox"}]
    out = inject(pod, CNI, kubernetes_version="1.29")
    assert names(out["spec"]["initContainers"]) == ["istio-validation", "migrate"]
    assert names(out["spec"]["containers"])[0] == "istio-proxy"  # hold: the proxy starts first
    assert status(out)["initContainers"] == ["istio-validation"]
    plain = inject(pod, {}, kubernetes_version="1.29")
    assert names(plain["spec"]["initContainers"]) == ["migrate", "istio-init"]


def test_without_cni_istio_init_is_unchanged() -> None:
    out = inject(hello_pod(), {"pilot": {"cni": {"enabled": False, "provider": "multus"}}})
    init = named(out["spec"]["initContainers"], "istio-init")
    assert init["securityContext"]["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert init["securityContext"]["runAsUser"] == 0
    assert "--run-validation" not in init["args"]
    assert not set(ISTIO_CNI_ANNOTATIONS) & set(out["metadata"]["annotations"]) - {"sidecar.istio.io/interceptionMode"}
    assert "k8s.v1.cni.cncf.io/networks" not in out["metadata"]["annotations"]


def test_user_proxy_run_as_becomes_the_validations_identity() -> None:
    """proxy-override-runas.yaml.cni.injected: -u 1234, runAsUser 1234, runAsGroup 4321."""
    pod = hello_pod()
    pod["spec"]["containers"].append({"name": "istio-proxy", "image": "auto",
                                      "securityContext": {"runAsUser": 1234, "runAsGroup": 4321}})
    v = named(inject(pod, CNI)["spec"]["initContainers"], "istio-validation")
    assert arg(v["args"], "-u") == "1234"
    assert v["securityContext"] == {**ISTIO_VALIDATION_SC, "runAsUser": 1234, "runAsGroup": 4321}


def test_tproxy_validation_stays_1337() -> None:
    """The template renders 1337 in TPROXY mode and adjustInitContainerUser leaves it there."""
    pod = with_annotations(**{"sidecar.istio.io/interceptionMode": "TPROXY"})
    pod["spec"]["containers"].append({"name": "istio-proxy", "image": "auto",
                                      "securityContext": {"runAsUser": 1234, "runAsGroup": 4321}})
    out = inject(pod, CNI)
    v = named(out["spec"]["initContainers"], "istio-validation")
    assert (v["securityContext"]["runAsUser"], v["securityContext"]["runAsGroup"]) == (1337, 1337)
    assert arg(v["args"], "-m") == "TPROXY"
    assert out["metadata"]["annotations"]["sidecar.istio.io/interceptionMode"] == "TPROXY"


def test_force_apply_and_native_nftables_in_cni_mode() -> None:
    """`--run-validation --skip-rule-apply` replace --force-apply; --native-nftables follows them (template order)."""
    values = {**CNI, "global": {"nativeNftables": True, "proxy_init": {"forceApplyIptables": True}}}
    v = named(inject(hello_pod(), values)["spec"]["initContainers"], "istio-validation")
    assert v["args"][-3:] == ["--run-validation", "--skip-rule-apply", "--native-nftables"]
    assert "--force-apply" not in v["args"]


@pytest.mark.parametrize("ann, want", [
    ({}, {}),
    ({"traffic.sidecar.istio.io/excludeInboundPorts": "8080"},
     {"traffic.sidecar.istio.io/excludeInboundPorts": "8080,15020"}),
    ({"traffic.sidecar.istio.io/excludeInboundPorts": "15020,8080"},
     {"traffic.sidecar.istio.io/excludeInboundPorts": "15020,8080"}),
    ({"status.sidecar.istio.io/port": "0"}, {"traffic.sidecar.istio.io/excludeInboundPorts": ""}),
    ({"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.1/32",
      "traffic.sidecar.istio.io/includeOutboundPorts": "5432", "traffic.sidecar.istio.io/excludeOutboundPorts": ""},
     {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.1/32",
      "traffic.sidecar.istio.io/includeOutboundPorts": "5432", "traffic.sidecar.istio.io/excludeOutboundPorts": ""}),
    # `{{ with }}` writes nothing for an empty value: the pod's own "" stays, not replaced by the values' '*'
    ({"traffic.sidecar.istio.io/includeOutboundIPRanges": ""},
     {"traffic.sidecar.istio.io/includeOutboundIPRanges": ""}),
    ({"traffic.sidecar.istio.io/kubevirtInterfaces": "net1", "traffic.sidecar.istio.io/excludeInterfaces": "eth9"},
     {"traffic.sidecar.istio.io/kubevirtInterfaces": "net1", "traffic.sidecar.istio.io/excludeInterfaces": "eth9"}),
])
def test_plugin_annotations_follow_the_template(ann: dict[str, str], want: dict[str, str]) -> None:
    out = inject(with_annotations(**ann), CNI)["metadata"]["annotations"]
    expected = {**ISTIO_CNI_ANNOTATIONS, **want}
    assert {k: out.get(k) for k in expected} == expected


def test_values_defaults_reach_the_plugin_annotations() -> None:
    values = {**CNI, "global": {"proxy": {"excludeIPRanges": "169.254.169.254/32", "excludeOutboundPorts": "25",
                                          "includeInboundPorts": "80,443"}}}
    ann = inject(hello_pod(), values)["metadata"]["annotations"]
    assert ann["traffic.sidecar.istio.io/excludeOutboundIPRanges"] == "169.254.169.254/32"
    assert ann["traffic.sidecar.istio.io/excludeOutboundPorts"] == "25"
    assert ann["traffic.sidecar.istio.io/includeInboundPorts"] == "80,443"
    assert "traffic.sidecar.istio.io/includeOutboundPorts" not in ann


@pytest.mark.parametrize("existing, want", [
    (None, "default/istio-cni"),                                                    # hello-cncf-networks
    ("alt_cni", "alt_cni, default/istio-cni"),                                      # hello-existing-cncf-networks
    ('[{"name": "alt_cni"}, {"name": "more_cni", "namespace": "kube-system"}]',   # ...-json
     '[{"name": "alt_cni"}, {"name": "more_cni", "namespace": "kube-system"}, '
     '{"name": "istio-cni", "namespace": "default"}]'),
])
def test_multus_network_annotation(existing: str | None, want: str) -> None:
    pod = with_annotations(**({"k8s.v1.cni.cncf.io/networks": existing} if existing is not None else {}))
    out = inject(pod, MULTUS)
    assert out["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == want
    assert inject(out, MULTUS) == out  # re-injection: appended once


# TestAppendMultusNetwork (Istio's network argument there is the bare "istio-cni").
APPEND_CASES = [
    ("", "istio-cni"),
    ("macvlan-conf-1", "macvlan-conf-1, istio-cni"),
    ("macvlan-conf-1, macvlan-conf-2", "macvlan-conf-1, macvlan-conf-2, istio-cni"),
    ('[{"name": "macvlan-conf-1"}]', '[{"name": "macvlan-conf-1"}, {"name": "istio-cni"}]'),
    ('[{"name": "macvlan-conf-1"}, {"name": "macvlan-conf-2"}]',
     '[{"name": "macvlan-conf-1"}, {"name": "macvlan-conf-2"}, {"name": "istio-cni"}]'),
    ('[\n {"name": "macvlan-conf-1", "another-field": "another-value"},\n {"name": "macvlan-conf-2"}\n ]',
     '[\n {"name": "macvlan-conf-1", "another-field": "another-value"},\n {"name": "macvlan-conf-2"}\n , '
     '{"name": "istio-cni"}]'),
    # not JSON (a trailing comma): left alone
    ('[\n {"name": "macvlan-conf-1"},\n {"name": "istio-cni", "config": "additional-config"},\n ]',
     '[\n {"name": "macvlan-conf-1"},\n {"name": "istio-cni", "config": "additional-config"},\n ]'),
    ('[{"name": "istio-cni"}]', '[{"name": "istio-cni"}]'),
    ("istio-cni", "istio-cni"),
    (" istio-cni ,x", " istio-cni ,x"),
]


@pytest.mark.parametrize("existing, want", APPEND_CASES)
def test_append_multus_network_as_istio(existing: str, want: str) -> None:
    got = cni.append_multus_network(existing, "istio-cni")
    assert got == want
    assert cni.append_multus_network(got, "istio-cni") == want  # idempotent


@pytest.mark.parametrize("existing", [
    '[{"name": "istio-cni", "namespace": "default"}]',
    '[null, {"name": "istio-cni", "namespace": "default"}]',
])
def test_append_multus_network_namespaced_already_there(existing: str) -> None:
    assert cni.append_multus_network(existing) == existing


@pytest.mark.parametrize("existing", ["[]", " [ ]\n", "[null]"])
def test_append_multus_network_to_an_empty_list_stays_json(existing: str) -> None:
    """Istio's splice before the last `]` would make `[, {...}]` of an empty list, which Multus cannot read."""
    got = cni.append_multus_network(existing)
    assert [n for n in json.loads(got) if n] == [{"name": "istio-cni", "namespace": "default"}]


@pytest.mark.parametrize("hostile", [
    "[" * 5000 + "]" * 5000,                       # deeper than any parser should go
    '[1, 2, {"name": "x"}]',                       # not a list of objects
    '{"networks": ["a"]}',                         # an object, not a list
    "[" + '{"name": "a"},' * 30000 + '{"name": "b"}]',  # long: bounded by the annotation limit anyway
    '[{"name": NaN}]',
    "]",
])
def test_hostile_multus_values_are_left_alone_or_appended_once(hostile: str) -> None:
    got = cni.append_multus_network(hostile)
    assert got == hostile or got.count("istio-cni") == 1
    if len(hostile) < 200_000:
        pod = with_annotations(**{"k8s.v1.cni.cncf.io/networks": hostile})
        out = inject_pod(pod, settings(values=MULTUS))  # never a traceback
        assert out["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == got


def test_native_nftables_is_refused_at_admission_naming_the_value() -> None:
    values = {"global": {"nativeNftables": True}}
    with pytest.raises(InjectionError, match=r"values\.global\.nativeNftables"):
        inject_pod(hello_pod(), settings(values=values))
    out = review(review_body(hello_pod()), settings(values=values))
    resp = out.response["response"]
    assert out.result == "error" and resp["allowed"] is False and "patch" not in resp
    message = resp["status"]["message"]
    assert "values.global.nativeNftables" in message and "\n" not in message and len(message) < 400


@pytest.mark.parametrize("values, pod", [
    ({"global": {"nativeNftables": False}}, hello_pod()),
    ({"global": {"nativeNftables": ""}}, hello_pod()),
    ({"global": {"nativeNftables": True}}, with_annotations(**{"sidecar.istio.io/interceptionMode": "NONE"})),
    ({"global": {"nativeNftables": True}, **CNI}, hello_pod()),
])
def test_native_nftables_is_fine_where_no_istio_init_gets_it(values: dict[str, Any], pod: dict[str, Any]) -> None:
    out = inject(pod, values)
    assert "istio-init" not in names(out["spec"].get("initContainers")) or "--native-nftables" not in named(
        out["spec"]["initContainers"], "istio-init")["args"]


def test_cni_injection_is_idempotent() -> None:
    pod = hello_pod()
    pod["spec"]["initContainers"] = [{"name": "migrate", "image": "busybox"}]
    for kv in ("1.29", "1.33"):
        once = inject(copy.deepcopy(pod), MULTUS, kubernetes_version=kv)
        assert inject(copy.deepcopy(once), MULTUS, kubernetes_version=kv) == once


GOLDEN_CASES: dict[str, dict[str, Any]] = {
    "hello-cni": {"values": CNI},
    "multus-override-classic": {"values": MULTUS, "kubernetes_version": "1.29"},
}


def test_every_cni_golden_input_has_a_case() -> None:
    assert golden_inputs(GOLDEN) == set(GOLDEN_CASES)


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_cni_goldens(case: str) -> None:
    check(GOLDEN / f"{case}.golden.yaml", render_golden(inject(golden_input(GOLDEN, case), **GOLDEN_CASES[case])))


VALIDATION_OVERLAY = """\
spec:
  initContainers:
  - name: istio-validation
    resources: {limits: {cpu: 50m}}
"""


def test_a_custom_template_overlays_istio_validation_as_ours() -> None:
    """A custom template (selected after `sidecar`) merges into the injected istio-validation; it is not taken for a
    user's container (nothing of it lands in proxy.istio.io/overrides) and re-injection stays stable."""
    s = settings(values=CNI, injector={"templates": {"limits": VALIDATION_OVERLAY}})
    pod = with_annotations(**{"inject.istio.io/templates": "sidecar,limits"})
    out = inject_pod(pod, s)
    validate_pod(out)
    v = named(out["spec"]["initContainers"], "istio-validation")
    assert v["resources"]["limits"]["cpu"] == "50m" and v["args"][-2:] == ["--run-validation", "--skip-rule-apply"]
    assert "proxy.istio.io/overrides" not in out["metadata"]["annotations"]
    assert inject_pod(copy.deepcopy(out), s) == out
