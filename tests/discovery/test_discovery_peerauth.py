"""discovery/peerauth.py: PeerAuthentication parsed, refused and resolved as istiod does (docs examples as tables)."""
from __future__ import annotations

from typing import Any

import pytest

from discovery import kinds, peerauth
from discovery.peerauth import DISABLE, PERMISSIVE, STRICT, compile, mode_for, resolve, service_mode

T0 = "2024-01-01T00:00:00Z"
T1 = "2024-01-02T00:00:00Z"
T2 = "2024-01-03T00:00:00Z"


def pa(namespace: str, name: str, mode: str | None = None, selector: dict[str, str] | None = None,
       ports: dict[Any, Any] | None = None, created: str = T0, version: str = "v1") -> dict[str, Any]:
    """A PeerAuthentication as the API server sends it (JSON: port keys are strings)."""
    spec: dict[str, Any] = {}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if ports is not None:
        spec["portLevelMtls"] = {str(k): ({"mode": v} if isinstance(v, str) else v) for k, v in ports.items()}
    return {"apiVersion": f"security.istio.io/{version}", "kind": "PeerAuthentication",
            "metadata": {"namespace": namespace, "name": name, "creationTimestamp": created}, "spec": spec}


def clean(objects: list[dict[str, Any]], root: str = "istio-system") -> peerauth.Policies:
    policies, problems = compile(objects, root)
    assert problems == []
    return policies


FINANCE = {"app": "finance"}

# Istio's documented examples (reference/config/security/peer_authentication), each: objects, workload, port, mode.
DOC_TABLE = [
    # nothing anywhere: PERMISSIVE
    ([], "foo", FINANCE, 80, PERMISSIVE),
    # "Policy to require mTLS traffic for all workloads under namespace foo"
    ([pa("foo", "default", STRICT)], "foo", FINANCE, 80, STRICT),
    ([pa("foo", "default", STRICT)], "bar", FINANCE, 80, PERMISSIVE),
    # mesh level: the root namespace, no selector
    ([pa("istio-system", "default", STRICT)], "bar", {}, 80, STRICT),
    # "allow both mTLS and plaintext for foo, but require mTLS for workload finance"
    ([pa("foo", "default", PERMISSIVE), pa("foo", "finance", STRICT, FINANCE)], "foo", FINANCE, 80, STRICT),
    ([pa("foo", "default", PERMISSIVE), pa("foo", "finance", STRICT, FINANCE)], "foo", {"app": "web"}, 80,
     PERMISSIVE),
    # "strict mTLS for all finance workloads, but leave port 8080 to plaintext"
    ([pa("foo", "default", STRICT, FINANCE, {8080: DISABLE})], "foo", FINANCE, 8080, DISABLE),
    ([pa("foo", "default", STRICT, FINANCE, {8080: DISABLE})], "foo", FINANCE, 9090, STRICT),
    # "inherit mTLS mode from namespace (or mesh) settings, and disable for port 8080"
    ([pa("foo", "ns", STRICT), pa("foo", "default", "UNSET", FINANCE, {8080: DISABLE})], "foo", FINANCE, 8080, DISABLE),
    ([pa("foo", "ns", STRICT), pa("foo", "default", "UNSET", FINANCE, {8080: DISABLE})], "foo", FINANCE, 80, STRICT),
    ([pa("istio-system", "m", DISABLE), pa("foo", "default", "UNSET", FINANCE, {8080: STRICT})], "foo", FINANCE, 80,
     DISABLE),
]


@pytest.mark.parametrize(("objects", "namespace", "labels", "port", "want"), DOC_TABLE)
def test_istio_documented_examples(objects: list[dict[str, Any]], namespace: str, labels: dict[str, str], port: int,
                                   want: str) -> None:
    assert mode_for(clean(objects), namespace, labels, port) == want


