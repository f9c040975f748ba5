"""Route matching against a brute-force model, backend choice, header modifiers and per-route counters."""

from __future__ import annotations

import random
from collections import Counter
from urllib.parse import parse_qsl

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.traffic.faults import FaultDecision, MirrorDecision, MirrorSkip
from tether.core.traffic.retry import RetryDecision, RetryReason
from tether.core.traffic.routes import (
    UNMATCHED_DEFAULT,
    UNMATCHED_NOT_FOUND,
    BackendRef,
    GrpcRouteMatch,
    HeaderModifier,
    HttpRouteMatch,
    PathMatch,
    PathMatchKind,
    Route,
    RouteKind,
    RouteRule,
    RouteStats,
    RouteTable,
    ValueMatch,
    apply_header_modifier,
    choose_backend,
    split_target,
)
from tether.core.traffic.timeouts import TimeoutKind

# ------------------------------------------------------------------ the brute-force model

KIND_RANK = {PathMatchKind.EXACT: 3, PathMatchKind.REGEX: 2, PathMatchKind.PREFIX: 1}


def model_host_score(hostnames: tuple[str, ...], authority: str) -> tuple[int, int] | None:
    host = authority.rsplit(":", 1)[0].lower() if authority.count(":") == 1 else authority.lower()
    if not hostnames:
        return (0, 0)
    scores = []
    for name in hostnames:
        if name.startswith("*."):
            labels, suffix = host.split("."), name[2:].split(".")
            if len(labels) > len(suffix) and labels[-len(suffix) :] == suffix:
                scores.append((0, len(name)))
        elif name == host:
            scores.append((len(name), len(name)))
    return max(scores) if scores else None


def model_path(match: PathMatch, path: str) -> tuple[int, int] | None:
    if match.kind is PathMatchKind.EXACT:
        return (3, 0) if path == match.value else None
    if match.kind is PathMatchKind.REGEX:
        return (2, 0) if match.pattern.fullmatch(path) else None
    wanted = [segment for segment in match.value.split("/") if segment]
    have = path.split("/")[1:]
    return (1, len("/" + "/".join(wanted)) if wanted else 0) if have[: len(wanted)] == wanted else None


def model_http(match: HttpRouteMatch, method: str, path: str, query: str, headers) -> tuple | None:
    if match.method is not None and match.method != method:
        return None
    path_key = model_path(match.path, path)
    if path_key is None:
        return None
    for wanted in match.headers:
        if not any(name.lower() == wanted.name and wanted.accepts(value) for name, value in headers):
            return None
    first = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        first.setdefault(name, value)
    if not all(q.name in first and q.accepts(first[q.name]) for q in match.query_params):
        return None
    return (*path_key, int(match.method is not None), len(match.headers), len(match.query_params))


def model_grpc(match: GrpcRouteMatch, path: str, headers) -> tuple | None:
    parts = path.split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
        return None
    if match.service not in (None, parts[1]) or match.method not in (None, parts[2]):
        return None
    for wanted in match.headers:
        if not any(name.lower() == wanted.name and wanted.accepts(value) for name, value in headers):
            return None
    return (len(match.service or ""), len(match.method or ""), len(match.headers))


def brute_force(routes: list[Route], method: str, authority: str, path: str, query: str, headers):
    """Every (route, rule, match) that matches, sorted by the explicit precedence key; the first wins."""
    grpc_request = any(n.lower() == "content-type" and v.startswith("application/grpc") for n, v in headers)
    hosts = {i: model_host_score(route.hostnames, authority) for i, route in enumerate(routes)}
    use_grpc = grpc_request and any(
        r.kind is RouteKind.GRPC and hosts[i] is not None and model_grpc(GrpcRouteMatch(), path, headers) is not None
        for i, r in enumerate(routes)
    )
    found = []
    for i, route in enumerate(routes):
        if hosts[i] is None or (route.kind is RouteKind.GRPC) != use_grpc:
            continue
        for j, rule in enumerate(route.rules):
            default = GrpcRouteMatch() if route.kind is RouteKind.GRPC else HttpRouteMatch()
            for k, match in enumerate(rule.matches or (default,)):
                score = (
                    model_grpc(match, path, headers)
                    if route.kind is RouteKind.GRPC
                    else model_http(match, method, path, query, headers)
                )
                if score is not None:
                    found.append(((*hosts[i], *score, -i, -j, -k), (i, j, k)))
    found.sort(reverse=True)
    return found[0][1] if found else None


