"""The images the kind suite tests, tagged by content: a hash of everything the two Dockerfiles build from.

A fixed tag lets a reused cluster (MESHBOOT_KIND_CLUSTER) keep running the pods of an earlier build: `helm upgrade`
with the same tag changes nothing. With the tag derived from the build inputs, changed code is a new tag, a changed
Deployment and newly injected pods; unchanged code reuses what is there. Built and loaded by `make kind-images`, the
same target the README's install path uses.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

DOCKERFILES = ("Dockerfile.webhook", "Dockerfile.agent")
IMAGES = {"Dockerfile.webhook": "meshboot-webhook", "Dockerfile.agent": "meshboot-agent"}
_SKIP_PARTS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def copy_sources(dockerfile_text: str) -> list[str]:
    """The build-context paths a Dockerfile's COPY/ADD lines name (`--from=` stages excluded; JSON form too)."""
    out: list[str] = []
    for line in dockerfile_text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from") for w in words[1:]) or len(args) < 2:
            continue
        if args[0].startswith("["):
            args = re.findall(r'"([^"]*)"', line)
        out.extend(a.strip('"') for a in args[:-1])
    return out


def _files(root: Path, rel: str) -> Iterator[Path]:
    path = root / rel
    if path.is_file():
        yield path
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and not (_SKIP_PARTS & set(p.relative_to(root).parts)) and p.suffix != ".pyc":
                yield p


def build_inputs(root: Path) -> list[Path]:
    """The Dockerfiles, .dockerignore and every file their COPY lines take, sorted and de-duplicated."""
    found = {root / d for d in DOCKERFILES}
    if (root / ".dockerignore").is_file():
        found.add(root / ".dockerignore")
    for d in DOCKERFILES:
        for rel in copy_sources((root / d).read_text()):
            found.update(_files(root, rel))
    return sorted(found)


def content_tag(root: Path, prefix: str = "e2e-") -> str:
    """`e2e-<12 hex>`: sha256 over each input's path and bytes (a rename or an edit changes it)."""
    h = hashlib.sha256()
    for p in build_inputs(root):
        data = p.read_bytes()
        h.update(f"{p.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return prefix + h.hexdigest()[:12]


def refs(hub: str, tag: str) -> list[str]:
    return [f"{hub}/{IMAGES[d]}:{tag}" for d in DOCKERFILES]
