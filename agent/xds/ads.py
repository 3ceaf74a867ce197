"""The agent's own ADS server for standalone mode: serves the resources the standalone helper built (SotW and Delta).

The resources arrive serialized from standalone.py (built there from xds-protos types) and never change, so there
is one version; messages are framed by wire.py, and which request gets an answer is rules.py's rule (shared with
SDS).
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import AsyncIterator

import grpc

from ..helper import Prestarted
from ..log import Log
from . import rules, wire

log = Log("xds")
SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
VERSION = "1"
Resources = dict[str, dict[str, bytes]]          # type URL → name → serialized resource


def decode(data: bytes) -> Resources:
    return {t: {n: base64.b64decode(v) for n, v in named.items()} for t, named in json.loads(data).items()}


async def load_resources(pre: Prestarted) -> Resources:
    try:
        return decode(await pre.result())
    except Exception as e:
        log.error("cannot build the standalone config", error=str(e))
        raise


class StandaloneADS:
    """Serves a fixed set of resources to Envoy over SotW and Delta ADS."""

    def __init__(self, res: asyncio.Future[Resources] | Resources) -> None:
        self._res = res
        self._nonce = itertools.count(1)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(self.sotw),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(self.delta),
        })

    async def resources(self) -> Resources:
        if isinstance(self._res, dict):
            return self._res
        return await asyncio.shield(self._res)

    async def sotw(self, request_iterator: AsyncIterator[bytes],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        state: dict[str, rules.Sent] = {}            # per type URL
        async for raw in request_iterator:
            req = wire.decode_request(raw)
            res = (await self.resources()).get(req.type_url)
            if res is None:                          # not served: no answer, and no state kept for it
                continue
            d = self._decide(req.type_url, req.response_nonce, frozenset(req.resource_names), req.error, state)
            if d is None:
                continue
            nonce = str(next(self._nonce))
            state[req.type_url] = rules.Sent(nonce, d.subscribed)
            yield wire.response(VERSION, req.type_url, nonce, list(_pick(res, d.send).values()))

    async def delta(self, request_iterator: AsyncIterator[bytes],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        state: dict[str, rules.Sent] = {}
        async for raw in request_iterator:
            req = wire.decode_delta_request(raw)
            res = (await self.resources()).get(req.type_url)
            if res is None:                          # not served: no answer, and no state kept for it
                continue
            last = state.get(req.type_url, rules.Sent())
            names = rules.delta_subscription(last.subscribed, req.subscribe, req.unsubscribe)
            d = self._decide(req.type_url, req.response_nonce, names, req.error, state)
            if d is None:
                continue
            nonce = str(next(self._nonce))
            state[req.type_url] = rules.Sent(nonce, d.subscribed)
            yield wire.delta_response(VERSION, req.type_url, nonce, _pick(res, d.send), VERSION)

    @staticmethod
    def _decide(type_url: str, nonce: str, names: frozenset[str], error: wire.Status | None,
                state: dict[str, rules.Sent]) -> rules.Decision | None:
        """The shared ACK/NACK rule (rules.py), LDS/CDS being wildcards; None when nothing is to be sent."""
        last = state.get(type_url, rules.Sent())
        d = rules.should_respond(nonce, names, error is not None and bool(error.code), last, wildcard=True)
        if d.kind == rules.NACK and error is not None:
            log.error("Envoy rejected config", type=type_url, error=error.message)
        if d.kind != rules.RESPOND:
            state[type_url] = rules.Sent(last.nonce, d.subscribed)
            return None
        return d


def _pick(res: dict[str, bytes], names: frozenset[str]) -> dict[str, bytes]:
    """The resources asked for; no names, or "*" (a wildcard request), means all of them."""
    return dict(res) if not names or "*" in names else {n: res[n] for n in sorted(names) if n in res}
