"""Traffic management on HTTP/2 streams: a retryable head (or a trailers-only gRPC status) discarded, the
endpoint's stream reset and the request replayed on a new stream; header modifiers; route metrics."""

from __future__ import annotations

import h2.events
from h2_peers import client_for, endpoint_for

from tether.core.proxy.routing import RoutesUpdated
from tether.core.traffic.route_config import load_route_yaml

GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
HTTP_RETRY = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, annotations: {retry.linkerd.io/http: 5xx}}
spec:
  rules:
    - filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: x-route, value: web}]}
"""
GRPC_RETRY = """
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: calls, annotations: {retry.linkerd.io/grpc: unavailable}}
spec:
  rules: [{matches: [{method: {service: pkg.Svc}}]}]
"""


def requests_seen(endpoint) -> list[int]:
    endpoint.read()
    return [event.stream_id for event in endpoint.events if isinstance(event, h2.events.RequestReceived)]


def test_an_h2_503_is_retried_on_a_new_stream_with_the_body_replayed(make_harness) -> None:
    h = make_harness()
    h.proxy.control(RoutesUpdated(routes=load_route_yaml(HTTP_RETRY, "r.yaml")), h.now_ns)
    client = client_for(h)
    stream = client.request("/items", body=b"payload")
    endpoint = endpoint_for(h)
    (first,) = requests_seen(endpoint)
    endpoint.respond(first, 503, b"busy")
    client.read()
    assert client.streams.get(stream) is None  # nothing of the discarded attempt reached the client
    h.advance(0.1)  # the backoff (25-50 ms)
    second = requests_seen(endpoint)[-1]
    assert second != first and bytes(endpoint.streams[second].data) == b"payload"
    endpoint.respond(second, 200, b"done")
    client.read()
    headers = dict(client.streams[stream].headers)
    assert headers[b":status"] == b"200" and headers[b"x-route"] == b"web"
    assert bytes(client.streams[stream].data) == b"done"
    (counts,) = h.proxy.telemetry.traffic.retries.values()
    assert (counts.requests, counts.successes) == (1, 1)


def test_a_trailers_only_grpc_unavailable_is_retried(make_harness) -> None:
    h = make_harness()
    h.proxy.control(RoutesUpdated(routes=load_route_yaml(GRPC_RETRY, "g.yaml")), h.now_ns)
    client = client_for(h)
    stream = client.request("/pkg.Svc/Call", body=b"\0\0\0\0\0", extra=GRPC)
    endpoint = endpoint_for(h)
    (first,) = requests_seen(endpoint)
    endpoint.h2.send_headers(first, [(b":status", b"200"), (b"grpc-status", b"14")], end_stream=True)
    endpoint.flush()
    h.advance(0.1)
    second = requests_seen(endpoint)[-1]
    assert second != first
    endpoint.respond(second, 200, b"\0\0\0\0\0", trailers=[(b"grpc-status", b"0")], extra=GRPC[:1])
    client.read()
    assert client.streams[stream].trailers == [(b"grpc-status", b"0")]


def test_a_grpc_status_the_route_does_not_name_is_forwarded(make_harness) -> None:
    h = make_harness()
    h.proxy.control(RoutesUpdated(routes=load_route_yaml(GRPC_RETRY, "g.yaml")), h.now_ns)
    client = client_for(h)
    stream = client.request("/pkg.Svc/Call", extra=GRPC)
    endpoint = endpoint_for(h)
    (first,) = requests_seen(endpoint)
    endpoint.h2.send_headers(first, [(b":status", b"200"), (b"grpc-status", b"5")], end_stream=True)
    endpoint.flush()
    client.read()
    assert dict(client.streams[stream].headers)[b"grpc-status"] == b"5"
    h.advance(0.1)
    assert requests_seen(endpoint) == [first]


def test_a_grpc_response_is_judged_at_its_end_and_timed_to_its_head(make_harness) -> None:
    h = make_harness()
    client = client_for(h)
    stream = client.request("/pkg.Svc/Watch", extra=GRPC)
    endpoint = endpoint_for(h)
    (first,) = requests_seen(endpoint)
    h.advance(0.01)
    endpoint.h2.send_headers(first, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    endpoint.flush()
    balancer = h.proxy.telemetry.traffic.balancers[("default", "http")]
    (address,) = balancer.endpoints()
    assert balancer.in_flight == 1  # still pending: the verdict is in the trailers
    h.advance(2.0)  # a long stream
    endpoint.h2.send_headers(first, [(b"grpc-status", b"14")], end_stream=True)
    endpoint.flush()
    client.read()
    assert client.streams[stream].trailers == [(b"grpc-status", b"14")]
    assert balancer.in_flight == 0
    estimate_ms = balancer.rtt_estimate_ns(address, h.now_ns) / 1e6
    assert estimate_ms < 100  # the 10 ms to the head (and the 30 ms default), not the 2 s stream
