"""The one ACK/NACK rule of the agent's xDS servers (SDS and the standalone ADS), as Istio's `shouldRespond`.

Pure: a request (its nonce, the names it subscribes, whether it carries an error) and what the stream last did for
that type (the nonce it sent, the names subscribed) → what to do. Both servers keep the state per stream and type;
the rule alone decides, so SotW SDS, SotW ADS and Delta ADS cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass

RESPOND = "respond"          # send `send` (empty with a wildcard subscription: every resource of the type)
ACK = "ack"                  # Envoy accepted the last response and wants nothing new
NACK = "nack"                # Envoy rejected the last response (error_detail set): log it, send nothing
STALE = "stale"              # the nonce is not the last one sent: an answer to an older response, ignored
UNSUBSCRIBE = "unsubscribe"  # no names on a non-wildcard type: Envoy no longer wants any


@dataclass(frozen=True)
class Sent:
    """A stream's state for one type: the last nonce sent ("" before any) and the names now subscribed."""

    nonce: str = ""
    subscribed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Decision:
    kind: str
    send: frozenset[str] = frozenset()       # RESPOND: the names to send
    subscribed: frozenset[str] = frozenset()  # the stream's subscription after this request


def should_respond(nonce: str, names: frozenset[str], nacked: bool, last: Sent, wildcard: bool) -> Decision:
    """Istio's rule. First request on a stream (no nonce) → every name asked for; a NACK → nothing; a stale
    nonce → ignored; an ACK → only names added since (a SotW request repeats the whole subscription).
    `wildcard` types (LDS/CDS) treat an empty name list as "all"; SDS treats it as unsubscribing."""
    if nacked:
        return Decision(NACK, subscribed=last.subscribed)
    if not names and not wildcard:
        return Decision(UNSUBSCRIBE)
    if not nonce:
        return Decision(RESPOND, names, names)
    if nonce != last.nonce:
        return Decision(STALE, subscribed=last.subscribed)
    added = names - last.subscribed
    return Decision(RESPOND, added, names) if added else Decision(ACK, subscribed=names)


def delta_subscription(current: frozenset[str], subscribe: list[str], unsubscribe: list[str]) -> frozenset[str]:
    """A Delta stream's subscription after one request: it names only the changes, not the whole set."""
    return (current | frozenset(subscribe)) - frozenset(unsubscribe)
