"""The proxy machine speaking HTTP/2: streams, flow control, trailers, resets, GOAWAY, gRPC errors."""

from __future__ import annotations

import h2.errors
from h2_peers import client_for, endpoint_for

from tether.core.address import Address
from tether.core.discovery import StaticResolver

GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


def one_stream(h, path: str = "/", **request):
    """A client with one stream open through the proxy, and the endpoint's side of that stream."""
    client = client_for(h)
    stream = client.request(path, **request)
    endpoint = endpoint_for(h)
    (upstream_stream,) = endpoint.streams
    return client, stream, endpoint, upstream_stream


def test_h2_request_keeps_its_protocol_to_the_endpoint(make_harness) -> None:
    h = make_harness()
    client, stream, endpoint, upstream_stream = one_stream(h, "/hello", body=b"ping")
    got = endpoint.streams[upstream_stream]
    assert (b":path", b"/hello") in got.headers and got.data == b"ping" and got.ended
    endpoint.respond(upstream_stream, 200, b"pong", extra=[(b"x-app", b"1")])
    client.read()
    answer = client.streams[stream]
    assert (b":status", b"200") in answer.headers and (b"x-app", b"1") in answer.headers
    assert answer.data == b"pong" and answer.ended


def test_h2_streams_multiplex_on_one_upstream_connection(make_harness) -> None:
    h = make_harness()
    client = client_for(h)
    streams = [client.request(f"/{i}") for i in range(5)]
    endpoint = endpoint_for(h)
    assert len(h.connects) == 1 and len(endpoint.streams) == 5
    for upstream_stream in reversed(list(endpoint.streams)):
        path = dict(endpoint.streams[upstream_stream].headers)[b":path"]
        endpoint.respond(upstream_stream, 200, path)
    client.read()
    assert [bytes(client.streams[s].data) for s in streams] == [f"/{i}".encode() for i in range(5)]


def test_h2_trailers_pass_through(make_harness) -> None:
    h = make_harness()
    client, stream, endpoint, upstream_stream = one_stream(h, "/svc.Echo/Say", body=b"\0\0\0\0\0", extra=GRPC)
    endpoint.respond(upstream_stream, 200, b"\0\0\0\0\0", trailers=[(b"grpc-status", b"0")], extra=GRPC[:1])
    client.read()
    assert client.streams[stream].trailers == [(b"grpc-status", b"0")]
    ((labels, classification, status, grpc_status),) = h.proxy.telemetry.response_total
    assert (classification, status, grpc_status) == ("success", 200, "0")


def test_grpc_failure_status_in_trailers_is_a_failure(make_harness) -> None:
    h = make_harness()
    client, _stream, endpoint, upstream_stream = one_stream(h, "/svc.Echo/Say", body=b"\0\0\0\0\0", extra=GRPC)
    endpoint.respond(upstream_stream, 200, trailers=[(b"grpc-status", b"14")], extra=GRPC[:1])
    client.read()
    ((_labels, classification, status, grpc_status),) = h.proxy.telemetry.response_total
    assert (classification, status, grpc_status) == ("failure", 200, "14")


def test_grpc_status_in_the_head_of_a_response_with_a_body_classifies_it(make_harness) -> None:
    h = make_harness()
    client, stream, endpoint, upstream_stream = one_stream(h, "/svc.Echo/Say", body=b"\0\0\0\0\0", extra=GRPC)
    endpoint.respond(upstream_stream, 200, b"\0\0\0\0\0", extra=[*GRPC[:1], (b"grpc-status", b"0")])
    client.read()
    assert client.streams[stream].ended and client.streams[stream].trailers == []
    ((_labels, classification, status, grpc_status),) = h.proxy.telemetry.response_total
    assert (classification, status, grpc_status) == ("success", 200, "0")


