"""meshboot-proxy-status: istioctl proxy-status against meshboot's control plane.

It reads /debug/syncz from the control plane's monitoring port (15014, where istioctl reads it from istiod through a
port-forward) and prints istioctl's table: NAME, CLUSTER, then CDS, LDS, EDS, RDS as SYNCED / NOT SENT / STALE
(ERROR after a NACK, IGNORED when not watched), ISTIOD, VERSION. `--json` prints the rows as served; a
`<pod>.<namespace>` argument prints what was last sent to that proxy (/debug/config_dump?proxyID=), as Envoy's
config_dump. The answer is read bounded and parsed with the bounded JSON reader.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from meshboot import constants as C
from meshboot import jsonsafe

from .debug import MAX_DUMP_BYTES

PROG = "meshboot-proxy-status"
COLUMNS = ("CDS", "LDS", "EDS", "RDS")      # istioctl's order
MAX_SYNCZ_BYTES = 64 * 1024 * 1024
TIMEOUT = 30.0
MAX_WARNINGS = 20


class Failed(Exception):
    """One line for stderr, exit 1."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("proxy", nargs="?", default="", metavar="<pod>.<namespace>",
                   help="print what was last sent to this proxy (its config_dump) instead of the table")
    p.add_argument("--control-plane", default=f"http://127.0.0.1:{C.MONITORING_PORT}", metavar="URL",
                   help="the control plane's monitoring port (default http://127.0.0.1:15014; kubectl port-forward "
                        "it from a cluster)")
    p.add_argument("--json", action="store_true", help="print /debug/syncz's JSON instead of the table")
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds to wait for the answer (default 30)")
    return p


def fetch(base: str, path: str, limit: int, timeout: float) -> bytes:
    """GET base+path; the body, at most `limit` bytes; Failed with the server's own words otherwise."""
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise Failed(f"--control-plane: {base[:200]!r} is not an http:// or https:// URL")
    url = base.rstrip("/") + path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body: bytes = resp.read(limit + 1)
    except urllib.error.HTTPError as e:
        detail = e.read(4096).decode("utf-8", "replace").strip()
        raise Failed(f"{url}: {e.code} {detail}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise Failed(f"{url}: cannot reach the control plane ({reason}); is --control-plane right?") from None
    if len(body) > limit:
        raise Failed(f"{url}: answer larger than {limit} bytes")
    return body


def table(rows: Sequence[dict[str, Any]]) -> str:
    """istioctl proxy-status's table, columns padded like its tabwriter (three spaces between)."""
    lines = [["NAME", "CLUSTER", *COLUMNS, "ISTIOD", "VERSION"]]
    for r in rows:
        words = r.get("sync_status") or {}
        lines.append([str(r.get("proxy", "")), str(r.get("cluster_id") or "Kubernetes"),
                      *(str(words.get(c, "IGNORED")) for c in COLUMNS), str(r.get("istiod", "")),
                      str(r.get("istio_version", ""))])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("   ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def run(args: argparse.Namespace) -> str:
    if args.proxy:
        query = urllib.parse.urlencode({"proxyID": args.proxy})
        body = fetch(args.control_plane, f"/debug/config_dump?{query}", MAX_DUMP_BYTES + 4096, args.timeout)
        return body.decode("utf-8", "replace").rstrip("\n")
    body = fetch(args.control_plane, "/debug/syncz", MAX_SYNCZ_BYTES, args.timeout)
    try:
        rows = jsonsafe.load(body.decode("utf-8", "replace"), max_bytes=MAX_SYNCZ_BYTES)
    except ValueError as e:
        raise Failed(f"/debug/syncz: not JSON ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise Failed("/debug/syncz: expected a list of proxies")
    return json.dumps(rows, indent=2) if args.json else table(rows) + policy_warnings(args)


def policy_warnings(args: argparse.Namespace) -> str:
    """A line per AuthorizationPolicy the control plane could not apply as written (/debug/authorizationz), after the
    table: such a policy fails closed, and whoever reads proxy-status should see why traffic is refused. Nothing
    when the endpoint is not there or has nothing to say."""
    try:
        body = fetch(args.control_plane, "/debug/authorizationz", MAX_SYNCZ_BYTES, args.timeout)
        problems = jsonsafe.load(body.decode("utf-8", "replace"), max_bytes=MAX_SYNCZ_BYTES).get("problems")
    except (Failed, ValueError, AttributeError):
        return ""
    if not isinstance(problems, list) or not problems:
        return ""
    shown = [f"\n  {str(p)[:500]}" for p in problems[:MAX_WARNINGS]]
    more = f"\n  … and {len(problems) - MAX_WARNINGS} more" if len(problems) > MAX_WARNINGS else ""
    return (f"\n\n{len(problems)} AuthorizationPolicy problem(s): the control plane enforces these fail-closed "
            f"(/debug/authorizationz):{''.join(shown)}{more}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except Failed as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
