"""Structured logging in pilot-agent's shape: `time<TAB>level<TAB>scope<TAB>msg key=value...` or JSON lines.

Levels per scope come from `--log_output_level scope:level,...` (Istio's flag); quiet by default (info, no debug).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "warning": logging.WARNING,
           "error": logging.ERROR, "fatal": logging.CRITICAL, "none": logging.CRITICAL + 10}
_ROOT = "agent"


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs * 1000):06d}Z"
        level = {"WARNING": "warn", "CRITICAL": "fatal"}.get(record.levelname, record.levelname.lower())
        scope = record.name.split(".", 1)[1] if record.name.startswith(_ROOT + ".") else "default"
        fields: dict[str, Any] = getattr(record, "fields", {}) or {}
        msg = record.getMessage()
        if record.exc_info:
            fields = {**fields, "error": self.formatException(record.exc_info).splitlines()[-1]}
        if self.as_json:
            return json.dumps({"time": ts, "level": level, "scope": scope, "msg": msg, **fields}, default=str)
        kv = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{ts}\t{level}\t{scope}\t{msg}" + (f"\t{kv}" if kv else "")


def setup(output_level: str = "default:info", as_json: bool = False) -> None:
    """Configure the `agent.*` loggers from `scope:level,...` (`default` sets the base)."""
    root = logging.getLogger(_ROOT)
    root.handlers[:] = []
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(_Formatter(as_json))
    root.addHandler(h)
    root.propagate = False
    root.setLevel(logging.INFO)
    for tok in output_level.split(","):
        tok = tok.strip()
        if not tok:
            continue
        scope, _, lvl = tok.rpartition(":")
        level = _LEVELS.get(lvl.lower())
        if level is None:
            raise ValueError(f"--log_output_level: unknown level {lvl!r} in {tok!r}")
        if scope in ("", "default"):
            root.setLevel(level)
        else:
            logging.getLogger(f"{_ROOT}.{scope}").setLevel(level)


class Log:
    """A scope logger taking key=value fields: `log.info("msg", key=value)`."""

    def __init__(self, scope: str) -> None:
        self._l = logging.getLogger(f"{_ROOT}.{scope}")

    def _log(self, level: int, msg: str, exc: bool, fields: dict[str, Any]) -> None:
        if self._l.isEnabledFor(level):
            self._l.log(level, msg, extra={"fields": fields}, exc_info=exc)

    def debug(self, msg: str, **f: Any) -> None:
        self._log(logging.DEBUG, msg, False, f)

    def info(self, msg: str, **f: Any) -> None:
        self._log(logging.INFO, msg, False, f)

    def warn(self, msg: str, exc: bool = False, **f: Any) -> None:
        self._log(logging.WARNING, msg, exc, f)

    def error(self, msg: str, exc: bool = False, **f: Any) -> None:
        self._log(logging.ERROR, msg, exc, f)