def test_grpc_request_with_no_endpoints_gets_a_trailers_only_unavailable(make_harness) -> None:
    h = make_harness(endpoints=[])
    client = client_for(h)
    stream = client.request("/svc.Echo/Say", body=b"\0\0\0\0\0", extra=GRPC)
    client.read()
    headers = dict(client.streams[stream].headers)
    assert headers[b":status"] == b"200" and headers[b"grpc-status"] == b"14"
    assert b"no endpoints" in headers[b"grpc-message"] and b"l5d-proxy-error" in headers
    assert client.streams[stream].ended and not client.streams[stream].data


def test_h2_connect_failure_is_a_502_with_l5d_proxy_error(make_harness) -> None:
    h = make_harness()
    client = client_for(h)
    stream = client.request("/")
    h.proxy.connect_failed(h.connects[-1].conn_id, "refused", h.now_ns)
    h.pump()
    client.read()
    headers = dict(client.streams[stream].headers)
    assert headers[b":status"] == b"502" and b"refused" in headers[b"l5d-proxy-error"]
    assert h.connects[-1].conn_id not in h.closed, "the driver dropped that id already: no Close for it"


def test_client_reset_resets_the_endpoint_stream(make_harness) -> None:
    h = make_harness()
    client, stream, endpoint, upstream_stream = one_stream(h, "/slow")
    client.h2.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
    client.flush()
    endpoint.read()
    assert endpoint.streams[upstream_stream].reset == h2.errors.ErrorCodes.CANCEL


def test_endpoint_reset_resets_the_client_stream_with_its_code(make_harness) -> None:
    h = make_harness()
    client, stream, endpoint, upstream_stream = one_stream(h, "/")
    endpoint.h2.reset_stream(upstream_stream, h2.errors.ErrorCodes.REFUSED_STREAM)
    endpoint.flush()
    client.read()
    assert client.streams[stream].reset == h2.errors.ErrorCodes.REFUSED_STREAM


def test_a_slow_client_closes_the_endpoints_window(make_harness) -> None:
    """A client that does not read: the proxy holds at most one window of its response, then stops
    acknowledging, so the endpoint cannot push more."""
    h = make_harness()
    client = client_for(h)
    client.auto_ack = False
    stream = client.request("/big")
    endpoint = endpoint_for(h)
    (upstream_stream,) = endpoint.streams
    endpoint.h2.send_headers(upstream_stream, [(b":status", b"200")])
    sent = 0
    for _ in range(100):
        window = endpoint.h2.local_flow_control_window(upstream_stream)
        if window == 0:
            break
        chunk = min(window, 16384)
        endpoint.h2.send_data(upstream_stream, b"x" * chunk)
        sent += chunk
        endpoint.flush()
        endpoint.read()
        client.read()
    assert endpoint.h2.local_flow_control_window(upstream_stream) == 0
    # The client's window (64 KiB) plus the proxy's per-stream window (64 KiB), nothing more.
    assert sent <= 2 * 65_535
    assert len(client.streams[stream].data) <= 65_535


def test_goaway_on_shutdown_lets_open_streams_finish(make_harness) -> None:
    h = make_harness()
    client, stream, endpoint, upstream_stream = one_stream(h, "/")
    h.proxy.shutdown(h.now_ns)
    h.pump()
    client.read()
    assert client.goaway is not None and client.goaway.last_stream_id == stream
    endpoint.respond(upstream_stream, 200, b"done")
    client.read()
    assert client.streams[stream].data == b"done"
    assert h.closed.get(client.conn_id) is False


def test_garbage_after_the_preface_closes_cleanly(make_harness) -> None:
    h = make_harness()
    conn = h.accept()
    h.recv(conn, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64)
    assert conn in h.closed
    assert any("HTTP/2" in error for error in h.errors)


def test_a_settings_flood_gets_goaway_enhance_your_calm(make_harness) -> None:
    h = make_harness(h2_max_control_frames_per_second=50)
    client = client_for(h)
    for _ in range(60):
        client.h2.update_settings({4: 70_000})
    client.flush()
    client.read()
    assert client.goaway is not None
    assert client.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert client.conn_id in h.closed


