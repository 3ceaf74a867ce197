"""Whether a pod gets a sidecar, and why: the injector's policy (gate B) and the webhook selectors (gate A).

The reason code is what `meshboot-inject --explain` prints and what `sidecar_injection_skip_total{reason}` counts,
so it is a small fixed vocabulary.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshboot import constants as C
from webhook.config import Settings

# Reason codes (bounded: used as a metric label).
HOST_NETWORK = "host_network"
IGNORED_NAMESPACE = "ignored_namespace"
LABEL_FALSE = "label_inject_false"
ANNOTATION_FALSE = "annotation_inject_false"
LABEL_TRUE = "label_inject_true"
ANNOTATION_TRUE = "annotation_inject_true"
NEVER_SELECTOR = "never_inject_selector"
ALWAYS_SELECTOR = "always_inject_selector"
POLICY_ENABLED = "policy_enabled"
POLICY_DISABLED = "policy_disabled"
POLICY_INVALID = "policy_invalid"
NO_WEBHOOK = "no_webhook_matches"        # gate A: the API server would not call the injector


@dataclass(frozen=True)
class Decision:
    inject: bool
    reason: str          # one of the codes above
    message: str         # human sentence for --explain and logs
    warning: str = ""    # e.g. an unrecognised sidecar.istio.io/inject value


def _truthy_value(v: str) -> str | None:
    """'true'/'false' for YAML-style booleans (case-insensitive); None for anything else."""
    low = v.strip().lower()
    if low in ("true", "y", "yes", "on"):
        return "true"
    if low in ("false", "n", "no", "off"):
        return "false"
    return None


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels AND matchExpressions)."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != str(v):
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, vals = expr.get("key"), expr.get("operator"), [str(x) for x in expr.get("values") or []]
        present = key in labels
        if op == "In" and not (present and labels[key] in vals):
            return False
        if op == "NotIn" and present and labels[key] in vals:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return True


def _non_empty(sel: Mapping[str, Any]) -> bool:
    return bool(sel.get("matchLabels") or sel.get("matchExpressions"))


def decide(pod: Mapping[str, Any], namespace: str, settings: Settings) -> Decision:
    """Istio's injection policy over one pod (labels and annotations both visible here)."""
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    labels: Mapping[str, str] = meta.get("labels") or {}
    annotations: Mapping[str, str] = meta.get("annotations") or {}
    if spec.get("hostNetwork"):
        return Decision(False, HOST_NETWORK, "skipped: the pod has host networking enabled (spec.hostNetwork)")
    if namespace in C.IGNORED_NAMESPACES:
        return Decision(False, IGNORED_NAMESPACE, f"skipped: namespace {namespace!r} is never injected")

    warning = ""
    explicit: str | None = None       # "true" / "false" / None (default)
    reason = ""
    if C.LABEL_INJECT in labels:
        raw, src = str(labels[C.LABEL_INJECT]), "label"
    elif C.ANNOTATION_INJECT in annotations:
        raw, src = str(annotations[C.ANNOTATION_INJECT]), "annotation"
    else:
        raw, src = "", ""
    if src and raw != "":
        explicit = _truthy_value(raw)
        if explicit is None:
            warning = f"invalid {src} value {C.LABEL_INJECT}={raw!r}: want true or false; using the default policy"
        else:
            reason = {("label", "true"): LABEL_TRUE, ("label", "false"): LABEL_FALSE,
                      ("annotation", "true"): ANNOTATION_TRUE,
                      ("annotation", "false"): ANNOTATION_FALSE}[(src, explicit)]

    if explicit is None:
        for sel in settings.never_inject_selector:
            if _non_empty(sel) and selector_matches(sel, labels):
                explicit, reason = "false", NEVER_SELECTOR
                break
    if explicit is None:
        for sel in settings.always_inject_selector:
            if _non_empty(sel) and selector_matches(sel, labels):
                explicit, reason = "true", ALWAYS_SELECTOR
                break

    policy = settings.policy
    why = {LABEL_TRUE: f"label {C.LABEL_INJECT}=true", LABEL_FALSE: f"label {C.LABEL_INJECT}=false",
           ANNOTATION_TRUE: f"annotation {C.ANNOTATION_INJECT}=true",
           ANNOTATION_FALSE: f"annotation {C.ANNOTATION_INJECT}=false",
           NEVER_SELECTOR: "neverInjectSelector matches the pod labels",
           ALWAYS_SELECTOR: "alwaysInjectSelector matches the pod labels"}
    if policy not in ("enabled", "disabled"):
        return Decision(False, POLICY_INVALID, f"skipped: injection policy {policy!r} is neither enabled nor disabled",
                        warning)
    if explicit == "true":
        return Decision(True, reason, f"injected: {why[reason]}", warning)
    if explicit == "false":
        return Decision(False, reason, f"skipped: {why[reason]}", warning)
    if policy == "enabled":
        return Decision(True, POLICY_ENABLED, "injected: injection policy is enabled and nothing opts the pod out",
                        warning)
    return Decision(False, POLICY_DISABLED, "skipped: injection policy is disabled and nothing opts the pod in",
                    warning)


