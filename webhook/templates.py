"""Injection templates: which ones a pod asks for, and the operator's own (custom) templates.

Istio renders each template named by `inject.istio.io/templates` (default `sidecar`) with Go's text/template and
strategic-merges the result onto the pod. meshboot renders the built-in `sidecar`, `gateway` and `grpc-agent` in code
and `grpc-simple` in the subset below, and runs custom templates (the injector config's `templates:` map, or
`sidecarInjectorWebhook.templates` in the values) with a small, bounded subset of Go's template language, checked
when the config is loaded: a template that uses anything outside the subset is refused then, naming the template and
the action, rather than at admission. Istio's other built-ins (ambient and Gateway API ones) are refused by name,
with the reason.

The subset: `{{ expr }}`, `{{- ... -}}` trimming, `{{/* comments */}}`, `range [$i,] $c := .Spec.Containers`
(or `.Spec.InitContainers`), `if` / `else` / `end`, and expressions over `.ObjectMeta.{Name,Namespace,Labels,
Annotations}`, `.DeploymentMeta.{Name,Namespace,Kind}`, `.Spec.ServiceAccountName`, `.Revision`, `.ProxyImage`,
`.ProxyInitImage`, `.Values.*`, `.MeshConfig.*`, `$c.Name`, `$c.Image`, string literals, with `eq ne not and or
index default quote lower upper toLower toUpper`. A substituted value must be plain text (no spaces, quotes, `#`,
no `:` first or last...) unless piped to `quote`, so a tenant's annotation can never add YAML structure.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from meshboot import yamlsafe
from webhook.errors import ConfigError, InjectionError

ANNOTATION_TEMPLATES = "inject.istio.io/templates"
SIDECAR = "sidecar"
# Built-ins rendered in code; each renders istio-proxy, so at most one of them per pod.
PROXY_TEMPLATES = ("sidecar", "gateway", "grpc-agent")
# Istio's other built-ins: their text in an Istio ConfigMap is skipped, selecting them refused with the reason.
UNSUPPORTED_ISTIO = {
    "waypoint": "ambient mode is not supported by meshboot",
    "kube-gateway": "Gateway API deployments are not supported by meshboot",
    "agentgateway": "agentgateway is not supported by meshboot",
    "agentgateway-waypoint": "agentgateway is not supported by meshboot",
}
MAX_TEMPLATES = 32
MAX_TEMPLATE_BYTES = 64 * 1024
MAX_RENDERED_BYTES = 512 * 1024
MAX_SELECTED = 16
MAX_NAME = 63
MAX_ACTIONS = 4096
MAX_STEPS = 100_000          # nodes run per render (a range runs its body once per container)
MAX_NESTING = 32             # if/range blocks, parentheses and pipeline stages: compiling and rendering recurse
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")
# Unquoted output: characters that never start YAML structure, and not a value YAML reads as more than a scalar
# ("-" a list item, "=" YAML 1.1's value tag, "@..." reserved, "---" / "..." document markers at a line's start,
# ":" first or last a mapping; inside, as in an image's tag, it is text).
_PLAIN = re.compile(r"^(?![-=]$|@|---|\.\.\.|:)(?!.*:$)[A-Za-z0-9_./@+=:-]*$")

# grpc-simple (proxyless gRPC without an agent): a bootstrap written by an init container, pointed at by each app
# container's GRPC_XDS_BOOTSTRAP. Istio's template, not meshboot's own: https://github.com/istio/istio, path
# manifests/charts/istio-control/istio-discovery/files/grpc-simple.yaml, commit
# 29bcc3ca14c02eae571c3f8a879ecb5f0e03c45a; copyright Istio Authors, Apache License 2.0
# (https://www.apache.org/licenses/LICENSE-2.0). Its init script is kept byte for byte (Istio's grpc-simple golden
# checks it); meshboot changed the layout (flow-style lists), `range $c` for `range $index, $container`, and the
# probe-rewrite key under metadata.annotations, where Istio's golden shows it.
GRPC_SIMPLE = """\
metadata:
  annotations:
    sidecar.istio.io/rewriteAppHTTPProbers: "false"
