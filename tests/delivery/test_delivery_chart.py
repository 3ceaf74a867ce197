"""The Helm chart: lints, renders with default and non-default values, validates against the Kubernetes 1.29 and
1.33 schemas, and has the webhook configuration, RBAC, Deployment and injection values the issue asks for."""
from __future__ import annotations

import base64
import json
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
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

from meshboot import constants as C
from meshboot import pki

ISTIOD = C.DEFAULT_CA_ADDR


def scenarios(provided: tuple[bytes, pki.KeyPair]) -> dict[str, dict[str, Any]]:
    """Value sets covering every template branch: certificate modes, HPA, PDB flavours, istiod, names."""
    ca_pem, pair = provided
    return {
        "default": {},
        "cert-manager-hpa": {"certificates.mode": "cert-manager", "autoscaling.enabled": True,
                             "podDisruptionBudget.minAvailable": 1, "podDisruptionBudget.maxUnavailable": None},
        "provided-inline": {"certificates.mode": "provided", "webhook.replicaCount": 2,
                            "certificates.provided.tlsCrt": pair.chain_pem.decode(),
                            "certificates.provided.tlsKey": pair.key_pem.decode(),
                            "certificates.provided.caBundle": ca_pem.decode()},
        "provided-secret": {"certificates.mode": "provided", "certificates.provided.secretName": "my-tls",
                            "certificates.provided.caBundle": ca_pem.decode(),
                            "certificates.certManager.issuerRef": {"kind": "ClusterIssuer", "name": "x"}},
        "istiod": {"istiod.address": ISTIOD},
        "self-managed": {"certificates.mode": "self-managed"},
        "renamed": {"fullnameOverride": "injector", "mutatingWebhook.failurePolicy": "Ignore",
                    "mutatingWebhook.timeoutSeconds": 5, "sidecarInjectorWebhook.enableNamespacesByDefault": True,
                    "global.hub": "registry.example.com/mesh", "global.tag": "1.2.3",
                    "global.imagePullSecrets": ["regcred"], "podDisruptionBudget.enabled": False,
                    "serviceAccount.create": False, "serviceAccount.name": "existing-sa",
                    "ca.extraDNSNames": ["ca.example.com"], "webhook.env": {"EXTRA": "1"}},
    }


@pytest.fixture(scope="module")
def all_values(provided_certs: tuple[bytes, pki.KeyPair]) -> dict[str, dict[str, Any]]:
    return scenarios(provided_certs)


@pytest.fixture(scope="module")
def default(helm: Any) -> Rendered:
    return render()


def _workload(r: Rendered) -> tuple[dict[str, Any], dict[str, Any]]:
    dep = r.one("Deployment")
    return dep, container_by_name(dep["spec"]["template"]["spec"], "webhook")


# ---- lint, render, validate ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["default", "cert-manager-hpa", "provided-inline", "provided-secret", "istiod",
                                  "self-managed", "renamed"])
def test_lint_strict(helm: Any, all_values: dict[str, dict[str, Any]], name: str) -> None:
    out = lint(all_values[name])
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", ["default", "cert-manager-hpa", "provided-inline", "provided-secret", "istiod",
                                  "self-managed", "renamed"])
def test_every_document_validates(helm: Any, all_values: dict[str, dict[str, Any]], name: str,
                                  kube_version: str) -> None:
    namespace = "mesh-system" if name == "renamed" else "istio-system"
    r = render(all_values[name], kube_version=kube_version, namespace=namespace)
    kinds = set()
    for doc in r.docs:
        kinds.add(doc["kind"])
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} @ {kube_version}: {doc['kind']}/{doc['metadata']['name']}: "
                        f"{'.'.join(map(str, e.path))}: {e.message}")
        # Namespaced objects land in the release namespace.
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"):
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]
    assert {"Deployment", "Service", "ConfigMap", "ClusterRole", "ClusterRoleBinding",
            "MutatingWebhookConfiguration"} <= kinds


def test_validation_would_catch_a_broken_document(default: Rendered) -> None:
    """The validator is strict: a misspelt field in the rendered Deployment is rejected (so the test above can fail)."""
    dep = json.loads(json.dumps(default.one("Deployment")))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBE_VERSIONS[0], strict=True)


