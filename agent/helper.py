"""Short-lived helper processes for work that needs heavy libraries once (key generation, building the standalone
Envoy config from xds-protos): the libraries' memory goes away with the helper instead of staying in the agent,
which lives as long as the pod, and the work runs in parallel with the agent's own start-up.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import IO


class HelperError(RuntimeError):
    pass


def module_argv(module: str, *args: str) -> list[str]:
    """Isolated (-I): the agent's env comes from the pod spec, and PYTHON* variables in it (PYTHONWARNINGS,
    PYTHONPATH, ...) would otherwise run code in the helper before it starts (see meshboot/launchers.py)."""
    return [sys.executable, "-I", "-m", module, *args]


class Prestarted:
    """A helper started before the event loop exists (at agent start); `await result()` when its output is due.

    With `stdin=True` the helper waits for its input (e.g. certcheck.py, whose imports are done by then)."""

    def __init__(self, args: list[str], stdin: bool = False) -> None:
        self.args = args
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    async def result(self, data: bytes = b"", timeout: float = 60.0) -> bytes:
        import asyncio  # noqa: PLC0415 - this module loads before asyncio (see cli.import_asyncio_without_tls)

        deadline = time.monotonic() + timeout
        try:
            if self.proc.stdin is not None:
                stdin, self.proc.stdin = self.proc.stdin, None     # communicate() below must not touch it
                await _feed(stdin, data, deadline)
            while self.proc.poll() is None:
                if time.monotonic() > deadline:
                    self.close()
                    raise HelperError(f"{' '.join(self.args[2:4])} took longer than {timeout:.0f}s")
                await asyncio.sleep(0.002)
        except asyncio.CancelledError:          # the caller is gone (agent closing): so is the helper
            self.close()
            raise
        out, err = self.proc.communicate()
        if self.proc.returncode != 0:
            raise HelperError(f"{' '.join(self.args[2:4])} failed: {err.decode(errors='replace').strip()[-500:]}")
        return out

    def close(self) -> None:
        """A helper no longer wanted: killed if still running, reaped (no zombie) and its pipes closed (no fds left
        to the garbage collector). Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(5)               # SIGKILLed: ends at once
            except subprocess.TimeoutExpired:
                pass
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


async def _feed(pipe: IO[bytes], data: bytes, deadline: float) -> None:
    """Write all of `data` without blocking the loop (the pipe holds 64 KiB), then close it."""
    import asyncio  # noqa: PLC0415 - this module loads before asyncio (see cli.import_asyncio_without_tls)

    fd = pipe.fileno()
    os.set_blocking(fd, False)
    view = memoryview(data)
    try:
        while view and time.monotonic() < deadline:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                await asyncio.sleep(0.002)
    except BrokenPipeError:
        pass
    finally:
        pipe.close()


async def run(args: list[str], data: bytes | None = None, timeout: float = 60.0) -> bytes:
    """Run a helper to completion (stdin = `data`), killed after `timeout` seconds: a Prestarted awaited at once."""
    return await Prestarted(args, stdin=data is not None).result(data or b"", timeout)
