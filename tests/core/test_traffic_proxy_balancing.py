"""The balancers wired into the proxy machine: P2C over peak-EWMA per service, circuit breaking with
Linkerd's defaults, the failfast queue (503 with l5d-proxy-error, gRPC UNAVAILABLE), P2C on pending for
opaque TCP, and the inbound side that never ejects its workload."""

from __future__ import annotations

from h2_peers import client_for
from traffic_world import MS, Behaviour, S, World

from tether.core.address import Address
from tether.core.balance import RoundRobin
from tether.core.config import ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.traffic.balancer import EndpointState

A, B, C = Address("10.1.0.1", 80), Address("10.1.0.2", 80), Address("10.1.0.3", 80)
GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


def open_loop(world: World, authority: str, *, count: int, gap_ns: int, start_ns: int = 0) -> None:
    for index in range(count):
        world.at(start_ns + index * gap_ns, lambda: world.send(authority))


def balancer_of(world: World, service: str = "web"):
    return world.proxy.telemetry.traffic.balancers[(service, "http")]


ACCRUAL = 7  # failure accrual with Linkerd's 7, stated so that these tests do not hang on the default


def test_p2c_ewma_sends_few_requests_to_a_slow_endpoint() -> None:
    world = World({"web": [A, B, C]})
    world.behaviour[C] = Behaviour(latency_ns=60 * MS)
    open_loop(world, "web", count=600, gap_ns=3 * MS)
    world.run()
    counts = world.counts()
    assert all(answer.status == 200 for answer in world.answers)
    assert counts.get(C, 0) < 0.05 * 600, counts
    assert counts[A] > 250 and counts[B] > 250, counts
    assert balancer_of(world).in_flight == 0


def test_round_robin_spreads_evenly_whatever_the_latency() -> None:
    world = World({"web": [A, B, C]}, config=ProxyConfig(balancer="round-robin"))
    world.behaviour[C] = Behaviour(latency_ns=60 * MS)
    open_loop(world, "web", count=300, gap_ns=3 * MS)
    world.run()
    assert world.counts() == {A: 100, B: 100, C: 100}


def test_an_explicit_picker_bypasses_the_balancers() -> None:
    world = World({"web": [A, B]}, picker=RoundRobin())
    world.behaviour[B] = Behaviour(status=503)
    open_loop(world, "web", count=40, gap_ns=5 * MS)
    world.run()
    assert world.counts() == {A: 20, B: 20}  # never ejected: no breaker without a balancer
    assert world.proxy.telemetry.traffic.balancers == {}


def test_failing_endpoint_is_ejected_after_seven_failures_in_a_row_then_readmitted_once_healed() -> None:
    world = World({"web": [A, B]}, config=ProxyConfig(breaker_consecutive_failures=ACCRUAL))
    world.behaviour[B] = Behaviour(status=503)
    open_loop(world, "web", count=100, gap_ns=10 * MS)  # 1 s of traffic
    world.run(until_ns=1 * S - 1)
    assert world.counts()[B] == 7  # Linkerd's consecutive-failures default
    assert balancer_of(world).endpoint_state(B) is EndpointState.EJECTED
    world.behaviour[B] = Behaviour()  # healed; the probe after the 1-1.5 s backoff readmits it
    open_loop(world, "web", count=200, gap_ns=10 * MS, start_ns=1 * S)
    world.run()
    assert balancer_of(world).endpoint_state(B) is EndpointState.READY
    late = [request for request in world.requests_seen[B][7:]]
    assert len(late) > 50, len(late)  # back to about half the traffic
    failed = [answer for answer in world.answers if answer.status == 503]
    assert len(failed) == 7 and all("l5d-proxy-error" not in answer.headers for answer in failed)


def test_requests_wait_while_no_endpoint_is_ready_then_fail_fast_with_503() -> None:
    config = ProxyConfig(failfast_timeout_ns=500 * MS, breaker_consecutive_failures=ACCRUAL)
    world = World({"web": [A]}, config=config)
    world.behaviour[A] = Behaviour(refuse=True)
    for index in range(7):
        world.at(index * MS, lambda: world.send("web"))
    world.run(until_ns=10 * MS)
    assert [answer.status for answer in world.answers] == [502] * 7  # connect failures, then ejected
    waiting = world.send("web")  # at 10 ms
    world.run(until_ns=509 * MS)
    assert waiting.status is None  # in the failfast queue
    world.run(until_ns=511 * MS)
    assert waiting.status == 503 and "fail-fast" in waiting.headers["l5d-proxy-error"]
    at_once = world.send("web")
    world.run(until_ns=512 * MS)
    assert at_once.status == 503 and "fail-fast" in at_once.headers["l5d-proxy-error"]
    world.behaviour[A] = Behaviour()  # healed before the backoff ends: the next request probes it
    world.run(until_ns=2 * S)
    probe = world.send("web")
    after = world.send("web")
    world.run()
    assert (probe.status, after.status) == (200, 200)