# Inheritance of UNSET (and of a missing mtls) down mesh › namespace › workload › port.
INHERIT_TABLE = [
    # mesh UNSET → the PERMISSIVE default
    ([pa("istio-system", "m", "UNSET")], 80, PERMISSIVE),
    ([pa("istio-system", "m", STRICT), pa("foo", "n", "UNSET")], 80, STRICT),
    ([pa("istio-system", "m", STRICT), pa("foo", "n", None)], 80, STRICT),
    ([pa("istio-system", "m", STRICT), pa("foo", "n", DISABLE)], 80, DISABLE),
    ([pa("istio-system", "m", STRICT), pa("foo", "w", None, FINANCE)], 80, STRICT),
    ([pa("istio-system", "m", DISABLE), pa("foo", "n", STRICT), pa("foo", "w", "UNSET", FINANCE)], 80, STRICT),
    ([pa("foo", "n", STRICT), pa("foo", "w", PERMISSIVE, FINANCE)], 80, PERMISSIVE),
    # an UNSET port takes the workload's result (which itself inherited)
    ([pa("foo", "n", STRICT), pa("foo", "w", "UNSET", FINANCE, {80: "UNSET"})], 80, STRICT),
    ([pa("foo", "n", STRICT), pa("foo", "w", DISABLE, FINANCE, {80: {}})], 80, DISABLE),
    ([pa("foo", "n", DISABLE), pa("foo", "w", PERMISSIVE, FINANCE, {80: STRICT})], 80, STRICT),
    # port 0 (the passthrough chain) is never a portLevelMtls key
    ([pa("foo", "w", STRICT, FINANCE, {80: DISABLE})], 0, STRICT),
]


@pytest.mark.parametrize(("objects", "port", "want"), INHERIT_TABLE)
def test_unset_inherits_from_the_level_above(objects: list[dict[str, Any]], port: int, want: str) -> None:
    assert mode_for(clean(objects), "foo", {"app": "finance", "version": "v1"}, port) == want


def test_selector_must_be_a_subset_of_the_pod_labels() -> None:
    policies = clean([pa("foo", "n", DISABLE), pa("foo", "w", STRICT, {"app": "finance", "tier": "db"})])
    assert mode_for(policies, "foo", {"app": "finance"}, 80) == DISABLE
    assert mode_for(policies, "foo", {"app": "finance", "tier": "web"}, 80) == DISABLE
    assert mode_for(policies, "foo", {"app": "finance", "tier": "db", "x": "y"}, 80) == STRICT
    assert mode_for(policies, "bar", {"app": "finance", "tier": "db"}, 80) == PERMISSIVE  # only its own namespace


def test_an_empty_selector_is_namespace_or_mesh_wide() -> None:
    root = pa("istio-system", "m", STRICT) | {"spec": {"selector": {"matchLabels": {}}, "mtls": {"mode": STRICT}}}
    ns = pa("foo", "n", DISABLE) | {"spec": {"selector": {}, "mtls": {"mode": DISABLE}}}
    policies = clean([root, ns])
    assert mode_for(policies, "foo", {"any": "pod"}, 80) == DISABLE
    assert mode_for(policies, "bar", {}, 80) == STRICT


def test_a_selector_in_the_root_namespace_is_reported_and_ignored() -> None:
    policies, problems = compile([pa("istio-system", "sel", DISABLE, FINANCE), pa("istio-system", "m", STRICT)])
    assert len(problems) == 1 and "istio-system/sel" in problems[0] and "spec.selector" in problems[0]
    assert mode_for(policies, "foo", FINANCE, 80) == STRICT
    assert mode_for(policies, "istio-system", FINANCE, 80) == STRICT


def test_pods_in_the_root_namespace_get_the_mesh_policy() -> None:
    policies = clean([pa("istio-system", "m", DISABLE)])
    assert mode_for(policies, "istio-system", {}, 80) == DISABLE


