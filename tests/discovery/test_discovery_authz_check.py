"""meshboot-authz-check (discovery/authz_check.py) over config dumps of listeners discovery generated: the chain
Envoy would pick, the deciding policy and the verdict; hostile dumps and arguments are one line and exit 1. The
same command against a real Envoy's dump is in tests/e2e_local/test_local_authz.py."""
from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from discovery import authz, authz_check
from discovery import generate as g
from discovery.model import STRICT, Mesh, Model, Proxy, Workload

POLICIES = [
    {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
     "metadata": {"name": "web", "namespace": "demo"},
     "spec": {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}],
                         "to": [{"operation": {"ports": ["8080"]}}]}]}},
    {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
     "metadata": {"name": "no-dev", "namespace": "demo"},
     "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["dev"]}}]}]}},
    {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
     "metadata": {"name": "audit", "namespace": "demo"},
     "spec": {"action": "AUDIT", "rules": [{"from": [{"source": {"principals": ["*"]}}]}]}},
]
WEB = Workload("web-1", "demo", "10.1.0.11", "web", labels={"app": "web"}, named_ports={})


def dump_of(mode_9090: str = STRICT) -> dict[str, Any]:
    """An Envoy admin ConfigDump holding web-1's virtualInbound: 8080 PERMISSIVE, 9090 `mode_9090`."""
    policies, problems = authz.compile(POLICIES)
    assert problems == []
    from discovery.model import Endpoint, Service, ServicePort
    svc = Service("web", "demo", "10.96.0.10", (ServicePort("a", 80, 8080), ServicePort("b", 90, 9090)),
                  selector={"app": "web"})
    model = Model(services=(svc,), endpoints=(Endpoint(svc.key, "a", WEB.ip, 8080, True, WEB),), mesh=Mesh(),
                  mode_for=lambda w, p: mode_9090 if p == 9090 else "PERMISSIVE", authz=policies)
    proxy = Proxy("sidecar~10.1.0.11~web-1.demo~demo.svc.cluster.local", "web-1", "demo", (WEB.ip,), "web",
                  labels=WEB.labels)
    listener = json_format.MessageToDict(g.virtual_inbound(model, proxy), preserving_proto_field_name=True)
    return {"configs": [{"@type": authz_check.LISTENERS_DUMP, "dynamic_listeners": [
        {"name": "virtualInbound", "active_state": {"version_info": "1", "listener": listener}}]}]}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    rc = authz_check.main([*argv, "--json"]) if "--no-json" not in argv else \
        authz_check.main([a for a in argv if a != "--no-json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 and "--no-json" not in argv else out), err


@pytest.fixture
def dump_file(tmp_path: Path) -> Path:
    p = tmp_path / "dump.json"
    p.write_text(json.dumps(dump_of()))
    return p


@pytest.mark.parametrize(("who", "port", "verdict", "decided_by"), [
    (["--source-namespace", "demo", "--source-sa", "client"], 8080, "ALLOW", "AuthorizationPolicy demo/web, rule 0"),
    (["--source-namespace", "demo", "--source-sa", "other"], 8080, "DENY", ""),      # no ALLOW rule matched
    (["--source-namespace", "dev", "--source-sa", "client"], 8080, "DENY", "AuthorizationPolicy demo/no-dev, rule 0"),
    (["--source-namespace", "demo", "--source-sa", "client"], 9090, "DENY", ""),     # the ALLOW rule names 8080
    (["--plaintext"], 8080, "DENY", ""),                                              # PERMISSIVE: raw_buffer chain
    (["--plaintext"], 9090, "DENY", ""),                                              # STRICT: no chain at all
])
def test_verdicts(capsys: pytest.CaptureFixture[str], dump_file: Path, who: list[str], port: int, verdict: str,
                  decided_by: str) -> None:
    rc, got, err = run(capsys, "--config-dump", str(dump_file), *who, "--source-ip", "10.1.0.41", "--port", str(port))
    assert rc == 0, err
    assert (got["verdict"], got.get("decided_by", "")) == (verdict, decided_by), got


def test_chain_choice_and_audit_are_shown(capsys: pytest.CaptureFixture[str], dump_file: Path) -> None:
    rc, got, _ = run(capsys, "--config-dump", str(dump_file), "--plaintext", "--source-ip", "10.1.0.41",
                     "--port", "9090")
    assert got["chain"] is None and "mTLS mode" in got["reason"]
    rc, got, _ = run(capsys, "--config-dump", str(dump_file), "--source-namespace", "demo", "--source-sa", "client",
                     "--source-ip", "10.1.0.41", "--port", "8080")
    assert got["chain"] == "0.0.0.0_8080" and got["logged"], got
    rc, out, _ = run(capsys, "--no-json", "--config-dump", str(dump_file), "--source-namespace", "demo",
                     "--source-sa", "client", "--source-ip", "10.1.0.41", "--port", "8080")
    assert rc == 0 and out.startswith("ALLOW: spiffe://cluster.local/ns/demo/sa/client from 10.1.0.41 to port 8080")
    assert "policy:  AuthorizationPolicy demo/web, rule 0" in out


@pytest.mark.parametrize(("content", "argv", "message"), [
    ("not json", [], "not JSON"),
    ("{}", [], "no active virtualInbound"),
    (json.dumps({"configs": [{"@type": authz_check.LISTENERS_DUMP, "dynamic_listeners": [{"active_state": {
        "listener": {"name": "virtualInbound", "filter_chains": [{"name": "x", "filters": [
            {"name": "envoy.filters.network.rbac", "typed_config": {"@type": "type.googleapis.com/bogus"}}]}]}}}]}]}),
     ["--port", "1"], "unreadable"),
    (None, ["--source-ip", "10.0.0.1 "], "--source-ip"),
    (None, ["--source-namespace", "Demo;rm"], "--source-namespace"),
    (None, ["--port", "70000"], "--port"),
])
def test_hostile_input_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str | None,
                                   argv: list[str], message: str) -> None:
    p = tmp_path / "dump.json"
    p.write_text(json.dumps(dump_of()) if content is None else content)
    base = {"--source-namespace": "demo", "--source-ip": "10.0.0.1", "--port": "8080"}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    rc = authz_check.main(["--config-dump", str(p), *[x for kv in base.items() for x in kv]])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.count("\n") == 1, err


def _inbound(listener: Any = None, item: Any = None, listeners: Any = None) -> str:
    """A dump whose virtualInbound (or the structure around it) is `listener` / `item` / `listeners`."""
    if listeners is None:
        listeners = [{"active_state": {"listener": listener}} if item is None else item]
    return json.dumps({"configs": [{"@type": authz_check.LISTENERS_DUMP, "dynamic_listeners": listeners}]})


def _chains(*chains: Any) -> str:
    return _inbound({"name": "virtualInbound", "filter_chains": list(chains)})


@pytest.mark.parametrize(("content", "message"), [
    (_inbound(listeners=5), "dynamic_listeners"),
    (_inbound(item={"active_state": 5}), "active_state"),
    (_inbound({"name": "virtualInbound", "filter_chains": 5}), "filter_chains"),
    (_chains({"filter_chain_match": []}), "filter_chain_match"),
    (_chains({"filter_chain_match": {"application_protocols": 5}}), "application_protocols"),
    (_chains({"filter_chain_match": {"destination_port": "8080"}}), "destination_port"),
    (_chains({"filters": 5}), "filters"),
])
def test_a_dump_of_the_wrong_shape_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str,
                                              message: str) -> None:
    """Each wrong type where the dump has a list or an object is named, never a TypeError's traceback."""
    p = tmp_path / "dump.json"
    p.write_text(content)
    rc = authz_check.main(["--config-dump", str(p), "--source-namespace", "demo", "--source-ip", "10.0.0.1",
                           "--port", "8080"])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.count("\n") == 1, err


@pytest.fixture
def control_plane() -> Iterator[str]:
    """A stand-in for the monitoring port's /debug/config_dump (the real one: test_discovery_debug.py)."""
    body = json.dumps(dump_of()).encode()
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            ok = self.path == "/debug/config_dump?proxyID=web-1.demo"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(body if ok else b"unknown proxy")

        def log_message(self, *args: Any) -> None:
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_reads_the_control_planes_view_of_a_proxy(capsys: pytest.CaptureFixture[str], control_plane: str) -> None:
    rc, got, err = run(capsys, "web-1.demo", "--control-plane", control_plane, "--source-namespace", "demo",
                       "--source-sa", "client", "--source-ip", "10.1.0.41", "--port", "8080")
    assert rc == 0 and got["verdict"] == "ALLOW", err
    rc, _, err = run(capsys, "nope.demo", "--control-plane", control_plane, "--plaintext", "--source-ip", "10.0.0.1",
                     "--port", "8080")
    assert rc == 1 and "404 unknown proxy" in err
