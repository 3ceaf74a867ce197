"""The pod's application for agent tests: HTTP/1.1 (keep-alive) on 0.0.0.0:PORT.

GET /whoami → the peer address it sees; /slow?s=N → answers after N seconds; /ready → the status code written in
the file READY_FILE (default 200); anything else → 200 "hello". Prints one line per request.
"""
import http.server
import os
import sys
import time
import urllib.parse

PORT, READY_FILE = int(sys.argv[1]), sys.argv[2]


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        u = urllib.parse.urlsplit(self.path)
        code, body = 200, b"hello"
        if u.path == "/whoami":
            body = self.client_address[0].encode()
        elif u.path == "/slow":
            time.sleep(float(urllib.parse.parse_qs(u.query).get("s", ["2"])[0]))
            body = b"slow done"
        elif u.path == "/ready":
            code = int(open(READY_FILE).read().strip()) if os.path.exists(READY_FILE) else 200
            body = f"ready={code} host={self.headers.get('Host')}".encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        print(self.client_address[0], fmt % args, flush=True)


http.server.ThreadingHTTPServer.daemon_threads = True
http.server.ThreadingHTTPServer(("0.0.0.0", PORT), H).serve_forever()
