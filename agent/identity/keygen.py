"""Key + CSR generation in a helper process (helper.py): `python -m agent.identity.keygen KIND BITS CURVE PKCS8 URI`.

`cryptography` adds ~9 MB RSS to whoever imports it, while the agent needs a key only twice a day. The first
helper starts with the agent, so RSA key generation runs in parallel with the agent's start-up instead of holding
its GIL. Output on stdout: the private key PEM, then the CSR PEM.
"""
from __future__ import annotations

import sys

from .. import helper


def argv(kind: str, rsa_bits: int, curve: str, pkcs8: bool, uri: str) -> list[str]:
    return helper.module_argv("agent.identity.keygen", kind, str(rsa_bits), curve, "1" if pkcs8 else "0", uri)


def split_output(out: bytes) -> tuple[bytes, str]:
    """(key PEM, CSR PEM) from the helper's stdout."""
    marker = b"-----BEGIN CERTIFICATE REQUEST-----"
    i = out.find(marker)
    if i <= 0:
        raise ValueError("key generator produced no key/CSR")
    return out[:i], out[i:].decode()


async def generate(args: list[str]) -> tuple[bytes, str]:
    return split_output(await helper.run(args))


def main(args: list[str]) -> int:
    from meshboot import pki  # noqa: PLC0415 - cryptography (~9 MB RSS): only in the helper process, never the agent

    kind, bits, curve, pkcs8, uri = args
    key = pki.generate_key("RSA" if kind == "RSA" else "ECDSA", rsa_bits=int(bits), curve=curve)
    csr = pki.make_csr(key, uris=[uri])
    sys.stdout.buffer.write(pki.key_pem(key, pkcs8=pkcs8 == "1") + pki.csr_pem(csr))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
