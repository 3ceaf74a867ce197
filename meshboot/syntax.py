"""Lexical rules for the numbers and names tenants write in annotations, flags and env.

Python's `int()`/`str.isdigit()` accept fullwidth, Arabic-Indic and superscript digits ("８０", "٨٠", "²") that Go's
strconv and iptables refuse, so a value checked with them passes here and fails later (or with a traceback). Every
part checks numbers and interface names with these functions. Kept free of imports: istio-iptables' start-up time
is a measured budget.
"""
from __future__ import annotations

# Linux's dev_valid_name(): 1..IFNAMSIZ-1 bytes, not "." or "..", no '/', ':' or whitespace. Control characters and a
# leading '-' or '!' are refused too: iptables would read them as an option or a negation.
IFNAMSIZ = 16


def is_ascii_digits(text: str) -> bool:
    """True for a non-empty string of 0-9 only."""
    return bool(text) and text.isascii() and text.isdigit()


def parse_uint(text: str, maximum: int) -> int:
    """A decimal of ASCII digits from 0 to `maximum`; ValueError says what was wanted (the caller names the field)."""
    if not isinstance(text, str) or not is_ascii_digits(text) or len(text) > 20 or int(text) > maximum:
        raise ValueError(f"want a whole number from 0 to {maximum} (ASCII digits)")
    return int(text)


def parse_port(text: str) -> int:
    """A port number, 0..65535, ASCII digits."""
    return parse_uint(text, 65535)


def interface_name_error(name: str) -> str | None:
    """Why `name` is not a valid Linux interface name, or None when it is."""
    if not isinstance(name, str) or not name:
        return "an interface name must not be empty"
    raw = name.encode("utf-8", "surrogatepass")
    if len(raw) >= IFNAMSIZ:
        return f"an interface name is at most {IFNAMSIZ - 1} bytes"
    if name in (".", ".."):
        return "an interface name cannot be . or .."
    if name[0] in "-!":
        return "an interface name cannot start with - or !"
    for ch in name:
        if ch in "/:" or ch.isspace() or ord(ch) < 32 or ord(ch) == 127:
            return "an interface name has no '/', ':', whitespace or control characters"
    return None


_GO_TRUE = frozenset(("1", "t", "T", "TRUE", "true", "True"))
_GO_FALSE = frozenset(("0", "f", "F", "FALSE", "false", "False"))


def parse_go_bool(text: str) -> bool | None:
    """Go's strconv.ParseBool, which Istio uses for every boolean flag, env var and annotation: exactly these
    spellings ("yes", "on" and surrounding space are refused); None when `text` is not one of them."""
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    return None