# ------------------------------------------------------------------ strategies

PATHS = [
    PathMatch(PathMatchKind.EXACT, "/a"),
    PathMatch(PathMatchKind.EXACT, "/a/b"),
    PathMatch(PathMatchKind.PREFIX, "/"),
    PathMatch(PathMatchKind.PREFIX, "/a"),
    PathMatch(PathMatchKind.PREFIX, "/a/"),
    PathMatch(PathMatchKind.PREFIX, "/a/b"),
    PathMatch(PathMatchKind.REGEX, "/a/.*"),
    PathMatch(PathMatchKind.REGEX, "/[ab]+"),
]
HEADER_MATCHES = [ValueMatch("x-v", "1"), ValueMatch("x-canary", "yes"), ValueMatch("x-v", "[0-9]", regex=True)]
QUERY_MATCHES = [ValueMatch("q", "1"), ValueMatch("debug", ""), ValueMatch("q", "[12]", regex=True)]
HOSTNAMES = [(), ("web.shop",), ("*.shop",), ("api.shop", "*.shop"), ("other.example",)]


def unique_by_name(matches: list[ValueMatch]) -> tuple[ValueMatch, ...]:
    seen: dict[str, ValueMatch] = {}
    for match in matches:
        seen.setdefault(match.name, match)  # the loader keeps the first entry per name, as the spec says
    return tuple(seen.values())


http_matches = st.builds(
    HttpRouteMatch,
    path=st.sampled_from(PATHS),
    headers=st.lists(st.sampled_from(HEADER_MATCHES), max_size=2).map(unique_by_name),
    query_params=st.lists(st.sampled_from(QUERY_MATCHES), max_size=2).map(unique_by_name),
    method=st.sampled_from([None, "GET", "POST"]),
)
grpc_matches = st.builds(
    GrpcRouteMatch,
    service=st.sampled_from([None, "shop.Cart", "shop.v1.Cart"]),
    method=st.sampled_from([None, "Add", "Get"]),
    headers=st.lists(st.sampled_from(HEADER_MATCHES), max_size=2).map(unique_by_name),
)


def routes_of(kind: RouteKind, matches: st.SearchStrategy) -> st.SearchStrategy[Route]:
    rules = st.lists(st.builds(RouteRule, matches=st.lists(matches, max_size=3).map(tuple)), min_size=1, max_size=3)
    return st.builds(
        Route,
        kind=st.just(kind),
        name=st.sampled_from(["a", "b", "c"]),
        hostnames=st.sampled_from(HOSTNAMES),
        rules=rules.map(tuple),
    )


request_headers = st.lists(
    st.sampled_from([("x-v", "1"), ("X-V", "2"), ("x-canary", "yes"), ("x-canary", "no"), ("other", "1")]),
    max_size=3,
)
authorities = st.sampled_from(["web.shop", "web.shop:80", "WEB.SHOP", "api.shop", "a.b.shop", "shop", "other"])


@given(
    routes=st.lists(routes_of(RouteKind.HTTP, http_matches), min_size=1, max_size=4),
    method=st.sampled_from(["GET", "POST", "get"]),
    authority=authorities,
    path=st.sampled_from(["/", "/a", "/a/", "/a/b", "/ab", "/a/b/c", "/b", "/aa"]),
    query=st.sampled_from(["", "q=1", "q=2&q=1", "debug=", "q=1&debug=", "q=%31"]),
    headers=request_headers,
)
@settings(max_examples=150, deadline=None)
def test_http_route_precedence_matches_brute_force(routes, method, authority, path, query, headers) -> None:
    found = RouteTable(routes).match(method, authority, path, query, headers)
    expected = brute_force(routes, method.upper(), authority, path, query, headers)
    assert position(routes, found) == expected


def position(routes: list[Route], found) -> tuple[int, int, int] | None:
    if found is None:
        return None
    route_index = next(i for i, route in enumerate(routes) if route is found.route)
    return (route_index, found.rule_index, found.match_index)


@given(
    grpc_routes=st.lists(routes_of(RouteKind.GRPC, grpc_matches), max_size=3),
    http_routes=st.lists(routes_of(RouteKind.HTTP, http_matches), max_size=2),
    authority=authorities,
    path=st.sampled_from(["/shop.Cart/Add", "/shop.v1.Cart/Get", "/shop.Cart/Get", "/a/b", "/shop.Cart"]),
    grpc=st.booleans(),
    headers=request_headers,
)
@settings(max_examples=100, deadline=None)
def test_grpc_route_precedence_matches_brute_force(grpc_routes, http_routes, authority, path, grpc, headers) -> None:
    routes = [*grpc_routes, *http_routes]
    headers = [*headers, ("content-type", "application/grpc+proto" if grpc else "text/plain")]
    found = RouteTable(routes).match("POST", authority, path, "", headers)
    expected = brute_force(routes, "POST", authority, path, "", headers)
    assert position(routes, found) == expected


