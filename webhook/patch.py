"""RFC 6902 JSON Patch from the original pod to the injected one, made with `jsonpatch`.

jsonpatch compares every leaf via json.dumps, which dominates the cost on a pod; subtrees that are equal in both
documents produce no operations, so they are pruned first. Dict keys keep their paths, so the ops are the same.
"""
from __future__ import annotations

import json
from typing import Any

import jsonpatch

_MISSING = object()


class _Whole(tuple):
    """A list that changed, compared and replaced as one value: jsonpatch's element-wise list diff (LCS-style runs
    over serialized members) costs more than the rest of an injection together, and an injected pod's lists change
    by insertion at the front (init containers, volumes), which an element-wise diff turns into many ops anyway."""


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON (1 and True differ, unlike Python's ==)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _prune(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    pa: dict[str, Any] = {}
    pb: dict[str, Any] = {}
    for k, va in a.items():
        vb = b.get(k, _MISSING)
        if vb is va:  # untouched subtrees are shared with the original (the common case, checked first)
            continue
        if vb is _MISSING:
            pa[k] = va
        elif _same(va, vb):
            continue
        elif isinstance(va, dict) and isinstance(vb, dict):
            pa[k], pb[k] = _prune(va, vb)
        elif isinstance(va, list) and isinstance(vb, list):
            pa[k], pb[k] = _Whole(va), _Whole(vb)
        else:
            pa[k], pb[k] = va, vb
    for k, vb in b.items():
        if k not in a:
            pb[k] = vb
    return pa, pb


def _dumps(value: Any) -> str:
    """jsonpatch compares leaves by their JSON text; a changed list is already known to differ."""
    if isinstance(value, _Whole):
        return f"<list {id(value)}>"
    return json.dumps(value)


def _plain(op: dict[str, Any]) -> dict[str, Any]:
    v = op.get("value")
    if isinstance(v, _Whole):
        op["value"] = list(v)
    return op


def make_patch(original: dict[str, Any], final: dict[str, Any]) -> list[dict[str, Any]]:
    """JSON Patch operations turning `original` into `final`.

    The ops may share values with `final`: callers serialize them at once and must not mutate `final` afterwards.
    Move detection is off (an injection adds and replaces; it never moves), and so is jsonpatch's defensive deep
    copy of the ops, which together were 3/4 of the cost.
    """
    src, dst = _prune(original, final)
    try:
        builder = jsonpatch.DiffBuilder(src, dst, _dumps, optimization=False)
        # jsonpatch's internals, absent from its stubs; the except below covers a jsonpatch without them
        builder._compare_values((), None, src, dst)  # type: ignore[attr-defined]  # see the line above
        return [_plain(op) for op in builder.execute()]
    except (TypeError, AttributeError):  # a jsonpatch without these internals: the public, slower path
        return jsonpatch.make_patch(src, dst).patch