def test_keepalive_ping_closes_a_silent_connection(make_harness) -> None:
    h = make_harness(h2_keepalive_interval_ns=1_000_000_000, h2_keepalive_timeout_ns=500_000_000)
    client = client_for(h)
    h.advance(1.1)
    events = client.h2.receive_data(h.take(client.conn_id))
    assert any(type(event).__name__ == "PingReceived" for event in events)
    h.advance(0.6)
    assert h.closed.get(client.conn_id) is True


def test_http1_client_rides_h2_to_a_meshed_peer_and_back(make_harness) -> None:
    """Outbound: HTTP/1.1 to a meshed peer becomes HTTP/2 to its inbound port with l5d-orig-proto."""
    resolver = StaticResolver(by_host={"web": [Address("10.0.0.9", 8080)]}, meshed_hosts={"web": 4143})
    outbound = make_harness(resolver=resolver)
    client = outbound.accept()
    outbound.recv(client, b"POST /x HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\n\r\nabc")
    connect = outbound.connects[-1]
    assert connect.address == Address("10.0.0.9", 4143)
    outbound.connected(connect.conn_id)
    wire = outbound.take(connect.conn_id)
    assert wire.startswith(b"transport.l5d.io/v1\r\n\r\n")
    # The inbound proxy takes that byte stream as it is and restores HTTP/1.1 for the workload.
    inbound = make_harness(endpoints=[Address("127.0.0.1", 80)], protocol="detect", direction="inbound")
    peer = inbound.accept()
    inbound.recv(peer, wire)
    workload_connect = inbound.connects[-1]
    assert workload_connect.address == Address("127.0.0.1", 8080)
    inbound.connected(workload_connect.conn_id)
    request = inbound.take(workload_connect.conn_id)
    assert request.startswith(b"POST /x HTTP/1.1\r\n") and b"host: web" in request.lower()
    assert b"l5d-orig-proto" not in request and request.endswith(b"abc")
    inbound.recv(workload_connect.conn_id, b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    outbound.recv(connect.conn_id, inbound.take(peer))
    answer = outbound.take(client)
    assert answer.startswith(b"HTTP/1.1 201 ") and answer.endswith(b"\r\n\r\nok")


def test_oversized_h2_request_head_gets_431_on_its_stream(make_harness) -> None:
    h = make_harness(max_header_bytes=4096)
    client = client_for(h)
    big = client.request("/", extra=[(b"x-big", b"a" * 3000), (b"x-big2", b"b" * 3000)])
    small = client.request("/ok")
    client.read()
    assert dict(client.streams[big].headers)[b":status"] == b"431"
    assert client.conn_id not in h.closed, "one oversized head does not cost the client its connection"
    endpoint = endpoint_for(h)
    assert [dict(stream.headers)[b":path"] for stream in endpoint.streams.values()] == [b"/ok"]
    del small


def test_streams_an_endpoint_never_processed_are_replayed_after_its_goaway(make_harness) -> None:
    """nginx caps requests per connection and says GOAWAY: streams above its last stream id move to a
    new connection instead of failing."""
    h = make_harness()
    client = client_for(h)
    first, second = client.request("/1"), client.request("/2")
    endpoint = endpoint_for(h)
    processed, unprocessed = sorted(endpoint.streams)
    endpoint.h2.close_connection(last_stream_id=processed)
    endpoint.flush()
    assert len(h.connects) == 2, "the unprocessed stream needs a new connection"
    replacement = endpoint_for(h)
    (replayed,) = replacement.streams
    assert dict(replacement.streams[replayed].headers)[b":path"] == b"/2"
    endpoint.respond(processed, 200, b"one")
    replacement.respond(replayed, 200, b"two")
    client.read()
    assert (client.streams[first].data, client.streams[second].data) == (b"one", b"two")
    del unprocessed
