"""Tenant-controlled text the agent parses at start-up (PROXY_CONFIG, the proxy.istio.io/config annotation through the
downward API, ISTIO_KUBE_APP_PROBERS and ISTIO_PROMETHEUS_ANNOTATIONS derived from the pod spec, ISTIO_METAJSON_*):
each bad one is refused with one ConfigError line naming the input — never another exception, never a huge message."""
from __future__ import annotations

import time

import pytest

from agent import bootstrap
from agent.config import ConfigError
from meshboot import constants as C
from tests.agent.test_agent_core import cfg_of

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_YAML = "a:\n" + "".join(" " * i + "- \n" for i in range(1, 200))
ANNOT = f"{C.POD_ANNOTATIONS_FILE}"


def annotation(value: str) -> dict[str, str]:
    import json
    return {ANNOT: f"{C.ANNOTATION_PROXY_CONFIG}={json.dumps(value)}\n"}


@pytest.mark.parametrize("env,files,needle", [
    ({"PROXY_CONFIG": LAUGHS}, {}, "env PROXY_CONFIG: YAML aliases"),
    ({"PROXY_CONFIG": DEEP_JSON}, {}, "env PROXY_CONFIG: "),
    ({"PROXY_CONFIG": "drainDuration: " + "9" * 300_000}, {}, "env PROXY_CONFIG: "),
    ({}, annotation(LAUGHS), f"annotation {C.ANNOTATION_PROXY_CONFIG}: YAML aliases"),
    ({}, annotation(DEEP_JSON), f"annotation {C.ANNOTATION_PROXY_CONFIG}: "),
    ({}, annotation("{\"proxyMetadata\": {\"A\": " + DEEP_JSON + "}}"), f"annotation {C.ANNOTATION_PROXY_CONFIG}"),
    ({}, {C.MESH_CONFIG_FILE: DEEP_YAML}, f"mesh config {C.MESH_CONFIG_FILE}: "),
    ({}, {C.MESH_CONFIG_FILE: "defaultConfig: 5"}, "defaultConfig"),
    ({"PROXY_CONFIG": '{"serviceCluster": ' + '["x"]' * 1 + '}'}, {}, "ProxyConfig.serviceCluster must be a string"),
    ({"ISTIO_KUBE_APP_PROBERS": DEEP_JSON}, {}, "ISTIO_KUBE_APP_PROBERS"),
    ({"ISTIO_KUBE_APP_PROBERS": '{"/app-health/a/livez": {"httpGet": 5}}'}, {}, "ISTIO_KUBE_APP_PROBERS"),
    ({"ISTIO_KUBE_APP_PROBERS": '{"/app-health/a/livez": {"tcpSocket": {"port": 80}, "timeoutSeconds": "x"}}'},
     {}, "timeoutSeconds"),
    ({"ISTIO_KUBE_APP_PROBERS": '{"/app-health/a/livez": {"httpGet": {"port": 80, "httpHeaders": [1]}}}'},
     {}, "httpHeaders"),
    ({"ISTIO_PROMETHEUS_ANNOTATIONS": "[]"}, {}, "ISTIO_PROMETHEUS_ANNOTATIONS"),
    ({"ISTIO_PROMETHEUS_ANNOTATIONS": DEEP_JSON}, {}, "ISTIO_PROMETHEUS_ANNOTATIONS"),
    ({"ISTIO_PROMETHEUS_ANNOTATIONS": '{"targets": [5]}'}, {}, "ISTIO_PROMETHEUS_ANNOTATIONS"),
])
def test_hostile_input_is_one_clear_refusal(env: dict, files: dict, needle: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        cfg_of(env, files)
    msg = str(e.value)
    assert needle in msg, msg
    assert "\n" not in msg and "Traceback" not in msg and len(msg) < 400, msg
    assert time.monotonic() - t0 < 1.0


def test_metajson_that_cannot_be_parsed_is_skipped() -> None:
    """ISTIO_METAJSON_* is best effort in Istio too: bad JSON (even nested 100 000 deep) is skipped, not fatal."""
    cfg = cfg_of({"ISTIO_METAJSON_LABELS": DEEP_JSON, "ISTIO_METAJSON_X": '{"a": 1}'})
    meta = bootstrap.node_metadata(cfg)
    # As pilot-agent: an ISTIO_METAJSON_* object's keys are merged at the top level (the variable's name is ignored)
    assert meta["a"] == 1 and "X" not in meta and "LABELS" not in meta


def test_bounds_are_yamlsafe_bounds_and_yaml_loads_only_for_yaml() -> None:
    """The agent keeps PyYAML out of its process unless a YAML input needs it (the 40 MB RSS budget)."""
    import subprocess
    import sys

    from agent import config
    from meshboot import yamlsafe

    assert (config.MAX_TEXT, config.MAX_DEPTH) == (yamlsafe.MAX_BYTES, yamlsafe.MAX_DEPTH)
    code = ("import sys; from tests.agent.test_agent_core import cfg_of; cfg_of({'PROXY_CONFIG': '{}'}); "
            "print('yaml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("text", ["٨٠", "８０", "8²", "²", "1_000", "0x50"])
def test_numbers_are_ascii_digits_only(text: str) -> None:
    """int() and float() accept Unicode digits and underscores; Go's strconv (and Envoy) do not."""
    from agent.config import parse_float, parse_int
    with pytest.raises(ConfigError, match="ISTIO_X"):
        parse_int(text, "env ISTIO_X", 0, 65535)
    with pytest.raises(ConfigError, match="ISTIO_X"):
        parse_float(text, "env ISTIO_X", 0, 1e6)


@pytest.mark.parametrize("text,want", [("80", 80), (" 80 ", 80), (443, 443), ("-1", -1)])
def test_ascii_integers_still_parse(text: object, want: int) -> None:
    from agent.config import parse_int
    assert parse_int(text, "x") == want