def test_a_custom_root_namespace() -> None:
    objects = [pa("mesh-root", "m", STRICT), pa("istio-system", "n", DISABLE)]
    policies = clean(objects, root="mesh-root")
    assert mode_for(policies, "foo", {}, 80) == STRICT
    assert mode_for(policies, "istio-system", {}, 80) == DISABLE  # only a namespace policy there now


@pytest.mark.parametrize("reverse", [False, True])
def test_the_oldest_workload_policy_wins_whatever_the_order_given(reverse: bool) -> None:
    objects = [pa("foo", "zz-old", DISABLE, {"app": "finance"}, created=T0),
               pa("foo", "aa-new", STRICT, {"version": "v1"}, created=T1),
               pa("foo", "mm-newest", PERMISSIVE, {"app": "finance", "version": "v1"}, created=T2)]
    policies = clean(objects[::-1] if reverse else objects)
    assert mode_for(policies, "foo", {"app": "finance", "version": "v1"}, 80) == DISABLE
    assert mode_for(policies, "foo", {"version": "v1"}, 80) == STRICT
    assert resolve(policies, "foo", {"app": "finance", "version": "v1"}).source == "foo/zz-old"


def test_a_tie_in_time_goes_to_the_smaller_name() -> None:
    objects = [pa("foo", "b", DISABLE, FINANCE), pa("foo", "a", STRICT, {"version": "v1"})]
    assert mode_for(clean(objects), "foo", {"app": "finance", "version": "v1"}, 80) == STRICT


def test_the_oldest_port_map_is_the_one_used_not_a_merge() -> None:
    objects = [pa("foo", "old", STRICT, FINANCE, {80: DISABLE}, created=T0),
               pa("foo", "new", STRICT, FINANCE, {90: DISABLE}, created=T1)]
    policies = clean(objects)
    assert mode_for(policies, "foo", FINANCE, 80) == DISABLE
    assert mode_for(policies, "foo", FINANCE, 90) == STRICT


@pytest.mark.parametrize(("namespace", "winner"), [("istio-system", "mesh"), ("foo", "namespace")])
def test_a_second_mesh_or_namespace_policy_is_reported_and_the_oldest_kept(namespace: str, winner: str) -> None:
    objects = [pa(namespace, "a-newer", DISABLE, created=T1), pa(namespace, "z-older", STRICT, created=T0)]
    policies, problems = compile(objects)
    assert mode_for(policies, "foo", {}, 80) == STRICT
    assert len(problems) == 1
    assert f"{namespace}/a-newer" in problems[0] and f"{namespace}/z-older" in problems[0] and winner in problems[0]


def test_timestamps_compare_as_times_not_text() -> None:
    objects = [pa("foo", "a", DISABLE, created="2024-01-01T01:00:00+02:00"),  # 23:00 the day before, UTC
               pa("foo", "b", STRICT, created="2024-01-01T00:00:00Z")]
    policies, _ = compile(objects)
    assert mode_for(policies, "foo", {}, 80) == DISABLE


def test_v1beta1_and_v1_alike_and_a_list_item_without_apiversion() -> None:
    item = pa("foo", "n", STRICT)
    del item["apiVersion"], item["kind"]
    for obj in (pa("foo", "n", STRICT, version="v1beta1"), item):
        assert mode_for(clean([obj]), "foo", {}, 80) == STRICT


def test_service_mode_sees_only_namespace_and_mesh() -> None:
    policies = clean([pa("istio-system", "m", STRICT), pa("foo", "n", DISABLE), pa("bar", "w", DISABLE, FINANCE)])
    assert service_mode(policies, "foo") == DISABLE
    assert service_mode(policies, "bar") == STRICT
    assert service_mode(clean([]), "bar") == PERMISSIVE


def test_effective_lists_the_resolved_ports() -> None:
    effective = resolve(clean([pa("foo", "n", STRICT), pa("foo", "w", "UNSET", FINANCE, {8080: DISABLE, 9090: {}})]),
                        "foo", FINANCE)
    assert (effective.mode, dict(effective.ports), effective.source) == (STRICT, {8080: DISABLE, 9090: STRICT}, "foo/w")


