"""The agent's own ADS server for standalone mode: serves the resources the standalone helper built (SotW and Delta).

Only discovery messages are imported here; the resources arrive serialized (standalone.py), and never change, so
there is one version.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
from typing import AsyncIterator

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from .helper import Prestarted
from .log import Log

log = Log("xds")
VERSION = "1"
Resources = dict[str, dict[str, any_pb2.Any]]


def decode(data: bytes) -> Resources:
    raw = json.loads(data)
    return {t: {n: any_pb2.Any(type_url=t, value=base64.b64decode(v)) for n, v in named.items()}
            for t, named in raw.items()}


async def load_resources(pre: Prestarted) -> Resources:
    try:
        return decode(await pre.result())
    except Exception as e:
        log.error("cannot build the standalone config", error=str(e))
        raise


class StandaloneADS(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """Serves a fixed set of resources to Envoy over SotW and Delta ADS."""

    def __init__(self, res: "asyncio.Future[Resources] | Resources") -> None:
        self._res = res
        self._nonce = itertools.count(1)

    async def resources(self) -> Resources:
        if isinstance(self._res, dict):
            return self._res
        return await asyncio.shield(self._res)

    async def StreamAggregatedResources(self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
                                        context: grpc.aio.ServicerContext):  # noqa: ANN201
        sent: dict[str, str] = {}
        async for req in request_iterator:
            if req.HasField("error_detail") and req.error_detail.code:
                log.error("Envoy rejected config", type=req.type_url, error=req.error_detail.message)
                continue
            if req.response_nonce and req.response_nonce == sent.get(req.type_url):
                continue   # ACK
            all_res = await self.resources()
            if req.type_url not in all_res:
                continue
            res = all_res[req.type_url]
            names = list(req.resource_names) or list(res)
            nonce = str(next(self._nonce))
            sent[req.type_url] = nonce
            yield discovery_pb2.DiscoveryResponse(version_info=VERSION, type_url=req.type_url, nonce=nonce,
                                                  resources=[res[n] for n in names if n in res])

    async def DeltaAggregatedResources(self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
                                       context: grpc.aio.ServicerContext):  # noqa: ANN201
        sent: set[str] = set()
        async for req in request_iterator:
            if req.HasField("error_detail") and req.error_detail.code:
                log.error("Envoy rejected config", type=req.type_url, error=req.error_detail.message)
                continue
            all_res = await self.resources()
            if req.type_url not in all_res or req.type_url in sent:
                continue
            sent.add(req.type_url)
            yield discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=VERSION, type_url=req.type_url, nonce=str(next(self._nonce)),
                resources=[discovery_pb2.Resource(name=n, version=VERSION, resource=r)
                           for n, r in all_res[req.type_url].items()])
