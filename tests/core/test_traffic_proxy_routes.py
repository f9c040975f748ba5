"""Routes wired into the proxy: matching, weighted backends resolved through the resolver, header
modifiers, what an unmatched request gets, l5d-retry-* never forwarded, and route updates by control."""

from __future__ import annotations

from traffic_world import MS, World

from tether.core.address import Address
from tether.core.discovery import EndpointSet
from tether.core.proxy.routing import RoutesUpdated, parent_of
from tether.core.traffic.route_config import load_route_yaml

A, B, C, D = (Address(f"10.2.0.{n}", 80) for n in range(1, 5))

CANARY = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-split, namespace: default}
spec:
  parentRefs: [{name: web, kind: Service}]
  rules:
    - name: split
      backendRefs:
        - {name: web-stable, weight: 90}
        - {name: web-canary, weight: 10}
"""

HEADERS = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-headers, namespace: default}
spec:
  parentRefs: [{name: web, kind: Service}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-route, value: api}], remove: [x-debug]}
        - type: ResponseHeaderModifier
          responseHeaderModifier: {add: [{name: x-served-by, value: tether}]}
"""

ZERO = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-nowhere, namespace: default}
spec:
  parentRefs: [{name: web, kind: Service}]
  rules:
    - backendRefs: [{name: web-stable, weight: 0}]
"""

PROFILE = """
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata: {name: web.default.svc.cluster.local, namespace: default}
spec:
  routes:
    - {name: books, condition: {method: GET, pathRegex: /books/.*}}
"""


def services() -> dict[str, list[Address]]:
    return {"web": [A], "web-stable": [B, C], "web-canary": [D]}


def test_a_90_10_split_lands_within_two_percent() -> None:
    world = World(services(), routes=load_route_yaml(CANARY, "canary.yaml"))
    for index in range(2000):
        world.at(index * MS, lambda: world.send("web"))
    world.run()
    counts = world.counts()
    assert all(answer.status == 200 for answer in world.answers)
    assert A not in counts  # the parent itself gets nothing: the rule names its backends
    canary_share = counts[D] / 2000
    assert 0.08 <= canary_share <= 0.12, counts
    assert abs(counts[B] - counts[C]) < 0.15 * (counts[B] + counts[C])  # each backend balances its own endpoints
    traffic = world.proxy.telemetry.traffic
    by_backend = {backend.backend_name: count for (_route, backend), count in traffic.backend_requests.items()}
    assert by_backend == {"web-stable": counts[B] + counts[C], "web-canary": counts[D]}


def test_header_modifiers_apply_both_ways() -> None:
    world = World(services(), routes=load_route_yaml(HEADERS, "headers.yaml"))
    answer = world.send("web", "/api/list", headers=(("x-debug", "1"), ("x-route", "client")))
    world.run()
    (request,) = world.requests_seen[A]
    names = {name: value for name, value in request.headers}
    assert names[b"x-route"] == b"api" and b"x-debug" not in names
    assert answer.status == 200 and answer.headers["x-served-by"] == "tether"


def test_no_rule_matching_gets_404_with_l5d_proxy_error() -> None:
    world = World(services(), routes=load_route_yaml(HEADERS, "headers.yaml"))
    answer = world.send("web", "/other")
    world.run()
    assert answer.status == 404 and "no route" in answer.headers["l5d-proxy-error"]
    assert A not in world.counts()


def test_a_service_without_routes_is_unrouted_even_when_others_have_routes() -> None:
    world = World({**services(), "other": [C]}, routes=load_route_yaml(HEADERS, "headers.yaml"))
    answer = world.send("other", "/anything")
    world.run()
    assert answer.status == 200 and world.counts() == {C: 1}
    assert world.proxy.telemetry.traffic.route_statuses == {}


def test_a_profile_that_does_not_match_sends_to_the_service() -> None:
    world = World(services(), routes=load_route_yaml(PROFILE, "profile.yaml"))
    matched, unmatched = world.send("web", "/books/1"), world.send("web", "/cart")
    world.run()
    assert (matched.status, unmatched.status) == (200, 200)
    statuses = world.proxy.telemetry.traffic.route_statuses
    assert [(labels.route_kind, labels.route_name, status) for labels, status, _error in statuses] == [
        ("ServiceProfile", "books", "200")
    ]


def test_a_rule_whose_backends_all_weigh_zero_answers_500() -> None:
    world = World(services(), routes=load_route_yaml(ZERO, "zero.yaml"))
    answer = world.send("web")
    world.run()
    assert answer.status == 500 and "weight 0" in answer.headers["l5d-proxy-error"]


def test_l5d_retry_headers_never_reach_the_endpoint() -> None:
    world = World(services(), routes=load_route_yaml(CANARY, "canary.yaml"))
    world.send("web", headers=(("l5d-retry-limit", "3"), ("x-keep", "1")))
    world.send("other-service-unrouted", headers=(("l5d-retry-http", "5xx"),))
    world.run()
    for requests in world.requests_seen.values():
        for request in requests:
            assert not any(name.startswith(b"l5d-retry-") for name, _ in request.headers)


def test_routes_update_through_control_takes_effect_for_the_next_request() -> None:
    world = World(services())
    world.send("web")
    world.run()
    world.proxy.control(RoutesUpdated(routes=load_route_yaml(ZERO, "zero.yaml")), world.now_ns)
    answer = world.send("web")
    world.run()
    assert answer.status == 500
    world.proxy.control(RoutesUpdated(routes=None), world.now_ns)
    again = world.send("web")
    world.run()
    assert again.status == 200 and world.counts() == {A: 2}


def test_parent_service_names() -> None:
    assert parent_of(EndpointSet("web", ())) == ("web", "default")
    assert parent_of(EndpointSet("books.shop", ())) == ("books", "shop")
    assert parent_of(EndpointSet("books.shop.svc.cluster.local", ())) == ("books", "shop")
    assert parent_of(EndpointSet("10.0.0.1:80", ())) == ("10.0.0.1", "default")
    assert parent_of(EndpointSet("api.example.com", ())) == ("api.example.com", "default")
