"""Retries in the proxy (HTTP/1.1 exchanges): a retryable head discarded and the request replayed after the
backoff on a new balancer pick, bodies replayed from the 64 KiB buffer (larger never retried), failures
before the head, the policy's limit, the service's budget, and l5d-retry-* only where the route allows."""

from __future__ import annotations

from traffic_world import MS, Behaviour, S, World

from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.traffic.retry import REPLAY_BUFFER_MAX_BYTES
from tether.core.traffic.route_config import load_route_yaml

A, B = Address("10.3.0.1", 80), Address("10.3.0.2", 80)


def route(annotations: str = "", *, allow_headers: bool = False) -> str:
    allow = '\n    tether.io/allow-l5d-request-headers: "true"' if allow_headers else ""
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
  annotations:{(annotations + allow) or " {}"}
spec:
  parentRefs: [{{name: web}}]
  rules: [{{name: all}}]
"""


RETRY_5XX = route('\n    retry.linkerd.io/http: 5xx\n    retry.linkerd.io/limit: "2"')


def budget_profile(reserve_per_s: int) -> str:
    return f"""
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata: {{name: web.default.svc.cluster.local}}
spec:
  routes: [{{name: all, condition: {{pathRegex: "/.*"}}, isRetryable: true}}]
  retryBudget: {{retryRatio: 0.2, minRetriesPerSecond: {reserve_per_s}, ttl: 10s}}
"""


def retries_of(world: World) -> tuple[int, int, int, int]:
    (counts,) = world.proxy.telemetry.traffic.retries.values()
    return counts.requests, counts.successes, counts.limit_exceeded, counts.overflow


def test_a_503_is_discarded_and_the_request_replayed_with_its_body() -> None:
    world = World({"web": [A]}, routes=load_route_yaml(RETRY_5XX, "r.yaml"))
    world.behaviour[A] = Behaviour(failures_left=1)
    answer = world.send("web", method="POST", body=b"x" * 1000)
    world.run()
    assert answer.status == 200 and answer.body == b"ok"
    assert world.bodies_seen[A] == [b"x" * 1000, b"x" * 1000]
    assert retries_of(world) == (1, 1, 0, 0)
    assert answer.answered_ns - answer.sent_ns >= 25 * MS  # the first backoff is 25-50 ms


def test_a_retry_is_a_new_balancer_pick() -> None:
    # Failure accrual stated (it is the default): once A is ejected every pick is B.
    config = ProxyConfig(breaker_consecutive_failures=7)
    world = World({"web": [A, B]}, config=config, routes=load_route_yaml(RETRY_5XX, "r.yaml"))
    world.behaviour[A] = Behaviour(status=503)
    answers = [world.send("web") for _ in range(20)]
    world.run()
    assert all(answer.status == 200 for answer in answers)  # every 503 from A was retried on B
    assert len(world.requests_seen[B]) == 20


def test_a_body_larger_than_the_replay_buffer_is_never_retried() -> None:
    world = World({"web": [A]}, routes=load_route_yaml(RETRY_5XX, "r.yaml"))
    world.behaviour[A] = Behaviour(failures_left=1)
    answer = world.send("web", method="POST", body=b"y" * (REPLAY_BUFFER_MAX_BYTES + 1))
    world.run()
    assert answer.status == 503 and len(world.requests_seen[A]) == 1
    (counters,) = (counters for _key, counters in world.proxy._route_stats.items())
    assert counters.retry_body_too_large == 1


def test_the_limit_bounds_retries_per_request() -> None:
    world = World({"web": [A]}, routes=load_route_yaml(RETRY_5XX, "r.yaml"))
    world.behaviour[A] = Behaviour(status=503)
    answer = world.send("web")
    world.run()
    assert answer.status == 503 and len(world.requests_seen[A]) == 3  # the original and two retries
    assert retries_of(world) == (2, 0, 1, 0)


def test_a_refused_connection_is_retried_on_another_endpoint() -> None:
    config = ProxyConfig(breaker_consecutive_failures=7)  # failure accrual on: see the test above
    world = World({"web": [A, B]}, config=config, routes=load_route_yaml(RETRY_5XX, "r.yaml"))
    world.behaviour[A] = Behaviour(refuse=True)
    answers = [world.send("web") for _ in range(10)]
    world.run()
    assert [answer.status for answer in answers] == [200] * 10


def test_the_budget_bounds_retries_across_requests() -> None:
    # Without circuit breaking, so that every request reaches the failing endpoint and asks for a retry
    # (isRetryable: one retry each); with it, the endpoint would be ejected after seven failures.
    config = ProxyConfig(breaker_consecutive_failures=0)
    world = World({"web": [A]}, config=config, routes=load_route_yaml(budget_profile(1), "p.yaml"))
    world.behaviour[A] = Behaviour(status=503)
    for index in range(200):
        world.at(index * 5 * MS, lambda: world.send("web"))
    world.run()
    retries, _successes, _limit, overflow = retries_of(world)
    assert retries <= 0.2 * 200 + 1 * 10  # ratio x requests + minRetriesPerSecond x ttl
    assert overflow > 0 and retries + overflow == 200
    assert len(world.requests_seen[A]) == 200 + retries


def test_l5d_retry_headers_apply_only_where_the_route_allows_them() -> None:
    for allowed, expected in ((True, 4), (False, 1)):
        world = World({"web": [A]}, routes=load_route_yaml(route(allow_headers=allowed), "r.yaml"))
        world.behaviour[A] = Behaviour(status=503)
        answer = world.send("web", headers=(("l5d-retry-limit", "3"), ("l5d-retry-http", "5xx")))
        world.run()
        assert answer.status == 503 and len(world.requests_seen[A]) == expected


def test_a_response_the_policy_does_not_name_is_forwarded() -> None:
    world = World({"web": [A]}, routes=load_route_yaml(route('\n    retry.linkerd.io/http: "502"'), "r.yaml"))
    world.behaviour[A] = Behaviour(status=503)
    answer = world.send("web")
    world.run()
    assert answer.status == 503 and len(world.requests_seen[A]) == 1


def test_the_retry_timeout_cuts_a_silent_attempt_and_retries_it() -> None:
    annotations = "\n    retry.linkerd.io/http: 5xx\n    retry.linkerd.io/timeout: 100ms"
    world = World({"web": [A]}, routes=load_route_yaml(route(annotations), "r.yaml"))
    world.behaviour[A] = Behaviour(silent_left=1)
    answer = world.send("web")
    world.run(until_ns=1 * S)
    assert answer.status == 200 and len(world.requests_seen[A]) == 2
    assert 100 * MS <= answer.answered_ns < 200 * MS
