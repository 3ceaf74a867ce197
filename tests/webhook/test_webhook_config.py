"""Injection config files in Istio's layouts, Istio's defaults when absent, clear errors, reload on change."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from webhook.config import ConfigSource, build_settings, load_mesh, load_values, normalize_duration
from webhook.errors import ConfigError


def test_defaults_are_istios_with_meshboot_differences() -> None:
    s = build_settings()
    p = s.proxy
    assert (p["statusPort"], p["readinessPeriodSeconds"], p["readinessFailureThreshold"]) == (15020, 15, 4)
    assert p["holdApplicationUntilProxyStarts"] is True
    assert (s.g["hub"], s.g["tag"], p["image"], s.g["proxy_init"]["image"]) == \
        ("ghcr.io/meshboot", "0.1.0", "meshboot-agent", "meshboot-agent")
    assert "discoveryAddress" not in s.default_proxy_config
    assert s.mesh["proxyListenPort"] == 15001 and s.policy == "enabled" and s.native_sidecars == "auto"


def test_user_values_merge_over_defaults() -> None:
    s = build_settings({"global": {"proxy": {"statusPort": "123"}, "tag": 1.28}})
    assert s.proxy["statusPort"] == 123 and s.proxy["logLevel"] == "warning" and s.g["tag"] == "1.28"
    assert build_settings().proxy["statusPort"] == 15020, "defaults are never mutated"


def test_configmap_layouts(tmp_path: Path) -> None:
    values = {"global": {"hub": "docker.io/istio"}, "sidecarInjectorWebhook": {"rewriteAppHTTPProbe": False}}
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"values": json.dumps(values)}}
    (tmp_path / "cm.yaml").write_text(yaml.safe_dump(cm))
    (tmp_path / "values").write_text(json.dumps(values))
    assert load_values(str(tmp_path / "cm.yaml")) == values == load_values(str(tmp_path / "values"))
    mesh_cm = {"kind": "ConfigMap", "data": {"mesh": "defaultConfig:\n  drainDuration: 1m30s\n"}}
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(mesh_cm))
    mesh = load_mesh(str(tmp_path / "mesh.yaml"))
    assert build_settings(mesh=mesh).default_proxy_config == {"drainDuration": "90s"}


@pytest.mark.parametrize("values,where", [
    ({"global": {"proxy": {"statusPort": 70000}}}, "global.proxy.statusPort"),
    ({"global": {"proxy": {"privileged": "maybe"}}}, "global.proxy.privileged"),
    ({"global": {"proxy": "x"}}, "global.proxy"),
    ({"global": {"imagePullSecrets": "s"}}, "global.imagePullSecrets"),
    ({"sidecarInjectorWebhook": {"rewriteAppHTTPProbe": 3}}, "sidecarInjectorWebhook.rewriteAppHTTPProbe"),
])
def test_bad_values_name_the_field(values: dict, where: str) -> None:
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        build_settings(values)


def test_bad_mesh_and_options() -> None:
    with pytest.raises(ConfigError, match=r"defaultConfig\.drainDuration"):
        build_settings(mesh={"defaultConfig": {"drainDuration": "soon"}})
    with pytest.raises(ConfigError, match="interceptionMode"):
        build_settings(mesh={"defaultConfig": {"interceptionMode": "IPVS"}})
    with pytest.raises(ConfigError, match="native sidecars"):
        build_settings(native_sidecars="sometimes")
    with pytest.raises(ConfigError, match="kubernetes version"):
        build_settings(kubernetes_version="latest")


@pytest.mark.parametrize("text,want", [("45s", "45s"), ("1m", "60s"), ("1h2m3s", "3723s"), ("1.5s", "1.5s"),
                                       ("500ms", "0.5s"), (5, "5s")])
def test_durations(text: object, want: str) -> None:
    assert normalize_duration(text, "x") == want


def test_source_reloads_configmap_style_symlink_swap(tmp_path: Path) -> None:
    """A mounted ConfigMap updates by swapping the ..data symlink: the file's inode changes."""
    def publish(version: str, text: str) -> None:
        d = tmp_path / version
        d.mkdir()
        (d / "values").write_text(text)
        link = tmp_path / "..data_tmp"
        os.symlink(d.name, link)
        os.replace(link, tmp_path / "..data")

    publish("v1", "global:\n  tag: one\n")
    (tmp_path / "values").symlink_to("..data/values")
    src = ConfigSource(str(tmp_path / "values"), str(tmp_path / "absent-mesh"))
    assert src.settings.g["tag"] == "one" and src.generation == 1
    assert not src.reload_if_changed()
    publish("v2", "global:\n  tag: two\n")
    assert src.reload_if_changed() and src.settings.g["tag"] == "two" and src.settings.generation == 2
    publish("v3", "global:\n  proxy:\n    statusPort: x\n")
    assert not src.reload_if_changed()
    assert src.settings.g["tag"] == "two" and "statusPort" in (src.last_error or "")
