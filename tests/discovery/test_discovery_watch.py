"""discovery/watch.py and store.py against the fake API server over real HTTP: list, watch, 410, drops, CRDs."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from discovery import authz, kinds, peerauth
from discovery.store import Changed, Store
from discovery.watch import Watcher, lines
from testing.fakekube import FakeKube

PA_V1 = "security.istio.io/v1/peerauthentications"
PA_V1BETA1 = "security.istio.io/v1beta1/peerauthentications"


def until(pred: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := pred():
            return got
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def service(name: str, ns: str = "default", **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "labels": labels,
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x" * 5000,
                                         "networking.istio.io/exportTo": "."},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def pod(name: str, ip: str, ns: str = "default", **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "labels": {"security.istio.io/tlsMode": "istio", **labels}},
            "spec": {"serviceAccountName": "sa-" + name, "containers": [
                {"name": "app", "image": "x", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": None}]}}


def slice_(name: str, ip: str, ns: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "namespace": ns, "name": "web-1"}}]}


def peer_auth(name: str, ns: str, mode: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}, "spec": {"mtls": {"mode": mode},
                                                                   "portLevelMtls": {"8080": {"mode": "DISABLE"}}}}


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as k:
        k.add_namespace("default", {"istio-injection": "enabled"})
        k.add_namespace("istio-system")
        yield k


def start(kube: FakeKube, **options: Any) -> Watcher:
    options = {"watch_seconds": 2, "backoff": (0.05, 0.2), "absent_retry": 0.2, **options}
    w = Watcher(kube.api_client(), **options).start()
    until(w.synced)
    return w


@pytest.fixture
def running() -> Iterator[list[Watcher]]:
    watchers: list[Watcher] = []
    yield watchers
    for w in watchers:
        w.stop()
        assert not [t for t in w._threads if t.is_alive()], "a watch thread outlived stop()"


def labels_of(w: Watcher, kind: str, ns: str, name: str) -> dict[str, str] | None:
    obj = w.store.snapshot().get(kind, ns, name)
    return None if obj is None else obj["metadata"].get("labels", {})


def test_initial_list_keeps_the_bounded_typed_fields(kube: FakeKube, running: list[Watcher]) -> None:
    kube.put_object("services", service("web"))
    kube.put_object("pods", pod("web-1", "10.0.0.5", app="web"))
    kube.put_object("endpointslices", slice_("web-abc", "10.0.0.5"))
    kube.put_object("peerauthentications", peer_auth("default", "istio-system", "STRICT"))
    running.append(w := start(kube))
    snap = w.store.snapshot()
    assert snap.synced == frozenset(kinds.KINDS)
    assert set(snap.of("Namespace")) == {("", "default"), ("", "istio-system")}
    svc = snap.get("Service", "default", "web")
    assert svc is not None
    assert svc["metadata"]["annotations"] == {"networking.istio.io/exportTo": "."}   # only istio.io keys
    assert "managedFields" not in svc["metadata"] and "resourceVersion" not in svc["metadata"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    p = snap.get("Pod", "default", "web-1")
    assert p is not None and p["spec"]["serviceAccountName"] == "sa-web-1"
    assert p["status"]["conditions"] == [{"type": "Ready", "status": "True"}]
    assert p["spec"]["containers"] == [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]
    eps = snap.get("EndpointSlice", "default", "web-abc")
    assert eps is not None and eps["endpoints"][0]["addresses"] == ["10.0.0.5"]
    pa = snap.get("PeerAuthentication", "istio-system", "default")
    assert pa == {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": pa["metadata"],
                  "spec": {"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}}
    watches = kube.recorded("GET", "/api/v1/services")
    assert [r.query.get("watch") for r in watches][:2] == [None, ["true"]]
    assert watches[1].query["allowWatchBookmarks"] == ["true"]
    assert watches[1].query["resourceVersion"] == [str(kube.rv)]     # from the list's resourceVersion


def test_add_update_delete_arrive_with_notes(kube: FakeKube, running: list[Watcher]) -> None:
    running.append(w := start(kube))
    notes: list[Changed] = []
    w.store.subscribe(notes.append)
    v0 = w.store.version
    kube.put_object("services", service("web", tier="a"))
    until(lambda: labels_of(w, "Service", "default", "web") == {"tier": "a"})
    kube.put_object("services", service("web", tier="b"))
    until(lambda: labels_of(w, "Service", "default", "web") == {"tier": "b"})
    kube.delete_object("services", "default", "web")
    until(lambda: w.store.snapshot().get("Service", "default", "web") is None)
    assert [(n.version, n.kinds, n.keys["Service"]) for n in notes] == [
        (v0 + i, frozenset({"Service"}), frozenset({("default", "web")})) for i in (1, 2, 3)]


def test_an_update_outside_the_kept_fields_notifies_nobody(kube: FakeKube, running: list[Watcher]) -> None:
    kube.put_object("services", service("web"))
    running.append(w := start(kube))
    notes: list[Changed] = []
    w.store.subscribe(notes.append)
    changed = service("web")
    changed["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = "y"
    kube.put_object("services", changed)
    kube.put_object("services", service("web", marker="1"))
    until(lambda: labels_of(w, "Service", "default", "web") == {"marker": "1"})
    assert len(notes) == 1


def test_410_gone_relists_and_misses_nothing(kube: FakeKube, running: list[Watcher]) -> None:
    kube.put_object("pods", pod("old", "10.0.0.1"))
    running.append(w := start(kube))
    informer = w.informers["Pod"]
    lists = informer.lists
    until(lambda: informer._resp is not None)           # the watch is open
    with kube.cond:                                      # changes whose events the open watch never sends
        kube.delete_object("pods", "default", "old")
        kube.put_object("pods", pod("new", "10.0.0.2"))
        kube.compact()
        kube.drop_watches()
    until(lambda: set(w.store.snapshot().of("Pod")) == {("default", "new")})
    assert informer.lists == lists + 1
    assert any(r.query.get("watch") and r.status == 200 for r in kube.recorded("GET", "/api/v1/pods"))


def test_a_dropped_stream_resumes_without_relisting(kube: FakeKube, running: list[Watcher]) -> None:
    running.append(w := start(kube, watch_seconds=60))
    informer = w.informers["Service"]
    lists, watches = informer.lists, informer.watches
    until(lambda: informer._resp is not None)
    rv = informer.rv
    with kube.cond:
        kube.put_object("services", service("during"))   # sent by no stream: the resumed one must get it
        kube.drop_watches()
    until(lambda: w.store.snapshot().get("Service", "default", "during"))
    assert informer.lists == lists and informer.watches > watches
    resumed = [r for r in kube.recorded("GET", "/api/v1/services") if r.query.get("watch")][-1]
    assert resumed.query["resourceVersion"] == [rv]


def test_a_watch_that_ends_resumes_from_its_bookmark(kube: FakeKube, running: list[Watcher]) -> None:
    running.append(w := start(kube, watch_seconds=1))
    informer = w.informers["Namespace"]
    kube.put_object("services", service("elsewhere"))    # moves the server's resourceVersion on
    until(lambda: informer.watches >= 3)
    assert informer.rv == str(kube.rv) and informer.lists == 1


def test_a_burst_arrives_complete_and_in_order(kube: FakeKube, running: list[Watcher]) -> None:
    running.append(w := start(kube))
    seen: list[int] = []
    versions: list[int] = []

    def note(n: Changed) -> None:
        versions.append(n.version)
        if "Service" in n.kinds and (labels := labels_of(w, "Service", "default", "web")):
            seen.append(int(labels["n"]))
    w.store.subscribe(note)

    def burst(kind: str, make: Callable[[int], dict[str, Any]]) -> None:
        for i in range(150):
            kube.put_object(kind, make(i))
    other = threading.Thread(target=burst, args=("pods", lambda i: pod(f"p{i}", f"10.1.0.{i}")))
    other.start()
    burst("services", lambda i: service("web", n=str(i)))
    other.join()
    until(lambda: seen[-1:] == [149] and len(w.store.snapshot().of("Pod")) == 150)
    assert seen == list(range(150))
    assert versions == sorted(versions) and len(set(versions)) == len(versions)


def test_notes_reach_an_asyncio_loop_in_order(kube: FakeKube, running: list[Watcher]) -> None:
    running.append(w := start(kube))

    async def main() -> list[int]:
        got: list[int] = []
        w.subscribe_on_loop(asyncio.get_running_loop(), lambda n: got.append(n.version))
        await w.wait_synced()
        first = w.store.version
        await asyncio.to_thread(lambda: [kube.put_object("services", service(f"s{i}")) for i in range(20)])
        while len(got) < 20:
            await asyncio.sleep(0.02)
        return [v - first for v in got]
    assert asyncio.run(main()) == list(range(1, 21))


def test_without_the_crd_peer_authentication_is_empty_and_said_once(
        kube: FakeKube, running: list[Watcher], caplog: pytest.LogCaptureFixture) -> None:
    kube.unserved |= {PA_V1, PA_V1BETA1}
    caplog.set_level(logging.INFO, "meshboot.discovery")
    running.append(w := start(kube))
    assert "PeerAuthentication" in w.store.snapshot().synced
    until(lambda: len(kube.recorded("GET", "/apis/security.istio.io/v1/peerauthentications")) >= 4)
    said = [r for r in caplog.records if "not served" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    kube.unserved.clear()                                 # the CRD is installed later
    kube.put_object("peerauthentications", peer_auth("default", "default", "PERMISSIVE"))
    until(lambda: w.store.snapshot().get("PeerAuthentication", "default", "default"))
    assert any("served again" in r.getMessage() for r in caplog.records)


def test_only_v1beta1_served_is_watched_as_v1beta1(kube: FakeKube, running: list[Watcher]) -> None:
    kube.unserved.add(PA_V1)
    kube.put_object("peerauthentications", peer_auth("strict", "default", "STRICT"))
    running.append(w := start(kube))
    pa = w.store.snapshot().get("PeerAuthentication", "default", "strict")
    assert pa is not None and pa["apiVersion"] == "security.istio.io/v1beta1"
    kube.put_object("peerauthentications", peer_auth("strict", "default", "DISABLE"))
    until(lambda: (w.store.snapshot().get("PeerAuthentication", "default", "strict") or {})
          .get("spec", {}).get("mtls") == {"mode": "DISABLE"})
    assert kube.recorded("GET", "/apis/security.istio.io/v1beta1/peerauthentications")[-1].query["watch"] == ["true"]


def test_an_object_over_a_bound_is_refused_whole(kube: FakeKube, running: list[Watcher]) -> None:
    running.append(w := start(kube))
    kube.put_object("pods", pod("web-1", "10.0.0.5"))
    until(lambda: w.store.snapshot().get("Pod", "default", "web-1"))
    hostile = pod("web-1", "10.0.0.5", **{f"l{i}": "v" for i in range(1025)})
    kube.put_object("pods", hostile)                      # too many labels: its previous form goes too
    until(lambda: w.store.snapshot().get("Pod", "default", "web-1") is None)
    kube.put_object("pods", pod("web-2", "10.0.0.6"))     # and the watch carries on
    until(lambda: w.store.snapshot().get("Pod", "default", "web-2"))


def test_an_authorization_policy_over_a_bound_fails_closed(kube: FakeKube, running: list[Watcher]) -> None:
    """Left out, a DENY policy would allow what it denies: it is kept as a stub that authz enforces fail-closed
    (the whole namespace denied) and names the bound in its problem line."""
    running.append(w := start(kube))
    deny = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "no-dev", "namespace": "default", "labels": {f"l{i}": "v" for i in range(1025)}},
            "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "web"}},
                     "rules": [{"from": [{"source": {"namespaces": ["dev"]}}]}]}}
    kube.put_object("authorizationpolicies", deny)
    stored = until(lambda: w.store.snapshot().get("AuthorizationPolicy", "default", "no-dev"))
    policies, problems = authz.compile([stored])
    assert len(problems) == 1 and "default/no-dev" in problems[0] and "more than 1024" in problems[0], problems
    verdict = authz.explain(authz.for_workload(policies, "default", {"app": "db"}, "cluster.local"),
                            authz.Source("spiffe://cluster.local/ns/prod/sa/x", "10.0.0.1"), authz.Destination(80))
    assert verdict.verdict == authz.DENY and "no-dev" in verdict.policy


def test_a_dry_run_authorization_policy_over_a_bound_stays_dry_run() -> None:
    """The stub keeps istio.io/dry-run: a policy its owner asked not to enforce is not enforced by its stub either."""
    raw = {"metadata": {"name": "try", "namespace": "default", "labels": {f"l{i}": "v" for i in range(1025)},
                        "annotations": {authz.DRY_RUN: "true", "istio.io/x": "y" * 20000}},
           "spec": {"action": "DENY", "rules": [{}]}}
    with pytest.raises(kinds.Refused) as refused:
        kinds.keep("AuthorizationPolicy", raw)
    policies, problems = authz.compile([kinds.refused_form("AuthorizationPolicy", raw, refused.value)])
    assert problems and policies.namespaces["default"][0].dry_run
    verdict = authz.explain(authz.for_workload(policies, "default", {}, "cluster.local"),
                            authz.Source(None, "10.0.0.1"), authz.Destination(80))
    assert verdict.verdict == authz.ALLOW and verdict.logged, verdict


def test_a_strict_peer_authentication_over_a_bound_stays_strict(kube: FakeKube, running: list[Watcher]) -> None:
    """Left out, a STRICT namespace policy would leave the namespace PERMISSIVE (plaintext accepted): it is kept as a
    stub that peerauth applies fail-closed, STRICT over its namespace, with a problem line naming the bound."""
    running.append(w := start(kube))
    strict = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
              "metadata": {"name": "strict", "namespace": "default", "labels": {f"l{i}": "v" for i in range(1025)}},
              "spec": {"mtls": {"mode": "STRICT"}}}
    kube.put_object("peerauthentications", strict)
    stored = until(lambda: w.store.snapshot().get("PeerAuthentication", "default", "strict"))
    policies, problems = peerauth.compile([stored])
    assert len(problems) == 1 and "default/strict" in problems[0] and "more than 1024" in problems[0], problems
    assert peerauth.mode_for(policies, "default", {"app": "web"}, 8080) == peerauth.STRICT
    assert peerauth.service_mode(policies, "default") == peerauth.STRICT
    assert peerauth.mode_for(policies, "other", {}, 8080) == peerauth.PERMISSIVE     # its scope, not the mesh


def test_a_server_error_backs_off_and_relists(kube: FakeKube, running: list[Watcher]) -> None:
    kube.fail_next("GET", "/api/v1/namespaces", 500, 500)
    running.append(w := start(kube))
    assert w.informers["Namespace"].lists == 3              # two failed, each after a wait
    assert [r.status for r in kube.recorded("GET", "/api/v1/namespaces")][:3] == [500, 500, 200]


def test_kinds_keep_types_and_refuse_excess() -> None:
    raw = {"metadata": {"name": "p", "namespace": "n", "labels": {"a": 1, "b": "c"}},
           "spec": {"serviceAccountName": ["x"], "hostNetwork": "true",
                    "containers": [{"name": "c", "ports": [{"containerPort": "80"}, {"containerPort": 81}]}, "junk"]}}
    kept = kinds.keep("Pod", raw)
    assert kept == {"metadata": {"name": "p", "namespace": "n", "labels": {"b": "c"}},
                    "spec": {"containers": [{"name": "c", "ports": [{}, {"containerPort": 81}]}]}}
    with pytest.raises(kinds.Refused, match="longer than 63"):
        kinds.keep("Namespace", {"metadata": {"name": "n", "labels": {"a": "v" * 64}}})
    with pytest.raises(kinds.Refused, match="name"):
        kinds.keep("Service", {"metadata": {"name": 5}})
    assert kinds.key_of(kept) == ("n", "p")


def test_peer_authentication_spec_is_kept_as_sent_for_its_validator() -> None:
    from discovery import peerauth
    raw = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
           "metadata": {"name": "p", "namespace": "n", "creationTimestamp": "2026-01-01T00:00:00Z"},
           "spec": {"selector": {"matchExpressions": [{"key": "app"}]}, "mtls": {"mode": "DISABLE"}}}
    kept = kinds.keep("PeerAuthentication", raw)
    assert kept["spec"] == raw["spec"]                    # not cut down to a namespace-wide DISABLE
    _, problems = peerauth.compile([kept])
    assert len(problems) == 1 and "matchExpressions" in problems[0]
    with pytest.raises(kinds.Refused, match="bytes of JSON"):
        kinds.keep("PeerAuthentication", {**raw, "spec": {"x": "y" * 1536 * 1024}})


def test_lines_are_split_across_chunks_and_capped() -> None:
    assert list(lines([b'{"a"', b':1}\n\n{"b":2}', b"\n{"], cap=100)) == [b'{"a":1}', b'{"b":2}', b"{"]
    with pytest.raises(Exception, match="longer than 8 bytes"):
        list(lines([b"0123456789"], cap=8))


def test_store_replace_reports_what_a_relist_changed() -> None:
    store = Store(["Pod"])
    assert store.replace("Pod", {}) is not None           # first list: synced, even when empty
    assert store.replace("Pod", {}) is None
    store.put("Pod", ("n", "a"), {"metadata": {"name": "a"}})
    store.put("Pod", ("n", "b"), {"metadata": {"name": "b"}})
    snap = store.snapshot()
    note = store.replace("Pod", {("n", "b"): {"metadata": {"name": "b"}}, ("n", "c"): {"metadata": {"name": "c"}}})
    assert note is not None and note.keys["Pod"] == {("n", "a"), ("n", "c")}
    assert set(snap.of("Pod")) == {("n", "a"), ("n", "b")}     # an old snapshot does not move
