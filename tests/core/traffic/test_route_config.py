"""Loading HTTPRoute, GRPCRoute, ServiceProfile and rate limit YAML: realistic files, and hostile ones."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.config_file import ConfigFileError
from tether.core.traffic.budget import RetryBudgetConfig
from tether.core.traffic.ratelimit import LocalRateLimitConfig, RateLimit
from tether.core.traffic.retry import SERVER_ERRORS, Backoff, RetryConditions, RetryPolicy, StatusRange
from tether.core.traffic.route_config import RouteConfig, load_route_yaml, read_route_documents
from tether.core.traffic.routes import (
    UNMATCHED_DEFAULT,
    UNMATCHED_NOT_FOUND,
    BackendRef,
    FaultAbort,
    FaultDelay,
    HeaderModifier,
    MirrorPolicy,
    PathMatchKind,
    RouteKind,
    choose_backend,
)
from tether.core.traffic.timeouts import GrpcCode, RouteTimeouts

DATA = Path(__file__).parent / "data"
MS = 1_000_000
S = 1_000_000_000


def load(name: str) -> RouteConfig:
    return load_route_yaml((DATA / name).read_text(), name)


def test_httproute_canary_file() -> None:
    config = load("httproute-canary.yaml")
    books, writes = config.routes
    assert (books.kind, books.namespace, books.parents[0].port) == (RouteKind.HTTP, "shop", 8080)
    testers, split, search = books.rules
    assert testers.matches[0].headers[0].name == "x-canary"
    assert split.request_headers == HeaderModifier(set=(("x-route", "split"),), remove=("x-debug",))
    assert split.response_headers == HeaderModifier(add=(("x-served-by", "books"),))
    assert split.mirrors == (MirrorPolicy(backend=BackendRef(name="books-shadow", port=8080), ratio=0.1),)
    assert [b.weight for b in split.backends] == [90, 10]
    # The annotations override the rule fields and apply to every rule of the route.
    assert split.timeouts == RouteTimeouts(request_ns=5 * S, response_ns=1 * S, idle_ns=30 * S)
    assert split.retry == RetryPolicy(limit=2, conditions=RetryConditions(http=(SERVER_ERRORS, StatusRange(429, 429))))
    assert all(rule.allow_l5d_request_headers for rule in books.rules)
    assert search.matches[0].query_params[0].regex
    assert writes.rules[0].retry == RetryPolicy(
        limit=3,
        conditions=RetryConditions(http=(StatusRange(503, 503),)),
        backoff=Backoff(min_ns=50 * MS, max_ns=500 * MS),
    )


def test_httproute_canary_routes_requests() -> None:
    table = load("httproute-canary.yaml").table_for("books", "shop", 8080)
    assert table.unmatched == UNMATCHED_NOT_FOUND

    def rule(method: str, path: str, query: str = "", headers=()) -> str | None:
        found = table.match(method, "books.shop.svc.cluster.local:8080", path, query, list(headers))
        return None if found is None else f"{found.route.name}/{found.rule.name}"

    assert rule("GET", "/books/1", headers=[("x-canary", "yes")]) == "books/testers"  # headers beat no headers
    assert rule("GET", "/books/1") == "books/split"
    assert rule("POST", "/books") == "books-writes/None"  # a method match beats an equal prefix without one
    assert rule("GET", "/authors/12") == "books/split"
    assert rule("GET", "/search", "q=dune") == "books/search"
    assert rule("GET", "/search") is None
    assert rule("GET", "/") is None
    split = table.match("GET", "books", "/books", "", []).rule
    picks = [choose_backend(split.backends, random.Random(seed)).name for seed in range(200)]
    assert 150 <= picks.count("books-v1") <= 195


def test_table_for_other_services_and_ports() -> None:
    config = load("httproute-canary.yaml")
    assert config.table_for("books", "shop", 9999).routes == ()
    assert config.table_for("books", "other").unmatched == UNMATCHED_DEFAULT
    assert len(config.table_for("books", "shop").routes) == 2  # no port given: any port


def test_grpcroute_file() -> None:
    config = load("grpcroute.yaml")
    (cart,) = config.routes
    policy = RetryPolicy(
        limit=3,
        conditions=RetryConditions(grpc=frozenset({GrpcCode.UNAVAILABLE, GrpcCode.RESOURCE_EXHAUSTED})),
        attempt_timeout_ns=300 * MS,
    )
    assert all(rule.retry == policy and rule.timeouts.request_ns == 2 * S for rule in cart.rules)
    table = config.table_for("cart", "shop", 9090)
    grpc = [("content-type", "application/grpc")]
    assert table.match("POST", "cart", "/shop.v1.Cart/AddItem", "", grpc).rule_index == 0
    assert table.match("POST", "cart", "/shop.v1.Cart/List", "", [*grpc, ("x-tenant", "team-a")]).rule_index == 1
    assert table.match("POST", "cart", "/shop.v1.Cart/List", "", grpc) is None
    assert table.match("POST", "cart", "/grpc.health.v1.Health/Check", "", grpc).rule.backends == ()


def test_serviceprofile_file() -> None:
    config = load("serviceprofile.yaml")
    (profile,) = config.profiles
    assert (profile.service.name, profile.service.namespace) == ("books", "shop")
    assert config.budget_for("books", "shop") == RetryBudgetConfig(retry_ratio=0.2, min_retries_per_s=10, ttl_ns=10 * S)
    get, post, head = profile.routes
    assert get.rules[0].retry == RetryPolicy() and get.rules[0].timeouts.request_ns == 300 * MS
    assert post.rules[0].retry is None  # responseClasses alone classify; isRetryable enables retries
    assert post.rules[0].matches[0].method == "POST"
    assert post.rules[0].matches[0].path.kind is PathMatchKind.REGEX
    assert [m.method for m in head.rules[0].matches] == ["HEAD", "OPTIONS"]
    assert get.rules[0].backends == (
        BackendRef(name="books-v1", namespace="shop", port=7000, weight=900),
        BackendRef(name="books-v2", namespace="shop", port=7000, weight=100),
    )
    table = config.table_for("books", "shop")
    assert table.first_match and table.unmatched == UNMATCHED_DEFAULT
    assert table.match("GET", "books", "/books/7", "", []).route.name == "GET /books/{id}"
    assert table.match("GET", "books", "/books/7/reviews", "", []) is None  # pathRegex matches the whole path


def test_serviceprofile_retryable_route_uses_its_failure_classes() -> None:
    text = (
        (DATA / "serviceprofile.yaml")
        .read_text()
        .replace("      responseClasses:", "      isRetryable: true\n      responseClasses:")
    )
    post = load_route_yaml(text, "p.yaml").profiles[0].routes[1]
    assert post.rules[0].retry == RetryPolicy(conditions=RetryConditions(http=(StatusRange(500, 504),)))


def test_faults_and_rate_limits_file() -> None:
    config = load("faults-and-limits.yaml")
    (chaos,) = config.routes
    assert chaos.hostnames == ("ratings.shop.example", "*.ratings.example")
    fault = chaos.rules[0].fault
    assert fault.abort == FaultAbort(http_status=503, grpc_status=GrpcCode.UNAVAILABLE, ratio=0.1)
    assert fault.delay == FaultDelay(duration_ns=200 * MS, ratio=0.25)
    ((namespace, server, limits),) = config.rate_limits
    assert (namespace, server) == ("shop", "ratings-http")
    assert limits == LocalRateLimitConfig(
        total=RateLimit(requests_per_s=100),
        identity=RateLimit(requests_per_s=20),
        overrides=((("reviews.shop.serviceaccount.identity.linkerd.cluster.local",), RateLimit(requests_per_s=50)),),
    )


def test_a_route_without_rules_matches_everything() -> None:
    config = load_route_yaml("kind: HTTPRoute\napiVersion: gateway.networking.k8s.io/v1\nmetadata: {name: all}\n", "x")
    assert config.table_for("any").match("DELETE", "x", "/deep/path", "", []).route.name == "all"


# ------------------------------------------------------------------ hostile files

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: ns}
spec:
  rules:
    - matches: [{path: {type: PathPrefix, value: /}}]
    - matches: [{path: {type: PathPrefix, value: /}}]
    - matches:
        - path: {type: PathPrefix, value: /ok}
"""


