"""The agent's DNS proxy without a network namespace: NDS wire format, the resolver core (table-driven, against
Istio's rules), hostile packets, and the server on real localhost sockets against a fake upstream.

DNS bytes are checked with dnspython (an independent parser), NDS bytes with a protobuf message built at runtime from
istio's nds.proto field numbers.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import struct
import time
import tracemalloc
import weakref
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns_upstream
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given
from hypothesis import strategies as st

from agent.dns import config as dnsconfig
from agent.dns import server as dnsserver
from agent.dns.resolver import Scope, build, lookup
from agent.dns.server import DnsServer
from agent.dns.wire import TYPE_A, TYPE_AAAA, TYPE_CNAME, Query, fit, parse_query
from agent.metrics import Metrics
from agent.sidecar import Sidecar
from meshboot import nds
from meshboot.nds import NameInfo, NameTable, NdsError
from meshboot.protowire import varint
from testing.fuzzing import budget

K8S = nds.REGISTRY_KUBERNETES
TABLE = NameTable({
    "web.demo.svc.cluster.local": NameInfo(("10.96.0.10",), K8S, "web", "demo"),
    "db.other.svc.cluster.local": NameInfo(("10.96.0.20", "fd00::20"), K8S, "db", "other", ("db.legacy",)),
    "api.example.com": NameInfo(("240.240.0.1",), "External"),
    "*.wild.example.com": NameInfo(("240.240.0.2",), "External"),
    "noip.demo.svc.cluster.local": NameInfo(("not-an-ip",), K8S, "noip", "demo"),
    "v6only.demo.svc.cluster.local": NameInfo(("fd00::30",), K8S, "v6only", "demo"),
    "dotted.demo.svc.cluster.local.": NameInfo(("10.96.0.40",), K8S, "dotted", "demo"),
})
SCOPE = Scope("demo", "demo.svc.cluster.local", ("demo.svc.cluster.local", "svc.cluster.local", "cluster.local"))
FWD = None

# (query name, type) -> None (forwarded) or the answer: (owner, type, value) in order (addresses sorted)
CASES: dict[tuple[str, int], tuple[tuple[str, int, str], ...] | None] = {
    ("web.demo.svc.cluster.local.", TYPE_A): (("web.demo.svc.cluster.local.", TYPE_A, "10.96.0.10"),),
    ("web.", TYPE_A): (("web.", TYPE_A, "10.96.0.10"),),                         # short name, own namespace
    ("web.demo.", TYPE_A): (("web.demo.", TYPE_A, "10.96.0.10"),),
    ("web.demo.svc.", TYPE_A): (("web.demo.svc.", TYPE_A, "10.96.0.10"),),
    ("db.", TYPE_A): FWD,                                                          # short name, other namespace
    ("db.other.", TYPE_A): (("db.other.", TYPE_A, "10.96.0.20"),),
    ("db.other.svc.", TYPE_AAAA): (("db.other.svc.", TYPE_AAAA, "fd00::20"),),
    ("db.legacy.", TYPE_A): (("db.legacy.", TYPE_A, "10.96.0.20"),),              # alt_hosts
    ("web.demo.svc.cluster.local.", TYPE_AAAA): (),                                # v4-only: NOERROR, no records
    ("v6only.demo.svc.cluster.local.", TYPE_A): (),
    ("v6only.", TYPE_AAAA): (("v6only.", TYPE_AAAA, "fd00::30"),),
    # the first search-list try, answered with a CNAME so the resolver stops walking
    ("web.demo.demo.svc.cluster.local.", TYPE_A): (("web.demo.demo.svc.cluster.local.", TYPE_CNAME, "web.demo."),
                                                   ("web.demo.", TYPE_A, "10.96.0.10")),
    ("api.example.com.demo.svc.cluster.local.", TYPE_A): (
        ("api.example.com.demo.svc.cluster.local.", TYPE_CNAME, "api.example.com."),
        ("api.example.com.", TYPE_A, "240.240.0.1")),
    ("web.demo.svc.cluster.local.demo.svc.cluster.local.", TYPE_A): FWD,           # Istio adds no CNAME under search[0]
    ("web.demo.svc.cluster.local.svc.cluster.local.", TYPE_A): FWD,                # only the first search domain
    ("api.example.com.", TYPE_A): (("api.example.com.", TYPE_A, "240.240.0.1"),),
    ("api.example.com.", TYPE_AAAA): (),
    ("api.example.com.", 15): FWD,                                                 # MX: not A/AAAA, forwarded
    ("api.", TYPE_A): FWD,                                                         # no short names for non-K8s
    ("x.wild.example.com.", TYPE_A): (("x.wild.example.com.", TYPE_A, "240.240.0.2"),),
    ("a.b.wild.example.com.", TYPE_A): (("a.b.wild.example.com.", TYPE_A, "240.240.0.2"),),
    ("wild.example.com.", TYPE_A): FWD,
    ("noip.demo.svc.cluster.local.", TYPE_A): FWD,                                 # no usable IP: not in the table
    ("dotted.demo.svc.cluster.local.", TYPE_A): FWD,                               # Istio: K8s key with a dot
    ("unknown.example.org.", TYPE_A): FWD,
}


def _text(rtype: int, rdata: bytes) -> str:
    if rtype == TYPE_CNAME:
        return dns.name.from_wire(rdata, 0)[0].to_text()
    return socket.inet_ntop(socket.AF_INET if rtype == TYPE_A else socket.AF_INET6, rdata)


@pytest.mark.parametrize(("name", "qtype"), list(CASES))
def test_resolver_answers_as_istio_does(name: str, qtype: int) -> None:
    records = lookup(build(TABLE, SCOPE), qtype, name)
    want = CASES[(name, qtype)]
    if want is None:
        assert records is None
        return
    assert records is not None
    assert all(r.ttl == 30 for r in records)
    got = tuple((r.name, r.rtype, _text(r.rtype, r.rdata)) for r in records)
    assert got == want


def test_resolver_shuffles_addresses_and_keeps_them_all() -> None:
    many = NameTable({"m.example": NameInfo(tuple(f"10.0.0.{i}" for i in range(1, 21)), "External")})
    lt = build(many, SCOPE)
    orders = {tuple(r.rdata for r in lookup(lt, TYPE_A, "m.example.") or ()) for _ in range(20)}
    assert len(orders) > 1
    assert all(sorted(o) == sorted(socket.inet_aton(f"10.0.0.{i}") for i in range(1, 21)) for o in orders)


def test_resolver_without_domain_or_search_answers_only_the_fqdn() -> None:
    lt = build(TABLE, Scope("demo", "", ()))
    assert lookup(lt, TYPE_A, "web.demo.svc.cluster.local.") is not None
    assert lookup(lt, TYPE_A, "web.") is None
    assert lookup(lt, TYPE_A, "web.demo.demo.svc.cluster.local.") is None


def test_resolv_conf_parsing_is_bounded_and_keeps_ips_only() -> None:
    text = ("# c\nnameserver 10.96.0.10\nnameserver dns.example\nnameserver fd00::a\n"
            "search Demo.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
            + "nameserver 10.0.0.1\n" * 50 + "search " + "x" * 300 + " ok.local\n")
    rc = dnsconfig.parse_resolv_conf(text)
    assert rc.servers[:2] == ("10.96.0.10", "fd00::a") and len(rc.servers) == dnsconfig.MAX_SERVERS
    assert rc.search == ("ok.local",)
    assert dnsconfig.parse_resolv_conf("domain a.b\n").search == ("a.b",)
    assert dnsconfig.listen_addresses("localhost:15053", rc) == [("127.0.0.1", 15053), ("::1", 15053)]
    assert dnsconfig.listen_addresses("localhost:15053", dnsconfig.ResolvConf(("10.0.0.1",))) == [
        ("127.0.0.1", 15053)]


def test_dns_settings_follow_pilot_agents_env() -> None:
    assert not dnsconfig.dns_settings({}).enabled
    s = dnsconfig.dns_settings({"ISTIO_META_DNS_CAPTURE": "true", "DNS_FORWARD_TIMEOUT": "250ms"}, uid=1337)
    assert s.enabled and s.addr == "localhost:15053" and s.timeout == 0.25 and not s.parallel
    assert dnsconfig.dns_settings({"ISTIO_META_ENABLE_DNS_SERVER": "1"}).enabled
    on = {"ISTIO_META_DNS_CAPTURE": "true"}
    assert dnsconfig.dns_settings({**on, "DNS_PROXY_ADDR": "localhost:53"}, uid=1337).addr == "localhost:15053"
    assert dnsconfig.dns_settings({**on, "DNS_PROXY_ADDR": "localhost:53"}, uid=0).respond_before_sync
    for bad in ({"ISTIO_META_DNS_CAPTURE": "yes"}, {**on, "DNS_PROXY_ADDR": "nope"},
                {**on, "DNS_FORWARD_TIMEOUT": "1h"}):
        with pytest.raises(dnsconfig.ConfigError):
            dnsconfig.dns_settings(bad)
    assert not dnsconfig.dns_settings({"DNS_PROXY_ADDR": "nope", "DNS_FORWARD_TIMEOUT": "1h"}).enabled   # not read


# ---- NDS ----------------------------------------------------------------------------------------------------------

def _nds_class() -> Any:
    """istio.networking.nds.v1.NameTable built at runtime from the field numbers in istio's nds.proto."""
    fdp = descriptor_pb2.FileDescriptorProto(name="nds_test.proto", package="istio.networking.nds.v1",
                                             syntax="proto3")
    nt = fdp.message_type.add(name="NameTable")
    info = nt.nested_type.add(name="NameInfo")
    rep, opt, s = (descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
                   descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    for name, num, label in (("ips", 1, rep), ("registry", 2, opt), ("shortname", 3, opt), ("namespace", 4, opt),
                             ("alt_hosts", 5, rep)):
        info.field.add(name=name, number=num, label=label, type=s)
    entry = nt.nested_type.add(name="TableEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=opt, type=s)
    entry.field.add(name="value", number=2, label=opt, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                    type_name=".istio.networking.nds.v1.NameTable.NameInfo")
    nt.field.add(name="table", number=1, label=rep, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                 type_name=".istio.networking.nds.v1.NameTable.TableEntry")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("istio.networking.nds.v1.NameTable"))


def test_nds_round_trips_through_protobuf_both_ways() -> None:
    cls = _nds_class()
    assert cls.DESCRIPTOR.full_name + "" == nds.TYPE_URL.split("/", 1)[1]
    msg = cls()
    msg.ParseFromString(nds.encode(TABLE))
    assert set(msg.table) == set(TABLE.table)
    assert list(msg.table["db.other.svc.cluster.local"].alt_hosts) == ["db.legacy"]
    assert msg.table["web.demo.svc.cluster.local"].namespace == "demo"
    assert nds.decode(msg.SerializeToString(deterministic=True)) == TABLE
    assert nds.encode(TABLE) == msg.SerializeToString(deterministic=True)


def test_nds_decode_follows_protobuf_merge_rules() -> None:
    cls = _nds_class()
    a, b = cls(), cls()
    a.table["x"].ips.append("10.0.0.1")
    b.table["x"].ips.append("10.0.0.2")          # a repeated key: the last entry wins (map semantics)
    b.table["y"].registry = "External"
    assert nds.decode(a.SerializeToString() + b.SerializeToString()).table["x"].ips == ("10.0.0.2",)
    unknown = b"\x10\x05" + b"\x1d\x00\x00\x00\x00" + nds.encode(TABLE)   # varint and fixed32 fields skipped
    assert nds.decode(unknown) == TABLE


@pytest.mark.parametrize(("data", "why"), [
    (b"\x0a\x05\x0a\x03ab", "runs past"),
    (b"\x0a", "truncated"),
    (b"\x0b", "wire type"),
    (b"\x0a\x04\x0a\x02\xff\xfe", "UTF-8"),
    (b"\x10" + b"\x80" * 11, "varint"),
    (nds.encode(NameTable({"x" * 254: NameInfo()})), "longer than"),
    (nds.encode(NameTable({"h": NameInfo(("1.1.1.1",) * (nds.MAX_IPS_PER_NAME + 1))})), "IPs"),
    (nds.encode(NameTable({"h": NameInfo(alt_hosts=("a",) * (nds.MAX_ALT_HOSTS + 1))})), "alt_hosts"),
    (nds.encode(NameTable({f"h{i}": NameInfo() for i in range(nds.MAX_ENTRIES + 1)})), "entries"),
    (nds.encode(NameTable({f"h{i}": NameInfo(("10.0.0.1",) * 1000) for i in range(101)})), "in all"),
])
def test_nds_decode_refuses_what_breaks_a_bound(data: bytes, why: str) -> None:
    with pytest.raises(NdsError, match=why):
        nds.decode(data)


@pytest.mark.parametrize("data", [
    b"\x10\x01" * 300_000,                                # 300 k unknown top-level fields
    b"".join(b"\x0a\x09\x0a\x07h%06d" % i for i in range(200_000)),   # 200 k entries, far past MAX_ENTRIES
    b"\x0a" + varint(200_000) + b"\x12\x00" * 100_000,       # one entry, 100 k value parts
    b"\x0a" + varint(300_000) + b"\x12\x03\x0a\x01x" * 60_000,   # one entry, 60 k one-IP parts (merged)
])
def test_nds_decode_checks_bounds_as_it_goes(data: bytes) -> None:
    """Hostile tables cost memory and time in proportion to what the bounds allow, not to the bytes sent: decoding
    stops at the first bound broken, holding no list of every field."""
    t0 = time.monotonic()
    with contextlib.suppress(NdsError):
        nds.decode(data)
    assert time.monotonic() - t0 < 2
    tracemalloc.start()
    try:
        with contextlib.suppress(NdsError):
            nds.decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes"



def test_nds_decode_refuses_more_bytes_than_the_bounds_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    assert nds.MAX_BYTES >= len(nds.encode(NameTable({"x" * nds.MAX_NAME: NameInfo(
        ("f" * nds.MAX_IP_TEXT,) * 5, "r" * nds.MAX_NAME, "s" * nds.MAX_NAME, "n" * nds.MAX_NAME,
        ("a" * nds.MAX_NAME,) * nds.MAX_ALT_HOSTS)}))) * nds.MAX_ENTRIES
    monkeypatch.setattr(nds, "MAX_BYTES", 16)
    with pytest.raises(NdsError, match="17 bytes: more than 16"):
        nds.decode(b"\x10\x01" * 8 + b"\x10")


def test_the_server_keeps_only_its_lookup_table() -> None:
    """The decoded NameTable (~6 MB at the 20 000-name bound) is dropped once the lookup table is built from it: only
    pilot-agent's /debug/ndsz would read it, and the agent has none."""
    nt = nds.decode(nds.encode(TABLE))
    gone = weakref.ref(nt)
    server = _server(nt)
    del nt
    gc.collect()
    assert gone() is None
    assert _ask(server, dns.message.make_query("web.demo.svc.cluster.local.", "A")) is not None

def test_a_table_at_the_bounds_builds_quickly() -> None:
    big = NameTable({f"s{i}.ns{i % 50}.svc.cluster.local": NameInfo((f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",),
                                                                 K8S, f"s{i}", f"ns{i % 50}", ("a.b",) * 8)
                     for i in range(nds.MAX_ENTRIES)})
    t0 = time.monotonic()
    lt = build(nds.decode(nds.encode(big)), SCOPE)
    assert time.monotonic() - t0 < 10
    assert lookup(lt, TYPE_A, "s77.ns27.") is not None and len(lt.addrs) == nds.MAX_ENTRIES


# ---- packets ------------------------------------------------------------------------------------------------------

def _server(table: NameTable | None = TABLE, **kw: object) -> DnsServer:
    s = DnsServer(SCOPE, ["127.0.0.1"], Metrics(), **kw)  # type: ignore[arg-type]
    s.set_table(table)
    return s


def _ask(server: DnsServer, q: dns.message.Message, tcp: bool = False) -> dns.message.Message | None:
    answer, fwd = server.local(q.to_wire(), tcp)
    assert fwd is None, "expected a local answer"
    return None if answer is None else dns.message.from_wire(answer)


def test_a_mesh_name_gets_an_authoritative_answer_with_ttl_30() -> None:
    q = dns.message.make_query("Web.Demo.", "A", use_edns=True)
    r = _ask(_server(), q)
    assert r is not None and r.id == q.id and r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA and r.flags & dns.flags.QR and r.flags & dns.flags.RD
    assert r.question[0].name.to_text() == "Web.Demo."                # the question as asked
    assert [(a.name.to_text(), a.ttl, [x.to_text() for x in a]) for a in r.answer] == [
        ("web.demo.", 30, ["10.96.0.10"])]


def test_before_the_first_table_queries_get_servfail_or_are_forwarded_as_configured() -> None:
    q = dns.message.make_query("web.demo.", "A")
    r = _ask(_server(None), q)
    assert r is not None and r.rcode() == dns.rcode.SERVFAIL
    assert _server(None, respond_before_sync=True).local(q.to_wire(), False)[1] is not None


def test_a_large_answer_is_truncated_to_the_clients_size() -> None:
    many = NameTable({"m.example": NameInfo(tuple(f"10.0.{i // 250}.{i % 250}" for i in range(200)), "External")})
    s = _server(many)
    plain = _ask(s, dns.message.make_query("m.example.", "A"))
    assert plain is not None and plain.flags & dns.flags.TC and 0 < len(plain.answer[0]) < 200
    assert len(s.local(dns.message.make_query("m.example.", "A").to_wire(), False)[0] or b"") <= 512
    edns = _ask(s, dns.message.make_query("m.example.", "A", use_edns=True, payload=4096))
    assert edns is not None and not edns.flags & dns.flags.TC and len(edns.answer[0]) == 200
    tcp = _ask(s, dns.message.make_query("m.example.", "A"), tcp=True)
    assert tcp is not None and not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 200


def _hdr(qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


Q = b"\x03web\x04demo\x00\x00\x01\x00\x01"
HOSTILE: dict[str, tuple[bytes, int | None]] = {
    "empty": (b"", None),
    "short header": (_hdr()[:11], None),
    "a response": (_hdr(flags=0x8100) + Q, None),
    "opcode STATUS": (_hdr(flags=2 << 11) + Q, dns.rcode.NOTIMP),
    "no question": (_hdr(qd=0), dns.rcode.FORMERR),
    "two questions": (_hdr(qd=2) + Q + Q, dns.rcode.FORMERR),
    "an answer section": (_hdr(an=1) + Q, dns.rcode.FORMERR),
    "three additionals": (_hdr(ar=3) + Q, dns.rcode.FORMERR),
    "name runs past the end": (_hdr() + b"\x05ab", dns.rcode.FORMERR),
    "no qtype": (_hdr() + b"\x03web\x00\x00", dns.rcode.FORMERR),
    "label type 0x40": (_hdr() + b"\x41" + b"a" * 65 + b"\x00\x00\x01\x00\x01", dns.rcode.FORMERR),
    "pointer in the question": (_hdr() + b"\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR),
    "name over 255 bytes": (_hdr() + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", dns.rcode.FORMERR),
    "additional runs past the end": (_hdr(ar=1) + Q + b"\x00\x00\x29\x10", dns.rcode.FORMERR),
    "additional with a pointer loop": (_hdr(ar=1) + Q + b"\xc0\x1d\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00",
                                       dns.rcode.FORMERR),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_malformed_packets_get_formerr_or_are_dropped(case: str) -> None:
    data, rcode = HOSTILE[case]
    s = _server()
    answer, fwd = s.local(data, False)
    assert fwd is None
    if rcode is None:
        assert answer is None
        return
    assert answer is not None and len(answer) == 12
    qid, flags = struct.unpack("!HH", answer[:4])
    assert qid == 0x1234 and flags & 0x8000 and flags & 0xF == rcode


def test_a_name_with_odd_bytes_is_forwarded_not_matched() -> None:
    s = _server(NameTable({"a.b": NameInfo(("10.0.0.1",), "External")}))
    _, fwd = s.local(_hdr() + b"\x03a\x2eb\x00\x00\x01\x00\x01", False)       # one label "a.b"
    assert fwd is not None and fwd.name == "a\\046b."


@pytest.mark.fuzz
@budget(400)
@given(st.binary(max_size=600) | st.builds(lambda h, b: h + b, st.binary(min_size=12, max_size=12),
                                          st.binary(max_size=300)))
def test_fuzz_any_packet_gets_a_parseable_reply_or_nothing(data: bytes) -> None:
    s = _server()
    for tcp in (False, True):
        answer, fwd = s.local(data, tcp)
        if answer is not None:
            r = dns.message.from_wire(answer)
            assert r.id == struct.unpack("!H", data[:2])[0] and r.flags & dns.flags.QR
        if fwd is not None:
            assert answer is None and fwd.id == struct.unpack("!H", data[:2])[0]
            assert data[12:12 + len(fwd.question)] == fwd.question


# ---- the server on real sockets ----------------------------------------------------------------------------------

@pytest.fixture
def upstream() -> Iterator[int]:
    udp, tcp = dns_upstream.serve("127.0.0.1", 0)
    yield tcp.socket.getsockname()[1]
    for s in (udp, tcp):
        s.shutdown()
        s.server_close()


async def _udp(port: int, wire: bytes, timeout: float = 5) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect(("127.0.0.1", port))
        await loop.sock_sendall(s, wire)
        return await asyncio.wait_for(loop.sock_recv(s, 65535), timeout)


async def _tcp(port: int, *wires: bytes) -> list[bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"".join(struct.pack("!H", len(x)) + x for x in wires))      # pipelined, as glibc sends A and AAAA
    out = []
    for _ in wires:
        n = struct.unpack("!H", await asyncio.wait_for(r.readexactly(2), 5))[0]
        out.append(await r.readexactly(n))
    w.close()
    return out


def test_server_answers_mesh_names_and_forwards_the_rest_over_udp_and_tcp(upstream: int) -> None:
    async def run() -> None:
        s = DnsServer(SCOPE, ["127.0.0.1"], Metrics(), timeout=1, upstream_port=upstream)
        s.set_table(TABLE)
        await s.start([("127.0.0.1", 0)])
        port = s.addresses[0][2]
        try:
            mesh = dns.message.from_wire(await _udp(port, dns.message.make_query("web.", "A").to_wire()))
            assert [x.to_text() for x in mesh.answer[0]] == ["10.96.0.10"]
            ext = dns.message.from_wire(await _udp(port, dns.message.make_query("external.example.", "A").to_wire()))
            assert [x.to_text() for x in ext.answer[0]] == ["203.0.113.7"] and not ext.flags & dns.flags.AA
            nx = dns.message.from_wire(await _udp(port, dns.message.make_query("nope.example.", "A").to_wire()))
            assert nx.rcode() == dns.rcode.NXDOMAIN
            big = dns.message.from_wire(await _udp(port, dns.message.make_query("big.example.", "A").to_wire()))
            assert big.flags & dns.flags.TC and 0 < len(big.answer[0]) < 100    # cut to 512: retry over TCP
            a, aaaa, big_tcp = (dns.message.from_wire(x) for x in await _tcp(
                port, dns.message.make_query("web.demo.svc.cluster.local.", "A").to_wire(),
                dns.message.make_query("external.example.", "AAAA").to_wire(),
                dns.message.make_query("big.example.", "A").to_wire()))
            assert [x.to_text() for x in a.answer[0]] == ["10.96.0.10"]
            assert [x.to_text() for x in aaaa.answer[0]] == ["2001:db8::7"]
            assert len(big_tcp.answer[0]) == 100
            text = s.metrics.render().decode()
            assert "istio_agent_dns_requests_total 7.0" in text
            assert "istio_agent_dns_upstream_requests_total 5.0" in text
            assert "istio_agent_dns_upstream_failures_total 0.0" in text
            assert 'istio_agent_dns_upstream_request_duration_seconds_bucket{le="5.0"} 5.0' in text
        finally:
            await s.close()
    asyncio.run(run())


def test_an_upstream_that_does_not_answer_gives_servfail_after_the_timeout(upstream: int) -> None:
    async def run() -> None:
        s = DnsServer(SCOPE, ["127.0.0.1", "127.0.0.1"], Metrics(), timeout=0.3, upstream_port=upstream)
        s.set_table(TABLE)
        await s.start([("127.0.0.1", 0)])
        try:
            t0 = time.monotonic()
            r = dns.message.from_wire(await _udp(s.addresses[0][2],
                                                 dns.message.make_query("silent.example.", "A").to_wire()))
            assert r.rcode() == dns.rcode.SERVFAIL and 0.5 < time.monotonic() - t0 < 3    # both servers tried
            assert "istio_agent_dns_upstream_failures_total 1.0" in s.metrics.render().decode()
        finally:
            await s.close()
    asyncio.run(run())


def test_forwarded_queries_in_flight_are_bounded(upstream: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dnsserver, "MAX_INFLIGHT", 4)

    async def run() -> None:
        s = DnsServer(SCOPE, ["127.0.0.1"], Metrics(), timeout=1, upstream_port=upstream)
        s.set_table(TABLE)
        await s.start([("127.0.0.1", 0)])
        try:
            wires = [dns.message.make_query("silent.example.", "A").to_wire() for _ in range(10)]
            t0 = time.monotonic()
            replies = await asyncio.gather(*(_udp(s.addresses[0][2], w) for w in wires))
            fast = [r for r in replies if dns.message.from_wire(r).rcode() == dns.rcode.SERVFAIL]
            assert len(fast) == 10 and time.monotonic() - t0 < 3
            assert "istio_agent_dns_upstream_requests_total 4.0" in s.metrics.render().decode()
        finally:
            await s.close()
    asyncio.run(run())


def test_an_upstream_reply_too_large_keeps_the_records_that_fit() -> None:
    q = dns.message.make_query("big.example.", "A")
    parsed = parse_query(q.to_wire())
    assert isinstance(parsed, Query)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text_list(q.question[0].name, 60, "IN", "A", [f"10.0.0.{i}" for i in range(99)]))
    r.additional.append(dns.rrset.from_text("ns.example.", 60, "IN", "A", "10.1.1.1"))
    wire = r.to_wire()
    cut = dns.message.from_wire(fit(parsed, wire, 512))
    assert cut.flags & dns.flags.TC and cut.id == q.id and 0 < len(cut.answer[0]) < 99 and not cut.additional
    assert fit(parsed, wire, 4096) == wire
    garbage = wire[:29] + b"\xff" * 600                             # records that cannot be walked
    bare = dns.message.from_wire(fit(parsed, garbage, 512))
    assert bare.flags & dns.flags.TC and not bare.answer and bare.question == q.question


@pytest.mark.fuzz
@budget(300)
@given(st.binary(min_size=12, max_size=2000), st.sampled_from([512, 1232, 4096]))
def test_fuzz_an_upstream_reply_is_cut_to_the_limit_or_passed_whole(data: bytes, limit: int) -> None:
    q = parse_query(dns.message.make_query("x.example.", "A").to_wire())
    assert isinstance(q, Query)
    out = fit(q, data, limit)
    assert out == data if len(data) <= limit else len(out) <= limit and out[:2] == data[:2]


def test_parallel_forwarding_takes_the_first_answer(upstream: int) -> None:
    async def run() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:       # a nameserver that never answers
            hole.bind(("127.0.0.2", upstream))
            s = DnsServer(SCOPE, ["127.0.0.2", "127.0.0.1"], Metrics(), timeout=2, parallel=True,
                          upstream_port=upstream)
            s.set_table(TABLE)
            await s.start([("127.0.0.1", 0)])
            try:
                for _ in range(4):
                    t0 = time.monotonic()
                    r = dns.message.from_wire(await _udp(s.addresses[0][2],
                                                         dns.message.make_query("external.example.", "A").to_wire()))
                    assert [x.to_text() for x in r.answer[0]] == ["203.0.113.7"] and time.monotonic() - t0 < 1
            finally:
                await s.close()
    asyncio.run(run())


def test_a_dns_port_the_agent_cannot_take_stops_it_as_pilot_agent() -> None:
    """pilot-agent's Agent.Run fails with "failed to start local DNS server" when a listener cannot bind: the app's
    DNS is captured to that port, so running on without it would break every lookup in the pod."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        agent = SimpleNamespace(metrics=Metrics(), cfg=SimpleNamespace(
            node_type="sidecar", pod_namespace="demo", domain="demo.svc.cluster.local", standalone=True,
            env={"ISTIO_META_DNS_CAPTURE": "true", "DNS_PROXY_ADDR": f"127.0.0.1:{port}"}))
        with pytest.raises(OSError, match=f"failed to start local DNS server on 127.0.0.1:{port}: Address"):
            asyncio.run(Sidecar._start_dns(agent))  # type: ignore[arg-type]


def test_a_tcp_client_that_never_reads_its_answers_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that pipelines queries and never reads blocks the server's writes; the wait is bounded like the
    reads (TCP_IDLE), so such clients cannot hold the MAX_TCP_CONNS slots for ever."""
    monkeypatch.setattr(dnsserver, "TCP_IDLE", 0.5)

    async def run() -> None:
        s = _server()
        await s.start([("127.0.0.1", 0)])
        port = s.addresses[0][2]
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect(("127.0.0.1", port))
        c.setblocking(False)
        q = dns.message.make_query("web.demo.svc.cluster.local.", "A").to_wire()
        loop = asyncio.get_running_loop()
        try:
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(3):
                    while True:                            # until the server stops reading: its writes are stuck
                        await loop.sock_sendall(c, (struct.pack("!H", len(q)) + q) * 64)
            for _ in range(40):
                if s._tcp_conns == 0:
                    break
                await asyncio.sleep(0.1)
            assert s._tcp_conns == 0, "the stuck connection still holds its slot"
        finally:
            c.close()
            await s.close()
    asyncio.run(run())
