"""CNI mode's istio-validation, for real: meshboot's init tool run the way Istio's injector renders the container.

A CNI plugin writes the capture rules before the pod's containers start; here our istio-init (as root) stands in for
it. The validation then runs as Istio's golden shows (pkg/kube/inject/testdata/inject/hello.yaml.cni.injected): the
same istio-iptables arguments plus `--run-validation --skip-rule-apply`, uid/gid 1337, runAsNonRoot, every capability
dropped (so no NET_ADMIN, NET_RAW: it cannot read or write iptables) and a read-only root filesystem.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from init_helpers import CLASSIC, DEFAULT_ARGS

from testing.netns import Netns, pair

# Istio's istio-validation args for the hello pod (the injected istio-init args + the two validation flags).
VALIDATION_ARGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
                   "-d", "15090,15021,15020", "--log_output_level=default:info", "--run-validation",
                   "--skip-rule-apply"]
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
# The container's securityContext, as close as a process gets without a runtime: uid/gid 1337, no groups, every
# capability gone from the bounding, inheritable and ambient sets but CAP_DAC_READ_SEARCH (only so the venv under
# a root-only directory can be read, see testing.netns.user_argv), no_new_privs, and / remounted read-only in a
# private mount namespace.
UNPRIVILEGED = ["unshare", "--mount", "sh", "-c",
                'mount --make-rprivate / && mount -o remount,bind,ro / && exec "$@"', "sh",
                "setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", "--no-new-privs",
                "--bounding-set=-all,+dac_read_search", "--inh-caps=-all,+dac_read_search",
                "--ambient-caps=+dac_read_search"]


@pytest.fixture
def pod(root_required: None) -> Iterator[Netns]:
    with pair("mbcni") as (pod, _peer):
        yield pod


def validate(pod: Netns, *extra: str, timeout: str = "3s") -> tuple[int, str]:
    res = pod.run([*UNPRIVILEGED, sys.executable, "-m", "init", *VALIDATION_ARGS, f"--probe-timeout={timeout}",
                   *extra], check=False)
    return res.returncode, res.stdout + res.stderr


def istio_init(pod: Netns, *args: str, env: dict[str, str] | None = None) -> None:
    res = pod.run([sys.executable, "-m", "init", *args], check=False, env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stderr


def test_the_validation_process_is_unprivileged(pod: Netns) -> None:
    """The harness is what it claims: as the validation runs, the process holds neither NET_ADMIN nor NET_RAW,
    cannot read iptables and cannot write to /."""
    status = pod.run([*UNPRIVILEGED, "cat", "/proc/self/status"]).stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[:2] == ["1337", "1337"] and fields["Gid"].split()[:2] == ["1337", "1337"]
    for cap_set in ("CapEff", "CapPrm", "CapBnd"):
        bits = int(fields[cap_set], 16)
        assert not bits & (1 << CAP_NET_ADMIN | 1 << CAP_NET_RAW), (cap_set, fields[cap_set])
    assert pod.run([*UNPRIVILEGED, "iptables-save"], check=False).returncode != 0
    assert pod.run([*UNPRIVILEGED, "touch", "/tmp/mbcni-ro"], check=False).returncode != 0


def test_fails_when_no_rules_were_installed(pod: Netns) -> None:
    code, out = validate(pod, timeout="1s")
    assert code == 126, out
    assert "iptables validation failed; workload is not ready for Istio." in out
    assert "validation timeout after 1.0s" in out


@pytest.mark.parametrize("env", [{}, CLASSIC], ids=["current", "classic"])
def test_passes_once_the_rules_are_in_place(pod: Netns, env: dict[str, str]) -> None:
    istio_init(pod, *DEFAULT_ARGS, env=env)  # what the CNI plugin would have done
    code, out = validate(pod)
    assert code == 0, out
    assert "iptables validation passed" in out and "original=127.0.0.6:15002" in out


def test_fails_when_the_rules_spare_another_uid(pod: Netns) -> None:
    """Rules written for a proxy running as 1234 do not capture 1337's probe: the validation sees that."""
    istio_init(pod, *[("1234" if a == "1337" else a) for a in DEFAULT_ARGS])
    code, out = validate(pod, timeout="1s")
    assert code == 126, out


def test_native_nftables_is_accepted_for_validation_only(pod: Netns) -> None:
    """Istio renders --native-nftables into istio-validation too; validating does not depend on what wrote the
    rules, so it runs. Writing rules with it is still refused (init/config.py)."""
    istio_init(pod, *DEFAULT_ARGS)
    code, out = validate(pod, "--native-nftables")
    assert code == 0, out
    res = pod.run([sys.executable, "-m", "init", *DEFAULT_ARGS, "--native-nftables"], check=False)
    assert res.returncode == 1 and "--native-nftables" in res.stderr