# ------------------------------------------------------------------ named cases


def http_route(name: str, *matches: HttpRouteMatch, hostnames: tuple[str, ...] = ()) -> Route:
    rules = tuple(RouteRule(name=f"{name}-{i}", matches=(match,)) for i, match in enumerate(matches))
    return Route(kind=RouteKind.HTTP, name=name, hostnames=hostnames, rules=rules)


def rule_name(table: RouteTable, path: str, method: str = "GET", headers=(), query: str = "") -> str | None:
    found = table.match(method, "web.shop", path, query, list(headers))
    return None if found is None else found.rule.name


def test_exact_beats_regex_beats_the_longest_prefix() -> None:
    table = RouteTable(
        [
            http_route(
                "r",
                HttpRouteMatch(path=PathMatch(PathMatchKind.PREFIX, "/")),
                HttpRouteMatch(path=PathMatch(PathMatchKind.PREFIX, "/books")),
                HttpRouteMatch(path=PathMatch(PathMatchKind.REGEX, r"/books/\d+")),
                HttpRouteMatch(path=PathMatch(PathMatchKind.EXACT, "/books/42")),
            )
        ]
    )
    assert rule_name(table, "/books/42") == "r-3"
    assert rule_name(table, "/books/7") == "r-2"
    assert rule_name(table, "/books/new") == "r-1"
    assert rule_name(table, "/booksellers") == "r-0"  # a prefix matches whole segments only


def test_method_then_headers_then_query_break_ties() -> None:
    prefix = PathMatch(PathMatchKind.PREFIX, "/")
    table = RouteTable(
        [
            http_route(
                "r",
                HttpRouteMatch(path=prefix, query_params=(ValueMatch("a", "1"), ValueMatch("b", "2"))),
                HttpRouteMatch(path=prefix, headers=(ValueMatch("x-canary", "yes"),)),
                HttpRouteMatch(path=prefix, method="GET"),
            )
        ]
    )
    canary = [("X-Canary", "yes")]
    assert rule_name(table, "/", "GET", canary, "a=1&b=2") == "r-2"
    assert rule_name(table, "/", "POST", canary, "a=1&b=2") == "r-1"
    assert rule_name(table, "/", "POST", (), "a=1&b=2") == "r-0"
    assert rule_name(table, "/", "POST", (), "a=1") is None


def test_exact_hostname_beats_wildcard_beats_none() -> None:
    match = HttpRouteMatch()
    table = RouteTable(
        [
            http_route("any", match),
            http_route("wild", match, hostnames=("*.shop",)),
            http_route("exact", match, hostnames=("web.shop",)),
        ]
    )
    assert table.match("GET", "web.shop:8080", "/", "", []).route.name == "exact"
    assert table.match("GET", "api.shop", "/", "", []).route.name == "wild"
    assert table.match("GET", "shop", "/", "", []).route.name == "any"  # *.shop does not match shop itself


def test_grpc_requests_use_grpc_routes_and_others_do_not() -> None:
    grpc = Route(
        kind=RouteKind.GRPC,
        name="cart",
        rules=(RouteRule(name="add", matches=(GrpcRouteMatch(service="shop.Cart", method="Add"),)),),
    )
    http = http_route("web", HttpRouteMatch())
    table = RouteTable([grpc, http])
    grpc_headers = [("content-type", "application/grpc")]
    assert table.match("POST", "cart", "/shop.Cart/Add", "", grpc_headers).route.name == "cart"
    assert table.match("POST", "cart", "/shop.Cart/Get", "", grpc_headers) is None  # never merged with HTTP
    assert table.match("POST", "cart", "/shop.Cart/Add", "", []).route.name == "web"


