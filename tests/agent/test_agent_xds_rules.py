"""The one ACK/NACK rule of SDS and ADS (agent/xds/rules.py), as a table: request × what the stream last sent."""
from __future__ import annotations

import pytest

from agent.xds import rules
from agent.xds.rules import ACK, NACK, RESPOND, STALE, UNSUBSCRIBE, Sent, should_respond

F = frozenset
NONE = Sent()
AFTER_DEFAULT = Sent("n1", F({"default"}))

# (case, nonce, names, nacked, last, wildcard) → (kind, send, subscribed)
TABLE = [
    ("first request", "", F({"default"}), False, NONE, False, RESPOND, F({"default"}), F({"default"})),
    ("first request, two names", "", F({"default", "ROOTCA"}), False, NONE, False,
     RESPOND, F({"default", "ROOTCA"}), F({"default", "ROOTCA"})),
    ("reconnect: no nonce on a new stream", "", F({"default"}), False, AFTER_DEFAULT, False,
     RESPOND, F({"default"}), F({"default"})),
    ("ACK: nonce matches, same names", "n1", F({"default"}), False, AFTER_DEFAULT, False,
     ACK, F(), F({"default"})),
    ("ACK adding a name: only that name", "n1", F({"default", "ROOTCA"}), False, AFTER_DEFAULT, False,
     RESPOND, F({"ROOTCA"}), F({"default", "ROOTCA"})),
    ("ACK dropping a name: nothing sent", "n2", F({"default"}), False, Sent("n2", F({"default", "ROOTCA"})), False,
     ACK, F(), F({"default"})),
    ("ACK renaming: the new name", "n1", F({"ROOTCA"}), False, AFTER_DEFAULT, False,
     RESPOND, F({"ROOTCA"}), F({"ROOTCA"})),
    ("NACK: error_detail set", "n1", F({"default"}), True, AFTER_DEFAULT, False, NACK, F(), F({"default"})),
    ("NACK wins over a stale nonce", "old", F({"default", "x"}), True, AFTER_DEFAULT, False,
     NACK, F(), F({"default"})),
    ("stale nonce", "n0", F({"default", "ROOTCA"}), False, AFTER_DEFAULT, False, STALE, F(), F({"default"})),
    ("nonce before anything was sent", "n9", F({"default"}), False, NONE, False, STALE, F(), F()),
    ("SDS: no names = unsubscribe", "n1", F(), False, AFTER_DEFAULT, False, UNSUBSCRIBE, F(), F()),
    ("SDS: no names, stale nonce: still unsubscribe", "n0", F(), False, AFTER_DEFAULT, False, UNSUBSCRIBE, F(), F()),
    ("ADS wildcard: first request, no names = all", "", F(), False, NONE, True, RESPOND, F(), F()),
    ("ADS wildcard: ACK", "1", F(), False, Sent("1"), True, ACK, F(), F()),
    ("ADS wildcard: stale nonce", "0", F(), False, Sent("1"), True, STALE, F(), F()),
    ("ADS wildcard: NACK", "1", F(), True, Sent("1"), True, NACK, F(), F()),
    ("ADS named: ACK adding a name", "1", F({"a", "b"}), False, Sent("1", F({"a"})), True,
     RESPOND, F({"b"}), F({"a", "b"})),
]


@pytest.mark.parametrize(("nonce", "names", "nacked", "last", "wildcard", "kind", "send", "subscribed"),
                         [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_should_respond(nonce: str, names: frozenset, nacked: bool, last: Sent, wildcard: bool, kind: str,
                        send: frozenset, subscribed: frozenset) -> None:
    d = should_respond(nonce, names, nacked, last, wildcard)
    assert (d.kind, d.send, d.subscribed) == (kind, send, subscribed)


DELTA = [
    ("wildcard start", F(), [], [], F()),
    ("subscribe adds", F({"a"}), ["b"], [], F({"a", "b"})),
    ("unsubscribe removes", F({"a", "b"}), [], ["a"], F({"b"})),
    ("both in one request", F({"a"}), ["b", "c"], ["a", "c"], F({"b"})),
]


@pytest.mark.parametrize(("current", "sub", "unsub", "after"), [t[1:] for t in DELTA], ids=[t[0] for t in DELTA])
def test_delta_subscription(current: frozenset, sub: list, unsub: list, after: frozenset) -> None:
    assert rules.delta_subscription(current, sub, unsub) == after


def test_delta_stream_sends_each_type_once_then_acks() -> None:
    """Delta ADS through the same rule: a first request per type answers, its ACK and stale nonces do not."""
    state = Sent()
    names = rules.delta_subscription(state.subscribed, [], [])
    first = should_respond("", names, False, state, wildcard=True)
    assert first.kind == RESPOND and first.send == F()
    state = Sent("7", first.subscribed)
    assert should_respond("7", names, False, state, wildcard=True).kind == ACK
    assert should_respond("6", names, False, state, wildcard=True).kind == STALE
    assert should_respond("7", names, True, state, wildcard=True).kind == NACK


def test_standalone_ads_keeps_no_state_for_types_it_does_not_serve(monkeypatch) -> None:
    """The type URL comes from the client: one that sends ACKs for ever-new type URLs must not grow the stream's
    per-type state without bound; only the served types have any."""
    import asyncio

    from agent.xds import ads
    from agent.xds.wire import ld

    states: list[dict] = []
    decide = ads.StandaloneADS._decide

    def spy(type_url, nonce, names, error, state):  # type: ignore[no-untyped-def]
        states.append(state)
        return decide(type_url, nonce, names, error, state)

    monkeypatch.setattr(ads.StandaloneADS, "_decide", staticmethod(spy))
    served = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

    async def requests(type_field: int, nonce_field: int):  # type: ignore[no-untyped-def]
        yield ld(type_field, served)
        for i in range(200):
            yield ld(type_field, f"type.googleapis.com/junk.{i}") + ld(nonce_field, "1")

    async def main(method: str) -> None:
        server = ads.StandaloneADS({served: {"c": b""}})
        fields = (4, 5) if method == "sotw" else (2, 6)   # DiscoveryRequest / DeltaDiscoveryRequest
        async for _ in getattr(server, method)(requests(*fields), None):
            pass

    for method in ("sotw", "delta"):
        states.clear()
        asyncio.run(main(method))
        assert states and all(set(s) <= {served} for s in states), method
