"""A small Dockerfile and .dockerignore reader: enough to check, without Docker, what an image copies and runs."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str   # upper-case: FROM, RUN, COPY, ...
    value: str     # the rest of the (joined) line
    line: int

    def exec_form(self) -> list[str] | None:
        """["a", "b"] (JSON) form, or None for shell form."""
        v = self.value.strip()
        if v.startswith("["):
            return json.loads(v)
        return None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def expand(self, text: str) -> str:
        """Substitute global ARG defaults (${X} and $X) as the FROM lines see them."""
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m.group(1) or m.group(2), m.group(0)), text)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations, drop comments and blank lines; keep the first line number."""
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        out.append((start, buf.strip()))
        buf = ""
    if buf:
        raise ValueError(f"dangling line continuation at line {start}")
    return out


def parse(path: Path) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for n, line in _logical_lines(path.read_text()):
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            k, _, v = value.strip().partition("=")
            args[k] = v
            continue
        if keyword == "FROM":
            parts = value.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
            continue
        if not stages:
            raise ValueError(f"{path}:{n}: {keyword} before FROM")
        stages[-1].instructions.append(Instruction(keyword, value.strip(), n))
    return Dockerfile(path=path, args=args, stages=stages)


def copy_sources(instr: Instruction) -> tuple[list[str], str | None]:
    """(sources, --from stage) of a COPY/ADD; the last word is the destination."""
    words = instr.exec_form() or shlex.split(instr.value)
    src_from = None
    plain = []
    for w in words:
        if w.startswith("--from="):
            src_from = w.split("=", 1)[1]
        elif not w.startswith("--"):
            plain.append(w)
    return plain[:-1], src_from


def _substitutions(script: str) -> tuple[str, list[str]]:
    """Cut out each $(...) (balanced, quote-aware) and return (script with SUBST in its place, the bodies)."""
    out, bodies, i = [], [], 0
    while i < len(script):
        if script.startswith("$(", i):
            depth, j, quote = 1, i + 2, None
            while j < len(script) and depth:
                ch = script[j]
                if quote:
                    quote = None if ch == quote else quote
                elif ch in "'\"":
                    quote = ch
                elif ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                j += 1
            if depth:
                raise ValueError(f"unbalanced $( in {script!r}")
            bodies.append(script[i + 2:j - 1])
            out.append("SUBST")
            i = j
        else:
            out.append(script[i])
            i += 1
    return "".join(out), bodies


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a RUN shell script (split on && || ; |, quotes respected), each as its words;
    the bodies of $(...) substitutions are included as commands too."""
    script, bodies = _substitutions(script)
    cmds: list[list[str]] = []
    for body in bodies:
        cmds += shell_commands(body)
    lex = shlex.shlex(script, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    words: list[str] = []
    tokens = [*lex, ";"]
    for tok in tokens:
        if tok in (";", "&&", "||", "|", "&"):
            # Leading VAR=value assignments are not the command.
            while words and re.match(r"^\w+=", words[0]):
                words = words[1:]
            if words:
                cmds.append(words)
            words = []
        else:
            words.append(tok)
    return cmds


def read_dockerignore(path: Path) -> list[tuple[bool, str]]:
    """Patterns as (negated, pattern), in order."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            neg = line.startswith("!")
            out.append((neg, line.lstrip("!").strip("/")))
    return out


def ignored(rel: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent directory excludes its contents."""
    rel = rel.strip("/")
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for neg, pat in patterns:
        for p in prefixes:
            if fnmatch.fnmatchcase(p, pat) or (pat.startswith("**/") and
                                               fnmatch.fnmatchcase(p.split("/")[-1], pat[3:])):
                result = not neg
                break
    return result