def spec(**fields: Any) -> dict[str, Any]:
    obj = pa("foo", "bad", STRICT)
    obj["spec"] = fields
    return obj


BIG = {f"k{i}": "v" for i in range(peerauth.MAX_MATCH_LABELS + 1)}
REFUSALS = [
    (spec(mtls={"mode": "STRICT"}, portLevelMtls={"8080": {"mode": "DISABLE"}}), "spec.portLevelMtls", "selector"),
    (spec(selector={"matchLabels": {}}, portLevelMtls={"80": {"mode": "DISABLE"}}), "spec.portLevelMtls", "selector"),
    (spec(selector={"matchLabels": FINANCE}, portLevelMtls={}), "spec.portLevelMtls", "at least one"),
    (spec(selector={"matchLabels": FINANCE}, portLevelMtls={"0": {}}), "spec.portLevelMtls['0']", "1..65535"),
    (spec(selector={"matchLabels": FINANCE}, portLevelMtls={"65536": {}}), "spec.portLevelMtls['65536']", "1..65535"),
    (spec(selector={"matchLabels": FINANCE}, portLevelMtls={"http": {}}), "spec.portLevelMtls['http']", "whole"),
    (spec(selector={"matchLabels": FINANCE}, portLevelMtls={"８０": {}}), "spec.portLevelMtls['８０']", "ASCII"),
    (spec(selector={"matchLabels": FINANCE}, portLevelMtls={"-80": {}}), "spec.portLevelMtls['-80']", "whole"),
    (spec(selector={"matchLabels": FINANCE}, portLevelMtls={"80": {"mode": "strict"}}),
     "spec.portLevelMtls['80'].mode", "STRICT"),
    (spec(selector={"matchLabels": FINANCE}, portLevelMtls={"80": "STRICT"}), "spec.portLevelMtls['80']", "object"),
    (spec(selector={"matchLabels": FINANCE}, portLevelMtls={"80": {"mode": "STRICT", "x": 1}}),
     "spec.portLevelMtls['80'].x", "unknown"),
    (spec(selector={"matchLabels": FINANCE}, portLevelMtls={"80": {}, "080": {}}), "spec.portLevelMtls['080']",
     "twice"),
    (spec(mtls={"mode": "MUTUAL"}), "spec.mtls.mode", "UNSET, DISABLE, PERMISSIVE, STRICT"),
    (spec(mtls={"mode": 3}), "spec.mtls.mode", "got 3"),
    (spec(mtls={"mode": ""}), "spec.mtls.mode", "want one of"),
    (spec(mtls="STRICT"), "spec.mtls", "object"),
    (spec(mtls={"mode": STRICT, "minProtocolVersion": "TLSV1_3"}), "spec.mtls.minProtocolVersion", "unknown"),
    (spec(selector={"matchLabels": {"": "x"}}), "spec.selector.matchLabels['']", "non-empty"),
    (spec(selector={"matchLabels": {"app": "*"}}), "spec.selector.matchLabels['app']", "wildcard"),
    (spec(selector={"matchLabels": {"ap*": "x"}}), "spec.selector.matchLabels['ap*']", "wildcard"),
    (spec(selector={"matchLabels": {"app": 1}}), "spec.selector.matchLabels['app']", "string"),
    (spec(selector={"matchLabels": {"app": "x" * 64}}), "spec.selector.matchLabels['app']", "63"),
    (spec(selector={"matchLabels": {"k" * 318: "x"}}), "spec.selector.matchLabels[", "317"),
    (spec(selector={"matchLabels": BIG}), "spec.selector.matchLabels", "4096"),
    (spec(selector={"matchExpressions": []}), "spec.selector.matchExpressions", "unknown"),
    (spec(selector=["app"]), "spec.selector", "object"),
    (spec(targetRef={"kind": "Service", "name": "x"}), "spec.targetRef", "unknown"),
    (pa("foo", "bad", version="v1alpha1"), "apiVersion", "v1beta1"),
    (pa("foo", "bad") | {"kind": "AuthorizationPolicy"}, "kind", "PeerAuthentication"),
    (pa("foo", "bad") | {"spec": "STRICT"}, "spec", "object"),
    (pa("foo", "bad", created="yesterday"), "metadata.creationTimestamp", "RFC 3339"),
    (pa("foo", "bad", created="2024-02-30T00:00:00Z"), "metadata.creationTimestamp", "not a valid time"),
    (pa("foo", "bad", created="0001-01-01T00:00:00+01:00"), "metadata.creationTimestamp", "not a valid time"),
]


