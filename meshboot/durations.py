"""Go's duration syntax ("5s", "1m30s", "250ms", "0"), which Istio's flags, env vars and ProxyConfig all use.

One parser for the four places that read them (istio-iptables flags, the injector's ProxyConfig, the CA's TTL flag,
the agent's env and ProxyConfig). Kept free of imports: istio-iptables' start-up time is a measured budget.
"""
from __future__ import annotations

_DIGITS = frozenset("0123456789")   # ASCII only: float() would take "５" or "٥"
# Go's unitMap: microseconds as "us", "\u00b5s" (micro sign) and "\u03bcs" (Greek mu), which look alike.
_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds; protojson's fractional form ("0.5s") is accepted too. ValueError names the bad text."""
    s = str(text).strip()
    if s in ("0", "+0", "-0"):
        return 0.0
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    if not s:
        raise ValueError(f"invalid duration {text!r} (want e.g. 5s, 500ms, 1m30s)")
    total, i = 0.0, 0
    while i < len(s):
        j = i
        while j < len(s) and (s[j] in _DIGITS or s[j] == "."):
            j += 1
        k = j
        while k < len(s) and not (s[k] in _DIGITS or s[k] == "."):
            k += 1
        num, unit = s[i:j], s[j:k]
        if not num or num == "." or num.count(".") > 1 or unit not in _UNITS:
            raise ValueError(f"invalid duration {text!r} (want e.g. 5s, 500ms, 1m30s)")
        total += float(num) * _UNITS[unit]
        i = k
    return sign * total
