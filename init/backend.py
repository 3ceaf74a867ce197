"""The iptables binaries: backend detection (nft or legacy, as Istio picks them), save, restore, -C checks.

Detection is Istio's rule — legacy if it is usable and already holds rules, else nft, else plain `iptables` — made
cheap: "legacy holds rules" is first read from /proc/net/ip_tables_names (the legacy tables registered in this netns),
so the common nft case runs no probe command. Usability is proven by the state check's `-save`, which must succeed.
On a kernel without nf_tables (its netlink dump is refused as unsupported) legacy is tried before nft.
"""
from __future__ import annotations

import _socket  # see netinfo: the C module is enough for one netlink dump
import os
import select
import struct
import time

from .record import Record

V4, V6 = 4, 6
LOCK_RETRIES = 5
CHECKED_TABLES = frozenset({"filter", "nat", "mangle", "raw"})
_PROC_TABLES = {V4: "ip_tables_names", V6: "ip6_tables_names"}
NFT_SUBSYS = 10                 # NFNL_SUBSYS_NFTABLES: the nfnetlink subsystem asked whether nf_tables is there
_EINVAL, _EOPNOTSUPP, _EPROTONOSUPPORT = 22, 95, 93     # Linux errno values (no import of errno: start-up time)


class BackendError(RuntimeError):
    """No usable iptables backend, or an iptables command failed (message includes iptables' stderr)."""