def route_with(rule_yaml: str) -> str:
    """ROUTE with its third rule replaced (rule_yaml is indented under '    - ')."""
    head = ROUTE[: ROUTE.index("    - matches:\n        - path")]
    return head + "    - " + rule_yaml.strip().replace("\n", "\n      ") + "\n"


HOSTILE = [
    (route_with("matches: [{path: {type: Prefix, value: /}}]"), "spec.rules[2].matches[0].path.type", "use one of"),
    (route_with("matches: [{path: {value: relative}}]"), "spec.rules[2].matches[0].path.value", "start with '/'"),
    (
        route_with("matches: [{path: {type: RegularExpression, value: '(['}}]"),
        "spec.rules[2].matches[0].path.value",
        "regular expression",
    ),
    (
        route_with("matches: [{path: {type: Exact, value: " + "/a" * 600 + "}}]"),
        "spec.rules[2].matches[0].path.value",
        "at most 1024",
    ),
    (route_with("matches: [{method: FETCH}]"), "spec.rules[2].matches[0].method", "use one of GET"),
    (
        route_with("matches: [{headers: [{name: 'bad name', value: x}]}]"),
        "spec.rules[2].matches[0].headers[0].name",
        "header name",
    ),
    (
        route_with("matches: [{headers: [{name: x, value: 'a', type: Glob}]}]"),
        "spec.rules[2].matches[0].headers[0].type",
        "use one of",
    ),
    (
        route_with("matches: [{queryParams: [{name: q, value: '*', type: RegularExpression}]}]"),
        "spec.rules[2].matches[0].queryParams[0].value",
        "regular expression",
    ),
    (route_with("matches: [{pathh: {}}]"), "spec.rules[2].matches[0].pathh", "unknown field"),
    (route_with("backendRefs: [{name: b, weight: -1}]"), "spec.rules[2].backendRefs[0].weight", "0 to 1000000"),
    (route_with("backendRefs: [{name: b, port: 70000}]"), "spec.rules[2].backendRefs[0].port", "1 to 65535"),
    (route_with("backendRefs: [{name: b, kind: Pod}]"), "spec.rules[2].backendRefs[0].kind", "Service"),
    (route_with("backendRefs: [{port: 80}]"), "spec.rules[2].backendRefs[0].name", "non-empty"),
    (route_with("filters: [{type: URLRewrite, urlRewrite: {}}]"), "spec.rules[2].filters[0].type", "not supported"),
    (
        route_with(
            "filters: [{type: RequestHeaderModifier, requestHeaderModifier: {}},"
            " {type: RequestHeaderModifier, requestHeaderModifier: {}}]"
        ),
        "spec.rules[2].filters[1].type",
        "twice",
    ),
    (
        route_with(
            "filters: [{type: RequestHeaderModifier,"
            " requestHeaderModifier: {set: [{name: x, value: '1'}], remove: [X]}}]"
        ),
        "spec.rules[2].filters[0].requestHeaderModifier.remove[0]",
        "one action",
    ),
    (
        route_with(
            "filters: [{type: RequestMirror,"
            " requestMirror: {backendRef: {name: s}, percent: 10, fraction: {numerator: 1}}}]"
        ),
        "spec.rules[2].filters[0].requestMirror.fraction",
        "one of percent",
    ),
    (
        route_with("filters: [{type: RequestMirror, requestMirror: {backendRef: {name: s}, percent: 101}}]"),
        "spec.rules[2].filters[0].requestMirror.percent",
        "0 to 100",
    ),
    (
        route_with("filters: [{type: Fault, fault: {abort: {httpStatus: 503, ratio: .nan}}}]"),
        "spec.rules[2].filters[0].fault.abort.ratio",
        "not a number",
    ),
    (
        route_with("filters: [{type: Fault, fault: {abort: {httpStatus: 99}}}]"),
        "spec.rules[2].filters[0].fault.abort.httpStatus",
        "200 to 599",
    ),
    (
        route_with("filters: [{type: Fault, fault: {abort: {httpStatus: 503, grpcStatus: [1]}}}]"),
        "spec.rules[2].filters[0].fault.abort.grpcStatus",
        "gRPC code",
    ),
    (
        route_with("filters: [{type: Fault, fault: {delay: {duration: 0s}}}]"),
        "spec.rules[2].filters[0].fault.delay.duration",
        "positive",
    ),
    (route_with("filters: [{type: Fault, fault: {}}]"), "spec.rules[2].filters[0].fault.abort", "give abort, delay"),
    (
        route_with("timeouts: {request: 1s, backendRequest: 2s}"),
        "spec.rules[2].timeouts.backendRequest",
        "at most the request",
    ),
    (route_with("timeouts: {request: 10}"), "spec.rules[2].timeouts.request", "quoted duration"),
    (route_with("timeouts: {request: soon}"), "spec.rules[2].timeouts.request", "for example"),
    (route_with("retry: {attempts: 11}"), "spec.rules[2].retry.attempts", "0 to 10"),
    (route_with("retry: {codes: [200]}"), "spec.rules[2].retry.codes", "400-599"),
    (route_with("retry: {backoff: 5s}"), "spec.rules[2].retry.backoff", "1ms to 1s"),
    (route_with("matches: " + str([{"method": "GET"}] * 65)), "spec.rules[2].matches", "at most 64"),
    (ROUTE.replace("spec:\n", "spec:\n  hostnames: [Web.Shop]\n"), "spec.hostnames[0]", "lower-case"),
    (ROUTE.replace("spec:\n", "spec:\n  hostnames: [a.*.shop]\n"), "spec.hostnames[0]", "hostname"),
    (
        ROUTE.replace("spec:\n", "spec:\n  parentRefs: [{name: web, port: 0}]\n"),
        "spec.parentRefs[0].port",
        "1 to 65535",
    ),
    (
        ROUTE.replace("{name: r, namespace: ns}", "{name: r, annotations: {retry.linkerd.io/limit: 3}}"),
        "metadata.annotations.retry.linkerd.io/limit",
        "quote",
    ),
    (
        ROUTE.replace("{name: r, namespace: ns}", "{name: r, annotations: {retry.linkerd.io/limit: '99'}}"),
        "metadata.annotations.retry.linkerd.io/limit",
        "0 to 10",
    ),
    (
        ROUTE.replace("{name: r, namespace: ns}", "{name: r, annotations: {retry.linkerd.io/http: 4xx}}"),
        "metadata.annotations.retry.linkerd.io/http",
        "5xx",
    ),
    (
        ROUTE.replace("{name: r, namespace: ns}", "{name: r, annotations: {retry.linkerd.io/grpc: unavailable}}"),
        "metadata.annotations.retry.linkerd.io/grpc",
        "not valid on a HTTPRoute",
    ),
    (
        ROUTE.replace("{name: r, namespace: ns}", "{name: r, annotations: {retry.linkerd.io/limmit: '1'}}"),
        "metadata.annotations.retry.linkerd.io/limmit",
        "not a retry annotation",
    ),
    (
        ROUTE.replace("{name: r, namespace: ns}", "{name: r, annotations: {timeout.linkerd.io/idle: forever}}"),
        "metadata.annotations.timeout.linkerd.io/idle",
        "for example",
    ),
    (
        ROUTE.replace(
            "{name: r, namespace: ns}", "{name: r, annotations: {tether.io/allow-l5d-request-headers: 'yes'}}"
        ),
        "metadata.annotations.tether.io/allow-l5d-request-headers",
        '"true"',
    ),
    (ROUTE.replace("{name: r, namespace: ns}", "{namespace: ns}"), "metadata.name", "non-empty"),
    (ROUTE.replace("kind: HTTPRoute", "kind: Ingress"), "kind", "use HTTPRoute"),
    (ROUTE.replace("gateway.networking.k8s.io/v1", "linkerd.io/v1alpha2"), "apiVersion", "gateway.networking.k8s.io"),
    (ROUTE.replace("spec:\n", "spec:\n  sessionPersistence: {}\n"), "spec.sessionPersistence", "unknown field"),
    (ROUTE + "extra: 1\n", "extra", "unknown field"),
]