def test_first_match_table_takes_profile_routes_in_order() -> None:
    def profile(name: str, regex: str) -> Route:
        matches = (HttpRouteMatch(path=PathMatch(PathMatchKind.REGEX, regex)),)
        return Route(kind=RouteKind.PROFILE, name=name, rules=(RouteRule(name=name, matches=matches),))

    table = RouteTable([profile("all", "/.*"), profile("books", r"/books/\d+")], first_match=True)
    assert table.match("GET", "web", "/books/1", "", []).route.name == "all"
    assert table.unmatched == UNMATCHED_DEFAULT
    assert RouteTable([]).unmatched == UNMATCHED_DEFAULT
    assert RouteTable([http_route("r", HttpRouteMatch())]).unmatched == UNMATCHED_NOT_FOUND


def test_split_target() -> None:
    assert split_target("/a/b?x=1&y") == ("/a/b", "x=1&y")
    assert split_target("/") == ("/", "")


# ------------------------------------------------------------------ backends, headers, counters


@given(
    weights=st.lists(st.integers(0, 20), min_size=1, max_size=5),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=100, deadline=None)
def test_choose_backend_follows_weights(weights: list[int], seed: int) -> None:
    backends = [BackendRef(name=f"b{i}", weight=w) for i, w in enumerate(weights)]
    rng = random.Random(seed)
    picks = Counter(choose_backend(backends, rng) for _ in range(400))
    if sum(weights) == 0:
        assert picks == Counter({None: 400})
        return
    for backend in backends:
        share = backend.weight / sum(weights)
        assert (picks[backend] == 0) == (backend.weight == 0)
        assert abs(picks[backend] / 400 - share) < 0.15  # loose: 400 draws, 6 standard deviations at worst
    first, second = random.Random(seed), random.Random(seed)
    assert [choose_backend(backends, first) for _ in range(10)] == [choose_backend(backends, second) for _ in range(10)]


def test_choose_backend_draws_nothing_without_a_choice() -> None:
    rng = random.Random(3)
    state = rng.getstate()
    only = BackendRef(name="only", weight=5)
    assert choose_backend([only, BackendRef(name="off", weight=0)], rng) is only
    assert choose_backend([], rng) is None
    assert rng.getstate() == state


def test_header_modifier_sets_adds_and_removes_case_insensitively() -> None:
    modifier = HeaderModifier(set=(("x-env", "canary"),), add=(("x-trace", "b"),), remove=("x-drop",))
    headers = [("X-Env", "prod"), ("x-trace", "a"), ("X-Drop", "1"), ("keep", "k")]
    assert apply_header_modifier(modifier, headers) == [
        ("x-trace", "a"),
        ("keep", "k"),
        ("x-env", "canary"),
        ("x-trace", "b"),
    ]


def test_route_counters_record_decisions() -> None:
    stats = RouteStats()
    key = RouteTable([http_route("r", HttpRouteMatch())]).match("GET", "web", "/", "", []).key
    assert (key.kind, key.namespace, key.name, key.rule) == ("HTTPRoute", "default", "r", "r-0")
    counters = stats.for_rule(key)
    counters.record_retry(RetryDecision(25_000_000, RetryReason.RETRY))
    counters.record_retry(RetryDecision(None, RetryReason.BUDGET_EXHAUSTED))
    counters.record_retry(RetryDecision(None, RetryReason.LIMIT_REACHED))
    counters.record_retry(RetryDecision(None, RetryReason.NOT_RETRYABLE))
    counters.record_fault(FaultDecision(delay_ns=5, abort=None))
    counters.record_mirror(MirrorDecision(ticket=None, skipped=MirrorSkip.AT_CAPACITY))
    counters.record_timeout(TimeoutKind.IDLE)
    assert stats.items() == [(key, counters)]
    assert (counters.retries, counters.retry_budget_exhausted, counters.retry_limit_reached) == (1, 1, 1)
    assert (counters.fault_delays, counters.fault_aborts, counters.mirror_skipped) == (1, 0, 1)
    assert counters.timeouts == {"request": 0, "response": 0, "idle": 1}


@given(
    routes=st.lists(
        st.one_of(routes_of(RouteKind.HTTP, http_matches), routes_of(RouteKind.GRPC, grpc_matches)), max_size=3
    ),
    method=st.text(max_size=8),
    authority=st.text(max_size=20),
    path=st.text(max_size=20),
    query=st.text(max_size=20),
    headers=st.lists(st.tuples(st.sampled_from(["content-type", "x-v", "X-Canary"]), st.text(max_size=20)), max_size=3),
)
@settings(max_examples=150, deadline=None)
def test_any_request_head_matches_or_not_without_raising(routes, method, authority, path, query, headers) -> None:
    found = RouteTable(routes).match(method, authority, path, query, headers)
    assert found is None or found.rule in found.route.rules
