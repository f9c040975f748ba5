"""Named behaviours of the HTTP/1.1 proxy machine, one per test, driven without any I/O."""

from __future__ import annotations

from tether.core.address import Address

GET = b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


def open_exchange(h, request: bytes = GET) -> tuple[int, int]:
    client = h.accept()
    h.recv(client, request)
    assert h.connects, "the proxy should dial an endpoint"
    upstream = h.connects[-1].conn_id
    h.connected(upstream)
    return client, upstream


def test_proxy_forwards_request_and_response(make_harness) -> None:
    h = make_harness()
    client, upstream = open_exchange(h)
    assert h.take(upstream).startswith(b"GET /x HTTP/1.1\r\nhost: svc\r\n")
    h.recv(upstream, OK)
    reply = h.take(client)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\nhi")
    assert client not in h.closed and upstream not in h.closed


def test_proxy_reuses_pooled_upstream_connection(make_harness) -> None:
    h = make_harness()
    client, upstream = open_exchange(h)
    h.recv(upstream, OK)
    h.take(upstream)
    h.recv(client, GET)
    assert len(h.connects) == 1, "the second request must reuse the idle connection"
    assert h.take(upstream).startswith(b"GET /x")


def test_proxy_strips_hop_by_hop_headers(make_harness) -> None:
    h = make_harness()
    request = b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n\r\n"
    _client, upstream = open_exchange(h, request)
    forwarded = h.take(upstream).lower()
    assert b"x-secret" not in forwarded and b"keep-alive" not in forwarded


def test_proxy_connect_failure_is_502_with_reason(make_harness) -> None:
    h = make_harness()
    client = h.accept()
    h.recv(client, GET)
    h.proxy.connect_failed(h.connects[0].conn_id, "connection refused", h.now_ns)
    h.pump()
    reply = h.take(client)
    assert reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"l5d-proxy-error: connect to 10.0.0.1:80 failed: connection refused" in reply
    assert client not in h.closed, "a complete request keeps its connection after a proxy error"


def test_proxy_connect_timeout_is_504(make_harness) -> None:
    h = make_harness(connect_timeout_ns=100_000_000)
    client = h.accept()
    h.recv(client, GET)
    h.advance(0.2)
    assert h.take(client).startswith(b"HTTP/1.1 504 ")
    assert h.connects[0].conn_id in h.closed


def test_proxy_response_timeout_is_504_and_closes_upstream(make_harness) -> None:
    h = make_harness(response_timeout_ns=1_000_000_000)
    client, upstream = open_exchange(h)
    h.advance(0.5)
    assert h.take(client) == b""
    h.advance(0.6)
    reply = h.take(client)
    assert reply.startswith(b"HTTP/1.1 504 ") and b"did not answer within 1000 ms" in reply
    assert h.closed.get(upstream) is True