@pytest.mark.parametrize(("text", "field", "fix"), HOSTILE, ids=[f"{i}-{case[1]}" for i, case in enumerate(HOSTILE)])
def test_hostile_route_files_name_the_field_and_the_fix(text: str, field: str, fix: str) -> None:
    with pytest.raises(ConfigFileError) as caught:
        load_route_yaml(text, "routes.yaml")
    assert caught.value.source == "routes.yaml"
    assert caught.value.field == field
    assert fix in str(caught.value)


GRPC_ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec:
  rules:
    - matches: [MATCH]
"""

HOSTILE_GRPC = [
    ("{method: {type: RegularExpression, service: 'a.*'}}", "spec.rules[0].matches[0].method.type", "Exact"),
    ("{method: {service: 'not a service'}}", "spec.rules[0].matches[0].method.service", "package.Service"),
    ("{method: {method: 'Get/Item'}}", "spec.rules[0].matches[0].method.method", "such as Check"),
    ("{method: {}}", "spec.rules[0].matches[0].method.service", "a service, a method or both"),
    ("{path: {value: /}}", "spec.rules[0].matches[0].path", "unknown field"),
]


@pytest.mark.parametrize(("match", "field", "fix"), HOSTILE_GRPC)
def test_hostile_grpc_routes_name_the_field(match: str, field: str, fix: str) -> None:
    with pytest.raises(ConfigFileError) as caught:
        load_route_yaml(GRPC_ROUTE.replace("MATCH", match), "g.yaml")
    assert caught.value.field == field and fix in str(caught.value)


PROFILE = (DATA / "serviceprofile.yaml").read_text()

HOSTILE_PROFILES = [
    (PROFILE.replace("books.shop.svc.cluster.local", "books"), "metadata.name", "SERVICE.NAMESPACE.svc"),
    (
        PROFILE.replace("pathRegex: /books/[^/]*", "pathRegex: /books/[^/"),
        "spec.routes[0].condition.pathRegex",
        "regular expression",
    ),
    (PROFILE.replace("method: GET\n", "method: FETCH\n"), "spec.routes[0].condition.method", "use one of"),
    (
        PROFILE.replace("        method: GET\n        pathRegex: /books/[^/]*\n", "        not: {method: GET}\n"),
        "spec.routes[0].condition.not",
        "not supported",
    ),
    (
        PROFILE.replace("          - pathRegex: /books\n", "          - method: PUT\n"),
        "spec.routes[1].condition.all[1].method",
        "given twice",
    ),
    (
        PROFILE.replace("          - method: HEAD\n", "          - any: [{method: GET}]\n"),
        "spec.routes[2].condition.any[0].any",
        "nested",
    ),
    (
        PROFILE.replace("isRetryable: true\n      timeout", "isRetryable: 'yes'\n      timeout"),
        "spec.routes[0].isRetryable",
        "true or false",
    ),
    (PROFILE.replace("timeout: 300ms", "timeout: 300"), "spec.routes[0].timeout", "duration"),
    (PROFILE.replace("retryRatio: 0.2", "retryRatio: -1"), "spec.retryBudget.retryRatio", "out of range"),
    (PROFILE.replace("retryRatio: 0.2", "retryRatio: .nan"), "spec.retryBudget.retryRatio", "not a number"),
    (PROFILE.replace("ttl: 10s", "ttl: 2m"), "spec.retryBudget.ttl", "1s to 60s"),
    (
        PROFILE.replace("minRetriesPerSecond: 10", "minRetriesPerSecond: 1.5"),
        "spec.retryBudget.minRetriesPerSecond",
        "whole number",
    ),
    (PROFILE.replace("weight: 900m", "weight: lots"), "spec.dstOverrides[0].weight", "500m"),
    (
        PROFILE.replace("status: {min: 500, max: 504}", "status: {min: 500, max: 404}"),
        "spec.routes[1].responseClasses[0].condition.status.max",
        "500 to 599",
    ),
]


@pytest.mark.parametrize(("text", "field", "fix"), HOSTILE_PROFILES, ids=[c[1] for c in HOSTILE_PROFILES])
def test_hostile_service_profiles_name_the_field(text: str, field: str, fix: str) -> None:
    with pytest.raises(ConfigFileError) as caught:
        load_route_yaml(text, "p.yaml")
    assert caught.value.field == field and fix in str(caught.value)


def test_documents_are_named_in_multi_document_files() -> None:
    text = ROUTE + "---\n" + ROUTE.replace("type: PathPrefix, value: /ok", "type: Nope, value: /ok")
    with pytest.raises(ConfigFileError, match=r"^routes.yaml \(document 2\): spec.rules\[2\]"):
        load_route_yaml(text, "routes.yaml")


@pytest.mark.parametrize(
    ("text", "field"),
    ids=["unclosed", "a-list", "deep"],
    argvalues=[
        ("key: [unclosed", "line 1"),
        ("- just\n- a list\n", "document"),
        ("[" * 1000 + "]" * 1000, "file"),
    ],
)
def test_files_that_are_not_kubernetes_objects(text: str, field: str) -> None:
    with pytest.raises(ConfigFileError) as caught:
        load_route_yaml(text, "junk.yaml")
    assert caught.value.field == field


def test_too_many_documents() -> None:
    with pytest.raises(ConfigFileError, match="split it"):
        read_route_documents([{}] * 1001, "big.yaml")


# Any YAML value in any field of a realistic document is either read or refused with a ConfigFileError:
# never an AssertionError, TypeError or KeyError from deeper down.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
DOCUMENTS = [yaml.safe_load_all((DATA / name).read_text()) for name in sorted(p.name for p in DATA.glob("*.yaml"))]
DOCUMENTS = [doc for docs in DOCUMENTS for doc in docs]


def paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out.extend(paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out.extend(paths(value, (*prefix, index)))
    return out


def replaced(node: object, path: tuple, value: object) -> object:
    if not path:
        return value
    if isinstance(node, dict):
        return {k: replaced(v, path[1:], value) if k == path[0] else v for k, v in node.items()}
    return [replaced(v, path[1:], value) if i == path[0] else v for i, v in enumerate(node)]


@given(data=st.data(), value=json_values)
@settings(max_examples=200, deadline=None)
def test_any_value_anywhere_is_read_or_refused_cleanly(data: st.DataObject, value: object) -> None:
    document = data.draw(st.sampled_from(DOCUMENTS))
    path = data.draw(st.sampled_from(paths(document)[1:]))
    with contextlib.suppress(ConfigFileError):
        read_route_documents([replaced(document, path, value)], "fuzz.yaml")


def test_the_documented_example_loads() -> None:
    text = (Path(__file__).parents[3] / "docs" / "traffic.md").read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (route,) = load_route_yaml(example, "docs/traffic.md").routes
    rule = route.rules[0]
    assert rule.fault is not None and rule.mirrors and rule.request_headers is not None
    assert rule.retry.limit == 2 and rule.retry.attempt_timeout_ns == 300 * MS  # annotations win
    assert rule.timeouts == RouteTimeouts(request_ns=5 * S, response_ns=1 * S, idle_ns=30 * S)
