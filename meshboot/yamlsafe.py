"""YAML from tenants, parsed with aliases refused and size and depth bounded.

A few hundred bytes of anchors and aliases ("billion laughs") expand to gigabytes when the parsed document is walked
or serialized; PyYAML's safe_load builds the shared references without complaint. Go's sigs.k8s.io/yaml bounds the
expansion; refusing aliases outright is simpler and no ProxyConfig, volume or override needs them. Depth is bounded
so a deeply nested document cannot exhaust the parser's recursion.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import yaml

MAX_BYTES = 256 * 1024      # the API server's limit on all of an object's annotations together
MAX_DEPTH = 64


class YAMLRefused(ValueError):
    """The text is not YAML we accept; the message says why, in one line, without naming Python types."""


_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def _bracket_depth(text: str) -> int:
    """Deepest nesting of [ and { in `text`, brackets in scalars included (an over-estimate only for text that
    holds dozens of unclosed brackets). PyYAML's scanner keeps one possible key per open flow collection and walks
    them all for every token, so deep flow nesting costs time quadratic in its depth before any node is composed:
    8 KiB of '[' took 2 s. Counted before the parser sees the text."""
    deepest = level = 0
    for c in _NOT_BRACKETS.sub("", text):
        level = level + 1 if c in "[{" else max(level - 1, 0)
        deepest = max(deepest, level)
    return deepest


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses alias nodes and documents nested deeper than MAX_DEPTH (the pure-Python path)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _alias_refused(self.peek_event())
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YAMLRefused(f"YAML nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _alias_refused(event: Any) -> YAMLRefused:
    mark = event.start_mark
    return YAMLRefused(f"YAML aliases (*name) are not allowed (line {mark.line + 1}, column {mark.column + 1})")


_CLoader: Any = getattr(yaml, "CSafeLoader", None)   # PyYAML built with libyaml (the wheels are)
_OPEN = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_CLOSE = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


def _check_events(loader: Any) -> None:
    """libyaml's composer is C and cannot be hooked: walk its events first (C speed) for aliases and depth."""
    depth = 0
    while loader.check_event():
        event = loader.get_event()
        if isinstance(event, yaml.AliasEvent):
            raise _alias_refused(event)
        if isinstance(event, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                raise YAMLRefused(f"YAML nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, _CLOSE):
            depth -= 1


def _new_loader(text: str) -> Any:
    """The libyaml loader when there is one (events checked by a first pass), else the pure-Python bounded one."""
    if _CLoader is None:
        return _BoundedLoader(text)
    scan = _CLoader(text)
    try:
        _check_events(scan)
    finally:
        scan.dispose()
    return _CLoader(text)


def load(text: str, max_bytes: int = MAX_BYTES) -> Any:
    """One YAML document (JSON is YAML). YAMLRefused for aliases, excess size or depth, and any syntax error."""
    return _parse(text, max_bytes, lambda loader: loader.get_single_data())


def load_all(text: str, max_bytes: int = MAX_BYTES) -> list[Any]:
    """Every document of a multi-document stream, with the same bounds as `load`."""
    def every(loader: Any) -> list[Any]:
        docs = []
        while loader.check_data():
            docs.append(loader.get_data())
        return docs
    return _parse(text, max_bytes, every)


def _parse(text: str, max_bytes: int, read: Callable[[Any], Any]) -> Any:
    """The bounds checked before PyYAML sees the text, then `read(loader)` with every failure as YAMLRefused."""
    if len(text) > max_bytes:
        raise YAMLRefused(f"YAML longer than {max_bytes} bytes")
    if _bracket_depth(text) > MAX_DEPTH:
        raise YAMLRefused(f"YAML nested deeper than {MAX_DEPTH} levels")
    loader = None
    try:
        loader = _new_loader(text)  # the reader checks for non-printable characters here
        return read(loader)
    except YAMLRefused:
        raise
    except yaml.YAMLError as e:
        raise YAMLRefused(f"not valid YAML: {e}".replace("\n", " ")) from None
    except (RecursionError, ValueError, TypeError, OverflowError) as e:
        # Constructors raise these for e.g. an out-of-range timestamp or a huge float literal.
        raise YAMLRefused(f"not valid YAML: {type(e).__name__.lower()} while building the value") from None
    finally:
        if loader is not None:
            loader.dispose()
