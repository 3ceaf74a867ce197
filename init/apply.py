"""Apply a Plan to the current network namespace: read the live state, decide, then change it all-or-nothing.

Decisions are made for every family before anything changes: a clean family gets the rules, a family that already
has exactly these rules is left alone (exit 0), a drifted family is an error naming the differences — or, with
--reconcile, is replaced in one iptables-restore transaction. Each family is one `-restore --noflush`; when a
transaction spans several tables (iptables commits table by table) or a later family fails, the tables already
written are restored to their saved contents, so a failure never leaves half a rule set behind.
"""
from __future__ import annotations

from . import backend as B
from .config import CaptureConfig
from .log import Logger
from .record import Record, factory
from .rules import V4, V6, Plan, Rule, RuleSet
from .state import (
    LiveState,
    builtin_rules,
    cleanup_text,
    is_partial_apply,
    parse_save,
    replace_text,
    rollback_text,
    structural_drift,
    tables_of,
)

APPLY, NOTHING, REPLACE, CLEANUP = "apply", "nothing", "replace", "cleanup"
MAX_REPORTED = 5  # missing rules named in a drift error: the message stays one short line


class DriftError(RuntimeError):
    """The live ISTIO_* rules differ from this configuration and --reconcile was not given."""


class ApplyError(RuntimeError):
    """A restore failed; everything this run wrote has been rolled back."""


class Action(Record):
    family: int
    kind: str
    backend: B.Backend
    before: LiveState
    text: str = ""
    drift: list[str] = factory(list)
    rules: int = 0


def _planned(plan: Plan, family: int) -> RuleSet:
    return plan.v4 if family == V4 else plan.v6


def decide(cfg: CaptureConfig, plan: Plan, log: Logger) -> list[Action]:
    """Read each family's live state and decide what to do; changes nothing."""
    families = [V4] + ([V6] if cfg.enable_ipv6 or cfg.cleanup_only else [])
    actions: list[Action] = []
    drifted: list[str] = []
    for fam in families:
        try:
            b, text = B.detect_and_save(fam, cfg.force_iptables_binary)
        except B.BackendError:
            if fam == V6 and not cfg.enable_ipv6:
                log.debug("no IPv6 iptables backend; skipping IPv6 cleanup")
                continue
            raise
        log.debug("iptables backend", family=fam, backend=b.label)
        live = parse_save(text)
        planned = _planned(plan, fam)
        if cfg.cleanup_only:
            present = _present(b, [r for r in builtin_rules(planned) if r.table in live.tables], live)
            ctext = cleanup_text(live, present)
            actions.append(Action(fam, CLEANUP if ctext else NOTHING, b, live, ctext))
            continue
        if not live.has_footprint():
            actions.append(Action(fam, APPLY, b, live, planned.restore_text(), rules=len(planned.rules)))
            continue
        drift = structural_drift(planned, live)
        if drift and is_partial_apply(planned, live):
            log.info("completing a partially applied rule set", family=f"IPv{fam}", drift="; ".join(drift))
            present = _present(b, builtin_rules(planned), live)
            actions.append(Action(fam, REPLACE, b, live, replace_text(planned, live, present), drift,
                                  len(planned.rules)))
            continue
        if not drift:
            drift = _missing(b, planned, live)
        if drift and not cfg.reconcile:
            drifted.append(f"IPv{fam}: " + "; ".join(drift))
            continue
        if not drift and not cfg.force_apply:
            actions.append(Action(fam, NOTHING, b, live))
            continue
        present = _present(b, builtin_rules(planned), live)
        actions.append(Action(fam, REPLACE, b, live, replace_text(planned, live, present), drift,
                              len(planned.rules)))
    if drifted:
        raise DriftError("the ISTIO_* rules in this network namespace differ from this configuration ("
                         + " / ".join(drifted) + "); nothing was changed. Rerun with --reconcile to replace "
                         "them, or --cleanup-only to remove them")
    return actions