def test_proxy_no_endpoints_is_503_after_reading_body(make_harness) -> None:
    h = make_harness(endpoints=[])
    client = h.accept()
    h.recv(client, b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nab")
    assert h.take(client) == b"", "the answer waits for the rest of the body"
    h.recv(client, b"cde")
    reply = h.take(client)
    assert reply.startswith(b"HTTP/1.1 503 ") and b"l5d-proxy-error: no endpoints for svc" in reply
    assert client not in h.closed
    h.recv(client, GET)  # the connection still serves
    assert h.take(client).startswith(b"HTTP/1.1 503 ")


def test_proxy_malformed_request_is_400_and_close(make_harness) -> None:
    h = make_harness()
    client = h.accept()
    h.recv(client, b"NOT HTTP AT ALL\r\n\r\n")
    reply = h.take(client)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"l5d-proxy-error: malformed" in reply
    assert h.closed.get(client) is False, "a clean close, not a reset"
    assert not h.connects


def test_proxy_oversized_headers_are_431(make_harness) -> None:
    h = make_harness(max_header_bytes=1024)
    client = h.accept()
    h.recv(client, b"GET / HTTP/1.1\r\nHost: svc\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
    assert h.take(client).startswith(b"HTTP/1.1 431 ")
    assert client in h.closed


def test_proxy_upstream_death_mid_response_resets_client(make_harness) -> None:
    h = make_harness()
    client, upstream = open_exchange(h)
    h.recv(upstream, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    h.recv(upstream, b"")
    written = h.take(client)
    assert written.endswith(b"abc")
    assert h.closed.get(client) is True, "the client must see an abort, never a complete short body"


def test_proxy_upstream_close_before_response_is_502(make_harness) -> None:
    h = make_harness()
    client, upstream = open_exchange(h)
    h.recv(upstream, b"")
    reply = h.take(client)
    assert reply.startswith(b"HTTP/1.1 502 ") and b"closed the connection before the response" in reply


def test_proxy_chunked_upload_streams_before_end(make_harness) -> None:
    h = make_harness()
    client, upstream = open_exchange(h, b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n")
    h.take(upstream)
    h.recv(client, b"5\r\nhello\r\n")
    assert b"hello" in h.take(upstream), "body bytes go upstream as they arrive"
    h.recv(client, b"0\r\n\r\n")
    assert h.take(upstream).endswith(b"0\r\n\r\n")


def test_proxy_backpressure_stops_reading_upstream(make_harness) -> None:
    h = make_harness(max_buffered_bytes=1024)
    h.auto_ack = False
    client, upstream = open_exchange(h)
    h.recv(upstream, b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 4000)
    assert h.reading.get(upstream) is False, "a slow client must pause the endpoint"
    pending = len(h.take(client))
    h.proxy.sent(client, pending, h.now_ns)
    h.pump()
    assert h.reading.get(upstream) is True


def test_proxy_waits_for_response_before_next_pipelined_request(make_harness) -> None:
    h = make_harness()
    client, upstream = open_exchange(h, GET + GET)
    assert h.take(upstream).count(b"GET /x") == 1
    assert h.reading.get(client) is not False, "a small pipelined request waits in the parser, reading on"
    h.recv(upstream, OK)
    assert h.take(upstream).count(b"GET /x") == 1, "the pipelined request goes out after the first answer"


def test_pipelined_requests_beyond_the_buffer_limit_pause_reading(make_harness) -> None:
    h = make_harness(max_buffered_bytes=1024)
    client, upstream = open_exchange(h, GET * 60)
    assert h.take(upstream).count(b"GET /x") == 1
    assert h.reading.get(client) is False, "over 1 KiB of pipelined requests: stop reading until answered"
    h.recv(upstream, OK)
    assert h.take(upstream).count(b"GET /x") == 1


def test_proxy_idle_client_connection_closes(make_harness) -> None:
    h = make_harness(idle_timeout_ns=5_000_000_000)
    client = h.accept()
    h.advance(6)
    assert h.closed.get(client) is False


def test_proxy_shutdown_drains_in_flight_then_closes(make_harness) -> None:
    h = make_harness()
    idle = h.accept()
    client, upstream = open_exchange(h)
    h.proxy.shutdown(h.now_ns)
    h.pump()
    assert idle in h.closed and client not in h.closed
    h.recv(upstream, OK)
    reply = h.take(client)
    assert reply.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in reply.lower()
    assert client in h.closed and h.proxy.is_drained()


def test_proxy_round_robin_spreads_across_endpoints(make_harness) -> None:
    h = make_harness(endpoints=[Address("10.0.0.1", 80), Address("10.0.0.2", 80)])
    for _ in range(4):
        h.recv(h.accept(), GET)
    hosts = [connect.address.host for connect in h.connects]
    assert sorted(hosts) == ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"]


def test_proxy_pool_limit_queues_then_serves(make_harness) -> None:
    h = make_harness(pool_max_connections_per_endpoint=1)
    first, upstream = open_exchange(h)
    second = h.accept()
    h.recv(second, GET)
    assert len(h.connects) == 1, "the second request waits for the only connection"
    h.take(upstream)
    h.recv(upstream, OK)
    assert h.take(upstream).startswith(b"GET /x"), "the waiter is served on the released connection"
    h.recv(upstream, OK)
    assert h.take(second).startswith(b"HTTP/1.1 200 OK")


def test_proxy_telemetry_counts_with_linkerd_labels(make_harness) -> None:
    h = make_harness()
    client, upstream = open_exchange(h)
    h.recv(upstream, OK)
    telemetry = h.proxy.telemetry
    (labels,) = telemetry.request_total
    assert (labels.direction, labels.authority, labels.target_addr) == ("outbound", "svc", "10.0.0.1:80")
    assert telemetry.request_total[labels] == 1
    assert telemetry.response_total == {(labels, "success", 200, ""): 1}
    assert telemetry.response_latency_ms[(labels, 200)].count == 1
    by_peer = {tcp.peer: tcp for tcp in telemetry.tcp_open_total}
    assert telemetry.tcp_open_connections == {by_peer["src"]: 1, by_peer["dst"]: 1}
    assert telemetry.tcp_read_bytes_total[by_peer["src"]] == len(GET)
    assert telemetry.tcp_read_bytes_total[by_peer["dst"]] == len(OK)
    assert telemetry.tcp_write_bytes_total[by_peer["src"]] == len(h.take(client))
    h.recv(client, b"")  # the client leaves
    h.advance(11)  # the pooled upstream connection idles out
    assert telemetry.tcp_open_connections == {by_peer["src"]: 0, by_peer["dst"]: 0}
    assert telemetry.tcp_close_total == {by_peer["src"]: 1, by_peer["dst"]: 1}
    assert telemetry.tcp_connection_duration_ms[by_peer["dst"]].count == 1


def test_proxy_failed_request_is_a_failure_response(make_harness) -> None:
    h = make_harness(endpoints=[])
    h.recv(h.accept(), GET)
    ((labels, classification, status, _grpc),) = h.proxy.telemetry.response_total
    assert (labels.authority, labels.target_addr, classification, status) == ("svc", "", "failure", 503)
