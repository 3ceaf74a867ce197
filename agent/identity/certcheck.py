"""Is a chain the CA issued fit to serve? Run in a helper process (helper.py):
`python -I -m agent.identity.certcheck ID`.

The agent serves only a chain that (1) matches the private key it generated, (2) chains to the trust root, (3) is
valid now (every certificate's NotBefore/NotAfter), (4) names exactly the agent's SPIFFE identity in its URI SAN.
OpenSSL decides 1–3 the way a TLS peer will: an in-memory TLS handshake between two SSLObjects over MemoryBIOs,
the server holding the issued chain + our key, the client trusting only the root (no hostname check). (4) comes from
the verified peer certificate. Python's `ssl` loads the system OpenSSL (~4.6 MB RSS): that is why this runs in a
short helper process and not in the agent (cli.import_asyncio_without_tls), like keygen.py.

stdin: JSON {"chain": PEM, "key": PEM, "roots": PEM}; stdout: one line, `ok <serial hex>` or `refused <kind>: <why>`.
"""
from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    import ssl

# The reason kinds, also the `reason` label of istio_agent_certificate_refused_total.
KINDS = ("unparseable", "key_mismatch", "expired", "not_yet_valid", "untrusted", "identity")


class Refused(ValueError):
    def __init__(self, kind: str, why: str) -> None:
        super().__init__(f"{kind}: {why}")
        self.kind = kind


def _memfd(name: str, data: bytes) -> int:
    """An in-memory file (the root filesystem is read-only in the pod; load_cert_chain wants a path)."""
    fd = os.memfd_create(name)
    os.write(fd, data)
    return fd


def _verify_kind(message: str) -> str:
    m = message.lower()
    if "expired" in m:
        return "expired"
    if "not yet valid" in m:
        return "not_yet_valid"
    return "untrusted"


class _End:
    """One side of the in-memory connection: an SSLObject over an incoming and an outgoing MemoryBIO."""

    def __init__(self, ctx: ssl.SSLContext, server_side: bool) -> None:
        import ssl  # noqa: PLC0415 - ssl (OpenSSL, ~4.6 MB RSS) stays out of the agent, which imports this module

        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side)
        self.done = False

    def step(self) -> None:
        import ssl  # noqa: PLC0415 - ssl stays out of the agent, which imports this module

        if not self.done:
            try:
                self.obj.do_handshake()
                self.done = True
            except ssl.SSLWantReadError:
                pass


def _handshake(server: _End, client: _End) -> None:
    """Pump records between the two ends until both finish (a TLS 1.3 handshake takes 2–3 round trips)."""
    for _ in range(10):
        client.step()
        server.step()
        server.incoming.write(client.outgoing.read())
        client.incoming.write(server.outgoing.read())
        if client.done and server.done:
            return
    raise Refused("untrusted", "TLS handshake with the issued chain did not complete")


def check(chain_pem: bytes, key_pem: bytes, roots_pem: bytes, spiffe_id: str) -> str:
    """The leaf's serial (hex) if the chain is fit to serve for `spiffe_id`; else raises Refused naming why."""
    import ssl  # noqa: PLC0415 - ssl stays out of the agent, which imports this module

    if b"-----BEGIN CERTIFICATE-----" not in chain_pem or b"-----BEGIN CERTIFICATE-----" not in roots_pem:
        raise Refused("unparseable", "no certificate in the chain or in the trust root")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    fds = [_memfd("chain", chain_pem), _memfd("key", key_pem)]
    try:
        server_ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    except ssl.SSLError as e:
        kind = "key_mismatch" if "KEY_VALUES_MISMATCH" in str(e) else "unparseable"
        why = "the certificate is not for the agent's private key" if kind == "key_mismatch" else e.reason or str(e)
        raise Refused(kind, why) from None
    finally:
        for fd in fds:
            os.close(fd)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    try:
        client_ctx.load_verify_locations(cadata=roots_pem.decode("ascii", "replace"))
    except ssl.SSLError as e:
        raise Refused("unparseable", f"trust root: {e.reason or e}") from None
    client, server = _End(client_ctx, False), _End(server_ctx, True)
    try:
        _handshake(server, client)
    except ssl.SSLCertVerificationError as e:
        raise Refused(_verify_kind(e.verify_message), f"chain does not verify against the trust root: "
                                                        f"{e.verify_message}") from None
    except ssl.SSLError as e:
        raise Refused("untrusted", f"TLS handshake with the issued chain failed: {e.reason or e}") from None
    peer = client.obj.getpeercert() or {}
    # ssl documents subjectAltName as (type, value) pairs; its stub types every field as a union of shapes
    sans = cast("tuple[tuple[str, str], ...]", peer.get("subjectAltName", ()))
    uris = [v for k, v in sans if k == "URI"]
    if uris != [spiffe_id]:
        raise Refused("identity", f"certificate is for {', '.join(uris)[:200] or 'no URI SAN'}, want {spiffe_id}")
    return str(peer.get("serialNumber", "")).lower()


MAX_INPUT = 1 << 20


def argv(spiffe_id: str) -> list[str]:
    from .. import helper  # noqa: PLC0415 - only the agent asks; the checker process skips subprocess's imports

    return helper.module_argv("agent.identity.certcheck", spiffe_id)


def main(args: list[str]) -> int:
    """Imports first, then wait for the input: a prestarted checker answers as soon as the CA has."""
    import ssl  # noqa: F401, PLC0415 - imported now, before the input arrives: the answer then comes at once

    (spiffe_id,) = args
    raw = sys.stdin.buffer.read(MAX_INPUT + 1)
    if not raw:                       # the agent stopped before any chain arrived
        return 0
    if len(raw) > MAX_INPUT:
        print(f"refused unparseable: issued chain larger than {MAX_INPUT} bytes")
        return 0
    req = json.loads(raw)
    try:
        serial = check(req["chain"].encode(), req["key"].encode(), req["roots"].encode(), spiffe_id)
    except Refused as e:
        print(f"refused {e}")
        return 0
    print(f"ok {serial}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
