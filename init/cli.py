"""Entry point of `meshboot-iptables`, `istio-iptables`, `python -m init` and `meshboot-agent istio-iptables ...`.

Exit codes follow istio-iptables: 0 ok (also "already in place"), 1 configuration/apply error, 126 validation
failed, 255 command-line error.
"""
from __future__ import annotations

import os
import sys

from meshboot import constants as C

from . import flags
from .config import ConfigError, build_config
from .log import Logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from .config import CaptureConfig
    from .rules import Plan

EXIT_OK, EXIT_ERROR, EXIT_VALIDATION, EXIT_USAGE = 0, 1, 126, 255


MAX_RESOLV_CONF = 64 * 1024  # the pod's resolv.conf is tenant-shaped (dnsConfig); read a bounded prefix


def _read(path: str, limit: int = MAX_RESOLV_CONF) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(limit)
    except OSError:
        return None


def dry_run_output(plan: Plan, cfg: CaptureConfig) -> str:
    """The iptables-restore input of each family, as comments + text that can be piped to iptables-restore."""
    out = [f"# iptables-restore --noflush (IPv4)\n{plan.v4.restore_text()}"]
    if cfg.enable_ipv6:
        out.append(f"# ip6tables-restore --noflush (IPv6)\n{plan.v6.restore_text()}")
    return "".join(out)


def _dry_run_record(plan: Plan, cfg: CaptureConfig) -> str:
    """What Istio's dry-run stub records in DRY_RUN_FILE_PATH: commands and restore lines, in order."""
    lines = ["iptables-save", "ip6tables-save", *plan.v4.restore_text().splitlines()]
    if cfg.enable_ipv6:
        lines += plan.v6.restore_text().splitlines()
    lines.append("iptables-save")
    if cfg.enable_ipv6:
        lines.append("ip6tables-save")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run istio-iptables with argv (the arguments after the program name)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    env = os.environ
    try:
        parsed = flags.parse(argv, env)
    except flags.FlagError as e:
        print(f"Error: {e}\nRun 'istio-iptables --help' for usage.", file=sys.stderr)
        return EXIT_USAGE
    if parsed.help:
        sys.stdout.write(flags.usage())
        return EXIT_OK
    try:
        log = Logger.from_flags(str(parsed.values["log_output_level"]), bool(parsed.values["log_as_json"]))
    except ValueError as e:
        print(f"Error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for w in parsed.env_warnings:
        log.warn(w)
    if parsed.extra_args:
        shown = " ".join(parsed.extra_args)
        log.warn("ignoring positional arguments", count=len(parsed.extra_args),
                 args=shown if len(shown) <= 200 else shown[:200] + "...")

    from . import netinfo  # noqa: PLC0415 - not needed for --help or a usage error (start-up time)

    values = parsed.values
    resolv = None
    if values["redirect_dns"] and not values["capture_all_dns"]:
        resolv = _read("/etc/resolv.conf")
    try:
        cfg = build_config(values, env, netinfo.host_info(), resolv)
    except ConfigError as e:
        log.error(str(e))
        return EXIT_ERROR
    for w in cfg.warnings:
        log.warn(w)

    from . import rules  # noqa: PLC0415 - not needed for --help or a usage error (start-up time)

    plan = rules.build(cfg)
    if cfg.dry_run:
        sys.stdout.write(dry_run_output(plan, cfg))
        sys.stdout.flush()
        record_path = env.get(C.ENV_DRY_RUN_FILE_PATH, "")
        if record_path:
            try:
                with open(record_path, "w") as f:
                    f.write(_dry_run_record(plan, cfg))
            except OSError as e:
                log.error(f"{C.ENV_DRY_RUN_FILE_PATH}: cannot write {record_path[:200]!r}: {e.strerror}")
                return EXIT_ERROR
    elif not cfg.skip_rule_apply:
        code = _apply(cfg, plan, log)
        if code != EXIT_OK:
            return code
    if cfg.run_validation:
        from .validation import validate  # noqa: PLC0415 - only with --run-validation: socket, threading

        if not validate(cfg, log):
            return EXIT_VALIDATION
    return EXIT_OK


def _apply(cfg: CaptureConfig, plan: Plan, log: Logger) -> int:
    """Apply the rules and routes while holding the network namespace's lock (init/lock.py: concurrent runs)."""
    from . import lock  # noqa: PLC0415 - only when applying, not on --dry-run

    try:
        held = lock.acquire()
    except (lock.LockTimeout, OSError) as e:
        log.error(f"cannot lock the network namespace: {e}")
        return EXIT_ERROR
    try:
        return _apply_locked(cfg, plan, log)
    finally:
        held.close()


def _apply_locked(cfg: CaptureConfig, plan: Plan, log: Logger) -> int:
    from . import apply, backend  # noqa: PLC0415 - only when applying, not on --dry-run

    try:
        apply.apply_plan(cfg, plan, log)
    except (backend.BackendError, apply.DriftError, apply.ApplyError) as e:
        log.error(str(e))
        return EXIT_ERROR
    if cfg.cleanup_only:
        return EXIT_OK
    from . import netinfo  # noqa: PLC0415 - see main (start-up time)

    try:
        if cfg.enable_ipv6:
            netinfo.add_lo_ipv6_passthrough()
        if cfg.tproxy and cfg.inbound_ports:
            netinfo.setup_tproxy_routes(int(cfg.tproxy_mark), int(cfg.tproxy_route_table), cfg.enable_ipv6)
    except Exception as e:  # noqa: BLE001 - netlink errors: reported as one line, like any other apply failure
        log.error(f"failed to configure routes for capture: {e}")
        return EXIT_ERROR
    return EXIT_OK