def which(name: str) -> str | None:
    """shutil.which without importing shutil (startup time)."""
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        p = os.path.join(d or ".", name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


class Backend(Record):
    family: int
    cmd: str            # iptables-nft, ip6tables-legacy, ...
    legacy: bool
    wait: bool          # pass --wait=30 to write commands (legacy >= 1.6.2 takes the xtables lock)

    @property
    def save(self) -> str:
        return f"{self.cmd}-save"

    @property
    def restore(self) -> str:
        return f"{self.cmd}-restore"

    @property
    def label(self) -> str:
        return f"{self.cmd} ({'legacy' if self.legacy else 'nf_tables'})"


class Result(Record):
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def _run(argv: list[str], stdin: str | None = None, timeout: float = 60) -> Result:
    """Run a command, feeding stdin and collecting stdout/stderr.

    os.posix_spawn + poll rather than subprocess: importing subprocess (signal, threading, ...) costs ~2 ms of this
    tool's ~15 ms start-up budget, and these commands need nothing more than pipes.
    """
    path = argv[0] if "/" in argv[0] else which(argv[0])
    if path is None:
        return Result(argv, 127, "", f"{argv[0]}: not found on PATH")
    pipes = [os.pipe() for _ in range(3)]  # stdin, stdout, stderr
    (in_r, in_w), (out_r, out_w), (err_r, err_w) = pipes
    actions: list[tuple[int, ...]] = [
        (os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for pair in pipes for fd in pair]
    try:
        pid = os.posix_spawn(path, argv, os.environ, file_actions=actions)
    except OSError as e:
        for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
            os.close(fd)
        return Result(argv, 126, "", f"{argv[0]}: {e}")
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    data = (stdin or "").encode()
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    poller = select.poll()
    poller.register(out_r, select.POLLIN)
    poller.register(err_r, select.POLLIN)
    open_fds = {out_r, err_r}
    if data:
        poller.register(in_w, select.POLLOUT)
    else:
        os.close(in_w)
    deadline = time.monotonic() + timeout
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, 9)
            break
        for fd, _ev in poller.poll(left * 1000):
            if fd == in_w:
                try:
                    n = os.write(in_w, data[:65536])
                except BrokenPipeError:
                    n = len(data)
                data = data[n:]
                if not data:
                    poller.unregister(in_w)
                    os.close(in_w)
                continue
            buf = os.read(fd, 65536)
            if buf:
                chunks[fd].append(buf)
            else:
                poller.unregister(fd)
                open_fds.discard(fd)
                os.close(fd)
    if data:
        os.close(in_w)
    for fd in open_fds:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if time.monotonic() >= deadline:
        return Result(argv, 124, "", f"{argv[0]} timed out after {timeout}s")
    return Result(argv, code, b"".join(chunks[out_r]).decode(errors="replace"),
                  b"".join(chunks[err_r]).decode(errors="replace"))


def legacy_has_tables(family: int) -> bool:
    """The legacy tables registered in this thread's netns (/proc/thread-self: /proc/net is the process leader's,
    which differs for a thread that joined a pod's netns); /proc/net where thread-self is not mounted."""
    for prefix in ("/proc/thread-self/net/", "/proc/net/"):
        try:
            with open(prefix + _PROC_TABLES[family]) as f:
                return bool(f.read().strip())
        except FileNotFoundError:
            continue
        except OSError:
            return False
    return False


def nft_support(errno: int) -> str:
    """What a failed nf_tables dump says about the kernel (pure): "absent" when nfnetlink is missing
    (EPROTONOSUPPORT at socket()) or has no nf_tables subsystem (EINVAL once the module could not be loaded, or
    EOPNOTSUPP), "unknown" for anything else (EPERM without CAP_NET_ADMIN, a timeout)."""
    return "absent" if errno in (_EPROTONOSUPPORT, _EINVAL, _EOPNOTSUPP) else "unknown"


def _nft_dump(family: int) -> tuple[set[str] | None, int]:
    """The nf_tables tables of this family in this netns by one netlink dump (no subprocess): (names, 0) — an empty
    set means iptables-nft has nothing here, the state check is trivial — or (None, errno) when the kernel refused or
    netlink failed (errno -1: unreadable)."""
    nfproto = 2 if family == V4 else 10
    msg_type = (NFT_SUBSYS << 8) | 1  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETTABLE
    req = struct.pack("=IHHII", 20, msg_type, 0x301, 1, 0) + struct.pack("=BBH", nfproto, 0, 0)
    names: set[str] = set()
    try:
        s = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    except OSError as e:
        return None, e.errno or -1
    try:
        s.settimeout(1.0)
        s.send(req)
        while True:
            data = s.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, mtype = struct.unpack_from("=IH", data, off)
                if length < 16:
                    return None, -1
                if mtype == 3:      # NLMSG_DONE
                    return names, 0
                if mtype == 2:      # NLMSG_ERROR
                    errno = struct.unpack_from("=i", data, off + 16)[0]
                    return (names, 0) if errno == 0 else (None, -errno)
                pos, end = off + 20, off + length   # nlmsghdr + nfgenmsg
                while pos + 4 <= end:
                    alen, atype = struct.unpack_from("=HH", data, pos)
                    if alen < 4:
                        break
                    if atype & 0x7FFF == 1:          # NFTA_TABLE_NAME
                        names.add(data[pos + 4:pos + alen].split(b"\0", 1)[0].decode())
                    pos += (alen + 3) & ~3
                off += (length + 3) & ~3
    except OSError as e:
        return None, e.errno or -1
    finally:
        s.close()


def _legacy_version_ok(cmd: str) -> bool:
    """True if this legacy iptables takes the xtables lock (>= 1.6.2), from `-save --version`."""
    out = _run([f"{cmd}-save", "--version"])
    text = out.stdout + out.stderr
    digits = text.split(" v", 1)[1].split()[0] if " v" in text else "0"
    parts = tuple(int(p) for p in digits.split(".") if p.isdigit())
    return parts >= (1, 6, 2)


def order(force: str, legacy_tables: bool, nft: str) -> list[str]:
    """The backends to try, by kind ("legacy", "nft", "iptables"), the first usable one wins (pure).

    Istio's rule — legacy when it already holds tables, else nft, else plain `iptables` — plus the case Istio leaves
    to its plain fallback: on a kernel without nf_tables (`nft` is "absent") legacy comes before nft."""
    if force in ("legacy", "nft"):
        return [force]
    if legacy_tables or nft == "absent":
        return ["legacy", "nft", "iptables"]
    return ["nft", "iptables"]


def candidates(family: int, force: str, nft: str = "unknown") -> list[Backend]:
    """The backends to try, in `order`'s order; the first whose `-save` succeeds is used. `nft`: what the kernel
    said to an nf_tables dump ("present", "absent", "unknown")."""
    base = "iptables" if family == V4 else "ip6tables"
    kinds = {"legacy": Backend(family, f"{base}-legacy", True, True),
             "nft": Backend(family, f"{base}-nft", False, False),
             "iptables": Backend(family, base, False, False)}
    picked = order(force, legacy_has_tables(family), nft)
    if not force:   # unforced: only backends that are installed (plain `iptables` is always tried)
        picked = [k for k in picked if k == "iptables" or which(kinds[k].cmd)]
    return [kinds[k] for k in picked]


def detect_and_save(family: int, force: str) -> tuple[Backend, str]:
    """Pick the backend and read its current tables in one go (its `-save` is the usability probe). The kernel is
    asked once whether it has nf_tables (a read-only netlink dump: trying, with no side effect); without it, legacy
    is tried first."""
    errors: list[str] = []
    tables, errno = _nft_dump(family) if force != "legacy" else (None, -1)
    nft = "present" if tables is not None else nft_support(errno)
    for b in candidates(family, force, nft):
        if not which(b.cmd) or not which(b.save):
            errors.append(f"{b.cmd}: not found on PATH")
            continue
        if not b.legacy and b.cmd.endswith("-nft") and tables is not None and not tables & CHECKED_TABLES:
            return b, ""  # nf_tables holds no iptables table here: nothing to read (saves a subprocess)
        res = _run([b.save])
        if res.returncode == 0:
            if b.legacy:
                b = Backend(family, b.cmd, True, _legacy_version_ok(b.cmd))
            elif b.cmd in ("iptables", "ip6tables"):
                ver = _run([b.cmd, "--version"]).stdout
                b = Backend(family, b.cmd, "nf_tables" not in ver, "nf_tables" not in ver)
            return b, res.stdout
        errors.append(f"{b.save}: exit {res.returncode}: {res.stderr.strip() or res.stdout.strip()}")
    forced = f" (forced by --force-iptables-binary={force})" if force else ""
    kernel = " (the kernel has no nf_tables)" if nft == "absent" else ""
    raise BackendError(f"no usable IPv{family} iptables backend{forced}{kernel}: " + "; ".join(errors))


def save(b: Backend) -> str:
    res = _run([b.save])
    if res.returncode != 0:
        raise BackendError(f"{b.save} failed (exit {res.returncode}): {res.stderr.strip()}")
    return res.stdout


def _restore_run(argv: list[str], text: str) -> Result:
    """Run a `-restore`, retrying while another process holds the xtables lock (exit 4)."""
    for attempt in range(LOCK_RETRIES):
        res = _run(argv, stdin=text)
        lock = res.returncode == 4 and ("lock" in res.stderr or "Resource temporarily" in res.stderr)
        if not lock or attempt == LOCK_RETRIES - 1:
            return res
        time.sleep(0.05 * 2 ** attempt)
    return res


def restore(b: Backend, text: str, noflush: bool = True) -> None:
    """Feed text to `-restore` (lock-busy retried); BackendError with iptables' message on failure."""
    argv = [b.restore] + (["--noflush"] if noflush else []) + (["--wait=30"] if b.wait else [])
    res = _restore_run(argv, text)
    if res.returncode != 0:
        msg = res.stderr.strip().replace("\n", " | ")
        raise BackendError(f"{' '.join(argv)} failed (exit {res.returncode}): {msg}")


def check_all(b: Backend, checks: list[list[str]], max_missing: int = 0) -> list[bool]:
    """Which of these `-t T -C CHAIN spec` checks hold, with one `-restore` of `-C` lines per missing rule plus one,
    instead of one `iptables -C` process per rule (a rerun with 2,000 rules took 34 s that way).

    The restore stops at the first check that fails and names its line; the checks before it held, so the next
    round starts after it. Legacy evaluates `-C` under --test; nf_tables only at commit, which a batch of checks
    leaves unchanged. With max_missing > 0 the rest counts as present once that many are missing.
    """
    present = [True] * len(checks)
    order = sorted(range(len(checks)), key=lambda i: (checks[i][1], i))  # grouped by table, stable
    argv = [b.restore, "--noflush"] + (["--test", "--wait=30"] if b.legacy else [])
    start, missing = 0, 0
    while start < len(order):
        lines, at = _check_lines(checks, order, start)
        res = _restore_run(argv, "\n".join(lines) + "\n")
        if res.returncode == 0:
            break
        pos = at.get(_failed_line(res.stderr))
        if pos is None:  # not a "line N failed": ask rule by rule, as before
            for i in order[start:]:
                present[i] = check(b, checks[i])
            break
        present[order[pos]] = False
        missing += 1
        if max_missing and missing >= max_missing:
            break
        start = pos + 1
    return present


def _check_lines(checks: list[list[str]], order: list[int], start: int) -> tuple[list[str], dict[int, int]]:
    """Restore input for order[start:], and restore line number -> position in `order`."""
    lines: list[str] = []
    at: dict[int, int] = {}
    table = None
    for pos in range(start, len(order)):
        args = checks[order[pos]]          # ["-t", table, "-C", chain, *spec]
        if args[1] != table:
            if table is not None:
                lines.append("COMMIT")
            table = args[1]
            lines.append(f"*{table}")
        lines.append(" ".join(args[2:]))
        at[len(lines)] = pos
    lines.append("COMMIT")
    return lines, at


def _failed_line(stderr: str) -> int:
    """N from iptables-restore's "line N failed", or -1."""
    _, found, rest = stderr.partition("line ")
    digits = rest.split(" ", 1)[0]
    return int(digits) if found and digits.isascii() and digits.isdigit() and " failed" in rest else -1


def check(b: Backend, args: list[str]) -> bool:
    """`iptables -t T -C CHAIN spec`: is this exact rule present?"""
    argv = [b.cmd, *args] + (["--wait=30"] if b.wait else [])
    return _run(argv).returncode == 0
