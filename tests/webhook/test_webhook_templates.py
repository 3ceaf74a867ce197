"""Injection templates (`inject.istio.io/templates`): the built-ins (sidecar, gateway, grpc-simple), custom templates
from the injector config, their selection, refusals and bounds. Expected values are those of Istio's gateway,
grpc-simple, custom-template and spire goldens (pkg/kube/inject/testdata/inject)."""
from __future__ import annotations

import base64
import copy
import itertools
import json
from typing import Any

import jsonpatch
import pytest
import yaml
from webhook_fixtures import review_body, settings, validate_pod

from testing.golden import TESTDATA, check
from webhook import templates as tpl_mod
from webhook.admission import review
from webhook.config import build_settings
from webhook.errors import ConfigError, InjectionError
from webhook.inject import inject_pod

INJECT = TESTDATA / "inject" / "templates"

# Written for these tests in the shape of Istio's custom-template and spire test configs.
CUSTOM = """\
metadata:
  annotations:
    prometheus.istio.io/merge-metrics: "false"
    sidecar.istio.io/rewriteAppHTTPProbers: "false"
    foo: bar
spec:
  containers:
  {{- range $i, $c := .Spec.Containers }}
  - name: {{ $c.Name }}
    env:
    - {name: SOME_ENV, value: "true"}
    - {name: SOME_FILE, value: /var/lib/data/foo.json}
    volumeMounts:
    - {mountPath: /var/lib/data/foo.json, subPath: foo.json, name: some-injected-file}
  {{- end }}
  volumes:
  - name: some-injected-file
    downwardAPI:
      items:
      - path: foo.json
        fieldRef: {fieldPath: "metadata.annotations['foo']"}
"""
SPIRE = """\
spec:
  containers:
  - name: istio-proxy
    volumeMounts:
    - {name: workload-socket, mountPath: /var/run/secrets/workload-spiffe-uds, readOnly: true}
  volumes:
  - name: workload-socket
    csi: {driver: csi.spiffe.io, readOnly: true}
"""
TEMPLATES = {"injector": {"templates": {"custom": CUSTOM, "spire": SPIRE}}}
NO_HOLD = {"global": {"proxy": {"holdApplicationUntilProxyStarts": False}}}
CASES: dict[str, dict[str, Any]] = {
    "gateway": {"values": NO_HOLD},
    "gateway-with-default-container": {"values": NO_HOLD},
    "grpc-simple": {},
    "grpc-agent": {"values": NO_HOLD},
    "custom-template": TEMPLATES,
    "sidecar-spire": TEMPLATES,
    "gateway-spire": TEMPLATES,
}


