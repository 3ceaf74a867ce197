"""Key + CSR generation, run as a short-lived helper process: `python -m agent.keygen KIND BITS CURVE PKCS8 URI`.

Why a process: `cryptography` (its Rust/OpenSSL library) adds ~9 MB RSS to whoever imports it, and the agent lives
in every pod for its whole life while it needs a key only twice a day. The helper starts at the agent's very
first instruction, so RSA key generation runs in parallel with the agent's own start-up instead of holding its
GIL. Output on stdout: the private key PEM, then the CSR PEM.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys


def argv(kind: str, rsa_bits: int, curve: str, pkcs8: bool, uri: str) -> list[str]:
    return [sys.executable, "-m", "agent.keygen", kind, str(rsa_bits), curve, "1" if pkcs8 else "0", uri]


def split_output(out: bytes) -> tuple[bytes, str]:
    """(key PEM, CSR PEM) from the helper's stdout."""
    marker = b"-----BEGIN CERTIFICATE REQUEST-----"
    i = out.find(marker)
    if i <= 0:
        raise ValueError("key generator produced no key/CSR")
    return out[:i], out[i:].decode()


class Prestarted:
    """A helper started before the event loop exists (at agent start); awaited when the first CSR is due."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    async def result(self) -> tuple[bytes, str]:
        while self.proc.poll() is None:       # output is a few KB: it cannot block on a full pipe
            await asyncio.sleep(0.002)
        out, err = self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"key generator failed: {err.decode(errors='replace').strip()}")
        return split_output(out)


async def generate(args: list[str]) -> tuple[bytes, str]:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"key generator failed: {err.decode(errors='replace').strip()}")
    return split_output(out)


def main(args: list[str]) -> int:
    from meshboot import pki

    kind, bits, curve, pkcs8, uri = args
    key = pki.generate_key(kind, rsa_bits=int(bits), curve=curve)  # type: ignore[arg-type]
    csr = pki.make_csr(key, uris=[uri])
    sys.stdout.buffer.write(pki.key_pem(key, pkcs8=pkcs8 == "1") + pki.csr_pem(csr))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
