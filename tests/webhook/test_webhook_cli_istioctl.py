"""meshboot-inject takes `istioctl kube-inject`'s flag names where they mean the same: the output is byte for byte
the one meshboot's own names give."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from webhook.cli import main

DEPLOY = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "hello"},
          "spec": {"selector": {"matchLabels": {"app": "hello"}}, "template": {
              "metadata": {"labels": {"app": "hello"}, "annotations": {"inject.istio.io/templates": "sidecar,extra"}},
              "spec": {"containers": [{"name": "hello", "image": "hello:1"}]}}}}
VALUES = {"global": {"hub": "example.io/mesh", "tag": "9.9"}, "revision": "canary"}
MESH = {"defaultConfig": {"drainDuration": "23s"}}
INJECTOR = {"templates": {"extra": "metadata:\n  annotations:\n    extra: \"yes\"\n"}}


def _files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name, doc in (("in", DEPLOY), ("values", VALUES), ("mesh", MESH), ("inj", INJECTOR)):
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(doc))
        out[name] = str(p)
    return out


@pytest.mark.parametrize("istioctl", [
    ["--filename", "{in}", "--output", "{out}", "--valuesFile", "{values}", "--meshConfigFile", "{mesh}",
     "--injectConfigFile", "{inj}"],
    ["-f", "{in}", "-o", "{out}", "--valuesFile={values}", "--meshConfigFile={mesh}", "--injectConfigFile={inj}"],
])
def test_istioctl_flag_names(istioctl: list[str], tmp_path: Path) -> None:
    f = _files(tmp_path)
    ours = ["-f", f["in"], "-o", str(tmp_path / "ours.yaml"), "--values", f["values"], "--mesh-config", f["mesh"],
            "--injector-config", f["inj"]]
    assert main(ours) == 0
    theirs = [a.format(**f, out=str(tmp_path / "theirs.yaml")) for a in istioctl]
    assert main(theirs) == 0
    expected = (tmp_path / "ours.yaml").read_text()
    assert (tmp_path / "theirs.yaml").read_text() == expected
    pod = yaml.safe_load(expected)["spec"]["template"]
    proxy = next(c for c in pod["spec"]["initContainers"] + pod["spec"]["containers"] if c["name"] == "istio-proxy")
    assert proxy["image"] == "example.io/mesh/meshboot-agent:9.9"                       # the values were read
    assert '"drainDuration":"23s"' in next(e["value"] for e in proxy["env"] if e["name"] == "PROXY_CONFIG")
    assert pod["metadata"]["annotations"]["extra"] == "yes"                             # the injector config
    assert pod["metadata"]["annotations"]["istio.io/rev"] == "canary"
