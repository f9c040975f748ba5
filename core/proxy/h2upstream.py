"""The endpoint side of every StreamExchange: pooled HTTP/2 connections, and HTTP/1.1 ones.

Theory of operation
-------------------
Where a stream goes (``_dispatch_stream``):

- a request that arrived over HTTP/2 with ``l5d-orig-proto: HTTP/1.1`` (a meshed peer upgraded it) is
  restored to HTTP/1.1 towards the workload, on a pool of HTTP/1.1 connections per endpoint, as is an
  HTTP/1.1 client's request bound for an endpoint outside the mesh (a mirror's copy, a route's backend);
- a request to a meshed peer rides a multiplexed HTTP/2 connection to the peer's inbound port, opened
  with a transport header that names the workload port and says HTTP/2 (transport_header.py);
- any other HTTP/2 request keeps its protocol: HTTP/2 (h2c) to the endpoint.

HTTP/2 connections are pooled per (address, transport header): a stream takes a ready connection with
room under the peer's ``MAX_CONCURRENT_STREAMS`` (and ours); otherwise it waits (at most
``pool_max_waiters_per_endpoint`` per pool) while a connection opens, up to
``pool_max_connections_per_endpoint``. A connection with no streams closes after ``pool_idle_timeout``; one
that got GOAWAY takes no new streams, fails the streams the peer says it never processed, and closes when
the rest end. The HTTP/1.1 connections are h2h1sink.py's. This class holds only methods; the state lives
in the ``Proxy`` that inherits it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import h2.events
import h2.exceptions
import h11
from h2.errors import ErrorCodes

from tether.core.address import Address
from tether.core.discovery import EndpointSet
from tether.core.proxy import h2translate as tr
from tether.core.proxy import transport_header
from tether.core.proxy.balancing import Leaseholder
from tether.core.proxy.connections import Downstream, Upstream, UpstreamState
from tether.core.proxy.errors import ProxyError, ProxyErrorKind
from tether.core.proxy.h2h1sink import H1Sink
from tether.core.proxy.h2session import H2Limits, H2Session, H2SessionError
from tether.core.proxy.routing import RouteState
from tether.core.proxy.streams import H2Pool, StreamExchange
from tether.core.traffic.breaker import Outcome

NS_PER_MS = 1_000_000


class H2Upstream(H1Sink):
    if TYPE_CHECKING:  # defined by the other flows

        def _h2_limits(self) -> H2Limits: ...
        def _sync_h2_reading(self, connection: Downstream | Upstream) -> None: ...
        def _settle(self, exchange: StreamExchange) -> None: ...
        def _stream_abort(
            self, exchange: StreamExchange, reason: str, code: int = ErrorCodes.INTERNAL_ERROR
        ) -> None: ...
        def _abandon_stream(self, exchange: StreamExchange, code: int) -> None: ...
        def _reset_source(self, exchange: StreamExchange, code: int) -> None: ...
        def _ping_answered(self, connection: Downstream | Upstream, now_ns: int) -> None: ...
        def _exchange_progress(self, exchange: StreamExchange) -> None: ...
        def _credit_all(self, exchange: StreamExchange) -> None: ...
        def _credit_sink(self, exchange: StreamExchange) -> None: ...
        def _sync_h1_source_reading(self, downstream: Downstream) -> None: ...
        def _drop_lease(self, holder: Leaseholder, request_id: int, outcome: Outcome) -> None: ...
        def _route_rearm(self, request_id: int, state: RouteState) -> None: ...
        def _stream_request_bytes(self, exchange: StreamExchange, data: bytes) -> None: ...
        def _stream_failed_attempt(self, exchange: StreamExchange, error: ProxyError) -> bool: ...

    # ---------------------------------------------------------------- where a stream goes

    def _dispatch_stream(self, exchange: StreamExchange, endpoint_set: EndpointSet | None) -> None:
        endpoint = exchange.endpoint
        if endpoint is None and exchange.refusal is not None:
            self._stream_fail(exchange, exchange.refusal)
            return
        if endpoint is None and exchange.awaiting_endpoint:
            return  # in the backend's failfast queue: _stream_endpoint_ready dispatches it
        if endpoint is None and exchange.route is not None and exchange.route.waiting is not None:
            self._route_rearm(exchange.exchange_id, exchange.route)  # an injected delay first (h2traffic.py)
            return
        if endpoint is None:
            reason = f"no endpoints for {exchange.labels.authority or 'this request'}"
            self._stream_fail(exchange, ProxyError(ProxyErrorKind.NO_ENDPOINTS, reason))
            return
        meshed_port = endpoint_set.meshed_inbound_port if endpoint_set is not None else None
        # HTTP/1.1 off the mesh: a request a meshed peer upgraded; an HTTP/1.1 client's copy to a mirror (mirrors.py)
        h1 = exchange.source_stream is None or exchange.head.orig_proto == tr.HTTP11
        if h1 and meshed_port is None:
            exchange.sink_is_h2 = False
            self._h1_sink_dispatch(exchange, endpoint)
            return
        key = _meshed_pool_key(endpoint, meshed_port) if meshed_port is not None else (endpoint, b"")
        pool = self._h2_pools.get(key)
        if pool is None:
            identity = endpoint_set.identity if endpoint_set is not None and meshed_port is not None else None
            pool = self._h2_pools[key] = H2Pool(key[0], key[1], server_identity=identity)
        self._h2_dispatch(exchange, pool)

    def _sink_connection(self, exchange: StreamExchange) -> Upstream | None:
        return self._upstream.get(exchange.sink_id) if exchange.sink_id is not None else None

    def _sink_queued(self, exchange: StreamExchange) -> int:
        sink = self._sink_connection(exchange)
        queued = exchange.to_sink_bytes
        if sink is not None and sink.h2 is not None and exchange.sink_stream is not None:
            queued += sink.h2.queued_bytes(exchange.sink_stream)
        return queued

    # ---------------------------------------------------------------- HTTP/2 pools

    def _h2_dispatch(self, exchange: StreamExchange, pool: H2Pool) -> None:
        upstream = self._ready_h2_connection(pool)
        if upstream is not None:
            self._open_sink_stream(exchange, upstream)
            return
        if len(pool.waiting) >= self.config.pool_max_waiters_per_endpoint:
            reason = (
                f"{len(pool.connection_ids)} HTTP/2 connections to {pool.address} full and {len(pool.waiting)} waiting"
            )
            self._stream_fail(exchange, ProxyError(ProxyErrorKind.POOL_EXHAUSTED, reason))
            return
        pool.waiting.append(exchange.exchange_id)
        self._open_h2_if_needed(pool)

    def _ready_h2_connection(self, pool: H2Pool) -> Upstream | None:
        for conn_id in pool.connection_ids:
            upstream = self._upstream[conn_id]
            if upstream.state is UpstreamState.READY and self._has_room(upstream):
                return upstream
        return None

    def _has_room(self, upstream: Upstream) -> bool:
        session = upstream.h2
        assert session is not None
        if session.goaway_received or session.goaway_sent:
            return False
        limit = min(session.peer_max_concurrent_streams, self.config.h2_max_concurrent_streams)
        return len(upstream.streams) < limit

    def _open_h2_if_needed(self, pool: H2Pool) -> None:
        connecting = any(self._upstream[c].state is UpstreamState.CONNECTING for c in pool.connection_ids)
        if pool.waiting and not connecting and len(pool.connection_ids) < self.config.pool_max_connections_per_endpoint:
            conn_id = self._new_id()
            upstream = Upstream(conn_id, self._new_upstream_parser(), pool.address, stream_world=True)
            upstream.h2 = H2Session(client=True, limits=self._h2_limits())
            upstream.preamble = pool.preamble + upstream.h2.data_to_send()
            upstream.pool_key = (pool.address, pool.preamble)
            self._upstream[conn_id] = upstream
            pool.connection_ids.append(conn_id)
            if not self._connect(conn_id, pool.address, pool.server_identity):
                self._stream_upstream_failed(upstream, f"mTLS to {pool.server_identity}: {self._tls_refusal}")
                return
            self._deadlines.set(("connect", conn_id), self._now_ns + self.config.connect_timeout_ns)

    def _serve_h2_waiters(self, pool: H2Pool) -> None:
        while pool.waiting:
            upstream = self._ready_h2_connection(pool)
            if upstream is None:
                break
            exchange = self._streams.get(pool.waiting.popleft())
            if exchange is not None and not exchange.done and exchange.sink_id is None:
                self._open_sink_stream(exchange, upstream)
        self._open_h2_if_needed(pool)

    def _open_sink_stream(self, exchange: StreamExchange, upstream: Upstream) -> None:
        session = upstream.h2
        assert session is not None
        stream_id = session.new_stream_id()
        headers = tr.h2_request_headers(exchange.head, orig_proto=exchange.source_stream is None)
        end_now = not exchange.request_has_body or (
            exchange.request_ended and not exchange.to_sink and not exchange.request_trailers
        )
        try:
            session.send_headers(stream_id, headers, end_stream=end_now)
        except h2.exceptions.ProtocolError as error:
            reason = f"request cannot be sent over HTTP/2: {error}"
            self._stream_fail(exchange, ProxyError(ProxyErrorKind.MALFORMED_REQUEST, reason[:300]))
            return
        upstream.streams[stream_id] = exchange.exchange_id
        exchange.sink_id, exchange.sink_stream, exchange.sink_is_h2 = upstream.conn_id, stream_id, True
        if exchange.route is not None:
            self._stream_attempt_started(exchange)
        exchange.sink_request_ended = end_now
        self._deadlines.cancel(("pool-idle", upstream.conn_id))
        exchange.sink_body_bytes += exchange.to_sink_bytes
        while exchange.to_sink:
            session.send_data(stream_id, exchange.to_sink.popleft())
        exchange.to_sink_bytes = 0
        self._end_sink_request(exchange)
        self._write_h2(upstream)
        self._after_sink_progress(exchange)

    def _stream_upstream_connected(self, upstream: Upstream) -> None:
        self._send(upstream, upstream.preamble)
        upstream.preamble = b""
        if upstream.h2 is None:
            exchange = self._streams.get(upstream.exchange_id or -1)
            upstream.state = UpstreamState.IDLE
            if exchange is not None and not exchange.done:
                self._bind_h1_sink(exchange, upstream)
            else:
                self._release_h1_sink(upstream)
            return
        upstream.state = UpstreamState.READY
        self._deadlines.set(("ping", upstream.conn_id), self._now_ns + self.config.h2_keepalive_interval_ns)
        self._serve_h2_waiters(self._h2_pool_of(upstream))
        self._h2_upstream_maybe_idle(upstream)

    def _stream_upstream_failed(self, upstream: Upstream, reason: str, *, driver_gave_up: bool = False) -> None:
        """A connect failed (``driver_gave_up``: the driver already dropped the id) or timed out: the
        streams waiting for it get the error."""
        kind = ProxyErrorKind.CONNECT_TIMEOUT if "timed out" in reason else ProxyErrorKind.CONNECT_FAILED
        waiting: list[int] = []
        if upstream.h2 is not None:
            pool = self._h2_pool_of(upstream)
            waiting, pool.waiting = list(pool.waiting), pool.waiting.__class__()
        elif upstream.exchange_id is not None:
            waiting = [upstream.exchange_id]
        upstream.exchange_id = None
        if driver_gave_up:
            self._forget_upstream(upstream)
        else:
            self._close_upstream(upstream, reset=True)  # cancels the connect in progress
        for exchange_id in waiting:
            exchange = self._streams.get(exchange_id)
            if exchange is not None and not exchange.done and not exchange.response_started:
                self._stream_fail(exchange, ProxyError(kind, reason))

    def _h2_pool_of(self, upstream: Upstream) -> H2Pool:
        assert upstream.pool_key is not None
        return self._h2_pools[upstream.pool_key]

    def _forget_stream_upstream(self, upstream: Upstream) -> None:
        """Pool bookkeeping when a stream-world connection is gone (machine.py closed it)."""
        if upstream.h2 is not None:
            pool = self._h2_pools.get(upstream.pool_key) if upstream.pool_key is not None else None
            if pool is not None:
                if upstream.conn_id in pool.connection_ids:
                    pool.connection_ids.remove(upstream.conn_id)
                self._serve_h2_waiters(pool)
            return
        sink_pool = self._h1_sink_pools.get(upstream.endpoint)
        if sink_pool is not None:
            sink_pool.forget(upstream.conn_id)
            self._serve_h1_sink_waiters(sink_pool)

    # ---------------------------------------------------------------- HTTP/2 endpoint connections

    def _stream_upstream_received(self, upstream: Upstream, data: bytes) -> None:
        if upstream.h2 is None:
            self._h1_sink_received(upstream, data)
            return
        if upstream.state is UpstreamState.CONNECTING:
            return
        if not data:
            self._sink_connection_lost(upstream, f"{upstream.endpoint} closed the connection")
            return
        try:
            events = upstream.h2.receive(data, self._now_ns)
        except H2SessionError as error:
            self._write_h2(upstream)
            self._sink_connection_lost(upstream, f"{upstream.endpoint}: {error}")
            return
        for event in events:
            if upstream.conn_id not in self._upstream:
                return
            self._h2_upstream_event(upstream, event)
        if upstream.conn_id in self._upstream:
            self._write_h2(upstream)
            self._sync_h2_reading(upstream)

    def _h2_upstream_event(self, upstream: Upstream, event: h2.events.Event) -> None:
        session = upstream.h2
        assert session is not None
        stream_id = getattr(event, "stream_id", 0) or 0
        exchange = self._streams.get(upstream.streams.get(stream_id, -1))
        if isinstance(event, h2.events.ResponseReceived) and exchange is not None:
            self._h2_response_head(exchange, list(event.headers), ended=event.stream_ended is not None)
        elif isinstance(event, h2.events.InformationalResponseReceived) and exchange is not None:
            self._h2_informational(exchange, list(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            session.acknowledge(stream_id, event.flow_controlled_length - len(event.data))
            if exchange is None:
                session.acknowledge(stream_id, len(event.data))
            elif event.data:
                exchange.sink_unacked += len(event.data)
                if event.stream_ended is not None and exchange.response_started:
                    self._sink_response_end(exchange, None, event.data)  # the end rides on the same frame
                else:
                    self._sink_response_data(exchange, event.data)
        elif isinstance(event, h2.events.TrailersReceived) and exchange is not None:
            self._h2_trailers(exchange, list(event.headers))
        elif isinstance(event, h2.events.StreamEnded) and exchange is not None and exchange.response_started:
            self._sink_response_end(exchange, None)
        elif isinstance(event, h2.events.StreamReset):
            upstream.streams.pop(stream_id, None)
            session.forget(stream_id)  # request bytes queued for it are moot
            if exchange is not None:
                self._sink_reset(exchange, event.error_code)
            self._h2_upstream_maybe_idle(upstream)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._flush_h2(upstream)
            self._serve_h2_waiters(self._h2_pool_of(upstream))
        elif isinstance(event, h2.events.PingAckReceived):
            self._ping_answered(upstream, self._now_ns)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._h2_upstream_goaway(upstream, event.last_stream_id)

    def _h2_trailers(self, exchange: StreamExchange, trailers: list[tuple[bytes, bytes]]) -> None:
        if exchange.source_stream is None:  # an HTTP/1.1 client: the trailers must fit HTTP/1.1
            try:
                tr.check_h1_fields(trailers, self._field_memo)
            except tr.TranslationError as error:
                self._stream_abort(exchange, f"invalid trailers from {exchange.endpoint}: {error}")
                return
        self._sink_response_end(exchange, trailers)

    def _h2_informational(self, exchange: StreamExchange, headers: list[tuple[bytes, bytes]]) -> None:
        try:
            status, regular = tr.split_response(headers, for_h1=exchange.source_stream is None, memo=self._field_memo)
        except tr.TranslationError as error:
            reason = f"invalid informational response from {exchange.endpoint}: {error}"
            self._stream_fail(exchange, ProxyError(ProxyErrorKind.INVALID_RESPONSE, reason))
            return
        self._sink_informational(exchange, status, regular)

    def _h2_response_head(self, exchange: StreamExchange, headers: list[tuple[bytes, bytes]], *, ended: bool) -> None:
        try:
            status, regular = tr.split_response(headers, for_h1=exchange.source_stream is None, memo=self._field_memo)
        except tr.TranslationError as error:
            reason = f"invalid response from {exchange.endpoint}: {error}"
            self._stream_fail(exchange, ProxyError(ProxyErrorKind.INVALID_RESPONSE, reason))
            return
        self._sink_response_head(exchange, status, regular, ended=ended)

    def _sink_reset(self, exchange: StreamExchange, code: int) -> None:
        """The endpoint reset the stream: the client's stream is reset with the same code.

        After the whole response is in, a reset (NO_ERROR, RFC 9113 section 8.1) only stops the upload:
        the client still gets every byte of the response, then its own RST_STREAM(NO_ERROR) once the
        last byte has left (``_finish_stream``).
        """
        if exchange.response_ended:
            self._credit_all(exchange)
            exchange.sink_id = None
            return
        self._credit_sink(exchange)  # the response bytes it holds used the connection's window too
        exchange.sink_id = None  # the stream is gone on that side; nothing to reset back
        self._drop_lease(exchange, exchange.exchange_id, Outcome.FAILURE)  # no-op once the verdict is in
        if not exchange.response_started and exchange.route is not None:
            reason = f"{exchange.endpoint} reset the stream (HTTP/2 error code {code})"
            if self._stream_failed_attempt(exchange, ProxyError(ProxyErrorKind.UPSTREAM_CLOSED, reason)):
                return  # retried (h2traffic.py)
        if not exchange.response_started and exchange.source_stream is None:
            reason = f"{exchange.endpoint} reset the stream (HTTP/2 error code {code})"
            self._stream_fail(exchange, ProxyError(ProxyErrorKind.UPSTREAM_CLOSED, reason))
            return
        # An HTTP/1.1 client whose response was cut (whatever the code, NO_ERROR too) is reset, never
        # given a FIN that would pass for the end of the body.
        self._reset_source(exchange, code if exchange.source_stream is not None else ErrorCodes.INTERNAL_ERROR)
        self._abandon_stream(exchange, code)

    def _h2_upstream_goaway(self, upstream: Upstream, last_stream_id: int | None) -> None:
        """The endpoint is going away: streams it never processed go elsewhere, the rest finish.

        RFC 9113 section 6.8: streams above ``last_stream_id`` were not processed, so they are safe to
        send again, on another connection of the pool (a server that caps requests per connection, as
        nginx does at 1,000, says goodbye this way). Only a stream whose body bytes already left cannot
        be replayed, since the proxy does not keep them: it fails.
        """
        last = last_stream_id if last_stream_id is not None else 2**31
        for stream_id, exchange_id in list(upstream.streams.items()):
            exchange = self._streams.get(exchange_id)
            if stream_id <= last or exchange is None or exchange.response_started:
                continue
            upstream.streams.pop(stream_id, None)
            exchange.sink_id = exchange.sink_stream = None
            if exchange.sink_body_bytes == 0:
                exchange.sink_request_ended = False
                self._h2_dispatch(exchange, self._h2_pool_of(upstream))
            else:
                reason = f"{upstream.endpoint} sent GOAWAY before processing the request"
                self._stream_fail(exchange, ProxyError(ProxyErrorKind.UPSTREAM_CLOSED, reason))
        self._h2_upstream_maybe_idle(upstream)  # with no streams left it closes now

    def _h2_upstream_maybe_idle(self, upstream: Upstream) -> None:
        session = upstream.h2
        if upstream.conn_id not in self._upstream or session is None or upstream.streams:
            return
        if upstream.state is not UpstreamState.READY:
            return
        if session.goaway_received or self._draining:
            self._close_upstream(upstream)
        else:
            self._deadlines.set(("pool-idle", upstream.conn_id), self._now_ns + self.config.pool_idle_timeout_ns)

    def _sink_connection_lost(self, upstream: Upstream, reason: str, *, already_closed: bool = False) -> None:
        """The endpoint's connection broke: its streams fail (before their response) or are reset."""
        exchange_ids = list(upstream.streams.values())
        if upstream.h2 is None and upstream.exchange_id is not None:
            exchange_ids.append(upstream.exchange_id)
        upstream.streams.clear()
        upstream.exchange_id = None
        if already_closed:
            self._forget_upstream(upstream)
        else:
            self._close_upstream(upstream, reset=True)
        for exchange_id in exchange_ids:
            exchange = self._streams.get(exchange_id)
            if exchange is None or exchange.done:
                continue
            exchange.sink_id = None
            if exchange.response_ended:
                continue  # the whole response is in: it only waits for the client's window
            if exchange.response_started:
                self._stream_abort(exchange, reason)
            else:
                self._stream_fail(exchange, ProxyError(ProxyErrorKind.UPSTREAM_CLOSED, reason))

    # ---------------------------------------------------------------- request bytes towards the sink

    def _to_sink(self, exchange: StreamExchange, data: bytes) -> None:
        if exchange.route is not None:
            self._stream_request_bytes(exchange, data)  # replay buffer, idle timeout (h2traffic.py)
        sink = self._sink_connection(exchange)
        if (
            sink is None
            or (exchange.sink_is_h2 and exchange.sink_stream is None)
            or (not exchange.sink_is_h2 and sink.state is not UpstreamState.BUSY)
        ):
            exchange.to_sink.append(data)
            exchange.to_sink_bytes += len(data)
        elif sink.h2 is not None and exchange.sink_stream is not None:
            exchange.sink_body_bytes += len(data)
            sink.h2.send_data(exchange.sink_stream, data)
            self._write_h2(sink)
        else:
            self._send(sink, sink.h11.send(h11.Data(data=data)))
        self._after_sink_progress(exchange)

    def _end_sink_request(self, exchange: StreamExchange) -> None:
        sink = self._sink_connection(exchange)
        if exchange.sink_request_ended or not exchange.request_ended or sink is None:
            return
        if sink.h2 is not None and exchange.sink_stream is not None:
            exchange.sink_request_ended = True
            sink.h2.end_stream(exchange.sink_stream, exchange.request_trailers)
            self._write_h2(sink)
        elif sink.h2 is None and sink.state is UpstreamState.BUSY:
            exchange.sink_request_ended = True
            trailers = exchange.request_trailers if exchange.request_chunked else None
            self._send(sink, sink.h11.send(h11.EndOfMessage(headers=trailers or [])))

    def _detach_sink(self, exchange: StreamExchange, code: int) -> None:
        self._credit_all(exchange)
        sink = self._sink_connection(exchange)
        exchange.sink_id = None
        if sink is None:
            return
        if sink.h2 is not None:
            stream_id = exchange.sink_stream
            if stream_id is not None and sink.streams.pop(stream_id, None) is not None:
                if not (exchange.response_ended and exchange.sink_request_ended):
                    sink.h2.reset(stream_id, code)
                    self._write_h2(sink)
                self._serve_h2_waiters(self._h2_pool_of(sink))
                self._h2_upstream_maybe_idle(sink)
        elif sink.exchange_id == exchange.exchange_id:
            sink.exchange_id = None
            if sink.state is UpstreamState.BUSY:
                self._close_upstream(sink, reset=True)  # half an exchange went out: it cannot be reused

    def _after_sink_progress(self, exchange: StreamExchange) -> None:
        self._settle(exchange)
        downstream = self._downstream.get(exchange.source_id)
        if downstream is not None and exchange.source_stream is None:
            self._sync_h1_source_reading(downstream)

    def _flush_h2(self, connection: Downstream | Upstream) -> None:
        """Windows opened: write what waited, and acknowledge its producers."""
        session = connection.h2
        if session is None:
            return
        for stream_id, _count in session.flush():
            exchange = self._streams.get(connection.streams.get(stream_id, -1))
            if exchange is not None:
                self._exchange_progress(exchange)
        self._write_h2(connection)


@lru_cache(maxsize=4096)  # bounded; one entry per meshed endpoint (the header was encoded per request)
def _meshed_pool_key(endpoint: Address, meshed_port: int) -> tuple[Address, bytes]:
    """The H2Pool key of a meshed endpoint: its inbound port, and the transport header naming its port."""
    header = transport_header.TransportHeader(endpoint.port, session_protocol="http2").encode()
    return Address(endpoint.host, meshed_port), header
