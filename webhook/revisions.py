"""Revisions and tags: which injector the API server calls for a pod, as Istio's webhooks route it.

Istio runs one injector per control-plane revision. Each revision's MutatingWebhookConfiguration takes namespaces
labelled `istio.io/rev=<revision>` (or, in a namespace with neither injection label, pods labelled so); only the
default revision (installed without a revision) also takes `istio-injection=enabled` namespaces and pods labelled
`sidecar.istio.io/inject=true`. A tag (`istioctl tag set <tag> --revision <rev>`, the chart's `revisionTags`) is one
more configuration, `istio-revision-tag-<tag>`, taking `istio.io/rev=<tag>` to its revision's injector; the tag
`default` also takes what the default revision takes. A pod whose labels name nothing installed is silently left
uninjected — the case `--explain` is for.

Pure: the webhooks are data (`webhooks`, the same selectors the chart renders, checked against it by the tests)
and `route` evaluates them as the API server does: every configuration, in name order, each entry's
namespaceSelector and objectSelector; every injector that is called re-injects, so the last one called wins.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshboot import constants as C
from webhook.errors import ConfigError
from webhook.policy import NO_WEBHOOK, Decision, selector_matches

DEFAULT = "default"          # istio.io/rev of the control plane installed without a revision; also the default tag
WEBHOOK_SUFFIX = "sidecar-injector.istio.io"
TAG_CONFIG_PREFIX = "istio-revision-tag-"
DEFAULT_CONFIG_NAME = "meshboot-sidecar-injector"    # the chart's mutatingWebhook.name
OTHER_REVISION = "other_revision"                     # a Decision reason: another revision's injector takes the pod
# Istio's revision and tag names end up in object names and label values: a DNS label, short enough for both.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,28}[a-z0-9])?$")


@dataclass(frozen=True)
class Webhook:
    """One webhook entry: the configuration holding it, its name and selectors, the revision whose injector it
    calls, and the tag it belongs to (None for the revision's own configuration)."""

    configuration: str
    name: str
    revision: str
    tag: str | None
    namespace_selector: Mapping[str, Any]
    object_selector: Mapping[str, Any]


@dataclass(frozen=True)
class ControlPlanes:
    """What is installed: revisions ("default" = the unrevisioned control plane) and tags (tag -> revision)."""

    revisions: tuple[str, ...] = (DEFAULT,)
    tags: Mapping[str, str] = field(default_factory=dict)
    enable_namespaces_by_default: bool = False      # sidecarInjectorWebhook.enableNamespacesByDefault (auto.)
    config_name: str = DEFAULT_CONFIG_NAME          # the chart's mutatingWebhook.name
    namespace: str = C.ISTIO_NAMESPACE              # the control plane's namespace (never auto-injected)


@dataclass(frozen=True)
class Routing:
    """The webhooks the API server calls for one pod, in call order, and why (or why none)."""

    called: tuple[Webhook, ...]
    reason: str

    @property
    def revision(self) -> str | None:
        """The revision whose injection the pod ends up with: the last injector called re-injects over the others."""
        return self.called[-1].revision if self.called else None


def check_name(what: str, name: str) -> str:
    """A revision or tag name as Istio's chart can use it; one clear message naming the field otherwise."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{what}: {name!r} is not a revision/tag name (lowercase letters, digits and '-', "
                          f"1-30 characters, starting and ending with a letter or digit)")
    return name


def planes(revisions: Iterable[str], tags: Mapping[str, str], **kw: Any) -> ControlPlanes:
    """Validated ControlPlanes: names well-formed, every tag points at an installed revision, no tag hides a
    revision (istioctl tag set refuses that) except `default`, which moves the default to another revision."""
    revs = tuple(dict.fromkeys(check_name("revisions", r) for r in revisions))
    if not revs:
        raise ConfigError("revisions: at least one control-plane revision must be installed")
    for tag, rev in tags.items():
        check_name("tags", tag)
        if rev not in revs:
            raise ConfigError(f"tags: tag {tag!r} points at revision {rev!r}, which is not installed "
                              f"(installed: {', '.join(revs)})")
        if tag == DEFAULT == rev:
            raise ConfigError("tags: tag 'default' on the default revision, which already takes what it would")
        if tag in revs and tag != DEFAULT:
            raise ConfigError(f"tags: tag {tag!r} has the name of an installed revision")
    return ControlPlanes(revisions=revs, tags=dict(tags), **kw)


def _exprs(*items: tuple[str, str, Sequence[str]]) -> dict[str, Any]:
    return {"matchExpressions": [{"key": k, "operator": op, **({"values": list(v)} if v else {})}
                                 for k, op, v in items]}


def _entries(value: str, with_default: bool, cp: ControlPlanes) -> list[tuple[str, dict, dict]]:
    """Istio's chart entries for one istio.io/rev value: (prefix, namespaceSelector, objectSelector)."""
    not_false = (C.LABEL_INJECT, "NotIn", ("false",))
    out = [("rev.namespace.", _exprs((C.LABEL_REV, "In", (value,)), (C.LABEL_INJECTION_NS, "DoesNotExist", ())),
            _exprs(not_false)),
           ("rev.object.", _exprs((C.LABEL_REV, "DoesNotExist", ()), (C.LABEL_INJECTION_NS, "DoesNotExist", ())),
            _exprs(not_false, (C.LABEL_REV, "In", (value,))))]
    if not with_default:
        return out
    unlabelled = ((C.LABEL_INJECTION_NS, "DoesNotExist", ()), (C.LABEL_REV, "DoesNotExist", ()))
    out += [("namespace.", _exprs((C.LABEL_INJECTION_NS, "In", ("enabled",))), _exprs(not_false)),
            ("object.", _exprs(*unlabelled),
             _exprs((C.LABEL_INJECT, "In", ("true",)), (C.LABEL_REV, "DoesNotExist", ())))]
    if cp.enable_namespaces_by_default:
        ignored = (*C.IGNORED_NAMESPACES, cp.namespace)
        out.append(("auto.", _exprs(*unlabelled, ("kubernetes.io/metadata.name", "NotIn", ignored)),
                    _exprs((C.LABEL_INJECT, "DoesNotExist", ()), (C.LABEL_REV, "DoesNotExist", ()))))
    return out


def webhooks(cp: ControlPlanes) -> list[Webhook]:
    """Every webhook entry the installed revisions and tags make (the chart's), in the API server's call order:
    configurations sorted by name, entries in their order."""
    configs: list[tuple[str, str, str | None, list[tuple[str, dict, dict]]]] = []
    for rev in cp.revisions:
        name = cp.config_name if rev == DEFAULT else f"{cp.config_name}-{rev}"
        configs.append((name, rev, None, _entries(rev, rev == DEFAULT, cp)))
    for tag, rev in cp.tags.items():
        suffix = "" if cp.namespace == C.ISTIO_NAMESPACE else f"-{cp.namespace}"
        configs.append((f"{TAG_CONFIG_PREFIX}{tag}{suffix}", rev, tag, _entries(tag, tag == DEFAULT, cp)))
    return [Webhook(name, prefix + WEBHOOK_SUFFIX, rev, tag, ns_sel, obj_sel)
            for name, rev, tag, entries in sorted(configs, key=lambda c: c[0])
            for prefix, ns_sel, obj_sel in entries]


def _names(cp: ControlPlanes) -> str:
    tags = ", ".join(f"{t} -> {r}" for t, r in sorted(cp.tags.items())) or "none"
    return f"installed revisions: {', '.join(cp.revisions)}; tags: {tags}"


def _why_none(ns_labels: Mapping[str, str], pod_labels: Mapping[str, str], cp: ControlPlanes) -> str:
    """Why no webhook is called, in the order the selectors decide it."""
    ns_inj, ns_rev = ns_labels.get(C.LABEL_INJECTION_NS), ns_labels.get(C.LABEL_REV)
    pod_inj, pod_rev = pod_labels.get(C.LABEL_INJECT), pod_labels.get(C.LABEL_REV)
    has_default = DEFAULT in cp.revisions or DEFAULT in cp.tags
    if pod_inj == "false" and (ns_inj == "enabled" or ns_rev or pod_rev):
        return f"not sent to any injector: pod label {C.LABEL_INJECT}=false"
    if ns_inj is not None and ns_inj != "enabled":
        return (f"namespace label {C.LABEL_INJECTION_NS}={ns_inj} turns injection off (it takes precedence over "
                f"{C.LABEL_REV})")
    if ns_inj == "enabled":
        return (f"namespace label {C.LABEL_INJECTION_NS}=enabled is taken by the default revision, and none is "
                f"installed nor tagged default ({_names(cp)})")
    if ns_rev is not None:
        return (f"namespace label {C.LABEL_REV}={ns_rev} names no installed revision or tag ({_names(cp)}): "
                f"its pods are left uninjected")
    if pod_rev is not None:
        return (f"pod label {C.LABEL_REV}={pod_rev} names no installed revision or tag ({_names(cp)}): "
                f"the pod is left uninjected")
    if pod_inj == "true" and not has_default:
        return (f"pod label {C.LABEL_INJECT}=true is taken by the default revision, and none is installed nor "
                f"tagged default ({_names(cp)})")
    return (f"no webhook selects it: label the namespace {C.LABEL_INJECTION_NS}=enabled or {C.LABEL_REV}=<revision "
            f"or tag>, or the pod {C.LABEL_INJECT}=true or {C.LABEL_REV}=<revision or tag>")


def _check_labels(what: str, labels: Mapping[str, Any]) -> None:
    """Label values are strings (the API server refuses a YAML true/false); say which one is not."""
    if not isinstance(labels, Mapping):
        raise ConfigError(f"{what}s: want a map of strings, got {type(labels).__name__}")
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ConfigError(f"{what} {k!r}: value {v!r} is not a string (Kubernetes label values are strings: "
                              f"quote it)")


def route(namespace: str, ns_labels: Mapping[str, str], pod_labels: Mapping[str, str],
          cp: ControlPlanes) -> Routing:
    """Which webhooks the API server calls for a pod created in `namespace` (selectors see labels only; the
    namespace's name is its kubernetes.io/metadata.name label, which the API server sets)."""
    _check_labels("namespace label", ns_labels)
    _check_labels("pod label", pod_labels)
    ns = {"kubernetes.io/metadata.name": namespace, **ns_labels}
    called: list[Webhook] = []
    for wh in webhooks(cp):
        if selector_matches(wh.namespace_selector, ns) and selector_matches(wh.object_selector, pod_labels):
            called.append(wh)
    if not called:
        return Routing((), _why_none(ns, pod_labels, cp))
    last = called[-1]
    via = f"tag {last.tag} -> revision {last.revision}" if last.tag else f"revision {last.revision}"
    reason = f"webhook {last.name} of {last.configuration} ({via})"
    if len(called) > 1:
        others = ", ".join(f"{w.configuration} ({w.revision})" for w in called[:-1])
        reason += (f"; also called before it: {others} — the last injector called re-injects, so revision "
                   f"{last.revision} wins (remove the older default, as istioctl tag set default does)")
    return Routing(tuple(called), reason)


def gate(routing: Routing, own_revision: str) -> Decision | None:
    """Gate A for the injector of `own_revision`: a Decision not to inject when the API server would not call it
    (no webhook, or another revision's); None when it is called and its own policy decides."""
    if routing.revision is None:
        return Decision(False, NO_WEBHOOK, f"skipped: {routing.reason}")
    if routing.revision != own_revision:
        return Decision(False, OTHER_REVISION, f"skipped by revision {own_revision}: the API server calls "
                                               f"{routing.reason}")
    return None


def explain_line(routing: Routing) -> str:
    """One line for --explain: the injector the pod ends up with, or none and why."""
    if routing.revision is None:
        return f"no injector: {routing.reason}"
    return f"revision {routing.revision}: {routing.reason}"
