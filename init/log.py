"""A tiny structured logger in Istio's format (`<RFC3339 time>\\t<level>\\t<msg> key=value`) or JSON lines.

Not the logging module: this runs in the init container's start-up path, where every import counts.
"""
from __future__ import annotations

import sys
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import TextIO

LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "fatal": 50, "none": 100}


class Logger:
    def __init__(self, level: str = "info", as_json: bool = False, stream: TextIO | None = None) -> None:
        self.threshold = LEVELS.get(level, 20)
        self.as_json = as_json
        self.stream = stream

    @classmethod
    def from_flags(cls, output_level: str, as_json: bool) -> Logger:
        """`--log_output_level` is `scope:level,...` or a bare level; the `default` scope (or a bare one) counts."""
        level = "info"
        for item in output_level.split(","):
            scope, colon, lvl = item.rpartition(":")
            if not colon:
                level = item or level
            elif scope in ("default", "all", "iptables"):
                level = lvl
        if level not in LEVELS:
            shown = output_level if len(output_level) <= 60 else output_level[:60] + "..."
            raise ValueError(f"--log_output_level: invalid log level in {shown!r} "
                             f"(want {'|'.join(sorted(LEVELS))}, or scope:level,...)")
        return cls(level, as_json)

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.threshold

    def log(self, level: str, msg: str, **fields: object) -> None:
        if not self.enabled(level):
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        if self.as_json:
            import json  # noqa: PLC0415 - only with --log_as_json (start-up time)

            line = json.dumps({"time": stamp, "level": level, "scope": "default", "msg": msg, **fields},
                              default=str)
        else:
            extra = "".join(f" {k}={_fmt(v)}" for k, v in fields.items())
            line = f"{stamp}\t{level}\t{msg}{extra}"
        stream = self.stream or (sys.stderr if LEVELS[level] >= 30 else sys.stdout)
        print(line, file=stream, flush=True)

    def debug(self, msg: str, **f: object) -> None:
        self.log("debug", msg, **f)

    def info(self, msg: str, **f: object) -> None:
        self.log("info", msg, **f)

    def warn(self, msg: str, **f: object) -> None:
        self.log("warn", msg, **f)

    def error(self, msg: str, **f: object) -> None:
        self.log("error", msg, **f)


def _fmt(v: object) -> str:
    s = str(v)
    return repr(s) if (not s or any(c.isspace() for c in s) or "=" in s) else s
