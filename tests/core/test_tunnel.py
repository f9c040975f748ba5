"""Protocol detection in the proxy and opaque TCP tunnels, driven without any I/O."""

from __future__ import annotations

from tether.core.address import Address
from tether.core.discovery import StaticResolver
from tether.core.proxy.transport_header import PREFACE, TransportHeader, parse

GET = b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n"


def open_tunnel(h, first: bytes = b"") -> tuple[int, int]:
    client = h.accept()
    if first:
        h.recv(client, first)
    upstream = h.connects[-1].conn_id
    h.connected(upstream)
    return client, upstream


def test_opaque_mode_pipes_bytes_both_ways(make_harness) -> None:
    h = make_harness(protocol="opaque")
    client = h.accept()
    assert h.connects, "an opaque connection dials at once: the server may speak first"
    upstream = h.connects[0].conn_id
    h.recv(client, b"early bytes ")
    h.connected(upstream)
    assert h.take(upstream) == b"early bytes "
    h.recv(upstream, b"banner\r\n")
    assert h.take(client) == b"banner\r\n"
    h.recv(client, b"\x00\x01binary")
    assert h.take(upstream) == b"\x00\x01binary"


def test_tunnel_half_close_carries_each_end_of_stream(make_harness) -> None:
    h = make_harness(protocol="opaque")
    client, upstream = open_tunnel(h)
    h.recv(client, b"last words")
    h.recv(client, b"")
    assert h.shutdowns == [upstream], "the client's EOF becomes a FIN towards the endpoint"
    assert client not in h.closed, "the reverse direction still flows"
    h.recv(upstream, b"the reply")
    assert h.take(client) == b"the reply"
    h.recv(upstream, b"")
    assert h.shutdowns == [upstream, client]
    assert h.closed == {upstream: False, client: False}, "both ends done: both close cleanly"
    assert h.proxy.open_connections == 0


def test_tunnel_connect_failure_resets_client(make_harness) -> None:
    h = make_harness(protocol="opaque")
    client = h.accept()
    h.proxy.connect_failed(h.connects[0].conn_id, "connection refused", h.now_ns)
    h.pump()
    assert h.closed.get(client) is True
    assert any("connection refused" in error for error in h.errors)


def test_tunnel_reset_on_one_side_resets_the_other(make_harness) -> None:
    h = make_harness(protocol="opaque")
    client, upstream = open_tunnel(h)
    h.proxy.closed(upstream, h.now_ns)
    h.pump()
    assert h.closed.get(client) is True and h.proxy.open_connections == 0


def test_tunnel_backpressure_pauses_the_feeding_side(make_harness) -> None:
    h = make_harness(protocol="opaque", max_buffered_bytes=1024)
    h.auto_ack = False
    client, upstream = open_tunnel(h)
    h.recv(upstream, b"x" * 4096)
    assert h.reading.get(upstream) is False
    h.proxy.sent(client, len(h.take(client)), h.now_ns)
    h.pump()
    assert h.reading.get(upstream) is True


def test_detect_http_request_goes_through_http(make_harness) -> None:
    h = make_harness(protocol="detect")
    client = h.accept()
    h.recv(client, GET[:9])
    assert not h.connects, "a prefix of a request line waits for more"
    h.recv(client, GET[9:])
    upstream = h.connects[0].conn_id
    h.connected(upstream)
    assert h.take(upstream).startswith(b"GET /x HTTP/1.1\r\nhost: svc")


def test_detect_other_bytes_become_a_tunnel(make_harness) -> None:
    h = make_harness(protocol="detect")
    client, upstream = open_tunnel(h, b"\x16\x03\x01 not http")
    assert h.take(upstream) == b"\x16\x03\x01 not http"


def test_detect_timeout_tunnels_a_silent_client(make_harness) -> None:
    h = make_harness(protocol="detect", detect_timeout_ns=2_000_000_000)
    client = h.accept()
    h.advance(1)
    assert not h.connects
    h.advance(1.5)
    assert h.connects, "after the detect timeout the server may speak first"
    h.connected(h.connects[0].conn_id)
    h.recv(h.connects[0].conn_id, b"220 smtp ready\r\n")
    assert h.take(client) == b"220 smtp ready\r\n"


def test_http1_mode_still_answers_garbage_with_400(make_harness) -> None:
    h = make_harness()
    client = h.accept()
    h.recv(client, b"\x16\x03\x01 not http\r\n\r\n")
    assert h.take(client).startswith(b"HTTP/1.1 400 ")


UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_upgrade_101_turns_the_exchange_into_a_pipe(make_harness) -> None:
    h = make_harness()
    client = h.accept()
    h.recv(client, UPGRADE)
    upstream = h.connects[0].conn_id
    h.connected(upstream)
    forwarded = h.take(upstream).lower()
    assert b"upgrade: websocket" in forwarded and b"connection: upgrade" in forwarded
    h.recv(upstream, SWITCH + b"\x81\x05hello")  # a frame right behind the head
    reply = h.take(client)
    assert reply.startswith(b"HTTP/1.1 101 ") and b"upgrade: websocket" in reply.lower()
    assert reply.endswith(b"\x81\x05hello")
    h.recv(client, b"\x81\x85masked")
    assert h.take(upstream) == b"\x81\x85masked"
    ((labels, classification, status, _grpc),) = h.proxy.telemetry.response_total
    assert (status, classification) == (101, "success"), "the upgrade still counts as a response"


def test_connect_2xx_turns_the_exchange_into_a_pipe(make_harness) -> None:
    h = make_harness()
    client = h.accept()
    h.recv(client, b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n")
    upstream = h.connects[0].conn_id
    h.connected(upstream)
    assert h.take(upstream).startswith(b"CONNECT db:5432 HTTP/1.1")
    h.recv(upstream, b"HTTP/1.1 200 Connection established\r\n\r\n")
    assert h.take(client).startswith(b"HTTP/1.1 200 ")
    h.recv(client, b"\x00\x00\x00\x08startup")
    assert h.take(upstream) == b"\x00\x00\x00\x08startup"


def test_declined_upgrade_stays_http(make_harness) -> None:
    h = make_harness()
    client = h.accept()
    h.recv(client, UPGRADE)
    upstream = h.connects[0].conn_id
    h.connected(upstream)
    h.take(upstream)
    h.recv(upstream, b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
    assert h.take(client).startswith(b"HTTP/1.1 426 ")
    assert h.proxy.telemetry.tcp_open_connections  # nothing switched: the proxy still owns both as HTTP


def test_redirected_connection_to_an_opaque_port_skips_detection(make_harness) -> None:
    h = make_harness(protocol="detect")
    conn = h.proxy.accepted(h.now_ns, target="10.0.0.9:3306")
    h.pump()
    assert h.connects, "MySQL speaks first: the proxy dials at once instead of waiting to detect"
    h.connected(h.connects[0].conn_id)
    h.recv(h.connects[0].conn_id, b"\x4a\x00\x00\x00\x0a8.0.36")
    assert h.take(conn) == b"\x4a\x00\x00\x00\x0a8.0.36"


def test_meshed_opaque_connection_goes_to_peer_inbound_with_transport_header(make_harness) -> None:
    resolver = StaticResolver(by_host={"db": [Address("10.0.0.7", 5432)]}, meshed_hosts={"db": 4143})
    outbound = make_harness(resolver=resolver, protocol="opaque")
    client = outbound.proxy.accepted(0, target="db:5432")
    outbound.pump()
    (connect,) = outbound.connects
    assert connect.address == Address("10.0.0.7", 4143), "opaque traffic to a meshed peer goes to its inbound port"
    outbound.recv(client, b"\x00\x00\x00\x08startup")
    outbound.connected(connect.conn_id)
    wire = outbound.take(connect.conn_id)
    header, used = parse(wire)  # type: ignore[misc]
    assert header == TransportHeader(5432) and wire[used:] == b"\x00\x00\x00\x08startup"

    inbound = make_harness([Address("127.0.0.1", 80)], direction="inbound", protocol="detect")
    peer = inbound.accept()
    inbound.recv(peer, wire[:10])
    assert not inbound.connects, "half a preface: wait"
    inbound.recv(peer, wire[10:])
    (local,) = inbound.connects
    assert local.address == Address("127.0.0.1", 5432), "the header names the workload's port"
    inbound.connected(local.conn_id)
    assert inbound.take(local.conn_id) == b"\x00\x00\x00\x08startup"


def test_invalid_transport_header_resets_the_peer(make_harness) -> None:
    h = make_harness(protocol="detect")
    peer = h.accept()
    h.recv(peer, PREFACE + b"\x00\x00\x00\x02\x08\x00")  # port 0
    assert h.closed.get(peer) is True and not h.connects
    assert any("invalid transport header" in error for error in h.errors)
