"""Live iptables state (parsed `iptables-save`) against a planned RuleSet: drift, replace and cleanup texts (pure).

Why our own state check rather than Istio's: Istio's cleanup is derived from the *current* config, so rules left by a
different config survive and a rerun crash-loops on "chain already exists". Here the ISTIO_* footprint is read from
the live tables, so a replace or cleanup removes exactly what is there, in one iptables-restore transaction.
"""
from __future__ import annotations

from .record import Record, factory
from .rules import BUILTIN, TABLE_ORDER, Rule, RuleSet, is_istio_chain

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Hashable, Iterable
    from typing import TypeVar

    _K = TypeVar("_K", bound=Hashable)

CHECKED_TABLES = frozenset(TABLE_ORDER)


class Table(Record):
    name: str
    block: list[str] = factory(list)          # the save lines of this table, `*t` .. `COMMIT`
    chains: dict[str, list[str]] = factory(dict)  # chain -> rule specs (without `-A CHAIN`)


class LiveState(Record):
    tables: dict[str, Table] = factory(dict)

    def istio_chains(self) -> dict[tuple[str, str], list[str]]:
        return {(t.name, c): rules for t in self.tables.values() for c, rules in t.chains.items()
                if is_istio_chain(c)}

    def jumps(self) -> list[tuple[str, str, str]]:
        """(table, chain, spec) of every rule outside ISTIO_* chains whose target is an ISTIO_* chain."""
        out = []
        for t in self.tables.values():
            for chain, rules in t.chains.items():
                if is_istio_chain(chain):
                    continue
                for spec in rules:
                    target = spec_target(spec.split())
                    if target and is_istio_chain(target):
                        out.append((t.name, chain, spec))
        return out

    def has_footprint(self) -> bool:
        return bool(self.istio_chains())


def spec_target(tokens: list[str]) -> str | None:
    for i in range(len(tokens) - 2, -1, -1):
        if tokens[i] in ("-j", "-g"):
            return tokens[i + 1]
    return None


def parse_save(text: str) -> LiveState:
    """Parse `iptables-save` output (filter/nat/mangle/raw; comments and counters ignored)."""
    state = LiveState()
    table: Table | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            name = line[1:].strip()
            table = Table(name, [f"*{name}"])
            if name in CHECKED_TABLES:
                state.tables[name] = table
            continue
        if table is None:
            continue
        table.block.append(line)
        if line.startswith(":"):
            table.chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            table.chains.setdefault(chain, []).append(rest[0] if rest else "")
        elif line.startswith("-N "):
            table.chains.setdefault(line.split()[1], [])
    return state


def structural_drift(planned: RuleSet, live: LiveState, table: str | None = None) -> list[str]:
    """Differences visible without asking the kernel: chains, rule counts, jumps into ISTIO_* chains."""
    diffs: list[str] = []
    want = {k: v for k, v in planned.istio_chains().items() if table in (None, k[0])}
    have = {k: len(v) for k, v in live.istio_chains().items() if table in (None, k[0])}
    for key in sorted(want.keys() - have.keys()):
        diffs.append(f"chain {key[0]}/{key[1]} is missing")
    for key in sorted(have.keys() - want.keys()):
        diffs.append(f"chain {key[0]}/{key[1]} exists but this configuration does not create it")
    for key in sorted(want.keys() & have.keys()):
        if want[key] != have[key]:
            diffs.append(f"chain {key[0]}/{key[1]} has {have[key]} rules, this configuration has {want[key]}")
    want_jumps: dict[tuple[str, str, str | None], int] = _count(
        (r.table, r.chain, r.target) for r in planned.rules if table in (None, r.table)
        and not is_istio_chain(r.chain) and r.target and is_istio_chain(r.target))
    have_jumps = _count((t, c, spec_target(spec.split())) for t, c, spec in live.jumps() if table in (None, t))
    for jump in sorted(want_jumps.keys() | have_jumps.keys(), key=str):
        if want_jumps.get(jump, 0) != have_jumps.get(jump, 0):
            diffs.append(f"{jump[0]}/{jump[1]} has {have_jumps.get(jump, 0)} jumps to {jump[2]}, "
                         f"this configuration has {want_jumps.get(jump, 0)}")
    return diffs


def is_partial_apply(planned: RuleSet, live: LiveState) -> bool:
    """True when the live ISTIO_* footprint is this very plan with whole tables missing: what a run killed
    between two table commits leaves behind. Completing it is safe without --reconcile."""
    footprint = {t for t, _ in live.istio_chains()} | {t for t, _, _ in live.jumps()}
    if not footprint <= set(planned.tables()):
        return False
    missing = [t for t in planned.tables() if t not in footprint]
    return bool(missing) and all(not structural_drift(planned, live, t) for t in footprint)


def _count(items: Iterable[_K]) -> dict[_K, int]:
    out: dict[_K, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def builtin_rules(planned: RuleSet) -> list[Rule]:
    """Planned rules in builtin chains that do not jump to ISTIO_* (interface RETURNs, TPROXY marks)."""
    return [r for r in planned.rules if r.chain in BUILTIN
            and not (r.target and is_istio_chain(r.target))]


def removal_lines(live: LiveState, keep: set[tuple[str, str]], present: list[Rule]) -> dict[str, list[str]]:
    """Per table: restore lines that delete every jump into ISTIO_*, the given present builtin rules, and every
    live ISTIO_* chain (flushed; deleted unless in `keep`, which the caller re-fills)."""
    out: dict[str, list[str]] = {}
    for table, chain, spec in live.jumps():
        out.setdefault(table, []).append(f"-D {chain} {spec}")
    for r in present:
        out.setdefault(r.table, []).append(f"-D {r.chain} {' '.join(r.spec)}")
    chains = live.istio_chains()
    for table, chain in chains:
        out.setdefault(table, []).append(f"-F {chain}")
    for table, chain in chains:
        if (table, chain) not in keep:
            out.setdefault(table, []).append(f"-X {chain}")
    return out


def replace_text(planned: RuleSet, live: LiveState, present: list[Rule]) -> str:
    """One --noflush transaction per table that removes the live ISTIO_* footprint and writes the planned rules."""
    keep = set(planned.istio_chains())
    removal = removal_lines(live, keep, present)
    live_chains = set(live.istio_chains())
    lines: list[str] = []
    for table in TABLE_ORDER:
        mine = [r for r in planned.rules if r.table == table]
        if table not in removal and not mine:
            continue
        lines.append(f"* {table}")
        lines.extend(removal.get(table, []))
        lines.extend(f"-N {c}" for c in planned.chains(table) if (table, c) not in live_chains)
        lines.extend(r.restore_line() for r in mine)
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def cleanup_text(live: LiveState, present: list[Rule]) -> str:
    """One --noflush transaction per table removing every ISTIO_* chain, every jump into one, and `present`."""
    removal = removal_lines(live, set(), present)
    lines: list[str] = []
    for table in TABLE_ORDER:
        if table in removal:
            lines.extend([f"* {table}", *removal[table], "COMMIT"])
    return "\n".join(lines) + "\n" if lines else ""


def tables_of(text: str) -> list[str]:
    return [line[1:].strip() for line in text.splitlines() if line.startswith("*")]


def rollback_text(before: LiveState, tables: list[str]) -> str:
    """A full (not --noflush) restore input putting `tables` back exactly as they were before."""
    lines: list[str] = []
    for name in tables:
        t = before.tables.get(name)
        if t is not None:
            lines.extend(t.block)
        else:
            lines.extend([f"*{name}", "COMMIT"])
    return "\n".join(lines) + "\n"
