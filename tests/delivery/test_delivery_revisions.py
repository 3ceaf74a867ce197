"""Chart revisions and tags: a revisioned control plane beside the default one, and tags as istioctl makes them.

Expected shapes are Istio's chart (istio-discovery mutatingwebhook.yaml, revision-tags-mwc.yaml, revision-tags-svc.yaml)
and `istioctl tag set`: a revision's configuration has only the rev.namespace./rev.object. webhooks selecting
istio.io/rev=<revision>; a tag's istio-revision-tag-<tag> selects istio.io/rev=<tag> and calls its revision's
injector Service; the tag default also carries the default revision's namespace./object. webhooks.
"""
from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from delivery_chart import (
    CRD_KINDS,
    KUBE_VERSIONS,
    Rendered,
    RenderError,
    arg_map,
    container_by_name,
    lint,
    render,
    render_notes,
)

from webhook import revisions as R

CANARY = {"revision": "canary", "revisionTags": ["prod-canary", "default"]}
STABLE_TAGGED = {"revisionTags": ["prod-stable"]}


@pytest.fixture(scope="module")
def default(helm: Any) -> Rendered:
    return render(STABLE_TAGGED)


@pytest.fixture(scope="module")
def canary(helm: Any) -> Rendered:
    return render(CANARY, release="meshboot-canary")


def _key(doc: dict[str, Any]) -> tuple[str, str, str | None, str]:
    meta = doc["metadata"]
    return (doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else "", doc["kind"], meta.get("namespace"),
            meta["name"])


def _rendered_webhooks(r: Rendered, revision_of_service: dict[str, str]) -> list[R.Webhook]:
    out = []
    for mwc in r.all("MutatingWebhookConfiguration"):
        tag = mwc["metadata"]["labels"].get("istio.io/tag")
        for wh in mwc["webhooks"]:
            svc = wh["clientConfig"]["service"]
            assert (svc["namespace"], svc["path"], svc["port"]) == (r.namespace, "/inject", 443)
            out.append(R.Webhook(mwc["metadata"]["name"], wh["name"], revision_of_service[svc["name"]], tag,
                                 wh["namespaceSelector"], wh["objectSelector"]))
    return out


# ---- side by side -----------------------------------------------------------------------------------------------

def test_two_releases_share_no_object(default: Rendered, canary: Rendered) -> None:
    """Every object of the default release and of the canary (kind, namespace, name) is distinct: both install."""
    ours, theirs = {_key(d) for d in default.docs}, {_key(d) for d in canary.docs}
    assert len(ours) == len(default.docs) and len(theirs) == len(canary.docs)
    assert ours & theirs == set()
    # ...and a test that would see a clash: the same release twice does
    assert {_key(d) for d in render(CANARY, release="meshboot-canary").docs} & theirs


def test_revision_names_every_object_and_labels_it(canary: Rendered) -> None:
    for doc in canary.docs:
        meta = doc["metadata"]
        assert meta["labels"]["istio.io/rev"] == "canary", _key(doc)
        if doc["kind"] not in ("MutatingWebhookConfiguration",) and "revision-tag" not in meta["name"]:
            assert "meshboot-webhook-canary" in meta["name"], _key(doc)
    dep = canary.one("Deployment", "meshboot-webhook-canary")
    assert dep["spec"]["template"]["metadata"]["labels"]["istio.io/rev"] == "canary"
    values = canary.one("ConfigMap", "meshboot-webhook-canary-injector")["data"]["values"]
    assert '"revision": "canary"' in values
    args = arg_map(container_by_name(dep["spec"]["template"]["spec"], "webhook")["args"])
    assert args["service-name"] == "meshboot-webhook-canary"
    # CA_ADDR and discovery point at the revision's own Service
    assert '"caAddress": "meshboot-webhook-canary.istio-system.svc:15012"' in values


def test_default_release_is_unchanged_in_name(default: Rendered) -> None:
    assert default.one("Deployment")["metadata"]["name"] == "meshboot-webhook"
    assert default.one("MutatingWebhookConfiguration", "meshboot-sidecar-injector")["metadata"]["labels"][
        "istio.io/rev"] == "default"
    assert '"revision": ""' in default.one("ConfigMap", "meshboot-webhook-injector")["data"]["values"]


# ---- webhooks: Istio's selectors, as webhook/revisions.py models them ---------------------------------------------

def test_rendered_webhooks_are_the_routing_model(default: Rendered, canary: Rendered) -> None:
    """The chart's configurations, entries, selectors and target Services equal webhook.revisions.webhooks(), so the
    routing table tested there (and `meshboot-inject --explain`) is what the API server does with this chart."""
    services = {"meshboot-webhook": "default", "meshboot-webhook-canary": "canary"}
    got = _rendered_webhooks(default, services) + _rendered_webhooks(canary, services)
    cp = R.planes(["default", "canary"], {"prod-stable": "default", "prod-canary": "canary", "default": "canary"})
    want = R.webhooks(cp)
    key = lambda w: (w.configuration, w.name)  # noqa: E731
    assert sorted(got, key=key) == sorted(want, key=key)


def test_revision_has_only_the_revision_webhooks(canary: Rendered) -> None:
    mwc = canary.one("MutatingWebhookConfiguration", "meshboot-sidecar-injector-canary")
    assert [w["name"] for w in mwc["webhooks"]] == ["rev.namespace.sidecar-injector.istio.io",
                                                    "rev.object.sidecar-injector.istio.io"]
    assert mwc["webhooks"][0]["namespaceSelector"]["matchExpressions"][0] == {
        "key": "istio.io/rev", "operator": "In", "values": ["canary"]}
    assert {w["clientConfig"]["service"]["name"] for w in mwc["webhooks"]} == {"meshboot-webhook-canary"}
    # enableNamespacesByDefault is the default revision's (auto.): a revision never takes unlabelled namespaces
    r = render({**CANARY, "sidecarInjectorWebhook.enableNamespacesByDefault": True}, release="meshboot-canary")
    names = [w["name"] for w in r.one("MutatingWebhookConfiguration", "meshboot-sidecar-injector-canary")["webhooks"]]
    assert "auto.sidecar-injector.istio.io" not in names