@pytest.mark.parametrize(("obj", "field", "reason"), REFUSALS)
def test_each_refusal_is_one_message_naming_the_object_and_field(obj: dict[str, Any], field: str, reason: str) -> None:
    policies, problems = compile([obj, pa("foo", "good", DISABLE, created=T1)])
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"PeerAuthentication foo/bad: {field}"), problems[0]
    assert reason in problems[0] and problems[0].endswith("the policy is ignored")
    assert mode_for(policies, "foo", FINANCE, 80) == DISABLE  # the bad one (older, STRICT) applies nowhere


def test_an_invalid_workload_policy_is_not_half_applied() -> None:
    # a valid mode and selector, a bad port: neither the mode nor the good port may apply
    bad = pa("foo", "w", DISABLE, FINANCE)
    bad["spec"]["portLevelMtls"] = {"8080": {"mode": "STRICT"}, "0": {"mode": "STRICT"}}
    policies, problems = compile([pa("foo", "n", PERMISSIVE), bad])
    assert len(problems) == 1
    assert [mode_for(policies, "foo", FINANCE, p) for p in (80, 8080)] == [PERMISSIVE, PERMISSIVE]


@pytest.mark.parametrize(("metadata", "shown"), [
    ({"name": "x"}, "?/x"),
    ({"namespace": "foo"}, "foo/?"),
    ({"namespace": "foo", "name": ""}, "foo/?"),
    ({"namespace": "foo", "name": "a/b"}, "foo/?"),
    ({"namespace": "foo", "name": "n" * 254}, "foo/?"),
    ({"namespace": "foo", "name": "x\n"}, "foo/?"),
])
def test_bad_metadata_is_refused(metadata: dict[str, Any], shown: str) -> None:
    obj = pa("foo", "x", STRICT) | {"metadata": metadata}
    policies, problems = compile([obj])
    assert len(problems) == 1 and problems[0].startswith(f"PeerAuthentication {shown}: metadata.")
    assert mode_for(policies, "foo", {}, 80) == PERMISSIVE


def test_non_objects_are_refused() -> None:
    policies, problems = compile(["STRICT", None, 3, pa("foo", "n", STRICT) | {"metadata": "x"}])
    assert len(problems) == 4 and all(p.startswith("PeerAuthentication ?: ") for p in problems)
    assert mode_for(policies, "foo", {}, 80) == PERMISSIVE


def test_a_huge_value_is_cut_short_in_the_message() -> None:
    _, problems = compile([spec(mtls={"mode": "S" * 100_000})])
    assert len(problems) == 1 and len(problems[0]) < 300


def test_yaml_int_port_keys_are_accepted_and_bools_are_not() -> None:
    ok = pa("foo", "w", STRICT, FINANCE)
    ok["spec"]["portLevelMtls"] = {8080: {"mode": DISABLE}}
    assert mode_for(clean([ok]), "foo", FINANCE, 8080) == DISABLE
    bad = pa("foo", "w", STRICT, FINANCE)
    bad["spec"]["portLevelMtls"] = {True: {"mode": DISABLE}}
    assert len(compile([bad])[1]) == 1


