"""istio-iptables' command line: the flag table and a pflag-compatible parser (pure: argv + env in, values out).

Precedence follows Istio: default < primary env var < extra env alias < command-line flag. A malformed env value is
not an error (pflag stores the zero value), a malformed argv value is (FlagError, exit 255 like pilot-agent's cobra).
"""
from __future__ import annotations

from meshboot import constants as C
from meshboot.durations import parse_duration
from meshboot.syntax import parse_go_bool, parse_port

from .record import Record

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Mapping

BOOL, STR, UINT16, DURATION = "bool", "str", "uint16", "duration"


class FlagError(ValueError):
    """A command-line error: unknown flag, missing or malformed value. Names the flag."""


class Flag(Record):
    long: str
    short: str | None
    kind: str
    default: object
    env: tuple[str, ...]  # primary env var first, then extra aliases (later ones win)
    help: str

    @property
    def key(self) -> str:
        return self.long.replace("-", "_")


def _f(long: str, short: str | None, kind: str, default: object, help: str, *, env: bool = True,
       aliases: tuple[str, ...] = ()) -> Flag:
    primary = (long.upper().replace("-", "_"),) if env else ()
    return Flag(long, short, kind, default, primary + aliases, help)


FLAGS: tuple[Flag, ...] = (
    _f("envoy-port", "p", STR, str(C.OUTBOUND_CAPTURE_PORT), "outbound redirect port (ISTIO_REDIRECT)", env=False),
    _f("inbound-capture-port", "z", STR, str(C.INBOUND_CAPTURE_PORT),
       "inbound redirect port (ISTIO_IN_REDIRECT, TPROXY --on-port)"),
    _f("inbound-tunnel-port", "e", STR, str(C.INBOUND_TUNNEL_PORT), "HBONE port, never captured inbound"),
    _f("proxy-uid", "u", STR, "", "comma list of proxy UIDs whose traffic is not captured"),
    _f("proxy-gid", "g", STR, "", "comma list of proxy GIDs whose traffic is not captured"),
    _f("istio-inbound-interception-mode", "m", STR, "", "REDIRECT (default) or TPROXY"),
    _f("istio-inbound-ports", "b", STR, "", "inbound ports to capture: '*', a comma list, or '' for none"),
    _f("istio-local-exclude-ports", "d", STR, "", "inbound ports to skip when -b is '*'"),
    _f("istio-exclude-interfaces", "c", STR, "", "interfaces whose traffic is never captured"),
    _f("istio-service-cidr", "i", STR, "", "outbound CIDRs to capture: '*', a comma list, or '' for none"),
    _f("istio-service-exclude-cidr", "x", STR, "", "outbound CIDRs never captured"),
    _f("istio-outbound-ports", "q", STR, "", "outbound TCP ports always captured"),
    _f("istio-local-outbound-ports-exclude", "o", STR, "", "outbound ports never captured (TCP and UDP)"),
    _f("kube-virt-interfaces", "k", STR, "", "interfaces whose incoming traffic is treated as outbound"),
    _f("istio-inbound-tproxy-mark", "t", STR, str(C.TPROXY_MARK), "TPROXY fwmark (decimal)"),
    _f("istio-inbound-tproxy-route-table", "r", STR, str(C.TPROXY_ROUTE_TABLE),
       "TPROXY policy routing table (decimal)"),
    _f("dry-run", "n", BOOL, False, "print the iptables-restore input and change nothing"),
    _f("iptables-probe-port", None, UINT16, C.IPTABLES_PROBE_PORT, "original port dialled by the validation probe"),
    _f("probe-timeout", None, DURATION, 5.0, "validation probe timeout (Go duration)"),
    _f("skip-rule-apply", None, BOOL, False, "do not touch iptables or routes"),
    _f("run-validation", None, BOOL, False, "prove capture works through a local probe, exit 126 if not"),
    _f("redirect-dns", None, BOOL, False, "capture DNS to the agent on 15053", aliases=(C.ENV_DNS_CAPTURE,)),
    _f("drop-invalid", None, BOOL, False, "drop conntrack-INVALID packets", aliases=(C.ENV_INVALID_DROP,)),
    _f("dual-stack", None, BOOL, False, "any IPv6 address enables IPv6 rules", aliases=(C.ENV_DUAL_STACK,)),
    _f("capture-all-dns", None, BOOL, False, "capture port 53 to any server (with --redirect-dns)"),
    _f("network-namespace", None, STR, "", "netns path (CNI mode lock file; not entered)"),
    _f("cni-mode", None, BOOL, False, "CNI plugin mode"),
    _f("reconcile", None, BOOL, False, "replace drifted rules atomically instead of failing"),
    _f("cleanup-only", None, BOOL, False, "remove every ISTIO_* chain and jump, apply nothing"),
    _f("force-apply", None, BOOL, False, "apply even when the rules are already in place"),
    _f("native-nftables", None, BOOL, False, "use native nftables (not supported by meshboot)"),
    _f("force-iptables-binary", None, STR, "", "'' (auto), legacy or nft"),
    # Istio's logging options (pkg/log); only the level and JSON switch change anything here.
    _f("log_output_level", None, STR, "default:info", "scope:level,... or a bare level", env=False),
    _f("log_as_json", None, BOOL, False, "log JSON lines", env=False),
    _f("log_stacktrace_level", None, STR, "default:none", "accepted for compatibility", env=False),
    _f("log_caller", None, STR, "", "accepted for compatibility", env=False),
    _f("log_target", None, STR, "stdout", "accepted for compatibility", env=False),
    _f("log_rotate", None, STR, "", "accepted for compatibility", env=False),
    _f("log_rotate_max_age", None, STR, "30", "accepted for compatibility", env=False),
    _f("log_rotate_max_size", None, STR, "104857600", "accepted for compatibility", env=False),
    _f("log_rotate_max_backups", None, STR, "1000", "accepted for compatibility", env=False),
)

