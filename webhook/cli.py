"""meshboot-inject: inject sidecars into workload YAML offline (like `istioctl kube-inject`), or explain the
decision for each pod template (like `istioctl x check-inject`).

Reads Istio's own files (`--values`: the `values` key of the istio-sidecar-injector ConfigMap, `--mesh-config`:
MeshConfig), so an Istio user's settings carry over unchanged.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import yaml

from webhook import revisions
from webhook.config import ConfigSource
from webhook.errors import ConfigError, InjectionError
from webhook.inject import inject_pod
from webhook.policy import Decision, decide, explain_lines
from webhook.workloads import get_template, iter_objects, pod_deploy_meta, set_template, workload_deploy_meta


def parse_labels(text: str | None, flag: str = "--namespace-labels") -> dict[str, str] | None:
    """'a=b,c=d' -> {'a': 'b', 'c': 'd'}; None when not given; '' -> {} (a namespace without labels)."""
    if text is None:
        return None
    out: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"{flag}: {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def control_planes(settings: Any, revision: str | None = None, installed: str | None = None,
                   tags: str | None = None) -> revisions.ControlPlanes:
    """--revision (istioctl kube-inject's: this injector's revision, into values.revision), --revisions (what else is
    installed) and --tags (TAG=REVISION): the webhooks gate A evaluates with --namespace-labels."""
    if revision is not None:
        own = "" if revision in ("", revisions.DEFAULT) else revisions.check_name("--revision", revision)
        settings.values["revision"] = own
    own = settings.revision or revisions.DEFAULT
    revs = [r.strip() for r in installed.split(",") if r.strip()] if installed else [own]
    if own not in revs:
        raise ConfigError(f"--revisions: {','.join(revs)} leaves out this injector's revision {own} (--revision)")
    return revisions.planes(revs, parse_labels(tags, "--tags") or {},
                            namespace=settings.g.get("istioNamespace") or "istio-system",
                            enable_namespaces_by_default=bool(
                                settings.values["sidecarInjectorWebhook"].get("enableNamespacesByDefault")))


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PROXY_CONFIG, ISTIO_META_POD_PORTS) as literal blocks, as kubectl shows them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _label(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')}/{meta.get('name') or meta.get('generateName') or '?'}"


class Injector:
    """Walks documents, finds pod templates, decides and injects; collects explanations and warnings."""

    def __init__(self, source: ConfigSource, namespace: str | None, namespace_labels: dict[str, str] | None,
                 planes: revisions.ControlPlanes | None = None) -> None:
        self.settings = source.settings
        self.namespace = namespace
        self.namespace_labels = namespace_labels
        self.planes = planes or control_planes(self.settings)
        self.decisions: list[tuple[str, Decision]] = []
        self.routes: list[str | None] = []      # per decision with --namespace-labels: the injector called
        self.warnings: list[str] = []

    def decide(self, pod: dict[str, Any], ns: str) -> Decision:
        """Gate A when the namespace labels are known: the installed revisions' and tags' webhooks must call this
        revision's injector (webhook/revisions.py); then the injector's own policy (gate B)."""
        if self.namespace_labels is None:
            return decide(pod, ns, self.settings)
        labels = (pod.get("metadata") or {}).get("labels") or {}
        routing = revisions.route(ns, self.namespace_labels, labels, self.planes)
        self.routes.append(revisions.explain_line(routing) if routing.revision else None)
        return revisions.gate(routing, self.settings.revision or revisions.DEFAULT) or decide(pod, ns, self.settings)

    def process(self, obj: dict[str, Any], where: str) -> None:
        template = get_template(obj)
        if template is None:
            return
        ns = (obj.get("metadata") or {}).get("namespace") or self.namespace or "default"
        is_pod = obj.get("kind") == "Pod"
        pod = obj if is_pod else {"metadata": template.get("metadata") or {}, "spec": template.get("spec")}
        name = f"{_label(obj)} (namespace {ns})"
        decision = self.decide(pod, ns)
        self.decisions.append((name, decision))
        if decision.warning:
            self.warnings.append(f"{where}: {name}: {decision.warning}")
        if not decision.inject:
            if decision.reason == "host_network":
                self.warnings.append(f"Skipping injection because {name} has host networking enabled")
            return
        try:
            # A Pod's workload is its controller, as the webhook infers it (Istio's kube-inject does the same).
            dm = pod_deploy_meta(pod, ns) if is_pod else workload_deploy_meta(obj, ns)
            injected = inject_pod(pod, self.settings, deploy_meta=dm)
        except InjectionError as e:
            raise InjectionError(f"{where}: {name}: {e}") from None
        if is_pod:
            set_template(obj, injected)
        else:
            template["metadata"] = injected["metadata"]
            template["spec"] = injected["spec"]


# The input is the user's own manifests (YAML aliases allowed, as kubectl allows them), bounded in size.
MAX_INPUT_BYTES = 64 * 1024 * 1024


def run(stream: TextIO, where: str, injector: Injector) -> list[Any]:
    text = stream.read(MAX_INPUT_BYTES + 1)
    if len(text) > MAX_INPUT_BYTES:
        raise InjectionError(f"{where}: larger than {MAX_INPUT_BYTES} bytes")
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise InjectionError(f"{where}: not valid YAML: {e}") from None
    except (RecursionError, ValueError, TypeError, OverflowError):
        raise InjectionError(f"{where}: not valid YAML: a value cannot be built (nested too deeply, or out of "
                             "range)") from None
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise InjectionError(f"{where}: document {i + 1}: want a Kubernetes object, got {type(doc).__name__}")
        for obj in iter_objects(doc):
            injector.process(obj, f"{where}: document {i + 1}")
    return [d for d in docs if d is not None]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshboot-inject", description=__doc__.split("\n")[0])
    p.add_argument("-f", "--filename", required=True, help="input YAML file, or - for stdin")
    p.add_argument("-o", "--output", default="-", help="output file (default stdout)")
    p.add_argument("--values", "--valuesFile", dest="values", help="injector values (Istio's `values` layout)")
    p.add_argument("--mesh-config", "--meshConfigFile", dest="mesh_config", help="MeshConfig YAML")
    p.add_argument("--injector-config", "--injectConfigFile", dest="injector_config",
                   help="injector config: policy, alwaysInjectSelector, neverInjectSelector")
    p.add_argument("-n", "--namespace", help="namespace for objects without one (default: default)")
    p.add_argument("--namespace-labels", help="labels of the namespace, KEY=VALUE,...; when given, the webhook "
                                              "selectors are applied too, as the API server would")
    p.add_argument("--kubernetes-version", help="MAJOR.MINOR of the cluster; native sidecars in auto mode need 1.33")
    p.add_argument("--native-sidecars", choices=("auto", "true", "false"))
    p.add_argument("--revision", help="control-plane revision of this injector (istioctl kube-inject --revision; "
                                      "values.revision); with --namespace-labels only what its webhooks take")
    p.add_argument("--revisions", help="installed revisions, comma-separated (default: --revision's): with "
                                       "--namespace-labels, which revision's injector each pod reaches")
    p.add_argument("--tags", help="revision tags, TAG=REVISION,... (istioctl tag set)")
    p.add_argument("--explain", action="store_true", help="print, per pod template, whether and why it is injected")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ns_labels = parse_labels(args.namespace_labels)
        source = ConfigSource(args.values, args.mesh_config, args.injector_config,
                              native_sidecars=args.native_sidecars, kubernetes_version=args.kubernetes_version)
        planes = control_planes(source.settings, args.revision, args.revisions, args.tags)
        injector = Injector(source, args.namespace, ns_labels, planes)
        if args.filename == "-":
            docs = run(sys.stdin, "<stdin>", injector)
        else:
            with open(args.filename, encoding="utf-8") as f:
                docs = run(f, args.filename, injector)
    except (ConfigError, InjectionError, ValueError) as e:
        print(f"meshboot-inject: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"meshboot-inject: {args.filename}: {e.strerror}", file=sys.stderr)
        return 1
    except UnicodeDecodeError:
        print(f"meshboot-inject: {args.filename}: not UTF-8 text", file=sys.stderr)
        return 1
    for w in injector.warnings:
        print(f"meshboot-inject: warning: {w}", file=sys.stderr)
    if args.explain:
        if not injector.decisions:
            print("no pod templates found")
        if ns_labels is None:
            print("(namespace labels not given: only the injector's own policy is evaluated; pass "
                  "--namespace-labels to include the webhook selectors)")
        for i, line in enumerate(explain_lines(injector.decisions)):
            route = injector.routes[i] if i < len(injector.routes) else None
            print(line + (f"; called: {route}" if route else ""))
        return 0
    text = yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