def test_a_missing_timestamp_sorts_oldest() -> None:
    undated = pa("foo", "zz", DISABLE)
    del undated["metadata"]["creationTimestamp"]
    policies, problems = compile([pa("foo", "aa", STRICT), undated])
    assert mode_for(policies, "foo", {}, 80) == DISABLE and len(problems) == 1 and "foo/aa" in problems[0]


def test_many_workload_policies_resolve_by_label_index() -> None:
    objects = [pa("foo", f"w{i:05}", STRICT, {"app": f"a{i}"}) for i in range(5000)]
    objects.append(pa("foo", "zz", DISABLE, {"app": "a4999", "tier": "db"}, created="2023-01-01T00:00:00Z"))
    policies = clean(objects)
    assert mode_for(policies, "foo", {"app": "a4999", "tier": "db"}, 80) == DISABLE
    assert mode_for(policies, "foo", {"app": "a4999"}, 80) == STRICT
    assert mode_for(policies, "foo", {"app": "nope"}, 80) == PERMISSIVE


def refused(namespace: str, name: str, raw_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stub the watch keeps of a PeerAuthentication over a bound (kinds.refused_form): here, 1025 labels."""
    raw = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
           "metadata": {"namespace": namespace, "name": name, "labels": {f"l{i}": "v" for i in range(1025)}},
           "spec": raw_spec or {"mtls": {"mode": "STRICT"}}}
    with pytest.raises(kinds.Refused) as error:
        kinds.keep("PeerAuthentication", raw)
    stub = kinds.refused_form("PeerAuthentication", raw, error.value)
    assert stub is not None
    return stub


def test_a_refused_workload_policy_makes_its_whole_namespace_strict() -> None:
    """Its selector is unknown, so every workload and port of its namespace is STRICT, over any other policy there
    (a newer PERMISSIVE workload policy or a DISABLE port it would have won against included)."""
    objects = [refused("prod", "web", {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}}),
               pa("prod", "ns", PERMISSIVE, created=T0),
               pa("prod", "loose", PERMISSIVE, selector={"app": "web"}, ports={8080: DISABLE}, created=T1)]
    policies, problems = compile(objects, "istio-system")
    assert len(problems) == 1 and "prod/web" in problems[0] and "STRICT" in problems[0], problems
    for labels in ({"app": "web"}, {"app": "db"}, {}):
        assert mode_for(policies, "prod", labels, 8080) == STRICT
        assert mode_for(policies, "prod", labels, 0) == STRICT
    assert resolve(policies, "prod", {"app": "web"}).source == "prod/web"
    assert service_mode(policies, "prod") == STRICT and service_mode(policies, "dev") == PERMISSIVE


def test_a_refused_policy_in_the_root_namespace_makes_the_mesh_default_strict() -> None:
    """Mesh-wide (the only scope a root-namespace policy has): it beats an older mesh-wide policy, and namespace and
    workload policies still override it, as they would have overridden the policy itself."""
    objects = [pa("istio-system", "old", PERMISSIVE, created=T0), refused("istio-system", "mesh"),
               pa("dev", "ns", DISABLE, created=T1)]
    policies, problems = compile(objects, "istio-system")
    assert len(problems) == 1 and "istio-system/mesh" in problems[0] and "mesh-wide" in problems[0], problems
    assert mode_for(policies, "prod", {}, 80) == STRICT and service_mode(policies, "prod") == STRICT
    assert mode_for(policies, "dev", {}, 80) == DISABLE


def test_a_refused_policy_without_a_namespace_is_reported_and_not_placed() -> None:
    stub = refused("prod", "x")
    stub["metadata"]["namespace"] = None
    policies, problems = compile([stub], "istio-system")
    assert len(problems) == 1 and "metadata.namespace" in problems[0], problems
    assert mode_for(policies, "prod", {}, 80) == PERMISSIVE
