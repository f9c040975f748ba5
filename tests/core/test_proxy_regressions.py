"""Proxy bugs the stateful test found, shrunk to plain reproductions and kept as regression tests."""

from __future__ import annotations

import random

import h11
import pytest
from stateful_support import (
    ENDPOINTS,
    MALFORMED,
    UNSOLICITED_RESPONSE,
    WHOLE_HEAD_ACCEPTED_BY_H11,
    _header,
)

from tether.core.config import ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.effects import Close, Connect, Send
from tether.core.proxy import Proxy

# ---------------------------------------------------------------------------------------------------------
# Proxy bugs the state machine found, shrunk to plain reproductions; fixed, they stay as regression tests.


class _Wire:
    """A bare driver for the reproductions: one proxy, every write acknowledged at once, bytes kept per id."""

    def __init__(self) -> None:
        resolver = StaticResolver(default=[ENDPOINTS[0]])
        self.proxy = Proxy(ProxyConfig(), resolver, random.Random(0))
        self.written: dict[int, bytearray] = {}
        self.closed: dict[int, bool] = {}  # conn id -> reset
        self.connects: list[int] = []

    def accept(self) -> int:
        conn_id = self.proxy.accepted(0)
        self._pump()
        return conn_id

    def receive(self, conn_id: int, data: bytes) -> None:
        self.proxy.received(conn_id, data, 0)
        self._pump()

    def connect(self, conn_id: int) -> None:
        self.proxy.connected(conn_id, 0)
        self._pump()

    def _pump(self) -> None:
        while effects := self.proxy.effects():
            for effect in effects:
                if isinstance(effect, Send):
                    self.written.setdefault(effect.conn_id, bytearray()).extend(effect.data)
                    self.proxy.sent(effect.conn_id, len(effect.data), 0)
                elif isinstance(effect, Close):
                    self.closed[effect.conn_id] = effect.reset
                elif isinstance(effect, Connect):
                    self.connects.append(effect.conn_id)


def _request_seen_by_endpoint(data: bytes) -> tuple[h11.Request, bytes, bool]:
    """Parse what the proxy wrote upstream: the request head, its body, and whether the body ended."""
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(data)
    head = parser.next_event()
    assert isinstance(head, h11.Request), head
    body = b""
    while isinstance(event := parser.next_event(), h11.Data):
        body += event.data
    return head, body, isinstance(event, h11.EndOfMessage)


def _first_response_id(data: bytes) -> bytes | None:
    """The x-request-id of the first response the proxy wrote to a client."""
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method="GET", target="/", headers=[("host", "svc.test")]))
    parser.send(h11.EndOfMessage())
    parser.receive_data(data)
    response = parser.next_event()
    assert isinstance(response, h11.Response), response
    return _header(list(response.headers), b"x-request-id")


def test_proxy_forwards_request_whose_connection_header_names_its_content_length() -> None:
    wire = _Wire()
    client = wire.accept()
    request = b"POST /items HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 3\r\nConnection: content-length\r\n\r\nabc"
    wire.receive(client, request)
    if not wire.connects:  # refusing the request outright would be as good as re-framing it
        assert bytes(wire.written[client]).startswith(b"HTTP/1.1 400 "), wire.written
        return
    (upstream,) = wire.connects
    wire.connect(upstream)
    _head, body, ended = _request_seen_by_endpoint(bytes(wire.written[upstream]))
    assert (body, ended) == (b"abc", True)


def test_proxy_drops_content_length_from_chunked_request() -> None:
    wire = _Wire()
    client = wire.accept()
    request = (
        b"POST /items HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    wire.receive(client, request)
    if not wire.connects:  # rejecting the message is the other answer RFC 9112 allows
        assert bytes(wire.written[client]).startswith(b"HTTP/1.1 400 "), wire.written
        return
    (upstream,) = wire.connects
    wire.connect(upstream)
    head, body, ended = _request_seen_by_endpoint(bytes(wire.written[upstream]))
    assert (body, ended) == (b"abc", True)
    assert _header(list(head.headers), b"content-length") is None, head


def test_proxy_never_hands_bytes_left_after_a_response_to_the_next_request() -> None:
    wire = _Wire()
    first, second = wire.accept(), wire.accept()
    wire.receive(first, b"GET /a HTTP/1.1\r\nHost: svc.test\r\nx-request-id: A\r\n\r\n")
    (upstream,) = wire.connects
    wire.connect(upstream)
    response_a = b"HTTP/1.1 200 OK\r\nx-request-id: A\r\ncontent-length: 5\r\n\r\nfor A"
    wire.receive(upstream, response_a + UNSOLICITED_RESPONSE)  # one read: A's response, then bytes nobody asked for
    assert _first_response_id(bytes(wire.written[first])) == b"A"
    wire.receive(second, b"GET /b HTTP/1.1\r\nHost: svc.test\r\nx-request-id: B\r\n\r\n")
    for conn_id in wire.connects[1:]:  # a fixed proxy does not reuse that connection and opens another
        wire.connect(conn_id)
    (carrier,) = [conn_id for conn_id in wire.connects if b"x-request-id: B" in wire.written.get(conn_id, b"")]
    wire.receive(carrier, b"HTTP/1.1 200 OK\r\nx-request-id: B\r\ncontent-length: 5\r\n\r\nfor B")
    assert _first_response_id(bytes(wire.written[second])) == b"B"  # today: b"unsolicited"


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_samples_are_malformed(name: str) -> None:
    """Harness check: h11 (the proxy's parser) refuses every MALFORMED sample, however it is split."""
    garbage = MALFORMED[name]
    sizes = (1, 7) if name == WHOLE_HEAD_ACCEPTED_BY_H11 else (1, 7, len(garbage))
    for size in sizes:
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=ProxyConfig().max_header_bytes)
        with pytest.raises(h11.RemoteProtocolError):
            for start in range(0, len(garbage), size):
                parser.receive_data(garbage[start : start + size])
                while parser.next_event() not in (h11.NEED_DATA, h11.PAUSED):
                    pass


def test_proxy_answers_head_request_with_error_head_and_no_body() -> None:
    """A HEAD whose endpoint cannot be reached gets the 502's head alone (the machine raised on the body)."""
    wire = _Wire()
    client = wire.accept()
    wire.receive(client, b"HEAD / HTTP/1.1\r\nHost: svc.test\r\n\r\n")
    (upstream,) = wire.connects
    wire.proxy.connect_failed(upstream, "refused", 0)
    wire._pump()
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method="HEAD", target="/", headers=[("host", "svc.test")]))
    parser.send(h11.EndOfMessage())
    parser.receive_data(bytes(wire.written[client]))
    response = parser.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 502, response
    assert isinstance(parser.next_event(), h11.EndOfMessage)
    assert parser.next_event() is h11.NEED_DATA  # nothing after the head: a body would be the next response
    assert client not in wire.closed
