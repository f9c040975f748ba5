"""Fault injection (abort, delay), mirroring within the gate's limits, and the inbound local rate limit,
wired into the proxy."""

from __future__ import annotations

from traffic_world import MS, Behaviour, S, World

from tether.core.address import Address
from tether.core.traffic.faults import MIRROR_MAX_BODY_BYTES
from tether.core.traffic.route_config import load_route_yaml

A, SHADOW = Address("10.5.0.1", 80), Address("10.5.0.9", 80)


def with_filter(filters: str) -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web}}
spec:
  rules:
    - name: all
      filters:{filters}
"""


ABORT = with_filter("\n        - {type: Fault, fault: {abort: {httpStatus: 418, ratio: 1.0}}}")
DELAY = with_filter("\n        - {type: Fault, fault: {delay: {duration: 200ms, ratio: 1.0}}}")
HALF_ABORT = with_filter("\n        - {type: Fault, fault: {abort: {httpStatus: 503, ratio: 0.5}}}")
MIRROR = with_filter("\n        - {type: RequestMirror, requestMirror: {backendRef: {name: shadow}, percent: 100}}")
RATE_LIMIT = """
apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: web-limit}
spec:
  targetRef: {group: policy.linkerd.io, kind: Server, name: web-http}
  total: {requestsPerSecond: 5}
"""


def test_an_abort_answers_without_reaching_the_endpoint() -> None:
    world = World({"web": [A]}, routes=load_route_yaml(ABORT, "f.yaml"))
    answer = world.send("web")
    world.run()
    assert answer.status == 418 and answer.headers["l5d-proxy-error"] == "fault injected: 418"
    assert world.counts() == {}


def test_a_delay_holds_the_request_then_sends_it() -> None:
    world = World({"web": [A]}, routes=load_route_yaml(DELAY, "f.yaml"))
    answer = world.send("web")
    world.run(until_ns=199 * MS)
    assert world.counts() == {}
    world.run()
    assert answer.status == 200 and 200 * MS <= answer.answered_ns < 210 * MS


def test_a_ratio_aborts_about_that_share_and_aborts_are_never_retried() -> None:
    text = HALF_ABORT.replace(
        "metadata: {name: web}", "metadata: {name: web, annotations: {retry.linkerd.io/http: 5xx}}"
    )
    world = World({"web": [A]}, routes=load_route_yaml(text, "f.yaml"))
    answers = [world.send("web") for _ in range(400)]
    world.run()
    aborted = [answer for answer in answers if answer.status == 503]
    assert 160 <= len(aborted) <= 240 and all("fault injected" in a.headers["l5d-proxy-error"] for a in aborted)
    assert len(world.requests_seen[A]) == 400 - len(aborted)


def test_mirrored_copies_reach_the_shadow_and_never_affect_the_primary() -> None:
    world = World({"web": [A], "shadow": [SHADOW]}, routes=load_route_yaml(MIRROR, "m.yaml"))
    world.behaviour[SHADOW] = Behaviour(status=500, latency_ns=300 * MS)
    answers = [world.send("web", method="POST", body=b"payload") for _ in range(5)]
    world.run()
    assert [(answer.status, answer.body) for answer in answers] == [(200, b"ok")] * 5
    assert all(answer.answered_ns < 100 * MS for answer in answers)  # never waited for the slow shadow
    assert world.bodies_seen[SHADOW] == [b"payload"] * 5
    assert world.proxy._mirror_gate.in_flight == 0 and world.proxy._mirror_tickets == {}


def test_a_body_over_the_mirror_limit_is_not_copied() -> None:
    world = World({"web": [A], "shadow": [SHADOW]}, routes=load_route_yaml(MIRROR, "m.yaml"))
    answer = world.send("web", method="POST", body=b"z" * (MIRROR_MAX_BODY_BYTES + 1))
    world.run()
    assert answer.status == 200 and SHADOW not in world.counts()
    (counters,) = (counters for _key, counters in world.proxy._route_stats.items())
    assert (counters.mirrored, counters.mirror_skipped) == (0, 1)


def test_a_shadow_that_refuses_connections_leaves_the_primary_alone() -> None:
    world = World({"web": [A], "shadow": [SHADOW]}, routes=load_route_yaml(MIRROR, "m.yaml"))
    world.behaviour[SHADOW] = Behaviour(refuse=True)
    answers = [world.send("web") for _ in range(10)]
    world.run()
    assert [answer.status for answer in answers] == [200] * 10
    assert world.proxy._mirror_gate.in_flight == 0


def test_the_inbound_rate_limit_answers_429_past_the_burst() -> None:
    world = World({"web": [A]}, routes=load_route_yaml(RATE_LIMIT, "l.yaml"), direction="inbound")
    burst = [world.send("web") for _ in range(7)]
    world.run(until_ns=10 * MS)
    assert [answer.status for answer in burst] == [200] * 5 + [429] * 2
    assert burst[-1].headers["l5d-proxy-error"] == "rate limited (total limit)"
    world.run(until_ns=1 * S)
    later = world.send("web")
    world.run()
    assert later.status == 200  # refilled at 5 per second
    assert world.proxy.telemetry.traffic.rate_limited == {"total": 2}


def test_the_outbound_side_ignores_rate_limit_policies() -> None:
    world = World({"web": [A]}, routes=load_route_yaml(RATE_LIMIT, "l.yaml"))
    answers = [world.send("web") for _ in range(10)]
    world.run()
    assert [answer.status for answer in answers] == [200] * 10
