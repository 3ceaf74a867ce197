"""Every Python process meshboot starts in a pod ignores PYTHON* env: the image's launchers (meshboot.launchers,
which Dockerfile.agent installs over pip's console scripts), the agent's helper processes, and the local pod runner's
entrypoints. The attack: ProxyConfig `proxyMetadata` becomes env of istio-init (root, NET_ADMIN), and
`PYTHONWARNINGS=ignore::antigravity.x` + `BROWSER=<cmd>` runs <cmd> when the interpreter starts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import helper
from e2e.local.kubelet import local_images
from meshboot import launchers
from tests.agent.pod import marker_script

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def hostile_envs(tmp: Path) -> dict[str, dict[str, str]]:
    """Each PYTHON* way to run code (or break start-up) before main(); each payload touches tmp/marker."""
    marker = tmp / "marker"
    browser = marker_script(tmp / "browser", marker)
    evil = tmp / "evilpath"
    evil.mkdir(exist_ok=True)
    payload = f"open({str(marker)!r}, 'w').close()\n"
    (evil / "sitecustomize.py").write_text(payload)
    (evil / "usercustomize.py").write_text(payload)
    user_site = tmp / "home/.local/lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    user_site.mkdir(parents=True, exist_ok=True)
    (user_site / "usercustomize.py").write_text(payload)
    (tmp / "startup.py").write_text(payload)
    base = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(tmp / "home")}
    return {
        "PYTHONWARNINGS+BROWSER": {**base, "PYTHONWARNINGS": "ignore::antigravity.x", "BROWSER": str(browser)},
        "PYTHONPATH": {**base, "PYTHONPATH": str(evil)},
        "PYTHONSTARTUP+PYTHONINSPECT": {**base, "PYTHONSTARTUP": str(tmp / "startup.py"), "PYTHONINSPECT": "1"},
        "PYTHONHOME": {**base, "PYTHONHOME": str(evil)},
        "user site (HOME)": base,
    }


def run_clean(argv: list[str], env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=str(tmp), capture_output=True, text=True, timeout=60,
                          input=f"open({str(tmp / 'marker')!r}, 'w').close()\n")


def test_the_attack_works_on_a_plain_console_script(tmp_path: Path) -> None:
    """Control: pip's console script (no -I) runs the tenant's command at start-up — the hole being closed."""
    env = hostile_envs(tmp_path)["PYTHONWARNINGS+BROWSER"]
    run_clean([str(VENV_BIN / "istio-iptables"), "--help"], env, tmp_path)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("name", sorted(launchers.ENTRYPOINTS))
def test_image_launchers_ignore_python_env(tmp_path: Path, name: str) -> None:
    """The image's entrypoints (written by the same function Dockerfile.agent runs) start isolated."""
    bin_dir = tmp_path / "bin"
    launchers.write(str(bin_dir), sys.executable)
    argv = [str(bin_dir / name), "--help" if "iptables" in name else "version"]
    for what, env in hostile_envs(tmp_path).items():
        res = run_clean(argv, env, tmp_path)
        assert res.returncode == 0, (what, res.stderr)
        assert not (tmp_path / "marker").exists(), f"{name}: {what} ran code at interpreter start-up"
    assert (bin_dir / name).read_text().splitlines()[0] == f"#!{sys.executable} -IBu"


def test_helpers_are_spawned_isolated(tmp_path: Path) -> None:
    """agent/helper.py's argv (key/CSR, standalone config, certificate check) runs Python with -I."""
    argv = helper.module_argv("agent", "version")
    for what, env in hostile_envs(tmp_path).items():
        res = run_clean(argv, env, tmp_path)
        assert res.returncode == 0 and "version" in res.stdout, (what, res.stderr)
        assert not (tmp_path / "marker").exists(), f"helper: {what} ran code at interpreter start-up"
    assert argv[:2] == [sys.executable, "-I"]


def test_local_pod_runner_starts_the_entrypoint_isolated(tmp_path: Path) -> None:
    """e2e/local/kubelet: the agent image's entrypoint and the `pilot-agent` a postStart hook finds on its PATH."""
    images = local_images(VENV_BIN)
    for ref in ("meshboot-agent", "proxyv2"):
        image = images[ref]
        entry = Path(image.entrypoint[0])
        path_dirs = image.env["PATH"].split(":")
        hook = next(Path(d) / "pilot-agent" for d in path_dirs if (Path(d) / "pilot-agent").exists())
        for exe in (entry, hook):
            for what, env in hostile_envs(tmp_path).items():
                res = run_clean([str(exe), "version"], {**image.env, **env, "PATH": image.env["PATH"]}, tmp_path)
                assert res.returncode == 0, (what, res.stderr)
                assert not (tmp_path / "marker").exists(), f"{exe}: {what} ran code at interpreter start-up"
        assert entry.read_text().splitlines()[0].endswith(" -IBu"), entry
