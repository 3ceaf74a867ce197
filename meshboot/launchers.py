"""The agent image's entrypoints as isolated-Python launchers: `#!<python> -IBu` scripts.

Everything in the pod's env reaches these processes, and tenants choose part of it (ProxyConfig `proxyMetadata`
becomes env of `istio-init`, which runs as root with NET_ADMIN). CPython acts on PYTHON* variables before any of our
code runs: `PYTHONWARNINGS=ignore::antigravity.x` + `BROWSER=<cmd>` runs a command at start-up, PYTHONPATH and
PYTHONSTARTUP/PYTHONINSPECT load code, PYTHONHOME moves the standard library. `-I` (isolated mode) ignores all
PYTHON* variables and the user site directory and keeps the script's directory and the CWD off sys.path.

pip's console-script shebangs carry no flags, so the image replaces them with these (same names, same `main`). A
shebang, not a /bin/sh wrapper: no shell reads the env on the way, and the process keeps the script's name (`ss -p`,
`ps` show `meshboot-agent`). `-B -u` restore what the image's PYTHONDONTWRITEBYTECODE / PYTHONUNBUFFERED asked for,
which -I now ignores. `python -m meshboot.launchers DIR [PYTHON]` writes them (Dockerfile.agent; e2e/local/kubelet).
"""
from __future__ import annotations

import os
import sys

ISOLATED_FLAGS = "-IBu"          # one shebang argument: Linux passes the rest of the line as a single word

ENTRYPOINTS: dict[str, str] = {   # name on PATH -> module whose main() it runs (pyproject's [project.scripts])
    "meshboot-agent": "agent.cli",
    "pilot-agent": "agent.cli",
    "istio-iptables": "init.cli",
    "meshboot-iptables": "init.cli",
}


def script(python: str, module: str) -> str:
    """The launcher text; `python` must be an absolute path without spaces (a shebang cannot quote)."""
    if not os.path.isabs(python) or any(c.isspace() for c in python):
        raise ValueError(f"interpreter path {python!r} must be absolute and without spaces")
    return (f"#!{python} {ISOLATED_FLAGS}\n"
            "# meshboot launcher: isolated Python (-I) so no PYTHON* env or user site reaches the interpreter\n"
            "import sys\n"
            f"from {module} import main\n"
            "sys.exit(main())\n")


def write(directory: str, python: str = sys.executable) -> list[str]:
    """Write (atomically, mode 0755) every entrypoint into `directory`; returns their paths."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    paths = []
    for name, module in ENTRYPOINTS.items():
        path = os.path.join(directory, name)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(script(python, module))
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: python -I -m meshboot.launchers DIR [PYTHON]", file=sys.stderr)
        return 2
    for p in write(argv[0], *argv[1:]):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