_BY_LONG = {f.long: f for f in FLAGS}
_BY_SHORT = {f.short: f for f in FLAGS if f.short}


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool (meshboot.syntax's, shared with the injector), raising for the flag parser."""
    value = parse_go_bool(text)
    if value is None:
        raise ValueError("invalid boolean (want true|false|1|0|t|f)")
    return value


def _convert(flag: Flag, text: str) -> object:
    if flag.kind == BOOL:
        return parse_bool(text)
    if flag.kind == UINT16:
        try:
            return parse_port(text)
        except ValueError:
            raise ValueError("invalid port (want 0-65535, ASCII digits)") from None
    if flag.kind == DURATION:
        try:
            return parse_duration(text)
        except ValueError:
            raise ValueError("invalid duration (want e.g. 5s, 500ms, 1m30s)") from None
    return text


def _cut(text: str, limit: int = 60) -> str:
    """A tenant value in a message: cut to `limit` chars and escaped, so an error stays one short line."""
    cut = text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
    return cut if cut.isprintable() else repr(cut)[1:-1]


def _zero(flag: Flag) -> object:
    return {BOOL: False, UINT16: 0, DURATION: 0.0}.get(flag.kind, "")


class Parsed(Record):
    values: dict[str, object]      # flag key (long with '_') -> value
    set_on_cli: frozenset[str]     # keys given in argv
    extra_args: tuple[str, ...]    # positional arguments (ignored, like cobra does)
    env_warnings: tuple[str, ...]  # malformed env values that fell back to the zero value
    help: bool = False


def parse(argv: list[str], env: Mapping[str, str]) -> Parsed:
    """Defaults, then env (primary, then aliases), then argv. Raises FlagError naming the flag."""
    values: dict[str, object] = {}
    warnings: list[str] = []
    for spec in FLAGS:
        value = spec.default
        for name in spec.env:
            if name in env:
                try:
                    value = _convert(spec, env[name])
                except ValueError as e:
                    value = _zero(spec)
                    warnings.append(f"env {name}: {e}; using {value!r}")
        values[spec.key] = value

    on_cli: set[str] = set()
    extra: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            extra.extend(argv[i:])
            break
        if arg in ("-h", "--help"):
            return Parsed(values, frozenset(on_cli), tuple(extra), tuple(warnings), help=True)
        if arg.startswith("--"):
            name, eq, inline = arg[2:].partition("=")
            flag = _BY_LONG.get(name)
            if flag is None:
                raise FlagError(f"unknown flag: --{_cut(name)}")
            label = f"--{name}"
        elif arg.startswith("-") and len(arg) > 1:
            flag = _BY_SHORT.get(arg[1])
            if flag is None:
                raise FlagError(f"unknown shorthand flag: {arg[1]!r} in {_cut(arg)}")
            rest = arg[2:]
            eq, inline = ("=", rest[1:]) if rest.startswith("=") else ("=" if rest else "", rest)
            label = f"-{flag.short}, --{flag.long}"
        else:
            extra.append(arg)
            continue
        if eq:
            text = inline
        elif flag.kind == BOOL:
            text = "true"
        elif i < len(argv):
            text = argv[i]
            i += 1
        else:
            raise FlagError(f"flag needs an argument: {label}")
        try:
            values[flag.key] = _convert(flag, text)
        except ValueError as e:
            raise FlagError(f"invalid argument {_cut(text)!r} for {label!r} flag: {e}") from None
        on_cli.add(flag.key)
    return Parsed(values, frozenset(on_cli), tuple(extra), tuple(warnings))


def usage() -> str:
    lines = ["Usage: istio-iptables [flags]   (also: meshboot-iptables, python -m init)", "", "Flags:"]
    for f in FLAGS:
        if f.long.startswith("log_") and f.long not in ("log_output_level", "log_as_json"):
            continue
        short = f"-{f.short}, " if f.short else "    "
        env = f"  [env {', '.join(f.env)}]" if f.env else ""
        default = "" if f.default in ("", False) else f" (default {f.default!r})"
        lines.append(f"  {short}--{f.long:<36} {f.help}{default}{env}")
    return "\n".join(lines) + "\n"