spec:
  initContainers:
  - name: grpc-bootstrap-init
    image: busybox:1.28
    volumeMounts:
    - {mountPath: /var/lib/grpc/data/, name: grpc-io-proxyless-bootstrap}
    env:
    - {name: INSTANCE_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
    - name: ISTIO_NAMESPACE
      value: |
        {{ .Values.global.istioNamespace }}
    command:
    - sh
    - -c
    - |-
      NODE_ID="sidecar~${INSTANCE_IP}~${POD_NAME}.${POD_NAMESPACE}~cluster.local"
      SERVER_URI="dns:///istiod.${ISTIO_NAMESPACE}.svc:15010"
      echo '
      {
        "xds_servers": [
          {
            "server_uri": "'${SERVER_URI}'",
            "channel_creds": [{"type": "insecure"}],
            "server_features" : ["xds_v3"]
          }
        ],
        "node": {
          "id": "'${NODE_ID}'",
          "metadata": {
            "GENERATOR": "grpc"
          }
        }
      }' > /var/lib/grpc/data/bootstrap.json
  containers:
  {{- range $c := .Spec.Containers }}
  - name: {{ $c.Name }}
    env:
    - {name: GRPC_XDS_BOOTSTRAP, value: /var/lib/grpc/data/bootstrap.json}
    - {name: GRPC_GO_LOG_VERBOSITY_LEVEL, value: "99"}
    - {name: GRPC_GO_LOG_SEVERITY_LEVEL, value: info}
    volumeMounts:
    - {mountPath: /var/lib/grpc/data/, name: grpc-io-proxyless-bootstrap}
  {{- end }}
  volumes:
  - name: grpc-io-proxyless-bootstrap
    emptyDir: {}
"""


# ---- the template language subset -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Out:
    expr: Any


@dataclass(frozen=True)
class Range:
    var: str
    index: str | None
    source: str             # "Containers" | "InitContainers"
    body: tuple[Any, ...]


@dataclass(frozen=True)
class If:
    cond: Any
    then: tuple[Any, ...]
    orelse: tuple[Any, ...]


@dataclass(frozen=True)
class Template:
    """A compiled custom template."""

    name: str
    body: tuple[Any, ...]


_FUNCS = ("eq", "ne", "not", "and", "or", "index", "default", "quote", "lower", "upper", "toLower", "toUpper")
_ROOT_FIELDS = {
    "ObjectMeta": ("Name", "Namespace", "Labels", "Annotations"),
    "DeploymentMeta": ("Name", "Namespace", "Kind"),
    "Spec": ("ServiceAccountName",),
}
_ROOT_SCALARS = ("Revision", "ProxyImage", "ProxyInitImage")
_CONTAINER_FIELDS = ("Name", "Image")
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)|(?P<punct>[()|])|(?P<word>[^\s()|"`]+))')


class _Compiler:
    def __init__(self, name: str) -> None:
        self.name = name
        self.vars: list[str] = []
        self.depth = 0

    def deeper(self, src: str) -> None:
        """One level more of blocks, parentheses or pipeline stages, refused past MAX_NESTING (both the compiler
        and the renderer recurse once per level)."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.fail(src, f"nested deeper than {MAX_NESTING} levels")

    def fail(self, action: str, why: str) -> ConfigError:
        return ConfigError(f"custom template {self.name!r}: {{{{{action.strip()[:60]}}}}}: {why}")

    def tokens(self, src: str) -> list[tuple[str, str]]:
        out, pos = [], 0
        while pos < len(src):
            m = _TOKEN.match(src, pos)
            if m is None or m.end() == pos:
                if src[pos:].strip() == "":
                    break
                raise self.fail(src, "cannot read this expression")
            pos = m.end()
            kind = m.lastgroup or ""
            out.append((kind, m.group(kind)))
        return out

    def expr(self, src: str) -> Any:
        toks = self.tokens(src)
        node, rest = self._pipeline(toks, src)
        if rest:
            raise self.fail(src, f"unexpected {rest[0][1]!r}")
        return node

    def _pipeline(self, toks: list[tuple[str, str]], src: str) -> tuple[Any, list[tuple[str, str]]]:
        node, toks = self._command(toks, src)
        outer = self.depth
        while toks and toks[0] == ("punct", "|"):
            self.deeper(src)
            fn, toks = self._command(toks[1:], src)
            if not (isinstance(fn, tuple) and fn[0] == "call"):
                raise self.fail(src, "a pipeline stage must be a function")
            node = ("call", fn[1], (*fn[2], node))
        self.depth = outer
        return node, toks

    def _command(self, toks: list[tuple[str, str]], src: str) -> tuple[Any, list[tuple[str, str]]]:
        if not toks:
            raise self.fail(src, "missing operand")
        kind, word = toks[0]
        if kind == "word" and word in _FUNCS:
            args: list[Any] = []
            toks = toks[1:]
            while toks and toks[0] not in (("punct", "|"), ("punct", ")")):
                arg, toks = self._operand(toks, src)
                args.append(arg)
            return ("call", word, tuple(args)), toks
        return self._operand(toks, src)

    def _operand(self, toks: list[tuple[str, str]], src: str) -> tuple[Any, list[tuple[str, str]]]:
        kind, word = toks[0]
        if kind == "str":
            try:
                return ("lit", json.loads(word) if word.startswith('"') else word[1:-1]), toks[1:]
            except ValueError:  # Go's other escapes (\x41, \a, octal) are outside the subset
                raise self.fail(src, f"cannot read the string {word[:40]}: only JSON's escapes are supported"
                                ) from None
        if (kind, word) == ("punct", "("):
            self.deeper(src)
            node, rest = self._pipeline(toks[1:], src)
            if not rest or rest[0] != ("punct", ")"):
                raise self.fail(src, "unbalanced parentheses")
            self.depth -= 1
            return node, rest[1:]
        if kind == "word" and word in _FUNCS:
            return ("call", word, ()), toks[1:]
        if kind == "word":
            return self.path(word, src), toks[1:]
        raise self.fail(src, f"unexpected {word!r}")

    def path(self, word: str, src: str) -> Any:
        if word.startswith("$."):
            word = word[1:]
        if word.startswith("$"):
            var, _, field = word.partition(".")
            if var not in self.vars:
                raise self.fail(src, f"undefined variable {var}")
            if field and field not in _CONTAINER_FIELDS:
                raise self.fail(src, f"{word}: a container offers only {', '.join(_CONTAINER_FIELDS)}")
            return ("var", var, field)
        parts = word.split(".")
        if word.startswith(".") and len(parts) >= 2:
            head = parts[1]
            if head in ("Values", "MeshConfig") and len(parts) >= 3 and all(parts[2:]):
                return ("tree", head, tuple(parts[2:]))
            if head in _ROOT_SCALARS and len(parts) == 2:
                return ("root", head, "")
            if head in _ROOT_FIELDS and len(parts) == 3 and parts[2] in _ROOT_FIELDS[head]:
                return ("root", head, parts[2])
        raise self.fail(src, f"{word} is not available to custom templates (see docs/webhook.md, Templates)")

    def block(self, actions: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[tuple[Any, ...], int,
                                                                                            str]:
        out: list[Any] = []
        while i < len(actions):
            kind, body = actions[i]
            if kind == "text":
                out.append(Text(body))
                i += 1
                continue
            word = body.split(None, 1)[0] if body.strip() else ""
            if word in stop:
                return tuple(out), i, word
            if word in ("end", "else"):
                raise self.fail(body, f"unexpected {word}")
            node: Any
            if word == "range":
                node, i = self.range_(actions, i, body)
            elif word == "if":
                node, i = self.if_(actions, i, body)
            elif word in ("define", "template", "block", "with", "break", "continue") or ":=" in body or (
                    word.startswith("$") and "=" in body):
                raise self.fail(body, f"{word or body!r} is not supported by meshboot's template subset")
            else:
                node, i = Out(self.expr(body)), i + 1
            out.append(node)
        if stop:
            raise self.fail(actions[-1][1] if actions else "", "missing {{end}}")
        return tuple(out), i, ""

    def range_(self, actions: list[tuple[str, str]], i: int, body: str) -> tuple[Range, int]:
        m = re.fullmatch(r"\s*range\s+(?:(\$\w+)\s*,\s*)?(\$\w+)\s*:=\s*(\$?\.Spec\.(Containers|InitContainers))\s*",
                         body)
        if m is None:
            raise self.fail(body, "only `range [$i,] $c := .Spec.Containers` (or .Spec.InitContainers) is supported")
        index, var, source = m.group(1), m.group(2), m.group(4)
        self.vars += [v for v in (index, var) if v]
        self.deeper(body)
        inner, j, _ = self.block(actions, i + 1, ("end",))
        self.depth -= 1
        del self.vars[-(2 if index else 1):]
        return Range(var, index, source, inner), j + 1

    def if_(self, actions: list[tuple[str, str]], i: int, body: str) -> tuple[If, int]:
        cond = self.expr(body.split(None, 1)[1] if len(body.split(None, 1)) > 1 else "")
        self.deeper(body)
        then, j, word = self.block(actions, i + 1, ("else", "end"))
        orelse: tuple[Any, ...] = ()
        if word == "else":
            rest = actions[j][1].split(None, 1)
            if len(rest) > 1:
                raise self.fail(actions[j][1], "`else if` is not supported; nest an if")
            orelse, j, word = self.block(actions, j + 1, ("end",))
        self.depth -= 1
        return If(cond, then, orelse), j + 1


def _split(text: str, name: str) -> list[tuple[str, str]]:
    """Text and actions, with Go's `{{-` / `-}}` whitespace trimming applied; comments dropped."""
    out: list[tuple[str, str]] = []
    pos = 0
    while True:
        start = text.find("{{", pos)
        if start < 0:
            out.append(("text", text[pos:]))
            break
        end = text.find("}}", start + 2)
        if end < 0:
            raise ConfigError(f"custom template {name!r}: unclosed {{{{ at offset {start}")
        chunk = text[pos:start]
        inner = text[start + 2:end]
        if inner[:1] == "-" and inner[1:2].isspace():
            chunk, inner = chunk.rstrip(), inner[2:]
        trim_after = inner[-1:] == "-" and inner[-2:-1].isspace()
        if trim_after:
            inner = inner[:-2]
        out.append(("text", chunk))
        stripped = inner.strip()
        if not (stripped.startswith("/*") and stripped.endswith("*/")):
            out.append(("action", inner))
        pos = end + 2
        if trim_after:
            while pos < len(text) and text[pos].isspace():
                pos += 1
        if len(out) > MAX_ACTIONS:
            raise ConfigError(f"custom template {name!r}: more than {MAX_ACTIONS} actions")
    return [(k, v) for k, v in out if k == "action" or v]


def compile_template(name: str, text: Any) -> Template:
    """Check and compile one custom template (raises ConfigError naming it)."""
    if not isinstance(name, str) or len(name) > MAX_NAME or not _NAME.match(name):
        raise ConfigError(f"templates: {str(name)[:64]!r} is not a template name (lower-case letters, digits, "
                          f"'-', '.', '_'; at most {MAX_NAME})")
    if not isinstance(text, str):
        raise ConfigError(f"custom template {name!r}: want the template text as a string")
    if len(text.encode()) > MAX_TEMPLATE_BYTES:
        raise ConfigError(f"custom template {name!r}: larger than {MAX_TEMPLATE_BYTES} bytes")
    body, _, _ = _Compiler(name).block(_split(text, name), 0, ())
    return Template(name, body)


def load_templates(raw: Any, where: str) -> dict[str, Template]:
    """The `templates:` map: custom ones compiled; built-ins' and Istio's unsupported ones' text skipped (an Istio
    ConfigMap carries the text of every built-in, which meshboot renders in code)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: templates: want a map of template name to text")
    if len(raw) > MAX_TEMPLATES:
        raise ConfigError(f"{where}: templates: more than {MAX_TEMPLATES} templates")
    out: dict[str, Template] = {}
    for name, text in raw.items():
        if name in PROXY_TEMPLATES or name in UNSUPPORTED_ISTIO or name == "grpc-simple":
            continue
        try:
            out[name] = compile_template(name, text)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    return out


def load_aliases(raw: Any, where: str) -> dict[str, tuple[str, ...]]:
    """`aliases:` name -> list of template names (Istio's config field)."""
    if raw is None:
        return {}
    ok = isinstance(raw, Mapping) and len(raw) <= MAX_TEMPLATES and all(
        isinstance(k, str) and isinstance(v, list) and len(v) <= MAX_SELECTED and all(isinstance(x, str) for x in v)
        for k, v in raw.items())
    if not ok:
        raise ConfigError(f"{where}: aliases: want a map of name to a list of at most {MAX_SELECTED} template names")
    return {k: tuple(v) for k, v in raw.items()}


def builtin_templates() -> dict[str, Template]:
    """The built-ins written in the template subset (grpc-simple)."""
    return {"grpc-simple": compile_template("grpc-simple", GRPC_SIMPLE)}


# ---- rendering --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Context:
    """What a custom template can read."""

    meta: Mapping[str, Any]
    spec: Mapping[str, Any]
    deploy: Mapping[str, str]
    values: Mapping[str, Any]
    mesh: Mapping[str, Any]
    scalars: Mapping[str, str]


def _truthy(v: Any) -> bool:
    return bool(v) if not isinstance(v, (int, float)) or isinstance(v, bool) else v != 0


def _call(fn: str, args: list[Any]) -> Any:
    def need(n: int) -> None:
        if len(args) != n:
            raise InjectionError(f"{fn} wants {n} arguments, got {len(args)}")
    if fn in ("eq", "ne"):
        need(2)
        return (args[0] == args[1]) == (fn == "eq")
    if fn == "not":
        need(1)
        return not _truthy(args[0])
    if fn in ("and", "or"):
        if not args:
            raise InjectionError(f"{fn} wants arguments")
        pick = next((a for a in args if _truthy(a) != (fn == "and")), args[-1])
        return pick
    if fn == "index":
        need(2)
        if not isinstance(args[1], str):  # a map or list as the key (Go: "value has type ...; should be string")
            raise InjectionError("index: the key must be a string")
        return args[0].get(args[1]) if isinstance(args[0], Mapping) else None
    if fn == "default":
        need(2)
        return args[1] if _truthy(args[1]) else args[0]
    if fn == "quote":
        need(1)
        return _Quoted(json.dumps("" if args[0] is None else _text(args[0])))
    need(1)
    return _text(args[0]).lower() if fn in ("lower", "toLower") else _text(args[0]).upper()


class _Quoted(str):
    """A value already quoted: printed verbatim."""


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (str, int, float)):
        return str(v)
    raise InjectionError("a map or list cannot be printed")


def _eval(node: Any, ctx: Context, scope: Mapping[str, Any]) -> Any:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "call":
        return _call(node[1], [_eval(a, ctx, scope) for a in node[2]])
    if kind == "var":
        v = scope[node[1]]
        return v if not node[2] else (v.get(node[2].lower()) if isinstance(v, Mapping) else None)
    if kind == "tree":
        cur: Any = ctx.values if node[1] == "Values" else ctx.mesh
        for part in node[2]:
            cur = cur.get(part) if isinstance(cur, Mapping) else None
        return cur
    head, field = node[1], node[2]
    if head in ctx.scalars:
        return ctx.scalars[head]
    if head == "ObjectMeta":
        return ctx.meta.get(field.lower()) or ({} if field in ("Labels", "Annotations") else "")
    if head == "DeploymentMeta":
        return ctx.deploy.get(field.lower(), "")
    return ctx.spec.get("serviceAccountName") or ""


class Budget:
    """The output and the work of all one pod's renders, bounded together: a pod naming a template 16 times (through
    aliases, up to 256 renders) must not buy that many times one render's bounds."""

    def __init__(self) -> None:
        self.size = 0
        self.steps = 0


class _Output:
    """The rendered text, charging its size and the work done to the pod's Budget (a range over a tenant's many
    containers, or nested ranges, must not turn a small template into a long render)."""

    def __init__(self, budget: Budget) -> None:
        self.parts: list[str] = []
        self.budget = budget

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.budget.size += len(text)
        if self.budget.size > MAX_RENDERED_BYTES:
            raise InjectionError(f"rendered output larger than {MAX_RENDERED_BYTES} bytes")

    def step(self) -> None:
        self.budget.steps += 1
        if self.budget.steps > MAX_STEPS:
            raise InjectionError(f"more than {MAX_STEPS} template steps")


def plain_text(s: str) -> bool:
    """Whether `s` may be printed unquoted: YAML reads it back as this one scalar wherever the template puts it."""
    return _PLAIN.match(s) is not None


def _run(body: tuple[Any, ...], ctx: Context, scope: dict[str, Any], out: _Output) -> None:
    for node in body:
        out.step()
        if isinstance(node, Text):
            out.add(node.text)
        elif isinstance(node, Out):
            v = _eval(node.expr, ctx, scope)
            s = v if isinstance(v, _Quoted) else _text(v)
            if not isinstance(v, _Quoted) and not plain_text(s):
                raise InjectionError(f"the value {s[:40]!r} is not plain text; the template must pipe it to quote")
            out.add(s)
        elif isinstance(node, If):
            _run(node.then if _truthy(_eval(node.cond, ctx, scope)) else node.orelse, ctx, scope, out)
        else:
            for i, c in enumerate(ctx.spec.get(node.source[0].lower() + node.source[1:]) or []):
                out.step()
                inner = {**scope, node.var: c}
                if node.index:
                    inner[node.index] = i
                _run(node.body, ctx, inner, out)


def render(tpl: Template, ctx: Context, budget: Budget | None = None) -> dict[str, Any]:
    """The template's overlay (metadata labels/annotations, spec), checked; InjectionError names the template.
    `budget`: the pod's, shared by all its renders (a fresh one when None)."""
    try:
        out = _Output(budget or Budget())
        _run(tpl.body, ctx, {}, out)
        doc = yamlsafe.load("".join(out.parts), max_bytes=MAX_RENDERED_BYTES)
    except InjectionError as e:
        raise InjectionError(f"failed to run injection template: template {tpl.name!r}: {e}") from None
    except yamlsafe.YAMLRefused as e:
        raise InjectionError(f"failed to run injection template: template {tpl.name!r}: {e}") from None
    why = overlay_shape_error(doc)
    if why:
        raise InjectionError(f"failed to run injection template: template {tpl.name!r}: {why}")
    return doc or {}


def overlay_shape_error(doc: Any) -> str | None:
    """Why a rendered template is not a pod overlay: metadata (labels, annotations: maps of strings) and spec."""
    if doc is None:
        return None
    if not isinstance(doc, dict) or set(doc) - {"metadata", "spec"}:
        return "want a mapping with only metadata and spec"
    meta = doc.get("metadata") or {}
    if not isinstance(meta, dict) or set(meta) - {"labels", "annotations"}:
        return "metadata: only labels and annotations may be set"
    for key in ("labels", "annotations"):
        m = meta.get(key)
        if m is not None and not (isinstance(m, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                              for k, v in m.items())):
            return f"metadata.{key}: want a map of strings"
    spec = doc.get("spec") or {}
    if not isinstance(spec, dict):
        return "spec: want a mapping"
    for key in ("containers", "initContainers", "volumes", "imagePullSecrets"):
        lst = spec.get(key)
        if lst is not None and not (isinstance(lst, list) and all(
                isinstance(x, dict) and isinstance(x.get("name"), str) and x["name"] for x in lst)):
            return f"spec.{key}: want a list of objects, each with a name"
    return None


# ---- selection --------------------------------------------------------------------------------------------------

def select(annotations: Mapping[str, str], defaults: tuple[str, ...], aliases: Mapping[str, tuple[str, ...]],
           known: Callable[[str], bool], have: Callable[[], list[str]]) -> list[str]:
    """The template names for a pod: the annotation's comma list (aliases expanded) or the defaults; a name that is
    not a template is refused with Istio's message, naming the annotation."""
    raw = annotations.get(ANNOTATION_TEMPLATES)
    names = [n.strip() for n in raw.split(",")] if raw is not None else list(defaults)
    if len(names) > MAX_SELECTED:
        raise InjectionError(f"failed to run injection template: annotation {ANNOTATION_TEMPLATES}: more than "
                             f"{MAX_SELECTED} templates")
    out: list[str] = []
    for n in names:
        out += list(aliases.get(n, (n,)))
    for n in out:
        if n in UNSUPPORTED_ISTIO:
            raise InjectionError(f"failed to run injection template: annotation {ANNOTATION_TEMPLATES}: template "
                                 f"{n!r}: {UNSUPPORTED_ISTIO[n]}")
        if not known(n):
            raise InjectionError(f"failed to run injection template: annotation {ANNOTATION_TEMPLATES}: requested "
                                 f"template {n[:MAX_NAME]!r} not found; have {', '.join(have())}")
    return out