def test_optional_objects_follow_values(helm: Any, all_values: dict[str, dict[str, Any]]) -> None:
    d = render(all_values["default"])
    assert d.has("PodDisruptionBudget") and not d.has("HorizontalPodAutoscaler") and not d.has("Secret")
    assert d.has("ServiceAccount") and not d.has("Certificate")
    cm = render(all_values["cert-manager-hpa"])
    assert cm.has("HorizontalPodAutoscaler") and cm.has("Certificate") and cm.has("Issuer")
    assert "replicas" not in cm.one("Deployment")["spec"], "the HPA owns the replica count"
    assert render(all_values["provided-inline"]).has("Secret")
    assert not render(all_values["provided-secret"]).has("Secret")
    renamed = render(all_values["renamed"], namespace="mesh-system")
    assert not renamed.has("PodDisruptionBudget") and not renamed.has("ServiceAccount")


# ---- MutatingWebhookConfiguration (reference/injection.md section 7) ------------------------------------------

def _exprs(sel: dict[str, Any]) -> set[tuple[str, str, tuple[str, ...]]]:
    return {(e["key"], e["operator"], tuple(e.get("values", ()))) for e in sel["matchExpressions"]}


def test_webhook_configuration_is_istios_default_revision_shape(default: Rendered) -> None:
    mwc = default.one("MutatingWebhookConfiguration")
    hooks = {w["name"]: w for w in mwc["webhooks"]}
    assert list(hooks) == ["rev.namespace.sidecar-injector.istio.io", "rev.object.sidecar-injector.istio.io",
                           "namespace.sidecar-injector.istio.io", "object.sidecar-injector.istio.io"]
    ns = hooks["namespace.sidecar-injector.istio.io"]
    assert _exprs(ns["namespaceSelector"]) == {(C.LABEL_INJECTION_NS, "In", ("enabled",))}
    assert _exprs(ns["objectSelector"]) == {(C.LABEL_INJECT, "NotIn", ("false",))}
    obj = hooks["object.sidecar-injector.istio.io"]
    assert _exprs(obj["objectSelector"]) == {(C.LABEL_INJECT, "In", ("true",)), (C.LABEL_REV, "DoesNotExist", ())}
    assert _exprs(obj["namespaceSelector"]) == {(C.LABEL_INJECTION_NS, "DoesNotExist", ()),
                                                (C.LABEL_REV, "DoesNotExist", ())}
    rev_ns = hooks["rev.namespace.sidecar-injector.istio.io"]
    assert _exprs(rev_ns["namespaceSelector"]) == {(C.LABEL_REV, "In", ("default",)),
                                                   (C.LABEL_INJECTION_NS, "DoesNotExist", ())}
    rev_obj = hooks["rev.object.sidecar-injector.istio.io"]
    assert (C.LABEL_REV, "In", ("default",)) in _exprs(rev_obj["objectSelector"])
    for w in hooks.values():
        assert w["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                               "resources": ["pods"]}]
        assert w["sideEffects"] == "None"
        assert w["failurePolicy"] == "Fail"
        assert w["timeoutSeconds"] == 10
        assert w["admissionReviewVersions"] == ["v1"]
        assert w["reinvocationPolicy"] == "Never"
        assert w["clientConfig"]["service"] == {"name": C.WEBHOOK_SERVICE, "namespace": C.ISTIO_NAMESPACE,
                                                "path": "/inject", "port": 443}
        # Self-managed: the server patches the caBundle in; the chart must not pin a stale one.
        assert "caBundle" not in w["clientConfig"]
        # A pod labelled inject=false never reaches the webhook through any entry.
        sel = _exprs(w["objectSelector"])
        assert (C.LABEL_INJECT, "NotIn", ("false",)) in sel or (C.LABEL_INJECT, "In", ("true",)) in sel


def test_webhook_configuration_non_default_values(helm: Any, all_values: dict[str, dict[str, Any]]) -> None:
    r = render(all_values["renamed"], namespace="mesh-system")
    hooks = {w["name"]: w for w in r.one("MutatingWebhookConfiguration")["webhooks"]}
    auto = hooks["auto.sidecar-injector.istio.io"]
    excluded = {k: v for k, op, v in _exprs(auto["namespaceSelector"]) if op == "NotIn"}
    assert set(excluded["kubernetes.io/metadata.name"]) >= {*C.IGNORED_NAMESPACES, "mesh-system"}
    for w in hooks.values():
        assert w["failurePolicy"] == "Ignore" and w["timeoutSeconds"] == 5
        assert w["clientConfig"]["service"]["name"] == "injector"
        assert w["clientConfig"]["service"]["namespace"] == "mesh-system"


def test_webhook_reaches_the_admission_port_through_the_service(default: Rendered) -> None:
    """MWC -> Service port 443 -> named targetPort -> the container port the server listens on (--port)."""
    mwc_svc = default.one("MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["service"]
    svc = default.one("Service", mwc_svc["name"])
    port = next(p for p in svc["spec"]["ports"] if p["port"] == mwc_svc["port"])
    dep, c = _workload(default)
    container_port = next(p for p in c["ports"] if p["name"] == port["targetPort"])
    assert container_port["containerPort"] == C.WEBHOOK_PORT == int(arg_map(c["args"])["port"])
    ca = next(p for p in svc["spec"]["ports"] if p["port"] == C.CA_PORT)
    assert next(p for p in c["ports"] if p["name"] == ca["targetPort"])["containerPort"] == C.CA_PORT
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())


# ---- serving certificate modes --------------------------------------------------------------------------------

def test_mesh_ca_certificate_flags(default: Rendered) -> None:
    """Default: the serving certificate comes from the mesh CA; the server patches the caBundle (the mesh root)."""
    _, c = _workload(default)
    args = arg_map(c["args"])
    assert args["serving-cert"] == "mesh-ca"
    assert args["serving-cert-ttl"] == "24h"
    assert args["webhook-config-name"] == default.one("MutatingWebhookConfiguration")["metadata"]["name"]
    assert "tls-cert" not in args and "tls-key" not in args
    writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
    for flag in ("ca-bundle-out", "self-signed-dir"):
        assert any(str(args[flag]).startswith(m + "/") for m in writable), f"--{flag} must go to a writable mount"


def _single_replica_recreate(r: Rendered) -> None:
    dep, c = _workload(r)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    args = arg_map(c["args"])
    assert "serving-cert" not in args and "tls-cert" not in args     # the self-signed default of the server
    assert args["webhook-config-name"] == r.one("MutatingWebhookConfiguration")["metadata"]["name"]
    # A PDB that never blocks a node drain of the one replica.
    pdb = r.one("PodDisruptionBudget")["spec"]
    assert pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb


def test_self_managed_runs_one_replica_with_recreate(helm: Any, all_values: dict[str, dict[str, Any]]) -> None:
    """A per-replica self-signed CA can only ever be trusted for one replica: one replica, Recreate, whatever
    replicaCount says; autoscaling is refused with one message naming the values."""
    _single_replica_recreate(render(all_values["self-managed"]))
    _single_replica_recreate(render({**all_values["self-managed"], "webhook.replicaCount": 3}))
    with pytest.raises(RenderError, match=r"autoscaling.enabled.*certificates.mode"):
        render({**all_values["self-managed"], "autoscaling.enabled": True})


def test_istiod_without_meshboot_ca_falls_back_to_self_managed(helm: Any,
                                                               all_values: dict[str, dict[str, Any]]) -> None:
    """istiod.address turns meshboot's CA off, so there is no mesh root to sign with: the default mode falls back to
    the per-replica self-signed CA, hence one replica with Recreate (the NOTES say so)."""
    _single_replica_recreate(render(all_values["istiod"]))
    notes = render_notes({"istiod.address": ISTIOD})
    assert "self-managed" in notes and "1 replica" in notes
    with pytest.raises(RenderError, match=r"autoscaling.enabled"):
        render({"istiod.address": ISTIOD, "autoscaling.enabled": True})


def _tls_volume_secret(r: Rendered) -> tuple[str, dict[str, Any]]:
    dep, c = _workload(r)
    args = arg_map(c["args"])
    mount = next(m for m in c["volumeMounts"] if str(args["tls-cert"]).startswith(m["mountPath"] + "/"))
    assert str(args["tls-key"]).startswith(mount["mountPath"] + "/")
    vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    return vol["secret"]["secretName"], args


def test_provided_certificate_is_served_and_trusted(helm: Any, all_values: dict[str, dict[str, Any]],
                                                    provided_certs: tuple[bytes, pki.KeyPair]) -> None:
    r = render(all_values["provided-inline"])
    secret_name, args = _tls_volume_secret(r)
    secret = r.one("Secret", secret_name)
    assert secret["type"] == "kubernetes.io/tls"
    crt = base64.b64decode(secret["data"]["tls.crt"])
    assert crt == provided_certs[1].chain_pem
    assert base64.b64decode(secret["data"]["tls.key"]) == provided_certs[1].key_pem
    assert args["tls-cert"].endswith("/tls.crt") and args["tls-key"].endswith("/tls.key")
    # Every webhook entry trusts the CA that signed the served certificate, for the Service's DNS name.
    ca = x509.load_pem_x509_certificate(provided_certs[0])
    leaf = x509.load_pem_x509_certificate(crt)
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    svc = r.one("Service")
    assert f"{svc['metadata']['name']}.{r.namespace}.svc" in sans
    for w in r.one("MutatingWebhookConfiguration")["webhooks"]:
        assert base64.b64decode(w["clientConfig"]["caBundle"]) == provided_certs[0]
    assert r.one("Deployment")["spec"]["replicas"] == 2


def test_provided_existing_secret(helm: Any, all_values: dict[str, dict[str, Any]]) -> None:
    r = render(all_values["provided-secret"])
    assert _tls_volume_secret(r)[0] == "my-tls"


def test_provided_needs_a_ca_bundle_and_a_certificate(helm: Any) -> None:
    with pytest.raises(RenderError, match="caBundle"):
        render({"certificates.mode": "provided", "certificates.provided.secretName": "x"})
    with pytest.raises(RenderError, match="secretName, or both"):
        render({"certificates.mode": "provided", "certificates.provided.caBundle": "-----BEGIN CERTIFICATE-----x"})


def test_cert_manager_certificate_feeds_the_deployment_and_the_ca_injector(
        helm: Any, all_values: dict[str, dict[str, Any]]) -> None:
    r = render(all_values["cert-manager-hpa"])
    secret_name, _ = _tls_volume_secret(r)
    cert = r.one("Certificate")
    assert cert["spec"]["secretName"] == secret_name
    svc = r.one("Service")["metadata"]["name"]
    assert f"{svc}.{r.namespace}.svc" in cert["spec"]["dnsNames"]
    issuer = r.one("Issuer")
    assert cert["spec"]["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": "Issuer",
                                         "group": "cert-manager.io"}
    mwc = r.one("MutatingWebhookConfiguration")
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
        f"{r.namespace}/{cert['metadata']['name']}"
    hpa = r.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == r.one("Deployment")["metadata"]["name"]
    pdb = r.one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]


