"""A full match in linear time for the regular expressions Istio's RBAC string matchers carry.

Envoy matches `safe_regex` with RE2, in time linear in the text; Python's `re` backtracks, and a pattern like
istiod's namespace regex for a tenant's `namespaces: ["*a*a*a*…"]` (`.*/ns/.*a.*a.*a…/.*`) took minutes on one
principal. So `explain()` matches with a Thompson NFA over the subset istiod emits — literals, escaped
punctuation, `.`, groups with `|`, and `*`, `+`, `?` — and refuses anything else rather than guess.
"""
from __future__ import annotations

import functools

MAX_PATTERN = 4096     # characters: a longer pattern is refused
MAX_NESTING = 32       # groups within groups
_SPECIAL = frozenset("()|*+?.\\[]{}^$")


class Unsupported(ValueError):
    """The pattern is not in the subset (or not a valid regular expression); the message says where."""


class _Nfa:
    """Thompson's construction: node → epsilon successors, node → (character or None for `.`, successor)."""

    def __init__(self, pattern: str) -> None:
        if len(pattern) > MAX_PATTERN:
            raise Unsupported(f"longer than {MAX_PATTERN} characters")
        self.pattern, self.pos = pattern, 0
        self.eps: list[list[int]] = []
        self.step: list[tuple[str | None, int] | None] = []
        self.start, self.end = self._alternation(0)
        if self.pos != len(pattern):
            raise Unsupported(f"unbalanced ')' at {self.pos}")

    def _node(self) -> int:
        self.eps.append([])
        self.step.append(None)
        return len(self.eps) - 1

    def _peek(self) -> str:
        return self.pattern[self.pos] if self.pos < len(self.pattern) else ""

    def _alternation(self, depth: int) -> tuple[int, int]:
        branches = [self._sequence(depth)]
        while self._peek() == "|":
            self.pos += 1
            branches.append(self._sequence(depth))
        if len(branches) == 1:
            return branches[0]
        start, end = self._node(), self._node()
        for s, e in branches:
            self.eps[start].append(s)
            self.eps[e].append(end)
        return start, end

    def _sequence(self, depth: int) -> tuple[int, int]:
        start = end = self._node()
        while self._peek() not in ("", "|", ")"):
            s, e = self._repeat(depth)
            self.eps[end].append(s)
            end = e
        return start, end

    def _repeat(self, depth: int) -> tuple[int, int]:
        s, e = self._atom(depth)
        while self._peek() in ("*", "+", "?"):
            op = self._peek()
            self.pos += 1
            start, end = self._node(), self._node()
            self.eps[start].append(s)
            self.eps[e].append(end)
            if op != "+":
                self.eps[start].append(end)      # zero times
            if op != "?":
                self.eps[e].append(s)            # again
            s, e = start, end
        return s, e

    def _atom(self, depth: int) -> tuple[int, int]:
        at, char = self.pos, self._peek()
        self.pos += 1
        if char == "(":
            if depth >= MAX_NESTING or self._peek() == "?":
                raise Unsupported(f"group at {at}: nested too deep or with flags")
            inner = self._alternation(depth + 1)
            if self._peek() != ")":
                raise Unsupported(f"group at {at} is not closed")
            self.pos += 1
            return inner
        if char == "\\":
            char = self._peek()
            self.pos += 1
            if not char or char.isalnum() or not char.isprintable():
                raise Unsupported(f"escape at {at}: only escaped punctuation is read")
            return self._char(char)
        if char in _SPECIAL and char != ".":
            raise Unsupported(f"{char!r} at {at} is not read (classes, anchors, counted repetition)")
        return self._char(None if char == "." else char)

    def _char(self, char: str | None) -> tuple[int, int]:
        s, e = self._node(), self._node()
        self.step[s] = (char, e)
        return s, e

    def _closure(self, nodes: list[int]) -> set[int]:
        seen, todo = set(nodes), list(nodes)
        while todo:
            for nxt in self.eps[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def fullmatch(self, text: str) -> bool:
        current = self._closure([self.start])
        for ch in text:
            moved = [step[1] for n in current if (step := self.step[n]) is not None
                     and (step[0] == ch or (step[0] is None and ch != "\n"))]
            if not moved:
                return False
            current = self._closure(moved)
        return self.end in current


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> _Nfa:
    return _Nfa(pattern)


def fullmatch(pattern: str, text: str) -> bool:
    """Whether `pattern` matches all of `text` (RE2's semantics on the subset); Unsupported for another pattern."""
    return _compiled(pattern).fullmatch(text)
