"""Pushes: what changed (a PushRequest), Istio's debounce as a pure state machine, and the queue that runs it.

Changes arrive in bursts (a rollout touches many endpoints at once). istiod waits until nothing has changed for
`PILOT_DEBOUNCE_AFTER` (100 ms), but never longer than `PILOT_DEBOUNCE_MAX` (10 s) after the first change, merges
what came in, and pushes once; one push runs at a time. A merge of endpoint-only changes stays endpoint-only (an
EDS push of just those clusters); any other change makes the push full. A full push may be limited to some types
(istiod's scoped push: an AuthorizationPolicy-only change re-sends LDS only, where policies live); merging keeps it
limited only while every full push merged in was.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from . import metrics
from . import protocol as P
from .snapshot import Snapshot

log = logging.getLogger("meshboot.discovery")

DEBOUNCE_AFTER = 0.1     # PILOT_DEBOUNCE_AFTER
DEBOUNCE_MAX = 10.0      # PILOT_DEBOUNCE_MAX


@dataclass(frozen=True)
class PushRequest:
    """One push: the snapshot to serve (newest wins on merge), whether it is full, and for an endpoint-only push the
    EDS cluster names whose endpoints changed. `types`: the type URLs a full push re-sends (None: every watched type);
    a full push limited to types without EDS still carries the `endpoints` of endpoint-only pushes merged into it.
    `start` is when the first merged change arrived (monotonic)."""
    snapshot: Snapshot
    full: bool = True
    endpoints: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()
    start: float = field(default_factory=time.monotonic)
    types: frozenset[str] | None = None

    def merge(self, newer: PushRequest) -> PushRequest:
        """Union of what changed; full if either is, of all types if either full one is, else of the union of the
        full ones' types; the changed EDS clusters kept unless the result re-sends all of EDS; the newer snapshot;
        the earlier start."""
        full = self.full or newer.full
        types: frozenset[str] | None = None
        if full:
            limited = [r.types for r in (self, newer) if r.full]
            if all(t is not None for t in limited):
                types = frozenset(u for t in limited if t is not None for u in t)
        endpoints = self.endpoints | newer.endpoints
        if full and (types is None or P.EDS in types):
            endpoints = frozenset()
        return PushRequest(snapshot=newer.snapshot, full=full, endpoints=endpoints,
                           reasons=self.reasons | newer.reasons, start=min(self.start, newer.start), types=types)

    def sends(self, type_url: str) -> bool:
        """Whether this (full) push re-sends every watched resource of `type_url`."""
        return self.full and (self.types is None or type_url in self.types)


@dataclass
class Debounce:
    """Pure: `offer` changes with their arrival time, `deadline` says when the merged push is due, `take` it then."""
    quiet: float = DEBOUNCE_AFTER
    max_delay: float = DEBOUNCE_MAX
    pending: PushRequest | None = None
    first: float = 0.0
    last: float = 0.0

    def offer(self, request: PushRequest, now: float) -> None:
        if self.pending is None:
            self.pending, self.first = request, now
        else:
            self.pending = self.pending.merge(request)
        self.last = now

    def deadline(self) -> float | None:
        if self.pending is None:
            return None
        return min(self.last + self.quiet, self.first + self.max_delay)

    def take(self, now: float) -> PushRequest | None:
        due = self.deadline()
        if due is None or now < due:
            return None
        request, self.pending = self.pending, None
        return request


def settle_heap() -> None:
    """At a full push, once its model is built: collect every garbage cycle, then freeze what survives (the watched
    objects, the model) so that the collector's automatic full collections, which stop the loop mid-push, skip it.
    At 1,000 services x 5 endpoints the server tracks ~134,000 objects (the store's ~73,000 most of them) and a full
    collection took 160-190 ms; one landed among 30 endpoint pushes of the bench, the convergence tail. Unfreezing
    first means a cycle that dies after a freeze is collected at the next full push (never leaked for good)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class PushQueue:
    """Runs the debounce in the event loop and calls `push` with each merged request, one at a time (changes that
    arrive during a push are merged into the next one)."""

    def __init__(self, push: Callable[[PushRequest], Awaitable[None]], quiet: float = DEBOUNCE_AFTER,
                 max_delay: float = DEBOUNCE_MAX) -> None:
        self._push = push
        self._debounce = Debounce(quiet, max_delay)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def enqueue(self, request: PushRequest) -> None:
        """A change: merged into the pending push; the debounce timer starts with the first one."""
        metrics.PUSH_TRIGGERS.inc("endpoint" if not request.full else "config")
        self._debounce.offer(request, time.monotonic())
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="discovery-push-queue")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            due = self._debounce.deadline()
            if due is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)      # later changes only move the deadline later: re-check then
                continue
            request = self._debounce.take(time.monotonic())
            if request is None:
                continue
            metrics.DEBOUNCE_TIME.observe(time.monotonic() - request.start)
            try:
                await self._push(request)
            except Exception:
                log.exception("push failed")