# ---- rollouts that drop no admissions ---------------------------------------------------------------------------

def test_default_is_safe_for_rolling_two_replicas(default: Rendered) -> None:
    """Like istiod: 2 replicas, a surge-only rolling update, a PDB that keeps one, readiness that drops (503) on
    SIGTERM while the server keeps serving for the drain, and a grace period that covers drain + one last request."""
    dep, c = _workload(default)
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pdb = default.one("PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1 and "maxUnavailable" not in pdb
    probe = c["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz" and probe["httpGet"]["scheme"] == "HTTPS"
    drain = float(str(arg_map(c["args"])["drain-duration"]).rstrip("s"))
    # The endpoints controller sees the 503 within period x failureThreshold; the drain must outlast that.
    assert probe["periodSeconds"] * probe["failureThreshold"] + 2 <= drain
    timeout = default.one("MutatingWebhookConfiguration")["webhooks"][0]["timeoutSeconds"]
    assert pod["terminationGracePeriodSeconds"] >= drain + timeout
    # Replicas spread across nodes when the scheduler can (preferred, never blocking).
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in spread["labelSelector"]["matchLabels"].items())


def test_rolling_update_in_every_shared_certificate_mode(helm: Any, all_values: dict[str, dict[str, Any]]) -> None:
    for name in ("cert-manager-hpa", "provided-inline", "provided-secret"):
        spec = render(all_values[name]).one("Deployment")["spec"]
        assert spec["strategy"]["type"] == "RollingUpdate", name
        assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, name


def test_grace_period_shorter_than_the_drain_is_refused(helm: Any) -> None:
    with pytest.raises(RenderError, match=r"webhook.terminationGracePeriodSeconds"):
        render({"webhook.terminationGracePeriodSeconds": 5})
    with pytest.raises(RenderError, match=r"webhook.drainDurationSeconds"):
        render({"webhook.drainDurationSeconds": 1})


def test_rolling_update_that_cannot_progress_is_refused(helm: Any, all_values: dict[str, dict[str, Any]]) -> None:
    for surge, unavailable in ((0, 0), ("0%", 0), (0, "0%")):
        with pytest.raises(RenderError, match=r"webhook.maxSurge and webhook.maxUnavailable are both 0"):
            render({"webhook.maxSurge": surge, "webhook.maxUnavailable": unavailable})
    render({"webhook.maxSurge": 0, "webhook.maxUnavailable": 1})
    render({**all_values["self-managed"], "webhook.maxSurge": 0, "webhook.maxUnavailable": 0})   # Recreate: unused


def test_user_spread_and_affinity_replace_the_default(helm: Any) -> None:
    own = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "meshboot"}}}]
    pod = render({"webhook.topologySpreadConstraints": own}).one("Deployment")["spec"]["template"]["spec"]
    assert pod["topologySpreadConstraints"] == own
    pod = render({"webhook.spreadAcrossNodes": False}).one("Deployment")["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in pod


# ---- RBAC -----------------------------------------------------------------------------------------------------

def _rules(role: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for rule in role["rules"]:
        for g in rule["apiGroups"]:
            for res in rule["resources"]:
                assert (g, res) not in out, f"duplicate rule for {g}/{res}"
                out[(g, res)] = rule
    return out


def test_rbac_is_least_privilege(default: Rendered) -> None:
    cluster = _rules(default.one("ClusterRole"))
    # discovery's informers
    watched = {("", "services"), ("", "pods"), ("discovery.k8s.io", "endpointslices"),
               ("security.istio.io", "peerauthentications"), ("security.istio.io", "authorizationpolicies")}
    assert set(cluster) == {("", "namespaces"), ("authentication.k8s.io", "tokenreviews"), ("", "configmaps"),
                            ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"), *watched}
    assert cluster[("authentication.k8s.io", "tokenreviews")]["verbs"] == ["create"]
    for key in (("", "namespaces"), *watched):
        assert set(cluster[key]["verbs"]) == {"list", "watch"}, key
    assert "delete" not in cluster[("", "configmaps")]["verbs"]
    mwc_rule = cluster[("admissionregistration.k8s.io", "mutatingwebhookconfigurations")]
    assert mwc_rule["resourceNames"] == [default.one("MutatingWebhookConfiguration")["metadata"]["name"]]
    for role in default.all("ClusterRole") + default.all("Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    # Secrets: only in the release namespace, and only the CA's own Secret beyond create.
    assert ("", "secrets") not in cluster
    role = default.one("Role")
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert named == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [C.CA_SECRET_NAME],
                      "verbs": ["get"]}]
    # Bindings give these roles to the Deployment's ServiceAccount.
    sa = default.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    for b in default.all("ClusterRoleBinding") + default.all("RoleBinding"):
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": default.namespace}]
        kind = "ClusterRole" if b["kind"] == "ClusterRoleBinding" else "Role"
        assert b["roleRef"]["kind"] == kind and default.one(kind, b["roleRef"]["name"])


def test_rbac_drops_what_a_mode_does_not_use(helm: Any, all_values: dict[str, dict[str, Any]]) -> None:
    cm = _rules(render(all_values["cert-manager-hpa"]).one("ClusterRole"))
    assert ("admissionregistration.k8s.io", "mutatingwebhookconfigurations") not in cm
    istiod = render(all_values["istiod"])
    rules = _rules(istiod.one("ClusterRole"))
    assert ("authentication.k8s.io", "tokenreviews") not in rules and ("", "configmaps") not in rules
    assert ("", "pods") not in rules and ("discovery.k8s.io", "endpointslices") not in rules   # no CA: no discovery
    assert not istiod.has("Role")


# ---- Deployment -------------------------------------------------------------------------------------------------

def test_deployment_runs_the_contract_flags(default: Rendered) -> None:
    _, c = _workload(default)
    args = arg_map(c["args"])
    assert args["port"] == str(C.WEBHOOK_PORT)
    assert args["monitoring-port"] == str(C.MONITORING_PORT)
    assert args["service-name"] == C.WEBHOOK_SERVICE and args["service-namespace"] == C.ISTIO_NAMESPACE
    assert args["kubernetes-version"] == "1.33"
    assert args["ca-port"] == str(C.CA_PORT)
    assert args["ca-secret"] == C.CA_SECRET_NAME
    assert args["plugin-certs"] == C.PLUGIN_CERTS_DIR
    assert args["token-review"] is True and args["publish-root-cert"] is True
    assert args["token-audiences"] == C.TOKEN_AUDIENCE
    assert args["trust-domain"] == C.DEFAULT_TRUST_DOMAIN
    dns = str(args["ca-dns-names"]).split(",")
    # The Service name, and the name an agent derives from CA_ADDR (its host) to verify the CA like istiod.
    assert f"{C.WEBHOOK_SERVICE}.{C.ISTIO_NAMESPACE}.svc" in dns and C.ISTIOD_SAN in dns


@pytest.mark.parametrize("kube_version,want", [("1.29.0", "1.29"), ("1.33.0", "1.33")])
def test_kubernetes_version_comes_from_the_cluster(helm: Any, kube_version: str, want: str) -> None:
    _, c = _workload(render(kube_version=kube_version))
    assert arg_map(c["args"])["kubernetes-version"] == want


def test_mounted_files_exist_in_their_configmaps(default: Rendered) -> None:
    """Each file flag points into a mounted ConfigMap that has that key (what the server will actually read)."""
    dep, c = _workload(default)
    args = arg_map(c["args"])
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    for flag, cm_key in (("values", "values"), ("injector-config", "config"), ("mesh-config", "mesh")):
        path = str(args[flag])
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        assert path[len(mount["mountPath"]) + 1:] == cm_key
        cm = default.one("ConfigMap", volumes[mount["name"]]["configMap"]["name"])
        assert cm_key in cm["data"]
    cacerts = volumes[next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == C.PLUGIN_CERTS_DIR)]
    assert cacerts["secret"] == {"secretName": "cacerts", "optional": True, "defaultMode": 0o440}


def test_deployment_is_hardened_and_probed(default: Rendered) -> None:
    dep, c = _workload(default)
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # A read-only root needs every written path on a writable volume.
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", "/var/run/meshboot"} <= writable
    ca_dir = str(arg_map(c["args"])["ca-dir"])
    assert any(ca_dir.startswith(w + "/") for w in writable)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert ports[c["readinessProbe"]["httpGet"]["port"]] == C.WEBHOOK_PORT
    assert ports[c["livenessProbe"]["httpGet"]["port"]] == C.MONITORING_PORT
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert dep["spec"]["template"]["metadata"]["labels"][C.LABEL_INJECT] == "false"
    assert c["image"] == "ghcr.io/meshboot/meshboot-webhook:0.1.0"


def test_standard_labels_everywhere(default: Rendered) -> None:
    for doc in default.docs:
        labels = doc["metadata"]["labels"]
        for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                  "app.kubernetes.io/managed-by", "app.kubernetes.io/part-of", "helm.sh/chart"):
            assert labels.get(k), f"{doc['kind']}/{doc['metadata']['name']} lacks {k}"
    dep = default.one("Deployment")
    sel = dep["spec"]["selector"]["matchLabels"]
    assert default.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == sel
    assert all(dep["spec"]["template"]["metadata"]["labels"][k] == v for k, v in sel.items())


