"""Short-lived helper processes for work that needs heavy libraries once (key generation, building the standalone
Envoy config from xds-protos): the libraries' memory goes away with the helper instead of staying in the agent,
which lives as long as the pod, and the work runs in parallel with the agent's own start-up.
"""
from __future__ import annotations

import subprocess
import sys


class HelperError(RuntimeError):
    pass


def module_argv(module: str, *args: str) -> list[str]:
    """Isolated (-I): the agent's env comes from the pod spec, and PYTHON* variables in it (PYTHONWARNINGS,
    PYTHONPATH, ...) would otherwise run code in the helper before it starts (see meshboot/launchers.py)."""
    return [sys.executable, "-I", "-m", module, *args]


class Prestarted:
    """A helper started before the event loop exists (at agent start); `await result()` when its output is due."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    async def result(self) -> bytes:
        import asyncio  # noqa: PLC0415 — this module loads before asyncio (see cli.import_asyncio_without_tls)

        while self.proc.poll() is None:
            await asyncio.sleep(0.002)
        out, err = self.proc.communicate()
        if self.proc.returncode != 0:
            raise HelperError(f"{' '.join(self.args[1:3])} failed: {err.decode(errors='replace').strip()}")
        return out


async def run(args: list[str]) -> bytes:
    import asyncio  # noqa: PLC0415

    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise HelperError(f"{' '.join(args[1:3])} failed: {err.decode(errors='replace').strip()}")
    return out
