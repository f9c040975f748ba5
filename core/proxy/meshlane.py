"""The meshed hop's common case without h11 events: a whole HTTP/1.1 message in, one HTTP/2 head out.

Theory of operation
-------------------
Between two meshed proxies an HTTP/1.1 exchange rides HTTP/2 with ``l5d-orig-proto`` (h2flows.py,
h2upstream.py, h2h1sink.py). On the event path each side of it is a handful of h11 events, each built,
dispatched and checked again. This module takes the common case of three steps whole, as h1lane.py does
for HTTP/1.1 to HTTP/1.1:

- ``_mesh_lane_request`` (outbound, called from h1lane.py's ``_lane_request`` for a meshed peer): a
  common-case head with its whole Content-Length body, not CONNECT, certainly within the head limit. The
  ``RequestHead`` is made from the parsed head directly (what ``head_from_h1`` makes of the h11 event), and
  the exchange goes through the same steps as the event path: ``_start_h1_over_h2``, ``_request_body``,
  ``_request_done``, then the connection's read state.
- ``_source_response_head_bytes`` (outbound, for ``_sink_response_head``): the response head towards an
  HTTP/1.1 client is written from the HTTP/2 head, as for the workload's request head below.
- ``_sink_request_head_bytes`` (inbound, for ``_bind_h1_sink``): the HTTP/1.1 head towards the workload is
  written from the ``RequestHead`` ``head_from_h2`` checked, with h1heads.py's writer, instead of an h11
  event that h11 serialises; only for a head h11 would frame by Content-Length (or not at all).
- ``_sink_lane_response`` (inbound, from ``_h1_sink_received``): the workload's common-case response with
  its whole Content-Length body goes to the exchange as ``_h1_sink_events`` would hand it on (the head
  held back and written with the body: HEADERS and DATA with END_STREAM in one write). A head whose body
  is not all here continues on the event path from that head.

Everything observable stays as the event path makes it, in the same order: effects and their bytes,
deadlines, metrics (``l5d-orig-proto`` handling included), balancer leases, flow control. The lane only
skips building events nobody keeps and checks already made. tests/core/test_meshlane.py runs the same
meshed traffic through both paths and compares what comes out.

This class holds only methods; the state lives in the ``Proxy`` that inherits it (machine.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tether.core.discovery import EndpointSet
from tether.core.proxy import h2translate as tr
from tether.core.proxy.connections import Downstream, Upstream, UpstreamState
from tether.core.proxy.h1heads import Head, request_event, response_event, write_head
from tether.core.proxy.h1lane import whole_response
from tether.core.proxy.http1 import HOP_BY_HOP
from tether.core.proxy.parts import ProxyParts
from tether.core.proxy.streams import StreamExchange

_NO_LANE_RESPONSE_METHODS = (b"HEAD", b"CONNECT")  # their responses are framed differently
_NOT_FORWARDED = HOP_BY_HOP | {b"host"}  # head_from_h1: hop-by-hop headers go, and Host becomes :authority


class MeshLane(ProxyParts):
    if TYPE_CHECKING:  # defined by the flows
        _traffic_on: bool

        def _start_h1_over_h2(
            self, downstream: Downstream, request: object, authority: str, endpoint_set: EndpointSet
        ) -> None: ...
        def _new_stream_exchange(
            self,
            downstream: Downstream,
            stream_id: int | None,
            head: tr.RequestHead,
            authority: str,
            endpoint_set: EndpointSet | None,
            now_ns: int,
        ) -> StreamExchange: ...
        def _dispatch_stream(self, exchange: StreamExchange, endpoint_set: EndpointSet | None) -> None: ...
        def _lane_request_rest(self, downstream: Downstream, body: bytes, now_ns: int) -> None: ...
        def _h1_sink_events(self, upstream: Upstream, held: list[StreamExchange], first: object = None) -> None: ...
        def _write_source(self, exchange: StreamExchange) -> None: ...
        def _sync_h1_sink_reading(self, upstream: Upstream) -> None: ...
        def _release_h1_sink(self, upstream: Upstream) -> None: ...
        def _sink_response_head(
            self,
            exchange: StreamExchange,
            status: int,
            headers: list[tuple[bytes, bytes]],
            *,
            ended: bool,
            write: bool = True,
        ) -> None: ...
        def _sink_response_end(
            self, exchange: StreamExchange, trailers: list[tuple[bytes, bytes]] | None, data: bytes = b""
        ) -> None: ...

    # ---------------------------------------------------------------- outbound: the client's request

    def _mesh_lane_request(
        self, downstream: Downstream, head: Head, authority: str, endpoint_set: EndpointSet, now_ns: int
    ) -> bool:
        """A parsed head from a client, bound for a meshed peer; False: nothing happened (the head goes on
        as its h11 event, h1lane.py)."""
        assert endpoint_set.meshed_inbound_port is not None
        if (
            not endpoint_set.endpoints
            or head.method == b"CONNECT"  # http1.wants_tunnel (a lane head carries no Upgrade)
            # http1.head_size counts at most the wire length - 2 + one byte a line (h1lane.py).
            or head.length - 2 + len(head.fields) > self.config.max_header_bytes
        ):
            return False
        body = downstream.h11.take_body()
        if body is None:
            return False
        # _request_started's meshed branch, then _start_h1_over_h2 with the head made here.
        self._deadlines.cancel(("idle", downstream.conn_id))
        request_head = _request_head(head, authority)
        exchange = self._new_stream_exchange(downstream, None, request_head, authority, endpoint_set, self._now_ns)
        exchange.request_has_body = head.framing > 0  # tr.h1_has_body: a lane head has no Transfer-Encoding
        self._dispatch_stream(exchange, endpoint_set)
        self._lane_request_rest(downstream, body, now_ns)  # h1lane.py
        return True

    # ---------------------------------------------------------------- outbound: the response to the client

    def _source_response_head_bytes(
        self,
        exchange: StreamExchange,
        downstream: Downstream,
        status: int,
        headers: list[tuple[bytes, bytes]],
        close: bool,
    ) -> bytes:
        """``downstream.h11.send(tr.h1_response(status, headers, close=close))`` for an HTTP/1.1 client, written
        out here when h11 would frame it by Content-Length (a response to HEAD or CONNECT, a 204 or 304, and
        one of unknown length go to h11)."""
        rows: list[tuple[bytes, bytes, bytes]] = []
        length = tr.h1_rows(headers, rows)
        if not length or status in (204, 304) or exchange.head.method in _NO_LANE_RESPONSE_METHODS:
            return downstream.h11.send(tr.h1_response(status, headers, close=close))
        framing = int(next(value for _, name, value in rows if name == b"content-length"))
        if close:
            rows.append((b"connection", b"connection", b"close"))
        reason = tr.reason_phrase(status)
        wire = write_head(b"HTTP/1.1 %d %s\r\n" % (status, reason), rows)

        def event() -> object:  # for h11, should this connection ever need it
            return response_event(status, reason, rows)

        return downstream.h11.send_prepared(event, wire, framing, keep_alive=not close)

    # ---------------------------------------------------------------- inbound: towards the workload

    def _sink_request_head_bytes(self, exchange: StreamExchange, upstream: Upstream, *, has_body: bool) -> bytes:
        """``upstream.h11.send(tr.h1_request(exchange.head, has_body=has_body))``, written out here when h11
        would frame it by Content-Length or not at all (a chunked upload, HEAD and CONNECT go to h11)."""
        head = exchange.head
        rows = [(b"host", b"host", head.authority or b"localhost")]
        length = tr.h1_rows(head.headers, rows)
        if (has_body and not length) or head.method in _NO_LANE_RESPONSE_METHODS:
            return upstream.h11.send(tr.h1_request(head, has_body=has_body))
        framing = 0
        if length:
            framing = int(next(value for _, name, value in rows if name == b"content-length"))
        wire = write_head(b"%s %s HTTP/1.1\r\n" % (head.method, head.path), rows)

        def event() -> object:  # for h11, should this connection ever need it
            return request_event(head.method, head.path, rows)

        return upstream.h11.send_prepared(event, wire, framing)

    def _sink_lane_response(self, upstream: Upstream, data: bytes) -> bool:
        """``data`` from the workload while ``upstream`` carries an exchange; False: nothing happened, the
        parser takes it as usual (h2h1sink.py's ``_h1_sink_received``)."""
        exchange = self._streams.get(upstream.exchange_id or -1)
        if exchange is None or exchange.head.method in _NO_LANE_RESPONSE_METHODS:
            return False
        read = whole_response(upstream.h11, data, self.config.max_header_bytes)
        if read is None:
            return False
        head, body = read
        held: list[StreamExchange] = []
        try:
            if body is None:
                self._h1_sink_events(upstream, held, head.event())  # the event path from this head on
            else:
                self._sink_lane_whole(upstream, exchange, head, body, held)
        finally:
            for waiting in held:
                self._write_source(waiting)
        self._sync_h1_sink_reading(upstream)
        return True

    def _sink_lane_whole(
        self, upstream: Upstream, exchange: StreamExchange, head: Head, body: bytes, held: list[StreamExchange]
    ) -> None:
        """A whole response: ``_h1_sink_events`` for a Response, maybe a Data, and an EndOfMessage."""
        headers = [(name, value) for _, name, value in head.fields]  # http1.pairs
        if not body:  # _h1_sink_last for the head: the end was read with it
            upstream.exchange_id = None
            self._release_h1_sink(upstream)
            self._sink_response_head(exchange, head.status, headers, ended=True)
            return
        write = exchange.source_stream is None  # an HTTP/2 client gets the head with the body (held)
        if not write:
            held.append(exchange)
        self._sink_response_head(exchange, head.status, headers, ended=False, write=write)
        if upstream.conn_id not in self._upstream or upstream.state is not UpstreamState.BUSY:
            return
        current = self._streams.get(upstream.exchange_id or -1)
        if current is None:
            self._close_upstream(upstream, reset=True)
            return
        upstream.exchange_id = None  # _h1_sink_last for the body
        self._release_h1_sink(upstream)
        self._sink_response_end(current, None, body)


def _request_head(head: Head, authority: str) -> tr.RequestHead:
    """``tr.head_from_h1(head.event(), authority)`` for a lane head: its Connection header names nothing but
    keep-alive (already hop-by-hop), and it carries no Transfer-Encoding."""
    headers = [(name, value) for _, name, value in head.fields if name not in _NOT_FORWARDED]
    return tr.RequestHead(head.method, b"http", authority.encode(), tr.h2_path(head.target), headers, tr.HTTP11)