def _unmatched(rules: list[Rule], live: LiveState, family: int) -> list[Rule]:
    """The rules whose `iptables-save` form (init/canon.py) is not in the live save, each live rule matching one
    planned rule at most. One save answers for thousands of rules; only these need asking the kernel."""
    from .canon import canonical  # noqa: PLC0415 - only a rerun compares against the save

    have: dict[tuple[str, str, str], int] = {}
    for t in live.tables.values():
        for chain, specs in t.chains.items():
            for spec in specs:
                key = (t.name, chain, spec)
                have[key] = have.get(key, 0) + 1
    out: list[Rule] = []
    for r in rules:
        try:
            key = (r.table, r.chain, canonical(r.spec, family))
        except (ValueError, OSError, IndexError):  # a shape canon.py does not know: let -C decide
            out.append(r)
            continue
        if have.get(key, 0) > 0:
            have[key] -= 1
        else:
            out.append(r)
    return out


def _present(b: B.Backend, rules: list[Rule], live: LiveState) -> list[Rule]:
    """The rules the kernel holds: found in the save, or (the rest) confirmed by a batched -C."""
    unknown = _unmatched(rules, live, b.family)
    held = B.check_all(b, [r.check_args() for r in unknown])
    absent = {id(r) for r, ok in zip(unknown, held, strict=True) if not ok}
    return [r for r in rules if id(r) not in absent]


def _missing(b: B.Backend, planned: RuleSet, live: LiveState) -> list[str]:
    """Planned rules the kernel lacks, at most MAX_REPORTED of them; when the save shows them all, no extra
    command runs at all."""
    unknown = _unmatched(planned.rules, live, b.family)
    held = B.check_all(b, [r.check_args() for r in unknown], max_missing=MAX_REPORTED)
    out = [f"rule missing: -t {r.table} {r.restore_line()}" for r, ok in zip(unknown, held, strict=True) if not ok]
    return out + (["(more may differ)"] if len(out) >= MAX_REPORTED else [])


def execute(actions: list[Action], log: Logger) -> None:
    """Run the decided restores in order; on any failure roll back what was written, then raise ApplyError."""
    done: list[Action] = []
    for act in actions:
        if act.kind == NOTHING or not act.text:
            continue
        try:
            B.restore(act.backend, act.text)
        except B.BackendError as e:
            tables = tables_of(act.text)
            undo = ([act] if len(tables) > 1 else []) + list(reversed(done))
            _rollback(undo, log)
            raise ApplyError(f"{e}; nothing was changed (rolled back {len(undo)} transaction(s))") from None
        done.append(act)
        if act.kind == REPLACE:
            log.info("iptables rules replaced", family=f"IPv{act.family}", backend=act.backend.label,
                     rules=act.rules, drift="; ".join(act.drift) or "none (forced)")
        elif act.kind == CLEANUP:
            log.info("iptables rules removed", family=f"IPv{act.family}", backend=act.backend.label)
        else:
            log.info("iptables rules applied", family=f"IPv{act.family}", backend=act.backend.label,
                     rules=act.rules)


def _rollback(actions: list[Action], log: Logger) -> None:
    for act in actions:
        text = rollback_text(act.before, tables_of(act.text))
        try:
            B.restore(act.backend, text, noflush=False)
        except B.BackendError as e:  # pragma: no cover - the saved state restores unless the kernel changed
            log.error("rollback failed; run with --reconcile to repair", family=f"IPv{act.family}", error=str(e))


def apply_plan(cfg: CaptureConfig, plan: Plan, log: Logger) -> list[Action]:
    """decide() then execute(); returns the actions taken (tests extend the Plan to prove atomicity)."""
    actions = decide(cfg, plan, log)
    if all(a.kind == NOTHING for a in actions):
        log.info("iptables rules already in place; nothing to do" if not cfg.cleanup_only
                 else "no ISTIO_* rules to remove")
    execute(actions, log)
    if log.enabled("debug"):
        for act in actions:
            log.debug("final iptables state", family=f"IPv{act.family}", save=B.save(act.backend))
    return actions
