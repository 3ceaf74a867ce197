"""The interface the ADS server serves from, and the simplest implementation of it.

The resource generator (generate.py) implements `Snapshot`; the server never builds configuration itself. A
snapshot is immutable once handed to a push: a change is a new snapshot with a new version.
"""
from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Mapping
from typing import Protocol

from google.protobuf.message import Message

from .protocol import Proxy

_counter = itertools.count(1)


def push_version(now: dt.datetime | None = None) -> str:
    """istiod's PushVersion, `<RFC3339>/<counter>`: what every response of one push carries as its version."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{stamp}/{next(_counter)}"


class Snapshot(Protocol):
    """Everything one push serves.

    `resources_for(proxy, type_url)` returns every resource of that type the proxy may see, by name (the server
    picks what the proxy subscribed to). Return the *same message object* for a resource that several proxies
    share: the server serializes each object once per push, so common configuration costs one encoding however
    many proxies are connected; per-proxy objects are encoded per proxy. Unknown types return an empty mapping.
    """

    @property
    def version(self) -> str: ...

    def resources_for(self, proxy: Proxy, type_url: str) -> Mapping[str, Message]: ...


class StaticSnapshot:
    """The same resources for every proxy: `{type_url: {name: message}}`."""

    def __init__(self, resources: Mapping[str, Mapping[str, Message]], version: str | None = None) -> None:
        self._resources = {t: dict(r) for t, r in resources.items()}
        self._version = version or push_version()

    @property
    def version(self) -> str:
        return self._version

    def resources_for(self, proxy: Proxy, type_url: str) -> Mapping[str, Message]:
        return self._resources.get(type_url, {})
