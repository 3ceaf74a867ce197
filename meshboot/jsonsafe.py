"""JSON from tenants, parsed with size and depth bounded and NaN/Infinity refused.

Python's json module recurses once per nesting level: a few kilobytes of `[[[[...` raise RecursionError (not
ValueError), which callers that catch ValueError let escape. Depth is counted before parsing, so the parser never
sees a document nested deeper than MAX_DEPTH. NaN and Infinity are not JSON (Go and Kubernetes refuse them), nor is
a number that overflows to infinity.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_BYTES = 256 * 1024      # the API server's limit on all of an object's annotations together
MAX_DEPTH = 64

# A string (skipped whole, so brackets inside it do not count) or one bracket.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class JSONRefused(ValueError):
    """The text is not JSON we accept; the message says why, in one line, without naming Python types."""


def depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text` (brackets inside strings do not count)."""
    deepest = level = 0
    for m in _TOKENS.finditer(text):
        c = m.group()
        if c == "[" or c == "{":
            level += 1
            deepest = max(deepest, level)
        elif c == "]" or c == "}":
            level -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise JSONRefused(f"not valid JSON: {name} is not a JSON value")


def _finite_float(literal: str) -> float:
    """A number literal that overflows (1e999) would be Infinity: as much not JSON as the NaN/Infinity names."""
    value = float(literal)
    if not math.isfinite(value):
        shown = literal if len(literal) <= 32 else literal[:32] + "..."
        raise JSONRefused(f"not valid JSON: {shown} is not a finite number")
    return value


def load(text: str, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """One JSON value. JSONRefused for excess size or depth, NaN/Infinity, and any syntax error."""
    if not isinstance(text, str):
        raise JSONRefused("not valid JSON: want text")
    if len(text) > max_bytes:
        raise JSONRefused(f"JSON longer than {max_bytes} bytes")
    if text.count("[") + text.count("{") > max_depth and depth(text) > max_depth:
        raise JSONRefused(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except JSONRefused:
        raise
    except ValueError as e:  # json.JSONDecodeError: "Expecting value: line 1 column 2 (char 1)"
        raise JSONRefused(f"not valid JSON: {e}".replace("\n", " ")) from None
    except RecursionError:  # unreachable below MAX_DEPTH; kept so no caller ever sees it
        raise JSONRefused(f"JSON nested deeper than {max_depth} levels") from None
