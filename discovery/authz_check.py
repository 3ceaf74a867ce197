"""meshboot-authz-check: which AuthorizationPolicy decides a connection to a sidecar, and the verdict (istioctl x
authz check).

It reads the destination proxy's Envoy config dump — a file (`--config-dump`, what Envoy's admin /config_dump gives)
or what the control plane last sent it (`<pod>.<namespace>`: /debug/config_dump?proxyID= on the monitoring port) —
picks the virtualInbound filter chain Envoy would pick for the port and the source (mTLS from a sidecar, or
plaintext), and runs discovery/authz.explain over that chain's RBAC network filters: Envoy's own semantics over the
filters Envoy has, so the answer is what Envoy does. A dump is tenant-influenced text: read bounded, parsed with the
bounded JSON reader, and anything it does not understand is an error, never a guess.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from envoy.config.listener.v3 import listener_components_pb2 as lc
from google.protobuf import json_format

from meshboot import constants as C
from meshboot import jsonsafe

from . import authz
from .debug import MAX_DUMP_BYTES
from .status import Failed, fetch

PROG = "meshboot-authz-check"
TIMEOUT = 30.0
LISTENERS_DUMP = "type.googleapis.com/envoy.admin.v3.ListenersConfigDump"
ISTIO_ALPN = ("istio-peer-exchange", "istio")
_RULE_NAME = re.compile(r"ns\[([^\]]*)\]-policy\[([^\]]*)\]-rule\[(\d+)\]")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("\n", " "))
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("proxy", nargs="?", default="", metavar="<pod>.<namespace>",
                       help="the destination proxy, its config as the control plane last sent it")
    where.add_argument("--config-dump", metavar="FILE", help="the destination Envoy's admin /config_dump output")
    p.add_argument("--control-plane", default=f"http://127.0.0.1:{C.MONITORING_PORT}", metavar="URL",
                   help="the control plane's monitoring port (default http://127.0.0.1:15014)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source-namespace", metavar="NS", help="the client's namespace (with --source-sa)")
    src.add_argument("--plaintext", action="store_true", help="the client has no sidecar (no peer certificate)")
    p.add_argument("--source-sa", metavar="SA", default="default", help="the client's service account")
    p.add_argument("--trust-domain", default=C.DEFAULT_TRUST_DOMAIN, help="the client's trust domain")
    p.add_argument("--source-ip", required=True, metavar="IP", help="the client's address as the server sees it")
    p.add_argument("--port", required=True, type=int, help="the destination workload (target) port")
    p.add_argument("--sni", default="", help="the TLS SNI the client sends (connection.sni)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds to wait for the control plane")
    return p


def load_dump(args: argparse.Namespace) -> Any:
    """The config dump as JSON: from the file or the control plane, bounded."""
    if args.config_dump:
        try:
            with open(args.config_dump, "rb") as f:
                raw = f.read(MAX_DUMP_BYTES + 1)
        except OSError as e:
            raise Failed(f"--config-dump: {e.strerror or e}") from None
        if len(raw) > MAX_DUMP_BYTES:
            raise Failed(f"--config-dump: larger than {MAX_DUMP_BYTES} bytes")
    else:
        raw = fetch(args.control_plane, "/debug/config_dump?" + urllib.parse.urlencode({"proxyID": args.proxy}),
                    MAX_DUMP_BYTES, args.timeout)
    try:
        return jsonsafe.load(raw.decode("utf-8", "replace"), max_bytes=MAX_DUMP_BYTES)
    except ValueError as e:
        raise Failed(f"the config dump is not JSON ({e})") from None


def _object(value: Any, where: str) -> Mapping[str, Any]:
    """`value` as a JSON object (absent = empty); Failed naming `where` for another type."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Failed(f"the config dump's {where} is a {type(value).__name__}, not an object")
    return value


def _objects(value: Any, where: str) -> list[Mapping[str, Any]]:
    """`value` as a list of JSON objects (absent = empty); Failed naming `where` otherwise."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise Failed(f"the config dump's {where} is not a list of objects")
    return value


def virtual_inbound(dump: Any) -> Mapping[str, Any]:
    """The active virtualInbound listener of a ConfigDump (Envoy's admin shape)."""
    for cfg in _objects(_object(dump, "top level").get("configs"), "configs"):
        if cfg.get("@type") != LISTENERS_DUMP:
            continue
        for item in _objects(cfg.get("dynamic_listeners"), "dynamic_listeners"):
            listener = _object(_object(item.get("active_state"), "active_state").get("listener"), "listener")
            if listener.get("name") == C.VIRTUAL_INBOUND:
                return listener
    raise Failed("the config dump has no active virtualInbound listener (not a sidecar, or not configured yet)")


# filter_chain_match fields read, with the JSON type each must have.
_MATCH_FIELDS: dict[str, type] = {"destination_port": int, "transport_protocol": str, "application_protocols": list}


def _match(chain: Mapping[str, Any]) -> Mapping[str, Any]:
    """A chain's filter_chain_match, the fields we read of the types Envoy's JSON gives them."""
    match = _object(chain.get("filter_chain_match"), "filter_chain_match")
    for key, kind in _MATCH_FIELDS.items():
        value = match.get(key)
        strings = not isinstance(value, list) or all(isinstance(v, str) for v in value)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) or not strings):
            raise Failed(f"the config dump's filter_chain_match.{key} of chain {str(chain.get('name'))[:60]!r} "
                         f"is not a {'list of strings' if kind is list else kind.__name__}")
    return match