def webhook_fires(namespace: str, namespace_labels: Mapping[str, str], pod_labels: Mapping[str, str],
                  settings: Settings) -> tuple[str | None, str]:
    """Gate A: which of the MutatingWebhookConfiguration's webhooks (default revision) the API server would call.

    Returns (webhook name or None, explanation). Selectors see labels only.
    """
    rev = settings.revision or "default"
    ns_inj = namespace_labels.get(C.LABEL_INJECTION_NS)
    ns_rev = namespace_labels.get(C.LABEL_REV)
    pod_inj = pod_labels.get(C.LABEL_INJECT)
    pod_rev = pod_labels.get(C.LABEL_REV)
    not_false = pod_inj != "false"
    candidates: list[tuple[str, bool]] = []
    if not settings.revision:
        candidates.append(("namespace.sidecar-injector.istio.io", ns_inj == "enabled" and not_false))
        candidates.append(("object.sidecar-injector.istio.io",
                           ns_inj is None and ns_rev is None and pod_inj == "true" and pod_rev is None))
    candidates.append(("rev.namespace.sidecar-injector.istio.io", ns_rev == rev and ns_inj is None and not_false))
    candidates.append(("rev.object.sidecar-injector.istio.io",
                       ns_rev is None and ns_inj is None and not_false and pod_rev == rev))
    if not settings.revision and settings.values["sidecarInjectorWebhook"].get("enableNamespacesByDefault"):
        candidates.append(("auto.sidecar-injector.istio.io",
                           ns_inj is None and ns_rev is None and namespace not in C.IGNORED_NAMESPACES
                           and pod_inj is None and pod_rev is None))
    for name, ok in candidates:
        if ok:
            return name, f"webhook {name} matches (namespace labels {dict(namespace_labels) or '{}'})"
    if ns_inj is not None and ns_inj != "enabled":
        why = f"namespace label {C.LABEL_INJECTION_NS}={ns_inj} disables injection"
    elif pod_inj == "false":
        why = f"pod label {C.LABEL_INJECT}=false"
    elif ns_rev is not None and ns_rev != rev:
        why = f"namespace label {C.LABEL_REV}={ns_rev} selects another revision"
    elif pod_rev is not None and pod_rev != rev:
        why = f"pod label {C.LABEL_REV}={pod_rev} selects another revision"
    else:
        why = (f"no webhook selects it: label the namespace {C.LABEL_INJECTION_NS}=enabled or the pod "
               f"{C.LABEL_INJECT}=true")
    return None, why


def decide_with_namespace(pod: Mapping[str, Any], namespace: str, namespace_labels: Mapping[str, str] | None,
                          settings: Settings) -> Decision:
    """Both gates when the namespace labels are known (the CLI's --namespace-labels, --explain); else gate B only."""
    if namespace_labels is not None:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        hook, why = webhook_fires(namespace, namespace_labels, labels, settings)
        if hook is None:
            return Decision(False, NO_WEBHOOK, f"skipped: {why}")
    return decide(pod, namespace, settings)


def explain_lines(decisions: Sequence[tuple[str, Decision]]) -> list[str]:
    return [f"{name}: {'WILL be injected' if d.inject else 'will NOT be injected'} — {d.message} [{d.reason}]"
            + (f" (warning: {d.warning})" if d.warning else "") for name, d in decisions]
