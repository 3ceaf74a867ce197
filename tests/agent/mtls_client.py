"""mTLS client for agent tests: `mtls_client.py HOST PORT CERT KEY ROOT`. One TLS connection, kept open; for each
line on stdin it sends `GET /whoami` on it and prints `<status> <body> <server cert serial hex> <server SAN>`.
Prints `ERROR <what>` and exits 1 when the connection fails."""
import socket
import ssl
import sys

from cryptography import x509

host, port, cert, key, root = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False          # Istio peers are checked by SPIFFE URI, not DNS name
ctx.load_verify_locations(root)
ctx.load_cert_chain(cert, key)
try:
    s = ctx.wrap_socket(socket.create_connection((host, port), timeout=5))
    f = s.makefile("rb")
except (OSError, ssl.SSLError) as e:
    print(f"ERROR {e!r}", flush=True)
    sys.exit(1)
peer = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
san = peer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
    x509.UniformResourceIdentifier)
for _ in sys.stdin:
    try:
        s.sendall(f"GET /whoami HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        status = f.readline().split()[1].decode()
        n = 0
        while (line := f.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                n = int(line.split(b":")[1])
        body = f.read(n).decode()
        print(status, body, f"{peer.serial_number:x}", san[0], flush=True)
    except (OSError, ssl.SSLError, IndexError) as e:
        print(f"ERROR {e!r}", flush=True)
        sys.exit(1)