def decode_patch(resp: dict[str, Any]) -> list[Any]:
    assert resp["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(resp["patch"]))


def _pod(case: str) -> dict[str, Any]:
    return yaml.safe_load((INJECT / f"{case}.yaml").read_text())


def _render(pod: dict[str, Any]) -> str:
    return yaml.safe_dump(pod, sort_keys=True, width=120, default_flow_style=False)


def _proxy(pod: dict[str, Any]) -> dict[str, Any]:
    spec = pod["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == "istio-proxy")


def _env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in c.get("env") or []}


def test_every_input_has_a_case() -> None:
    assert {p.name.removesuffix(".yaml") for p in INJECT.glob("*.yaml") if ".golden." not in p.name} == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_template_golden_idempotent_and_valid(case: str) -> None:
    s = settings(**copy.deepcopy(CASES[case]))
    out = inject_pod(_pod(case), s)
    check(INJECT / f"{case}.golden.yaml", _render(out))
    assert inject_pod(out, s) == out          # re-injection changes nothing
    validate_pod(out)


def test_gateway_shape_as_istio() -> None:
    """Istio's gateway golden: `proxy router`, no istio-init, only istio-proxy in containers, 1337, readiness on
    15021 without a startup probe, no app probers, no tlsMode label, the unprivileged-port sysctl."""
    out = inject_pod(_pod("gateway"), settings(values=NO_HOLD))
    spec, meta = out["spec"], out["metadata"]
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["istio-proxy"]
    proxy = spec["containers"][0]
    assert proxy["args"][:4] == ["proxy", "router", "--domain", "$(POD_NAMESPACE).svc.cluster.local"]
    assert proxy["image"] == "ghcr.io/meshboot/meshboot-agent:0.1.0"       # image: auto resolved
    assert proxy["imagePullPolicy"] == "IfNotPresent"                       # the user's field kept
    assert proxy["securityContext"] == {"runAsGroup": 1337, "runAsUser": 1337}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert "startupProbe" not in proxy and "lifecycle" not in proxy and "resources" not in proxy
    env = _env(proxy)
    assert env["ISTIO_META_WORKLOAD_NAME"] == "istio-ingressgateway"
    assert env["ISTIO_META_OWNER"] == ("kubernetes://apis/apps/v1/namespaces/istio-ingress/deployments/"
                                       "istio-ingressgateway")
    assert env["ISTIO_META_APP_CONTAINERS"] is None and "ISTIO_KUBE_APP_PROBERS" not in env
    names = [e["name"] for e in proxy["env"]]
    assert names.index("GOMEMLIMIT") < names.index("ISTIO_META_APP_CONTAINERS")
    assert spec["securityContext"]["sysctls"] == [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    assert "istio-ca-crl" not in [v["name"] for v in spec["volumes"]]
    assert "security.istio.io/tlsMode" not in meta["labels"]
    assert meta["labels"]["service.istio.io/canonical-name"] == "istio-ingressgateway"
    assert "kubectl.kubernetes.io/default-container" not in meta["annotations"]
    assert json.loads(meta["annotations"]["sidecar.istio.io/status"]) == {
        "initContainers": None, "containers": ["istio-proxy"], "imagePullSecrets": None, "revision": "default",
        "volumes": ["workload-socket", "credential-socket", "workload-certs", "istio-envoy", "istio-data",
                    "istio-podinfo", "istio-token", "istiod-ca-cert"]}


def test_gateway_native_setting_keeps_proxy_in_containers_and_hold_puts_it_first() -> None:
    pod = _pod("gateway-with-default-container")
    out = inject_pod(pod, settings(native_sidecars="true"))     # meshboot's default: hold on
    assert [c["name"] for c in out["spec"]["containers"]] == ["istio-proxy", "httpbin"]
    assert "initContainers" not in out["spec"]
    assert out["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "istio-proxy"
    assert _env(_proxy(out))["ISTIO_META_APP_CONTAINERS"] == "httpbin"


def test_gateway_values_security_context_replaces_the_sysctl() -> None:
    values = {"gateways": {"securityContext": {"runAsNonRoot": True}}}
    out = inject_pod(_pod("gateway"), settings(values=values))
    assert out["spec"]["securityContext"] == {"runAsNonRoot": True}


def test_grpc_simple_as_istio() -> None:
    out = inject_pod(_pod("grpc-simple"), settings())
    spec, ann = out["spec"], out["metadata"]["annotations"]
    assert [c["name"] for c in spec["initContainers"]] == ["grpc-bootstrap-init"]
    assert _env(spec["containers"][0])["GRPC_XDS_BOOTSTRAP"] == "/var/lib/grpc/data/bootstrap.json"
    assert spec["containers"][0]["readinessProbe"] == {"httpGet": {"port": 80}}      # not rewritten
    assert _env(spec["initContainers"][0])["ISTIO_NAMESPACE"] == "istio-system\n"
    assert ann["sidecar.istio.io/rewriteAppHTTPProbers"] == "false"
    assert ann["prometheus.io/port"] == "15020"        # Istio's prometheus merge runs for every template
    assert "istio.io/rev" not in ann and "service.istio.io/canonical-name" not in out["metadata"]["labels"]
    assert json.loads(ann["proxy.istio.io/overrides"])["containers"][0]["name"] == "traffic"


def test_custom_template_as_istio() -> None:
    out = inject_pod(_pod("custom-template"), settings(**TEMPLATES))
    hello = out["spec"]["containers"][0]
    assert _env(hello) == {"SOME_ENV": "true", "SOME_FILE": "/var/lib/data/foo.json"}
    assert hello["readinessProbe"] == {"httpGet": {"port": 80}}
    ann = out["metadata"]["annotations"]
    assert ann["foo"] == "bar" and "prometheus.io/port" not in ann
    assert json.loads(ann["sidecar.istio.io/status"])["containers"] == ["hello"]


def test_spire_overlay_reaches_the_native_proxy() -> None:
    """Istio's spire golden (native) gains a second, image-less istio-proxy in containers, which the API server
    refuses; meshboot merges the overlay into the one istio-proxy."""
    out = inject_pod(_pod("sidecar-spire"), settings(**TEMPLATES))
    assert [c["name"] for c in out["spec"]["containers"]] == ["hello"]
    mount = next(m for m in _proxy(out)["volumeMounts"] if m["name"] == "workload-socket")
    assert mount["readOnly"] is True
    vol = next(v for v in out["spec"]["volumes"] if v["name"] == "workload-socket")
    assert vol == {"name": "workload-socket", "csi": {"driver": "csi.spiffe.io", "readOnly": True}}


@pytest.mark.parametrize(("value", "message"), [
    ("nope", "annotation inject.istio.io/templates: requested template 'nope' not found; have custom, gateway, "
             "grpc-agent, grpc-simple, sidecar, spire"),
    ("sidecar, nope", "requested template 'nope' not found"),
    ("", "requested template '' not found"),
    ("waypoint", "template 'waypoint': ambient mode is not supported by meshboot"),
    ("sidecar,gateway", "templates sidecar and gateway each render istio-proxy; select one of them"),
    (",".join(["sidecar"] * 17), "more than 16 templates"),
])
def test_template_selection_refused(value: str, message: str) -> None:
    pod = _pod("grpc-simple")
    pod["metadata"]["annotations"]["inject.istio.io/templates"] = value
    with pytest.raises(InjectionError, match="failed to run injection template") as e:
        inject_pod(pod, settings(**TEMPLATES))
    assert message in str(e.value)


def test_repeated_and_aliased_templates() -> None:
    """Istio tolerates `sidecar,sidecar,sidecar`; aliases expand to their templates."""
    pod = _pod("sidecar-spire")
    pod["metadata"]["annotations"]["inject.istio.io/templates"] = "sidecar,sidecar,sidecar"
    once = _pod("sidecar-spire")
    del once["metadata"]["annotations"]["inject.istio.io/templates"]
    a, b = inject_pod(pod, settings()), inject_pod(once, settings())
    del a["metadata"]["annotations"]["inject.istio.io/templates"]
    assert a == b
    s = settings(injector={"templates": {"spire": SPIRE}, "aliases": {"spiffe": ["sidecar", "spire"]}})
    pod["metadata"]["annotations"]["inject.istio.io/templates"] = "spiffe"
    assert inject_pod(pod, s)["spec"]["volumes"][0]["csi"]["driver"] == "csi.spiffe.io"


def test_default_templates_from_the_injector_config() -> None:
    pod = _pod("sidecar-spire")
    del pod["metadata"]["annotations"]["inject.istio.io/templates"]
    s = settings(injector={"templates": {"spire": SPIRE}, "defaultTemplates": ["sidecar", "spire"]})
    assert inject_pod(pod, s)["spec"]["volumes"][0]["csi"]["driver"] == "csi.spiffe.io"


def test_istio_configmap_builtin_texts_are_skipped() -> None:
    """An Istio injector ConfigMap carries every built-in's Go template text: meshboot renders those in code."""
    s = build_settings(injector={"templates": {"sidecar": "{{ define \"x\" }}", "gateway": "{{ toYaml . }}",
                                               "grpc-agent": "{{ x }}", "waypoint": "{{ x }}", "custom": CUSTOM}})
    assert set(s.templates) == {"custom", "grpc-simple"}


@pytest.mark.parametrize(("templates", "message"), [
    ({"bad": "{{ toYaml .Values }}"}, "{{toYaml .Values}}: toYaml is not available to custom templates"),
    ({"bad": "{{ \"unterminated }}"}, "cannot read this expression"),
    ({"bad": "{{ define \"x\" }}{{ end }}"}, "'define' is not supported"),
    ({"bad": "{{ $x := 1 }}"}, "not supported"),
    ({"bad": "{{ .Spec.Volumes }}"}, ".Spec.Volumes is not available to custom templates"),
    ({"bad": "{{ range .Spec.Containers }}x{{ end }}"}, "only `range [$i,] $c := .Spec.Containers`"),
    ({"bad": "{{ if .Revision }}x"}, "missing {{end}}"),
    ({"bad": "x {{ end }}"}, "unexpected end"),
    ({"bad": "{{ $c.Name }}"}, "undefined variable $c"),
    ({"bad": "{{ .Revision "}, "unclosed {{"),
    ({"Bad Name": "x"}, "is not a template name"),
    ({"bad": ["x"]}, "want the template text as a string"),
    ({"bad": "x" * (64 * 1024 + 1)}, "larger than 65536 bytes"),
    ({f"t{i}": "x" for i in range(33)}, "more than 32 templates"),
    ("not-a-map", "templates: want a map"),
    ({"bad": "{{ " + "(" * 3000 + ".Revision" + ")" * 3000 + " }}"}, "nested deeper than 32 levels"),
    ({"bad": "{{ range $c := .Spec.Containers }}" * 600 + "{{ end }}" * 600}, "nested deeper than 32 levels"),
    ({"bad": "{{ if .Revision }}" * 40 + "{{ end }}" * 40}, "nested deeper than 32 levels"),
    ({"bad": "{{ .Revision" + " | lower" * 5000 + " }}"}, "nested deeper than 32 levels"),
    ({"bad": '{{ "\\q" }}'}, "cannot read the string"),
])
def test_custom_templates_refused_at_load(templates: Any, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_settings(injector={"templates": templates})
    assert message in str(e.value)
    assert "custom template" in str(e.value) or "templates" in str(e.value)


@pytest.mark.parametrize(("injector", "message"), [
    ({"defaultTemplates": ["nope"]}, "defaultTemplates: 'nope' is not a template"),
    ({"defaultTemplates": "sidecar"}, "defaultTemplates: want a list"),
    ({"aliases": {"a": ["nope"]}}, "aliases: 'nope' is not a template"),
    ({"aliases": {"a": "sidecar"}}, "aliases: want a map"),
])
def test_template_config_refused_at_load(injector: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="injector config") as e:
        build_settings(injector=injector)
    assert message in str(e.value)


TENANT = """\
metadata:
  annotations:
    echo: {{ index .ObjectMeta.Annotations "tenant" }}
"""
TENANT_QUOTED = """\
metadata:
  annotations:
    echo: {{ index .ObjectMeta.Annotations "tenant" | quote }}
    who: {{ .ObjectMeta.Name }}-{{ .DeploymentMeta.Kind | lower }}
spec:
  containers:
  {{- range $c := .Spec.Containers }}{{ if ne $c.Name "istio-proxy" }}
  - name: {{ $c.Name }}
    env: [{name: IMG, value: {{ $c.Image | quote }}}]
  {{- end }}{{ end }}
"""


@pytest.mark.parametrize("value", ["x\nlabels: {a: b}", "x: y", "a #b", "{a: 1}", "'q'", "-", "=", "@x", "---",
                                   "...", "x:", ":x"])
def test_tenant_values_cannot_add_yaml_structure(value: str) -> None:
    pod = _pod("grpc-simple")
    pod["metadata"]["annotations"].update({"inject.istio.io/templates": "t", "tenant": value})
    with pytest.raises(InjectionError, match=r"template 't': the value .* is not plain text; the template must "
                                             r"pipe it to quote"):
        inject_pod(pod, settings(injector={"templates": {"t": TENANT}}))
    pod["metadata"]["annotations"]["inject.istio.io/templates"] = "q"
    out = inject_pod(pod, settings(injector={"templates": {"q": TENANT_QUOTED}}))
    ann = out["metadata"]["annotations"]
    assert ann["echo"] == value and ann["who"] == "grpc-pod"
    assert _env(out["spec"]["containers"][0])["IMG"] == "fake.docker.io/google-samples/traffic-go-gke:1.0"
    assert out["metadata"]["labels"] == {"app": "grpc"}
    validate_pod(out)


@pytest.mark.parametrize(("text", "message"), [
    ("spec: [1]", "spec: want a mapping"),
    ("kind: Pod", "want a mapping with only metadata and spec"),
    ("metadata: {name: x}", "metadata: only labels and annotations may be set"),
    ("metadata: {labels: {a: 1}}", "metadata.labels: want a map of strings"),
    ("spec: {containers: [{image: x}]}", "spec.containers: want a list of objects, each with a name"),
    ("a: [", "not valid YAML"),
])
def test_rendered_template_checked(text: str, message: str) -> None:
    pod = _pod("grpc-simple")
    pod["metadata"]["annotations"]["inject.istio.io/templates"] = "t"
    with pytest.raises(InjectionError, match="failed to run injection template: template 't'") as e:
        inject_pod(pod, settings(injector={"templates": {"t": text}}))
    assert message in str(e.value)


def test_what_passes_as_plain_text_stays_one_yaml_scalar() -> None:
    """Every short value the unquoted check lets through reads back as one scalar (never a list, a map, a tag or a
    syntax error) after a key, as a list item, on a line of its own, in flow style and inside double quotes."""
    alphabet = "a0_./@+=-:"
    for n in range(1, 4):
        for chars in itertools.product(alphabet, repeat=n):
            v = "".join(chars)
            if not tpl_mod.plain_text(v):
                continue
            for doc, pick in ((f"k: {v}", lambda d: d["k"]), (f"- {v}", lambda d: d[0]), (v, lambda d: d),
                              (f"{{k: {v}, j: 1}}", lambda d: d["k"]), (f"[{v}, 1]", lambda d: d[0]),
                              (f'k: "{v}"', lambda d: d["k"])):
                assert not isinstance(pick(yaml.safe_load(doc)), (dict, list)), doc


def test_an_image_prints_unquoted_as_in_istios_templates() -> None:
    """Istio's templates write `image: "{{ .ProxyImage }}"`: an image's `:` (not first or last) is plain text."""
    pod = _pod("grpc-simple")
    pod["metadata"]["annotations"]["inject.istio.io/templates"] = "t"
    text = 'spec:\n  containers:\n  - name: extra\n    image: "{{ .ProxyImage }}"\n    args: [{{ .ProxyImage }}]\n'
    out = inject_pod(pod, settings(injector={"templates": {"t": text}}))
    extra = next(c for c in out["spec"]["containers"] if c["name"] == "extra")
    assert extra["image"] == extra["args"][0] == "ghcr.io/meshboot/meshboot-agent:0.1.0"


def test_index_with_a_key_that_is_not_text_is_refused() -> None:
    pod = _pod("grpc-simple")
    pod["metadata"]["annotations"]["inject.istio.io/templates"] = "t"
    text = "metadata:\n  labels:\n    k: {{ index .ObjectMeta.Labels .ObjectMeta.Annotations }}\n"
    with pytest.raises(InjectionError, match="template 't': index: the key must be a string"):
        inject_pod(pod, settings(injector={"templates": {"t": text}}))


def test_rendered_output_bounded() -> None:
    pod = _pod("grpc-simple")
    pod["metadata"]["annotations"]["inject.istio.io/templates"] = "t"
    pod["spec"]["containers"] = [{"name": f"c{i}", "image": "x"} for i in range(10)]
    text = "{{ range $c := .Spec.Containers }}#" + "x" * 60_000 + "\n{{ end }}"
    with pytest.raises(InjectionError, match="template 't': rendered output larger than 524288 bytes"):
        inject_pod(pod, settings(injector={"templates": {"t": text}}))


def test_rendering_is_bounded_per_pod_not_per_template() -> None:
    """A pod selecting one template 16 times (or through aliases, 16 x 16): the bounds hold for all its renders
    together, else one pod bought 16-256 times a template's bounded cost (seconds per admission)."""
    pod = _pod("grpc-simple")
    pod["metadata"]["annotations"]["inject.istio.io/templates"] = ",".join(["t"] * 16)
    text = "metadata:\n  annotations:\n    a: " + "x" * 60_000 + "\n"
    inject_pod(_pod("grpc-simple") | {"metadata": {**pod["metadata"], "annotations": {
        "inject.istio.io/templates": "t,t,t,t"}}}, settings(injector={"templates": {"t": text}}))
    with pytest.raises(InjectionError, match="template 't': rendered output larger than 524288 bytes"):
        inject_pod(pod, settings(injector={"templates": {"t": text}}))
    steps = "{{ range $a := .Spec.Containers }}{{ range $b := .Spec.Containers }}{{ end }}{{ end }}"
    pod["spec"]["containers"] = [{"name": f"c{i}", "image": "x"} for i in range(100)]
    with pytest.raises(InjectionError, match="template 't': more than 100000 template steps"):
        inject_pod(pod, settings(injector={"templates": {"t": steps}}))


def test_gateway_admitted_through_the_admission_review() -> None:
    """The gateway Deployment's pod was denied ("the pod has no application container"); now it is patched into the
    gateway shape. An unknown template is denied with the message naming the annotation."""
    pod = _pod("gateway")
    s = settings()
    doc = review(review_body(pod, namespace="istio-ingress"), s).response["response"]
    assert doc["allowed"] is True
    patched = jsonpatch.apply_patch(pod, decode_patch(doc))
    assert patched == inject_pod(pod, s, namespace="istio-ingress")
    assert _proxy(patched)["args"][1] == "router"
    validate_pod(patched)
    pod["metadata"]["annotations"]["inject.istio.io/templates"] = "gatewya"
    doc = review(review_body(pod, namespace="istio-ingress"), s).response["response"]
    assert doc["allowed"] is False
    assert doc["status"]["message"].startswith("failed to run injection template: annotation "
                                               "inject.istio.io/templates: requested template 'gatewya' not found")


def test_render_work_bounded() -> None:
    """Nested ranges over a tenant's many containers: refused after a bounded number of steps, quickly."""
    pod = _pod("grpc-simple")
    pod["metadata"]["annotations"]["inject.istio.io/templates"] = "t"
    pod["spec"]["containers"] = [{"name": f"c{i}", "image": "x"} for i in range(400)]
    text = "{{ range $a := .Spec.Containers }}{{ range $b := .Spec.Containers }}{{ end }}{{ end }}"
    with pytest.raises(InjectionError, match="template 't': more than 100000 template steps"):
        inject_pod(pod, settings(injector={"templates": {"t": text}}))


@pytest.mark.parametrize(("kw", "check_"), [
    ({"values": {"revision": "canary"}},
     lambda p, s: _env(s)["CA_ADDR"] == "istiod-canary.istio-system.svc:15012"
     and p["metadata"]["annotations"]["istio.io/rev"] == "canary"),
    ({"values": {"global": {"imagePullPolicy": "Always", "imagePullSecrets": ["reg"]}}},
     lambda p, s: p["spec"]["imagePullSecrets"] == [{"name": "reg"}] and s["imagePullPolicy"] == "IfNotPresent"),
    ({"values": {"global": {"mountMtlsCerts": True}}},
     lambda p, s: {"name": "istio-certs", "secret": {"optional": True, "secretName": "istio.istio-ingressgateway"}}
     in p["spec"]["volumes"]),
    ({"values": {"global": {"proxy": {"lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}}}}}},
     lambda p, s: s["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "5"]}}}),
    ({"annotations": {"sidecar.istio.io/proxyImage": "example.io/gw:1"}}, lambda p, s: s["image"] == "example.io/gw:1"),
    ({"annotations": {"sidecar.istio.io/bootstrapOverride": "custom-bs"}},
     lambda p, s: _env(s)["ISTIO_BOOTSTRAP_OVERRIDE"] == "/etc/istio/custom-bootstrap/custom_bootstrap.json"
     and {"configMap": {"name": "custom-bs"}, "name": "custom-bootstrap-volume"} in p["spec"]["volumes"]),
    ({"annotations": {"proxy.istio.io/config": "proxyMetadata: {ISTIO_META_DNS_CAPTURE: 'true'}"}},
     lambda p, s: _env(s)["ISTIO_META_DNS_CAPTURE"] == "true" and "initContainers" not in p["spec"]),
    ({"annotations": {"sidecar.istio.io/interceptionMode": "TPROXY"}},
     lambda p, s: s["securityContext"] == {"runAsGroup": 1337, "runAsUser": 1337}
     and _env(s)["ISTIO_META_INTERCEPTION_MODE"] == "REDIRECT"),   # Istio's gateway reads the ProxyConfig only
])
def test_gateway_options(kw: dict[str, Any], check_: Any) -> None:
    pod = _pod("gateway")
    pod["metadata"]["annotations"].update(kw.get("annotations", {}))
    out = inject_pod(pod, settings(values=copy.deepcopy(kw.get("values"))))
    assert check_(out, _proxy(out))
    assert inject_pod(out, settings(values=copy.deepcopy(kw.get("values")))) == out
    validate_pod(out)


@pytest.mark.parametrize("overrides", ['{"containers": null}', '{"initContainers": []}', None])
def test_template_touching_a_user_container_with_overrides_present(overrides: str | None) -> None:
    """The tenant's own proxy.istio.io/overrides (valid, odd) and a template's: one clear outcome, never a crash."""
    pod = _pod("custom-template")
    if overrides is not None:
        pod["metadata"]["annotations"]["proxy.istio.io/overrides"] = overrides
    out = inject_pod(pod, settings(**TEMPLATES))
    saved = json.loads(out["metadata"]["annotations"]["proxy.istio.io/overrides"])
    assert [c["name"] for c in saved["containers"]] == ["hello"]
    bad = "metadata:\n  annotations:\n    proxy.istio.io/overrides: '[1'\n" + CUSTOM.split("\n", 5)[-1]
    with pytest.raises(InjectionError, match=r"annotation proxy\.istio\.io/overrides: want a JSON object"):
        inject_pod(_pod("custom-template"), settings(injector={"templates": {"custom": bad}}))
