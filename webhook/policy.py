"""Whether a pod gets a sidecar, and why: the injector's policy (gate B; gate A, the webhook selectors, is
webhook/revisions.route over every installed revision and tag).

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


def explain_lines(decisions: Sequence[tuple[str, Decision]]) -> list[str]:
    return [f"{name}: {'WILL be injected' if d.inject else 'will NOT be injected'} — {d.message} [{d.reason}]"
            + (f" (warning: {d.warning})" if d.warning else "") for name, d in decisions]
