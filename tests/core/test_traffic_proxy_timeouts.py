"""Route timeouts in the proxy: request, response and idle, each a 504 with l5d-proxy-error (gRPC
DEADLINE_EXCEEDED), never retried; after the response head the client's connection is reset instead."""

from __future__ import annotations

from h2_peers import client_for, endpoint_for
from traffic_world import MS, Behaviour, S, World

from tether.core.address import Address
from tether.core.proxy.routing import RoutesUpdated
from tether.core.traffic.route_config import load_route_yaml

A = Address("10.4.0.1", 80)
GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


def timeouts(annotations: str) -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
  annotations:{annotations}
spec:
  rules: [{{name: all}}]
"""


def test_request_timeout_answers_504_and_is_never_retried() -> None:
    text = timeouts("\n    timeout.linkerd.io/request: 1s\n    retry.linkerd.io/http: 5xx")
    world = World({"web": [A]}, routes=load_route_yaml(text, "t.yaml"))
    world.behaviour[A] = Behaviour(silent=True)
    answer = world.send("web")
    world.run(until_ns=2 * S)
    assert answer.status == 504 and answer.headers["l5d-proxy-error"] == "request timeout after 1s"
    assert answer.answered_ns == 1 * S and len(world.requests_seen[A]) == 1
    assert all(counts.requests == 0 for counts in world.proxy.telemetry.traffic.retries.values())
    statuses = world.proxy.telemetry.traffic.route_statuses
    assert [(status, error) for (_labels, status, error) in statuses] == [("", "REQUEST_TIMEOUT")]


def test_request_timeout_spans_the_retries() -> None:
    text = timeouts(
        '\n    timeout.linkerd.io/request: 300ms\n    retry.linkerd.io/http: 5xx\n    retry.linkerd.io/limit: "10"'
    )
    world = World({"web": [A]}, routes=load_route_yaml(text, "t.yaml"))
    world.behaviour[A] = Behaviour(status=503, latency_ns=50 * MS)
    answer = world.send("web")
    world.run(until_ns=2 * S)
    assert answer.status == 504 and answer.answered_ns == 300 * MS
    assert 2 <= len(world.requests_seen[A]) <= 5


def test_response_timeout_is_per_attempt() -> None:
    world = World({"web": [A]}, routes=load_route_yaml(timeouts("\n    timeout.linkerd.io/response: 200ms"), "t"))
    world.behaviour[A] = Behaviour(latency_ns=500 * MS)
    answer = world.send("web")
    world.run(until_ns=2 * S)
    assert answer.status == 504 and "response timeout after 200ms" in answer.headers["l5d-proxy-error"]
    assert answer.answered_ns < 300 * MS


def test_idle_timeout_restarts_with_every_byte() -> None:
    world = World({"web": [A]}, routes=load_route_yaml(timeouts("\n    timeout.linkerd.io/idle: 100ms"), "t"))
    world.behaviour[A] = Behaviour(latency_ns=50 * MS)
    fast = world.send("web")
    world.run(until_ns=1 * S)
    world.behaviour[A] = Behaviour(latency_ns=150 * MS)
    slow = world.send("web")
    world.run(until_ns=2 * S)
    assert fast.status == 200
    assert slow.status == 504 and "idle timeout" in slow.headers["l5d-proxy-error"]


def test_a_stream_route_timeout_is_a_trailers_only_deadline_exceeded(make_harness) -> None:
    h = make_harness()
    h.proxy.control(
        RoutesUpdated(routes=load_route_yaml(timeouts("\n    timeout.linkerd.io/request: 1s"), "t")), h.now_ns
    )
    client = client_for(h)
    stream = client.request("/pkg.Svc/Call", extra=GRPC)
    endpoint_for(h)
    h.advance(1.5)
    client.read()
    headers = dict(client.streams[stream].headers)
    assert headers[b":status"] == b"200" and headers[b"grpc-status"] == b"4"
    assert headers[b"l5d-proxy-error"] == b"request timeout after 1s" and client.streams[stream].ended


def test_a_timeout_after_the_head_resets_the_client_connection(make_harness) -> None:
    h = make_harness()
    h.proxy.control(
        RoutesUpdated(routes=load_route_yaml(timeouts("\n    timeout.linkerd.io/request: 1s"), "t")), h.now_ns
    )
    client = h.accept()
    h.recv(client, b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
    upstream = h.connects[-1].conn_id
    h.connected(upstream)
    h.recv(upstream, b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
    assert h.take(client).startswith(b"HTTP/1.1 200")
    h.advance(1.5)
    assert h.closed[client] is True and h.closed[upstream] is True  # both reset, never a short body as whole
    assert any("request timeout after 1s" in error for error in h.errors)