def test_a_full_failfast_queue_sheds_load_at_once() -> None:
    world = World({"web": [A]}, config=ProxyConfig(failfast_queue_capacity=2, breaker_consecutive_failures=ACCRUAL))
    world.behaviour[A] = Behaviour(refuse=True)
    for _ in range(7):
        world.send("web")
    world.run(until_ns=10 * MS)
    waiting = [world.send("web"), world.send("web")]
    shed = world.send("web")
    assert shed.status == 503 and "queue full" in shed.headers["l5d-proxy-error"]
    assert all(answer.status is None for answer in waiting)


def test_a_client_that_leaves_while_waiting_leaves_the_queue() -> None:
    world = World({"web": [A]}, config=ProxyConfig(failfast_timeout_ns=500 * MS, breaker_consecutive_failures=ACCRUAL))
    world.behaviour[A] = Behaviour(refuse=True)
    for _ in range(7):
        world.send("web")
    world.run(until_ns=10 * MS)
    world.send("web")
    (client_id,) = [conn for conn, (_parser, answer) in world._clients.items() if answer is not None]
    world.proxy.closed(client_id, world.now_ns)
    world.pump()
    backend = world.proxy._backends[("web", "http")]
    assert backend.queue.waiting() == []


def test_grpc_request_in_failfast_gets_trailers_only_unavailable(make_harness) -> None:
    h = make_harness(failfast_timeout_ns=100 * MS, breaker_consecutive_failures=ACCRUAL)
    for _ in range(7):  # seven refused connections eject the only endpoint
        client = client_for(h)
        client.request("/pkg.Svc/Call", extra=GRPC)
        h.proxy.connect_failed(h.connects[-1].conn_id, "refused", h.now_ns)
        h.pump()
    client = client_for(h)
    stream = client.request("/pkg.Svc/Call", extra=GRPC)
    h.advance(0.2)
    client.read()
    headers = dict(client.streams[stream].headers)
    assert headers[b":status"] == b"200" and headers[b"grpc-status"] == b"14"
    assert b"fail-fast" in headers[b"l5d-proxy-error"] and client.streams[stream].ended


def test_opaque_connections_balance_on_open_connections_held_for_their_life(make_harness) -> None:
    resolver = StaticResolver(default=[A, B])
    h = make_harness(resolver=resolver, protocol="opaque")
    clients = [h.accept() for _ in range(4)]
    for connect in h.connects:
        h.connected(connect.conn_id)
    balancer = h.proxy.telemetry.traffic.balancers[("default", "opaque")]
    assert (balancer.pending(A), balancer.pending(B)) == (2, 2)
    for client in clients:
        h.proxy.closed(client, h.now_ns)
        h.pump()
    assert balancer.in_flight == 0


def test_the_inbound_proxy_never_ejects_its_workload() -> None:
    world = World({"web": [A]}, direction="inbound")
    world.behaviour[A] = Behaviour(status=500)
    open_loop(world, "web", count=20, gap_ns=5 * MS)
    world.run()
    assert [answer.status for answer in world.answers] == [500] * 20


def test_removed_endpoint_drains_and_new_requests_skip_it() -> None:
    world = World({"web": [A, B]})
    world.behaviour[A] = Behaviour(latency_ns=100 * MS)
    world.behaviour[B] = Behaviour(latency_ns=100 * MS)
    first = [world.send("web") for _ in range(4)]
    world.run(until_ns=10 * MS)
    world.resolver.set("web", [B])  # discovery drops A while it has requests in flight
    later = [world.send("web") for _ in range(4)]
    world.run()
    assert all(answer.status == 200 for answer in first + later)
    assert len(world.requests_seen[B]) >= 4 + sum(1 for request in world.requests_seen.get(A, []))  # later: all B
    assert balancer_of(world).endpoints() == [B]


def test_balancer_draws_come_from_the_proxy_rng_so_runs_replay() -> None:
    def arrivals(seed: int) -> list[Address]:
        world = World({"web": [A, B, C]}, seed=seed)
        open_loop(world, "web", count=60, gap_ns=1 * MS)
        world.run()
        return world.arrivals

    assert arrivals(3) == arrivals(3)
    assert arrivals(3) != arrivals(4)