# ---- injection values and mesh config ---------------------------------------------------------------------------

def _injector_inputs(r: Rendered) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    inj = r.one("ConfigMap", f"{r.one('Deployment')['metadata']['name']}-injector")["data"]
    mesh = r.one("ConfigMap", f"{r.one('Deployment')['metadata']['name']}-mesh")["data"]
    return json.loads(inj["values"]), yaml.safe_load(inj["config"]), yaml.safe_load(mesh["mesh"])


def test_injection_values_point_at_our_images_and_ca(default: Rendered) -> None:
    values, config, mesh = _injector_inputs(default)
    g = values["global"]
    assert (g["hub"], g["tag"]) == ("ghcr.io/meshboot", "0.1.0")
    assert g["proxy"]["image"] == g["proxy_init"]["image"] == "meshboot-agent"
    assert g["caAddress"] == f"{C.WEBHOOK_SERVICE}.{C.ISTIO_NAMESPACE}.svc:{C.CA_PORT}"
    assert g["sds"]["token"]["aud"] == C.TOKEN_AUDIENCE
    # Sidecars take their config from meshboot's discovery, served beside the CA on 15012 (like istiod).
    assert mesh["defaultConfig"]["discoveryAddress"] == g["caAddress"]
    assert config["policy"] == "enabled"
    # The CA's serving certificate covers the host the agents dial.
    _, c = _workload(default)
    assert g["caAddress"].rsplit(":", 1)[0] in str(arg_map(c["args"])["ca-dns-names"]).split(",")


