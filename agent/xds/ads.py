"""The agent's own ADS server for standalone mode: serves the resources the standalone helper built (SotW and Delta).

The resources arrive serialized from standalone.py (built there from xds-protos types) and never change, so there
is one version; messages are framed by wire.py.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
from typing import AsyncIterator

import grpc

from ..helper import Prestarted
from ..log import Log
from . import wire

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

    def __init__(self, res: "asyncio.Future[Resources] | Resources") -> None:
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
        sent: dict[str, str] = {}
        async for raw in request_iterator:
            req = wire.decode_request(raw)
            if req.error is not None and req.error.code:
                log.error("Envoy rejected config", type=req.type_url, error=req.error.message)
                continue
            if req.response_nonce and req.response_nonce == sent.get(req.type_url):
                continue   # ACK
            all_res = await self.resources()
            if req.type_url not in all_res:
                continue
            res = all_res[req.type_url]
            names = req.resource_names or list(res)
            nonce = str(next(self._nonce))
            sent[req.type_url] = nonce
            yield wire.response(VERSION, req.type_url, nonce, [res[n] for n in names if n in res])

    async def delta(self, request_iterator: AsyncIterator[bytes],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        sent: set[str] = set()
        async for raw in request_iterator:
            req = wire.decode_delta_request(raw)
            if req.error is not None and req.error.code:
                log.error("Envoy rejected config", type=req.type_url, error=req.error.message)
                continue
            all_res = await self.resources()
            if req.type_url not in all_res or req.type_url in sent:
                continue
            sent.add(req.type_url)
            yield wire.delta_response(VERSION, req.type_url, str(next(self._nonce)), all_res[req.type_url],
                                         VERSION)
