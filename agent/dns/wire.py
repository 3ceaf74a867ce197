"""DNS messages on the wire (RFC 1035, EDNS RFC 6891): the little the proxy reads and writes, framed by hand.

The app's packets are hostile: every read is bounded by the packet, names by 255 bytes and 63-byte labels, and a
query the proxy will not serve gets miekg/dns's verdicts, which Istio's proxy runs on: a packet shorter than a header
or a response is dropped (a reply could be used to amplify), an opcode other than QUERY gets NOTIMP, anything else
malformed (not exactly one question, answer/authority records, a name that does not parse) gets FORMERR.
A library (dnspython) would cost the agent ~5.6 MB RSS for this; the tests check these bytes with it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHHHHH")
TYPE_A, TYPE_CNAME, TYPE_AAAA, TYPE_OPT = 1, 5, 28, 41
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP = 0, 1, 2, 3, 4
QR, AA, TC, RD, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0010
MIN_UDP = 512          # dns.MinMsgSize
MAX_MSG = 65535        # dns.MaxMsgSize, a TCP message's limit
_NAME_OK = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_*")


@dataclass(frozen=True)
class Query:
    """One question as the app asked it; `name` is lowercase text with the trailing dot (Istio's lookup key)."""

    id: int
    flags: int
    name: str
    qtype: int
    qclass: int
    question: bytes            # the question section as received, echoed in replies
    udp_size: int              # the EDNS payload size the client advertised, 0 without EDNS


@dataclass(frozen=True)
class Refusal:
    """A packet that gets a header-only error reply (`rcode`) instead of an answer."""

    id: int
    opcode: int
    rcode: int


class _Bad(Exception):
    pass


def _label_text(label: bytes) -> str:
    """A label as text; bytes that no table name has are escaped (`\\DDD`), so such a name can only be forwarded."""
    return "".join(chr(b) if b in _NAME_OK else f"\\{b:03d}" for b in label.lower())


def read_name(data: bytes, i: int, pointers: bool) -> tuple[str, int]:
    """The name at `i` and the offset after it. Compression pointers only where allowed, only backwards."""
    labels: list[str] = []
    size, end, hops = 0, -1, 0
    while True:
        if i >= len(data):
            raise _Bad("name runs past the end")
        n = data[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0 == 0xC0:
            if not pointers or i + 1 >= len(data):
                raise _Bad("compression pointer")
            target = (n & 0x3F) << 8 | data[i + 1]
            if end < 0:
                end = i + 2
            hops += 1
            if target >= i or hops > 64:
                raise _Bad("compression pointer loop")
            i = target
            continue
        if n & 0xC0 or i + 1 + n > len(data):
            raise _Bad("bad label")
        size += n + 1
        if size > 254:
            raise _Bad("name longer than 255 bytes")
        labels.append(_label_text(data[i + 1:i + 1 + n]))
        i += 1 + n
    return "".join(f"{label}." for label in labels) or ".", (end if end >= 0 else i)


def _skip_records(data: bytes, i: int, count: int) -> tuple[int, int]:
    """Skip `count` records; returns (offset after them, EDNS payload size if an OPT record was among them)."""
    udp = 0
    for _ in range(count):
        _, i = read_name(data, i, pointers=True)
        if i + 10 > len(data):
            raise _Bad("record header runs past the end")
        rtype, rclass, _ttl, rdlen = struct.unpack_from("!HHIH", data, i)
        i += 10 + rdlen
        if i > len(data):
            raise _Bad("record data runs past the end")
        if rtype == TYPE_OPT:
            udp = max(rclass, 1)
    return i, udp


def parse_query(data: bytes) -> Query | Refusal | None:
    """A query to answer, a refusal to send, or None: drop it silently (no header, or it is itself a response)."""
    if len(data) < HEADER.size:
        return None
    qid, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    if flags & QR:
        return None
    opcode = flags >> 11 & 0xF
    if opcode != 0:
        return Refusal(qid, opcode, NOTIMP)
    if qd != 1 or an != 0 or ns > 1 or ar > 2:
        return Refusal(qid, 0, FORMERR)
    try:
        name, i = read_name(data, HEADER.size, pointers=False)
        if i + 4 > len(data):
            raise _Bad("question runs past the end")
        qtype, qclass = struct.unpack_from("!HH", data, i)
        question = data[HEADER.size:i + 4]
        _, udp = _skip_records(data, i + 4, ns + ar)
    except _Bad:
        return Refusal(qid, 0, FORMERR)
    return Query(qid, flags, name, qtype, qclass, question, udp)


def refusal_bytes(r: Refusal) -> bytes:
    """miekg's reply to a rejected packet: the header alone, QR set, the rcode, no sections."""
    return HEADER.pack(r.id, QR | r.opcode << 11 | r.rcode, 0, 0, 0, 0)


def encode_name(name: str) -> bytes:
    """Text (as the table spells it, trailing dot optional) to wire labels; names come from the table, bounded."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        if label:
            raw = label.encode("ascii", "replace")[:63]
            out += bytes((len(raw),)) + raw
    return bytes(out + b"\x00")


@dataclass(frozen=True)
class Record:
    name: str          # lowercase, trailing dot
    rtype: int
    ttl: int
    rdata: bytes       # A: 4 bytes, AAAA: 16 bytes, CNAME: the target already encoded


def reply(q: Query, rcode: int, records: tuple[Record, ...] = (), authoritative: bool = False,
          limit: int = MAX_MSG) -> bytes:
    """miekg's SetReply (id, opcode, RD and CD kept; no OPT) plus Truncate: records that do not fit `limit` are
    left out and TC is set. Owner names are lowercase, as Istio's; one spelled as the question points at it."""
    flags = QR | (q.flags & (RD | CD)) | rcode | (AA if authoritative else 0)
    body, count = bytearray(q.question), 0
    same = q.question[:-4] == q.question[:-4].lower()
    for r in records:
        owner = b"\xc0\x0c" if same and r.name == q.name else encode_name(r.name)
        rr = owner + struct.pack("!HHIH", r.rtype, CLASS_IN, r.ttl, len(r.rdata)) + r.rdata
        if HEADER.size + len(body) + len(rr) > limit:
            flags |= TC
            break
        body += rr
        count += 1
    return HEADER.pack(q.id, flags, 1, count, 0, 0) + bytes(body)


def response_size_limit(q: Query, tcp: bool) -> int:
    """Istio's size(): 64 KiB over TCP, else the client's EDNS size, never below 512."""
    return MAX_MSG if tcp else max(MIN_UDP, q.udp_size)


def is_reply_to(q: Query, data: bytes) -> bool:
    """An upstream's answer to `q`: a response with the same id (what miekg's Exchange checks)."""
    if len(data) < HEADER.size:
        return False
    qid, flags = struct.unpack_from("!HH", data)
    return qid == q.id and bool(flags & QR)


def fit(q: Query, data: bytes, limit: int) -> bytes:
    """An upstream reply cut to the client's limit as miekg's Truncate cuts it: the whole records that fit, in
    order, and TC set. Keeping some answers matters: glibc takes a reply with no answers, no AA and no RA for a lame
    server and never retries it over TCP. A reply that cannot be walked keeps only its header and question."""
    if len(data) <= limit:
        return data
    qid, flags, qd, *counts = HEADER.unpack_from(data)
    kept = [0, 0, 0]
    try:
        _, end = read_name(data, HEADER.size, pointers=True)
        end += 4
        if qd != 1 or end > limit:
            raise _Bad("question")
        for section, count in enumerate(counts):
            for _ in range(count):
                nxt, _ = _skip_records(data, end, 1)
                if nxt > limit:
                    raise _Bad("full")
                end, kept[section] = nxt, kept[section] + 1
    except _Bad:
        pass
    if not any(kept):
        return HEADER.pack(qid, flags | TC, 1, 0, 0, 0) + q.question
    return HEADER.pack(qid, flags | TC, 1, *kept) + data[HEADER.size:end]