def _narrow(chains: list[Mapping[str, Any]], key: str, fits: Any) -> list[Mapping[str, Any]]:
    """One step of Envoy's filter chain match: the chains whose `key` matches specifically, else those without it
    (Envoy does not fall back to less specific chains once a specific one exists for the value)."""
    specific = [c for c in chains if _match(c).get(key) and fits(_match(c)[key])]
    return specific or [c for c in chains if not _match(c).get(key)]


def pick_chain(listener: Mapping[str, Any], port: int, mtls: bool) -> Mapping[str, Any] | None:
    """The chain Envoy picks for a connection to `port` (mTLS from a sidecar or plaintext), matching the fields we
    emit in Envoy's order: destination port, transport protocol, ALPN. None: no chain matches and Envoy closes the
    connection (e.g. plaintext to a STRICT port: its port has only a `tls` chain)."""
    chains = _objects(listener.get("filter_chains"), "filter_chains")
    chains = _narrow(chains, "destination_port", lambda v: v == port)
    chains = _narrow(chains, "transport_protocol", lambda v: v == ("tls" if mtls else "raw_buffer"))
    chains = _narrow(chains, "application_protocols", lambda v: mtls and any(a in v for a in ISTIO_ALPN))
    return chains[0] if chains else None


def rbac_filters(chain: Mapping[str, Any]) -> list[lc.Filter]:
    """The chain's RBAC network filters as protos, in chain order (a filter we cannot read is an error)."""
    out = []
    for f in _objects(chain.get("filters"), "filters"):
        if f.get("name") == authz.FILTER_NAME:
            try:
                out.append(json_format.ParseDict(dict(f), lc.Filter()))
            except json_format.ParseError as e:
                raise Failed(f"an RBAC filter of chain {chain.get('name')!r} is unreadable: {str(e)[:200]}") from None
    return out


def describe(rule: str) -> str:
    """`ns[az]-policy[p]-rule[0]` → `AuthorizationPolicy az/p, rule 0` (istiod's names)."""
    m = _RULE_NAME.fullmatch(rule.removesuffix(authz.BAD_CUSTOM_SUFFIX))
    return f"AuthorizationPolicy {m[1]}/{m[2]}, rule {m[3]}" if m else rule


def _source(args: argparse.Namespace) -> authz.Source:
    try:
        ip = str(ipaddress.ip_address(args.source_ip))
    except ValueError:
        raise Failed(f"--source-ip: {args.source_ip[:60]!r} is not an IP address") from None
    if args.plaintext:
        return authz.Source(None, ip)
    for flag, value in (("--source-namespace", args.source_namespace), ("--source-sa", args.source_sa),
                        ("--trust-domain", args.trust_domain)):
        if not _NAME.fullmatch(value):
            raise Failed(f"{flag}: {value[:60]!r} is not a valid name")
    return authz.Source(f"spiffe://{args.trust_domain}/ns/{args.source_namespace}/sa/{args.source_sa}", ip)


def check(dump: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The verdict for the arguments over one config dump, as a JSON-able dict."""
    if not 1 <= args.port <= 65535:
        raise Failed(f"--port: {args.port} is not in 1..65535")
    source = _source(args)
    chain = pick_chain(virtual_inbound(dump), args.port, source.principal is not None)
    out: dict[str, Any] = {"source": source.principal or "(plaintext)", "source_ip": source.ip, "port": args.port}
    if chain is None:
        return {**out, "chain": None, "verdict": authz.DENY, "policy": "",
                "reason": "no inbound filter chain accepts this connection (its mTLS mode refuses it)", "logged": []}
    try:
        v = authz.explain(rbac_filters(chain), source, authz.Destination(args.port, args.sni))
    except authz.ExplainError as e:
        raise Failed(f"chain {chain.get('name')!r}: {e}") from None
    return {**out, "chain": chain.get("name", ""), "verdict": v.verdict, "policy": v.policy,
            "decided_by": describe(v.policy) if v.policy else "", "reason": v.reason, "logged": list(v.logged)}


def text(result: Mapping[str, Any]) -> str:
    lines = [f"{result['verdict']}: {result['source']} from {result['source_ip']} to port {result['port']}",
             f"  chain:   {result['chain'] or '(none)'}"]
    if result.get("decided_by"):
        lines.append(f"  policy:  {result['decided_by']}  ({result['policy']})")
    lines.append(f"  reason:  {result['reason']}")
    lines += [f"  logged:  {entry}" for entry in result["logged"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = check(load_dump(args), args)
    except Failed as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

