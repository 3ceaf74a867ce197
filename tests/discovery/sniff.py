"""What a connection puts on the wire: `python sniff.py IFACE DST_IP DST_PORT` (root, inside the receiver's netns).

Prints `ready`, then one JSON line per TCP connection to DST_IP:DST_PORT — its source and the first bytes of its
first data segment (hex) — so a test can tell a TLS ClientHello (0x16 0x03 …, with its SNI and ALPN in clear) from
plaintext HTTP. AF_PACKET sees the packets before any socket or Envoy does.
"""
from __future__ import annotations

import json
import socket
import struct
import sys

ETH_P_IP = 0x0800


def main() -> None:
    iface, dst, dport = sys.argv[1], socket.inet_aton(sys.argv[2]), int(sys.argv[3])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    s.bind((iface, 0))
    print("ready", flush=True)
    seen: set[tuple[str, int]] = set()
    while True:
        frame = s.recv(65535)
        ip = frame[14:]
        if len(ip) < 20 or ip[9] != 6 or ip[16:20] != dst:
            continue
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        tcp = ip[ihl:total]
        sport, port = struct.unpack("!HH", tcp[:4])
        payload = tcp[(tcp[12] >> 4) * 4:]
        src = (socket.inet_ntoa(ip[12:16]), sport)
        if port != dport or not payload or src in seen:
            continue
        seen.add(src)
        print(json.dumps({"src": src[0], "sport": sport, "head": payload[:512].hex()}), flush=True)


if __name__ == "__main__":
    main()
