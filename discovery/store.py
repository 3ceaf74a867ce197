"""The watched objects per kind, one version number, and "what changed" notifications for the push debouncer.

The watch threads write; the xDS generator reads a `Snapshot` (immutable: it never sees half an update) and the
debouncer subscribes to `Changed` notes. Notes are delivered in version order, under the store's lock, so a
subscriber must only hand them on (`on_loop` puts them on an asyncio loop). Stored objects are the bounded dicts
of `discovery.kinds` and are never mutated once stored, so snapshots share them.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

log = logging.getLogger("meshboot.discovery")

Key = tuple[str, str]            # (namespace, name); namespace "" for cluster-scoped kinds
Obj = dict[str, Any]


@dataclass(frozen=True)
class Changed:
    """The store moved to `version`; `keys` says which objects of which kinds were added, updated or removed."""

    version: int
    keys: Mapping[str, frozenset[Key]]

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self.keys)


@dataclass(frozen=True)
class Snapshot:
    """Every kind's objects at one version; `synced` names the kinds listed at least once (or known absent)."""

    version: int
    objects: Mapping[str, Mapping[Key, Obj]]
    synced: frozenset[str]

    def of(self, kind: str) -> Mapping[Key, Obj]:
        return self.objects.get(kind, MappingProxyType({}))

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self.of(kind).get((namespace, name))


Subscriber = Callable[[Changed], None]


class Store:
    """Thread-safe; `replace` after a (re)list, `put` per watch event, `snapshot` for readers."""

    def __init__(self, kinds: Iterable[str]) -> None:
        self._lock = threading.RLock()
        self._objects: dict[str, dict[Key, Obj]] = {k: {} for k in kinds}
        self._frozen: dict[str, Mapping[Key, Obj]] = {}       # per-kind read-only copies, rebuilt on change
        self._synced: set[str] = set()
        self._subscribers: list[Subscriber] = []
        self.version = 0

    def put(self, kind: str, key: Key, obj: Obj | None) -> Changed | None:
        """Add or update (`obj`) or remove (None) one object; a note only if that changed what is stored."""
        with self._lock:
            objects = self._objects[kind]
            if objects.get(key) == obj:
                return None
            if obj is None:
                del objects[key]
            else:
                objects[key] = obj
            return self._changed({kind: frozenset((key,))})

    def replace(self, kind: str, objects: Mapping[Key, Obj]) -> Changed | None:
        """The whole of `kind` after a list: what a missed watch dropped shows up here as changed keys."""
        with self._lock:
            old = self._objects[kind]
            keys = frozenset(k for k in old.keys() | objects.keys() if old.get(k) != objects.get(k))
            self._objects[kind] = dict(objects)
            first = kind not in self._synced
            self._synced.add(kind)
            if not keys and not first:
                return None
            return self._changed({kind: keys})

    def snapshot(self) -> Snapshot:
        with self._lock:
            for kind, objects in self._objects.items():
                if kind not in self._frozen:
                    self._frozen[kind] = MappingProxyType(dict(objects))
            return Snapshot(self.version, MappingProxyType(dict(self._frozen)), frozenset(self._synced))

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call `fn(Changed)` on every change (from a watch thread, in version order); returns the unsubscribe."""
        with self._lock:
            self._subscribers.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)
        return unsubscribe

    def _changed(self, keys: dict[str, frozenset[Key]]) -> Changed:
        self.version += 1
        for kind in keys:
            self._frozen.pop(kind, None)
        note = Changed(self.version, MappingProxyType(keys))
        for fn in list(self._subscribers):
            try:
                fn(note)
            except Exception:         # a broken subscriber must not stop the watches
                log.exception("discovery store subscriber failed")
        return note


def on_loop(loop: asyncio.AbstractEventLoop, fn: Subscriber) -> Subscriber:
    """A subscriber that runs `fn` on `loop` (call_soon_threadsafe keeps the order); a closed loop drops notes."""
    def deliver(note: Changed) -> None:
        try:
            loop.call_soon_threadsafe(fn, note)
        except RuntimeError:          # the loop is closed: nobody is listening any more
            pass
    return deliver
