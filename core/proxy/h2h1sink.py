"""The HTTP/1.1 sink of a StreamExchange: a request that arrived over HTTP/2 restored to HTTP/1.1.

Theory of operation
-------------------
A request a meshed peer upgraded (``l5d-orig-proto: HTTP/1.1``), and an HTTP/1.1 client's request bound
for an endpoint outside the mesh, reach the workload over HTTP/1.1 (h2upstream.py's ``_dispatch_stream``
decides). Each endpoint has a pool of HTTP/1.1 connections (``_h1_sink_pools``): a stream takes an idle
one, else opens one while the pool has room, else waits (at most ``pool_max_waiters_per_endpoint``).
A connection carries one exchange at a time; the h11 parser reads the response, which goes back to the
StreamExchange's source through the ``_sink_*`` handlers (h2flows.py). A connection whose response ended
cleanly returns to the pool (or serves a waiter); any other is closed. The sink is read only while the
source's queues are under ``max_buffered_bytes``. This class holds only methods; the state lives in the
``Proxy`` that inherits it (machine.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h11

from tether.core.address import Address
from tether.core.effects import Connect
from tether.core.proxy import h2translate as tr
from tether.core.proxy import http1
from tether.core.proxy.connections import Downstream, Upstream, UpstreamState
from tether.core.proxy.errors import ProxyError, ProxyErrorKind
from tether.core.proxy.meshlane import MeshLane
from tether.core.proxy.pool import EndpointPool, pool_for
from tether.core.proxy.streams import StreamExchange


class H1Sink(MeshLane):
    if TYPE_CHECKING:  # defined by the other flows

        def _write_h2(self, connection: Downstream | Upstream) -> None: ...
        def _stream_fail(self, exchange: StreamExchange, error: ProxyError) -> None: ...
        def _stream_attempt_started(self, exchange: StreamExchange) -> None: ...
        def _end_sink_request(self, exchange: StreamExchange) -> None: ...
        def _after_sink_progress(self, exchange: StreamExchange) -> None: ...
        def _sink_connection_lost(self, upstream: Upstream, reason: str, *, already_closed: bool = False) -> None: ...
        def _sink_informational(
            self, exchange: StreamExchange, status: int, headers: list[tuple[bytes, bytes]]
        ) -> None: ...
        def _sink_response_data(self, exchange: StreamExchange, data: bytes) -> None: ...

    def _h1_sink_pool(self, endpoint: Address) -> EndpointPool:
        return pool_for(self._h1_sink_pools, endpoint, self.config)

    def _h1_sink_dispatch(self, exchange: StreamExchange, endpoint: Address) -> None:
        pool = self._h1_sink_pool(endpoint)
        idle_id = pool.take_idle()
        if idle_id is not None:
            self._deadlines.cancel(("pool-idle", idle_id))
            self._bind_h1_sink(exchange, self._upstream[idle_id])
        elif pool.has_capacity():
            conn_id = self._new_id()
            upstream = Upstream(conn_id, self._new_upstream_parser(), endpoint, stream_world=True)
            upstream.exchange_id = exchange.exchange_id
            self._upstream[conn_id] = upstream
            pool.connection_ids.add(conn_id)
            exchange.sink_id = conn_id
            self._effects.append(Connect(conn_id=conn_id, address=endpoint))
            self._deadlines.set(("connect", conn_id), self._now_ns + self.config.connect_timeout_ns)
        elif pool.can_queue():
            pool.waiting_exchange_ids.append(exchange.exchange_id)
        else:
            reason = f"{pool.max_connections} connections to {endpoint} busy and {pool.max_waiters} waiting"
            self._stream_fail(exchange, ProxyError(ProxyErrorKind.POOL_EXHAUSTED, reason))

    def _bind_h1_sink(self, exchange: StreamExchange, upstream: Upstream) -> None:
        if exchange.route is not None:
            self._stream_attempt_started(exchange)
        upstream.state = UpstreamState.BUSY
        upstream.exchange_id = exchange.exchange_id
        exchange.sink_id = upstream.conn_id
        has_body = exchange.request_has_body and not (exchange.request_ended and not exchange.to_sink)
        exchange.request_chunked = has_body and not tr.has_content_length(exchange.head.headers)
        self._send(upstream, self._sink_request_head_bytes(exchange, upstream, has_body=has_body))  # meshlane.py
        while exchange.to_sink:
            self._send(upstream, upstream.h11.send(h11.Data(data=exchange.to_sink.popleft())))
        exchange.to_sink_bytes = 0
        self._end_sink_request(exchange)
        self._after_sink_progress(exchange)

    def _h1_sink_received(self, upstream: Upstream, data: bytes) -> None:
        if upstream.state is UpstreamState.IDLE:
            self._close_upstream(upstream, reset=bool(data))  # nothing was asked: bytes or EOF end it
            return
        if data and upstream.state is UpstreamState.BUSY and self._sink_lane_response(upstream, data):
            return  # the lane took it (meshlane.py)
        upstream.eof = upstream.eof or not data
        upstream.h11.receive_data(data)
        held: list[StreamExchange] = []  # exchanges whose response head waits for the body read with it
        try:
            self._h1_sink_events(upstream, held)
        finally:
            for exchange in held:  # whatever happened since, their HTTP/2 client gets its bytes now
                self._write_source(exchange)
        self._sync_h1_sink_reading(upstream)

    def _h1_sink_events(self, upstream: Upstream, held: list[StreamExchange], first: object = None) -> None:
        """The sink's events, from ``first`` (already read) if given."""
        ahead: object = first  # the event after the current one, read early (below)
        while upstream.conn_id in self._upstream and upstream.state is UpstreamState.BUSY:
            exchange = self._streams.get(upstream.exchange_id or -1)
            event, ahead = (ahead if ahead is not None else _next_h1_event(upstream)), None
            if isinstance(event, h11.RemoteProtocolError):
                self._sink_connection_lost(upstream, f"invalid response from {upstream.endpoint}: {event}"[:300])
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if exchange is None:
                self._close_upstream(upstream, reset=True)
                return
            write = True
            if type(event) is h11.Response or type(event) is h11.Data:
                # A response head or body bytes followed by the end of the message: both go on together, so
                # that an HTTP/2 client gets END_STREAM on the same frame (HEADERS, or the last DATA). A head
                # followed by body bytes leaves with them: one write (one TLS record) instead of two.
                ahead = _next_h1_event(upstream)
                if type(ahead) is h11.EndOfMessage and not ahead.headers:  # type: ignore[attr-defined]
                    ahead = None
                    self._h1_sink_last(upstream, exchange, event)
                    continue
                if type(event) is h11.Response and type(ahead) is h11.Data and exchange.source_stream is not None:
                    write = False
                    held.append(exchange)
            self._h1_sink_event(upstream, exchange, event, write=write)

    def _write_source(self, exchange: StreamExchange) -> None:
        downstream = self._downstream.get(exchange.source_id)
        if downstream is not None and downstream.h2 is not None:
            self._write_h2(downstream)

    def _h1_sink_last(self, upstream: Upstream, exchange: StreamExchange, event: h11.Response | h11.Data) -> None:
        """``event`` is the last of the response (its end was read too): the connection is released first,
        as for an ``EndOfMessage``, since finishing the exchange would otherwise find its sink busy."""
        if type(event) is h11.Response and http1.head_size(event) > self.config.max_header_bytes:
            reason = f"response head from {upstream.endpoint} larger than {self.config.max_header_bytes} bytes"
            self._sink_connection_lost(upstream, reason)
            return
        upstream.exchange_id = None
        self._release_h1_sink(upstream)
        if type(event) is h11.Response:
            self._sink_response_head(exchange, event.status_code, http1.pairs(event), ended=True)
        else:
            self._sink_response_end(exchange, None, bytes(event.data))  # type: ignore[union-attr]

    def _h1_sink_event(self, upstream: Upstream, exchange: StreamExchange, event: object, *, write: bool) -> None:
        if isinstance(event, h11.InformationalResponse):
            self._sink_informational(exchange, event.status_code, http1.pairs(event))
        elif isinstance(event, h11.Response):
            if http1.head_size(event) > self.config.max_header_bytes:
                reason = f"response head from {upstream.endpoint} larger than {self.config.max_header_bytes} bytes"
                self._sink_connection_lost(upstream, reason)
                return
            self._sink_response_head(exchange, event.status_code, http1.pairs(event), ended=False, write=write)
        elif isinstance(event, h11.Data):
            self._sink_response_data(exchange, bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            upstream.exchange_id = None
            self._release_h1_sink(upstream)
            self._sink_response_end(exchange, list(event.headers))
        elif isinstance(event, h11.ConnectionClosed):
            self._sink_connection_lost(upstream, f"{upstream.endpoint} closed the connection")

    def _release_h1_sink(self, upstream: Upstream) -> None:
        leftover, _closed = upstream.h11.trailing_data
        parser = upstream.h11
        clean = parser.our_state is h11.DONE and parser.their_state is h11.DONE and not leftover
        if upstream.state is UpstreamState.BUSY and not clean:
            self._close_upstream(upstream)
            return
        if upstream.state is UpstreamState.BUSY:
            parser.start_next_cycle()
        upstream.state = UpstreamState.IDLE
        pool = self._h1_sink_pool(upstream.endpoint)
        while pool.waiting_exchange_ids:
            waiting = self._streams.get(pool.waiting_exchange_ids.popleft())
            if waiting is not None and not waiting.done and waiting.sink_id is None:
                self._bind_h1_sink(waiting, upstream)
                return
        if self._draining or not pool.keep_idle(upstream.conn_id):
            self._close_upstream(upstream)
            return
        self._deadlines.set(("pool-idle", upstream.conn_id), self._now_ns + self.config.pool_idle_timeout_ns)
        self._set_reading(upstream, True)

    def _serve_h1_sink_waiters(self, pool: EndpointPool) -> None:
        while pool.waiting_exchange_ids and pool.has_capacity():
            exchange = self._streams.get(pool.waiting_exchange_ids.popleft())
            if exchange is not None and not exchange.done and exchange.sink_id is None:
                self._h1_sink_dispatch(exchange, pool.endpoint)

    def _sync_h1_sink_reading(self, upstream: Upstream) -> None:
        if upstream.conn_id not in self._upstream or upstream.state is not UpstreamState.BUSY:
            return
        exchange = self._streams.get(upstream.exchange_id or -1)
        source = self._downstream.get(exchange.source_id) if exchange is not None else None
        limit = self.config.max_buffered_bytes
        wanted = source is None or source.unsent_bytes < limit
        if wanted and source is not None and source.h2 is not None and exchange is not None:
            wanted = source.h2.queued_bytes(exchange.source_stream or 0) < limit
        self._set_reading(upstream, wanted)


def _next_h1_event(upstream: Upstream) -> object:
    """The sink connection's next event, or the error its bytes make."""
    try:
        return upstream.h11.next_event()
    except h11.RemoteProtocolError as error:
        return error