def test_one_value_switches_to_a_real_istiod(helm: Any, all_values: dict[str, dict[str, Any]]) -> None:
    r = render(all_values["istiod"])
    values, _, mesh = _injector_inputs(r)
    assert values["global"]["caAddress"] == ISTIOD
    assert mesh["defaultConfig"]["discoveryAddress"] == ISTIOD
    _, c = _workload(r)
    args = arg_map(c["args"])
    assert args["ca-port"] == "0" and "publish-root-cert" not in args and "token-review" not in args
    assert C.CA_PORT not in [p["port"] for p in r.one("Service")["spec"]["ports"]]


def test_renamed_release_follows_its_names(helm: Any, all_values: dict[str, dict[str, Any]]) -> None:
    r = render(all_values["renamed"], namespace="mesh-system")
    values, _, _ = _injector_inputs(r)
    assert values["global"]["caAddress"] == f"injector.mesh-system.svc:{C.CA_PORT}"
    assert values["global"]["imagePullSecrets"] == ["regcred"]
    dep, c = _workload(r)
    assert c["image"] == "registry.example.com/mesh/meshboot-webhook:1.2.3"
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "existing-sa"
    assert dep["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    dns = str(arg_map(c["args"])["ca-dns-names"]).split(",")
    assert {"injector.mesh-system.svc", "ca.example.com", C.ISTIOD_SAN} <= set(dns)
    assert len(dns) == len(set(dns))
    assert {"name": "EXTRA", "value": "1"} in c["env"]


def test_injection_values_load_in_the_webhook(default: Rendered) -> None:
    """The rendered values, config and mesh files go through the webhook's own loader and validation."""
    from webhook.config import build_settings

    values, config, mesh = _injector_inputs(default)
    s = build_settings(values, mesh, config, kubernetes_version="1.33")
    assert s.g["caAddress"] == f"{C.WEBHOOK_SERVICE}.{C.ISTIO_NAMESPACE}.svc:{C.CA_PORT}"
    assert s.proxy["image"] == "meshboot-agent" and s.policy == "enabled"
    assert s.native_sidecars == "auto" and s.native_default() is True


# ---- schema -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values,needle", [
    ({"certificates.mode": "bogus"}, "certificates.mode"),
    ({"webook": {"replicaCount": 2}}, "webook"),
    ({"mutatingWebhook.failurePolicy": "Sometimes"}, "failurePolicy"),
    ({"mutatingWebhook.timeoutSeconds": 31}, "timeoutSeconds"),
    ({"global.proxy.autoInject": "maybe"}, "autoInject"),
    ({"istiod.address": "https://istiod"}, "istiod.address"),
])
def test_schema_rejects_bad_values(helm: Any, values: dict[str, Any], needle: str) -> None:
    with pytest.raises(RenderError) as e:
        render(values)
    assert "values don't meet the specifications of the schema" in str(e.value)
    assert needle in str(e.value)


def test_notes_say_how_to_label_a_namespace_and_check_2_of_2(helm: Any) -> None:
    notes = render_notes()
    assert f"kubectl label namespace <ns> {C.LABEL_INJECTION_NS}=enabled" in notes
    assert "2/2" in notes and "kubectl -n <ns> get pods" in notes
    assert f"CA_ADDR:         {C.WEBHOOK_SERVICE}.{C.ISTIO_NAMESPACE}.svc:{C.CA_PORT}" in notes
    assert "standalone" in notes
    istiod = render_notes({"istiod.address": ISTIOD})
    assert f"CA_ADDR:         {ISTIOD}" in istiod and "real istiod" in istiod