def test_tag_configurations_as_istioctl_makes_them(canary: Rendered) -> None:
    prod = canary.one("MutatingWebhookConfiguration", "istio-revision-tag-prod-canary")
    assert prod["metadata"]["labels"]["istio.io/tag"] == "prod-canary"
    assert prod["metadata"]["labels"]["istio.io/rev"] == "canary"
    assert [w["name"] for w in prod["webhooks"]] == ["rev.namespace.sidecar-injector.istio.io",
                                                     "rev.object.sidecar-injector.istio.io"]
    assert {w["clientConfig"]["service"]["name"] for w in prod["webhooks"]} == {"meshboot-webhook-canary"}
    dflt = canary.one("MutatingWebhookConfiguration", "istio-revision-tag-default")
    assert [w["name"] for w in dflt["webhooks"]] == [
        "rev.namespace.sidecar-injector.istio.io", "rev.object.sidecar-injector.istio.io",
        "namespace.sidecar-injector.istio.io", "object.sidecar-injector.istio.io"]
    # a tag's Service keeps the unrevisioned name (it outlives a move) and selects the revision's pods
    svc = canary.one("Service", "meshboot-webhook-revision-tag-prod-canary")
    dep = canary.one("Deployment", "meshboot-webhook-canary")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert {p["name"] for p in svc["spec"]["ports"]} == {
        p["name"] for p in canary.one("Service", "meshboot-webhook-canary")["spec"]["ports"]}


def test_tag_configuration_name_outside_istio_system(helm: Any) -> None:
    r = render({"revision": "canary", "revisionTags": ["prod"]}, namespace="mesh")
    assert {m["metadata"]["name"] for m in r.all("MutatingWebhookConfiguration")} == {
        "meshboot-sidecar-injector-canary", "istio-revision-tag-prod-mesh"}


def test_server_keeps_the_ca_bundle_of_every_configuration(canary: Rendered) -> None:
    names = {m["metadata"]["name"] for m in canary.all("MutatingWebhookConfiguration")}
    args = arg_map(container_by_name(canary.one("Deployment")["spec"]["template"]["spec"], "webhook")["args"])
    assert set(str(args["webhook-config-name"]).split(",")) == names
    rule = [r for r in canary.one("ClusterRole")["rules"] if "mutatingwebhookconfigurations" in r["resources"]]
    assert len(rule) == 1 and set(rule[0]["resourceNames"]) == names
    # the tag's DNS name is in the CA's serving certificate
    assert "meshboot-webhook-revision-tag-prod-canary.istio-system.svc" in str(args["ca-dns-names"]).split(",")


def test_ca_bundle_reaches_tag_webhooks_in_other_modes(helm: Any, provided_certs: Any) -> None:
    ca_pem, _ = provided_certs
    r = render({**CANARY, "certificates.mode": "provided", "certificates.provided.secretName": "tls",
                "certificates.provided.caBundle": ca_pem.decode()}, release="meshboot-canary")
    for mwc in r.all("MutatingWebhookConfiguration"):
        assert all(w["clientConfig"].get("caBundle") for w in mwc["webhooks"]), mwc["metadata"]["name"]
    r = render({**CANARY, "certificates.mode": "cert-manager"}, release="meshboot-canary")
    for mwc in r.all("MutatingWebhookConfiguration"):
        assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
            "istio-system/meshboot-webhook-canary"


# ---- lint, validate, refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [CANARY, STABLE_TAGGED], ids=["canary", "stable-tagged"])
def test_lint_strict(helm: Any, values: dict[str, Any]) -> None:
    assert "0 chart(s) failed" in lint(values)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", [CANARY, STABLE_TAGGED, {**CANARY, "certificates.mode": "self-managed"}],
                         ids=["canary", "stable-tagged", "canary-self-managed"])
def test_every_document_validates(helm: Any, values: dict[str, Any], kube_version: str) -> None:
    r = render(values, kube_version=kube_version)
    assert r.all("MutatingWebhookConfiguration")
    for doc in r.docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{kube_version}: {doc['kind']}/{doc['metadata']['name']}: "
                        f"{'.'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize(("values", "needle"), [
    ({"revision": "default"}, "revision=default: the default revision is the one installed without a revision"),
    ({"revision": "canary", "revisionTags": ["canary"]}, 'tag "canary" is the name of this revision'),
    ({"revisionTags": ["default"]}, "tag default on the unrevisioned release"),
    ({"revision": "Canary"}, "revision"),
    ({"revisionTags": ["prod", "prod"]}, "revisionTags"),
    ({"revisionTags": ["-x"]}, "revisionTags"),
])
def test_bad_revision_values_are_refused(helm: Any, values: dict[str, Any], needle: str) -> None:
    with pytest.raises(RenderError, match=needle.replace("(", r"\(")):
        render(values)


def test_notes_name_the_revision_and_its_label(helm: Any) -> None:
    notes = render_notes(CANARY)
    assert "MutatingWebhookConfiguration/meshboot-sidecar-injector-canary" in notes
    assert "kubectl label namespace <ns> istio-injection- istio.io/rev=canary --overwrite" in notes
    assert "istio-injection=enabled" not in notes
    assert "kubectl label namespace <ns> istio-injection=enabled --overwrite" in render_notes({})
