"""Just enough X.509 to schedule rotation: the leaf's serial number and NotAfter, read from DER directly.

(The agent keeps `cryptography` out of its process; see keygen.py.)
"""
from __future__ import annotations

import base64
import calendar
import re

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)


class X509Error(ValueError):
    pass


def _tlv(buf: bytes, i: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the element at i."""
    if i + 2 > len(buf):
        raise X509Error("truncated DER")
    tag, n = buf[i], buf[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(buf[i:i + k], "big")
        i += k
    if i + n > len(buf):
        raise X509Error("truncated DER")
    return tag, i, i + n


def _time(tag: int, raw: bytes) -> float:
    s = raw.decode()
    if tag == 0x17:                                   # UTCTime YYMMDDHHMMSSZ
        year = int(s[:2])
        year += 2000 if year < 50 else 1900
        rest = s[2:]
    elif tag == 0x18:                                 # GeneralizedTime YYYYMMDDHHMMSSZ
        year, rest = int(s[:4]), s[4:]
    else:
        raise X509Error(f"unexpected time tag {tag:#x}")
    mo, d, h, mi, sec = (int(rest[j:j + 2]) for j in range(0, 10, 2))
    return float(calendar.timegm((year, mo, d, h, mi, sec, 0, 0, 0)))


def pem_certs(pem: bytes) -> list[bytes]:
    return [base64.b64decode(b"".join(m.group(1).split())) for m in _PEM.finditer(pem)]


def pem_certificate(der: bytes) -> str:
    """One certificate as 64-column PEM: the one form trust anchors are compared and sorted in (ROOTCA's merge with
    istiod's PCDS bundle), whatever line width their source used."""
    b64 = base64.b64encode(der).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def leaf_serial_and_expiry(pem: bytes) -> tuple[int, float]:
    """Serial number and NotAfter (epoch seconds) of the first certificate in `pem`."""
    certs = pem_certs(pem)
    if not certs:
        raise X509Error("no certificate in PEM")
    der = certs[0]
    _, cs, _ = _tlv(der, 0)                           # Certificate
    _, ts, _ = _tlv(der, cs)                          # TBSCertificate
    tag, s, e = _tlv(der, ts)
    if tag == 0xA0:                                   # [0] version
        tag, s, e = _tlv(der, e)
    if tag != 0x02:
        raise X509Error("no serial number")
    serial = int.from_bytes(der[s:e], "big", signed=True)
    _, _, e = _tlv(der, e)                            # signature algorithm
    _, _, e = _tlv(der, e)                            # issuer
    tag, vs, _ = _tlv(der, e)                         # validity
    _, _, nb_end = _tlv(der, vs)
    tag, s, e = _tlv(der, nb_end)
    return serial, _time(tag, der[s:e])
