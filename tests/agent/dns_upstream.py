"""A fake upstream nameserver for the DNS proxy tests: real UDP and TCP sockets, dnspython's encoder/decoder.

    python tests/agent/dns_upstream.py HOST PORT

Answers A/AAAA for the names in RECORDS (NXDOMAIN otherwise), `big.example.` with 100 A records (too large for 512
bytes), never answers `silent.example.`; prints `ready` and then one line per query: `<udp|tcp> <source ip> <name>
<type>`, so a test sees which queries reached it and from where.
"""
from __future__ import annotations

import socket
import socketserver
import struct
import sys
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

RECORDS = {("external.example.", "A"): ["203.0.113.7"], ("external.example.", "AAAA"): ["2001:db8::7"],
           ("big.example.", "A"): [f"198.51.100.{i}" for i in range(1, 101)]}
_lock = threading.Lock()


def answer(wire: bytes, proto: str, source: str) -> bytes | None:
    q = dns.message.from_wire(wire)
    name, rtype = q.question[0].name.to_text().lower(), dns.rdatatype.to_text(q.question[0].rdtype)
    with _lock:
        print(proto, source, name, rtype, flush=True)
    if name == "silent.example.":
        return None
    r = dns.message.make_response(q)
    ips = RECORDS.get((name, rtype))
    if ips:
        r.answer.append(dns.rrset.from_text_list(q.question[0].name, 60, "IN", rtype, ips))
    elif not any(n == name for n, _ in RECORDS):
        r.set_rcode(dns.rcode.NXDOMAIN)
    return r.to_wire()          # no truncation here: the proxy must cut what does not fit its client


class _Udp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        out = answer(data, "udp", self.client_address[0])
        if out is not None:
            sock.sendto(out, self.client_address)


class _Tcp(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            data = self.rfile.read(struct.unpack("!H", head)[0])
            out = answer(data, "tcp", self.client_address[0])
            if out is not None:
                self.wfile.write(struct.pack("!H", len(out)) + out)


def serve(host: str, port: int) -> tuple[socketserver.UDPServer, socketserver.TCPServer]:
    """UDP and TCP servers on host:port (port 0: the same free port for both), each in a daemon thread."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Udp(socketserver.ThreadingUDPServer):
        address_family = fam
        daemon_threads = True

    class Tcp(socketserver.ThreadingTCPServer):
        address_family = fam
        daemon_threads = True
        allow_reuse_address = True

    tcp = Tcp((host, port), _Tcp)
    udp = Udp((host, tcp.server_address[1]), _Udp)
    for s in (udp, tcp):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    return udp, tcp


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
    print("ready", flush=True)
    threading.Event().wait()
