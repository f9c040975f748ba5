"""HTTP/1.1 to HTTP/1.1: one ``Exchange`` per request, as a part of the proxy machine.

Theory of operation
-------------------
Each side of each connection has its own ``h11.Connection``: server role downstream, client role
upstream, so both parsers see exactly one peer. A request head from a client becomes an ``Exchange``
(exchange.py). The resolver maps its authority (the adapter's target if it passed one, else the Host
header) to an endpoint set, the picker chooses one endpoint, and the endpoint's pool gives the exchange an
idle connection, opens a new one, or queues it. Body bytes stream through as they arrive: nothing holds a
whole body. Bytes that arrive before the upstream connection is ready wait in the exchange, bounded by
``max_buffered_bytes``. A request for a meshed peer leaves for h2flows.py at its head (it rides HTTP/2).

Backpressure: when the connection an exchange writes to holds more than ``max_buffered_bytes``, the
connection feeding it stops being read. A downstream connection is also not read while its request is
complete and its response is pending, since HTTP/1.1 answers in order.

Failures before the response head reaches the client become a proxy response carrying
``l5d-proxy-error`` (errors.py). After the head went out, the only honest signal left is to abort the
client connection, so a client never sees a truncated body as complete.

This class holds only methods; the state lives in the ``Proxy`` that inherits it (machine.py).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING

import h11

from tether.core.address import Address
from tether.core.discovery import EndpointSet
from tether.core.effects import Connect, LogError
from tether.core.proxy import http1
from tether.core.proxy.balancing import Backend, Leaseholder, error_outcome
from tether.core.proxy.connections import Downstream, Upstream, UpstreamState
from tether.core.proxy.errors import ProxyError, ProxyErrorKind, error_body, error_response_headers
from tether.core.proxy.exchange import Exchange, ExchangeState, Step
from tether.core.proxy.h1fast import END_OF_MESSAGE
from tether.core.proxy.h1reading import H1Reading
from tether.core.proxy.h1traffic import H1Traffic
from tether.core.proxy.pool import EndpointPool, pool_for
from tether.core.proxy.streams import StreamExchange
from tether.core.traffic.breaker import Outcome

NS_PER_MS = 1_000_000


class H1Flows(H1Traffic, H1Reading):
    if TYPE_CHECKING:  # defined by the other flows

        def _exchange(self, exchange_id: int | None) -> Exchange | None: ...
        def _switch_to_tunnel(
            self, exchange: Exchange, upstream: Upstream, head: h11.InformationalResponse | h11.Response
        ) -> None: ...
        def _start_h1_over_h2(
            self, downstream: Downstream, request: h11.Request, authority: str, endpoint_set: EndpointSet
        ) -> None: ...
        def _h1_source_body(self, exchange: StreamExchange, data: bytes) -> None: ...
        def _source_request_ended(self, exchange: StreamExchange, now_ns: int) -> None: ...
        def _abandon_stream(self, exchange: StreamExchange, code: int) -> None: ...
        def _backend(self, name: str, endpoints: tuple[Address, ...], kind: str) -> Backend: ...
        def _take_lease(self, holder: Leaseholder, request_id: int, backend: Backend) -> ProxyError | None: ...
        def _drop_lease(self, holder: Leaseholder, request_id: int, outcome: Outcome) -> None: ...
        def _request_head_bytes(self, exchange: Exchange, upstream: Upstream) -> bytes: ...

    # ---------------------------------------------------------------- client side

    def _pump_downstream(self, downstream: Downstream, now_ns: int) -> None:
        while downstream.conn_id in self._downstream:
            try:
                event = downstream.h11.next_event()
            except h11.RemoteProtocolError as error:
                self._downstream_broke(downstream, error, now_ns)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                authority = downstream.target or http1.request_authority(event)
                self._request_started(downstream, event, authority, self.resolver.resolve(authority), now_ns)
            elif isinstance(event, h11.Data):
                self._request_body(downstream, bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._request_done(downstream, now_ns)
            elif isinstance(event, h11.ConnectionClosed):
                self._downstream_eof(downstream)
                break
        self._sync_reading_downstream(downstream)

    def _h1_request_started(
        self,
        downstream: Downstream,
        request: h11.Request,
        authority: str,
        endpoint_set: EndpointSet | None,
        now_ns: int,
    ) -> None:
        self._deadlines.cancel(("idle", downstream.conn_id))
        service = endpoint_set.name if endpoint_set is not None else (authority or "unknown")
        forwarded = http1.upstream_request(request, fallback_host=(authority or "localhost").encode())
        exchange = Exchange(self._new_id(), downstream.conn_id, forwarded, service, now_ns)
        self._exchanges[exchange.exchange_id] = exchange
        downstream.exchange_id = exchange.exchange_id
        refusal = None
        if endpoint_set is not None and endpoint_set.endpoints:
            chosen_set = endpoint_set
            if self._traffic_on:  # routes (outbound) or a rate limit (inbound): h1traffic.py
                refusal = self._h1_traffic_start(downstream, exchange, request, authority, endpoint_set)
                route = exchange.route
                chosen_set = route.backend_set if route is not None and route.backend_set is not None else chosen_set
            if refusal is None and (exchange.route is None or exchange.route.waiting is None):
                refusal = self._h1_choose(exchange, chosen_set)
        target_addr = str(exchange.endpoint) if exchange.endpoint is not None else ""
        exchange.labels = self.telemetry.http_labels(authority, target_addr, self.tls_labels(downstream, None))
        self.telemetry.request_started(service, exchange.labels)
        if http1.head_size(request) > self.config.max_header_bytes:
            downstream.closing = True
            reason = f"request head larger than {self.config.max_header_bytes} bytes"
            self._fail(exchange, ProxyError(ProxyErrorKind.HEADERS_TOO_LARGE, reason), now_ns)
            return
        if endpoint_set is None or not endpoint_set.endpoints:
            error = ProxyError(ProxyErrorKind.NO_ENDPOINTS, f"no endpoints for {authority or 'this request'}")
            self._fail_after_request(exchange, error, now_ns)
            return
        if refusal is not None:
            self._fail_after_request(exchange, refusal, now_ns)
        elif exchange.endpoint is not None:
            self._dispatch(exchange, now_ns)
        elif exchange.route is not None:
            self._route_rearm(exchange.exchange_id, exchange.route)  # an injected delay, or waiting
        # else: it waits in the backend's failfast queue (``_h1_endpoint_ready`` or ``_h1_endpoint_refused``)

    def _request_started(
        self,
        downstream: Downstream,
        request: h11.Request,
        authority: str,
        endpoint_set: EndpointSet | None,
        now_ns: int,
    ) -> None:
        """A request head: HTTP/1.1 all the way (exchange.py), or over HTTP/2 to a meshed peer (streams.py)."""
        if (
            endpoint_set is not None
            and endpoint_set.meshed_inbound_port is not None
            and endpoint_set.endpoints
            and not http1.wants_tunnel(request)  # upgrades and CONNECT stay HTTP/1.1 end to end
            and http1.head_size(request) <= self.config.max_header_bytes
        ):
            self._deadlines.cancel(("idle", downstream.conn_id))
            self._start_h1_over_h2(downstream, request, authority or "", endpoint_set)
            return
        self._h1_request_started(downstream, request, authority, endpoint_set, now_ns)

    def _request_body(self, downstream: Downstream, data: bytes) -> None:
        stream_exchange = self._streams.get(downstream.exchange_id or -1)
        if stream_exchange is not None:
            self._h1_source_body(stream_exchange, data)
            return
        exchange = self._exchange(downstream.exchange_id)
        if exchange is None or not exchange.live or not data:
            return  # the proxy already answered; the rest of the upload is discarded
        if exchange.deferred_error is not None:
            exchange.discarded_bytes += len(data)
            if exchange.discarded_bytes > self.config.max_buffered_bytes:
                self._fail(exchange, exchange.deferred_error, self._now_ns)  # and close: too much to skip
            return
        if exchange.route is not None:
            self._h1_request_bytes(exchange, data)  # replay buffer, mirrors, idle timeout
        upstream = self._upstream.get(exchange.upstream_id) if exchange.upstream_id is not None else None
        if upstream is not None and upstream.state is UpstreamState.BUSY:
            self._send(upstream, upstream.h11.send(h11.Data(data=data)))
        else:
            exchange.pending_body.append(data)
            exchange.pending_body_bytes += len(data)

    def _request_done(self, downstream: Downstream, now_ns: int) -> None:
        stream_exchange = self._streams.get(downstream.exchange_id or -1)
        if stream_exchange is not None:
            self._source_request_ended(stream_exchange, now_ns)
            return
        exchange = self._exchange(downstream.exchange_id)
        if exchange is None or not exchange.live:
            return
        exchange.request_received = True
        if exchange.route is not None:
            self._h1_request_ended(exchange)
        if exchange.deferred_error is not None:
            self._fail(exchange, exchange.deferred_error, now_ns)
            return
        upstream = self._upstream.get(exchange.upstream_id) if exchange.upstream_id is not None else None
        if upstream is not None and upstream.state is UpstreamState.BUSY:
            self._finish_request_upstream(exchange, upstream, now_ns)

    def _downstream_eof(self, downstream: Downstream) -> None:
        exchange = self._exchange(downstream.exchange_id) or self._streams.get(downstream.exchange_id or -1)
        if exchange is not None and (exchange.live if isinstance(exchange, Exchange) else not exchange.done):
            downstream.closing = True  # the client half-closed after its request; answer, then close
        else:
            self._close_downstream(downstream)

    def _downstream_broke(self, downstream: Downstream, error: h11.RemoteProtocolError, now_ns: int) -> None:
        stream_exchange = self._streams.get(downstream.exchange_id or -1)
        if stream_exchange is not None:
            # A broken upload (bad chunked encoding, say) to a meshed peer: stop it and drop the client.
            self._abandon_stream(stream_exchange, 2)  # INTERNAL_ERROR
            self._close_downstream(downstream, reset=True)
            return
        exchange = self._exchange(downstream.exchange_id)
        if exchange is not None and exchange.response_started:
            self._abandon(exchange, now_ns)
            self._close_downstream(downstream, reset=True)
            return
        hint = getattr(error, "error_status_hint", 400)
        kind = ProxyErrorKind.HEADERS_TOO_LARGE if hint == 431 else ProxyErrorKind.MALFORMED_REQUEST
        reason = f"malformed HTTP/1.1 request: {http1.describe_protocol_error(error)}"
        downstream.closing = True
        if exchange is None:
            service = downstream.target or "unknown"
            exchange = Exchange(
                self._new_id(),
                downstream.conn_id,
                h11.Request(method="GET", target="/", headers=[("host", "unknown")]),
                service,
                now_ns,
            )
            self._exchanges[exchange.exchange_id] = exchange
            downstream.exchange_id = exchange.exchange_id
            exchange.labels = self.telemetry.http_labels(downstream.target or "", "", self.tls_labels(downstream, None))
            self.telemetry.request_started(service, exchange.labels)
        self._fail(exchange, ProxyError(kind, reason), now_ns)

    # ---------------------------------------------------------------- dispatch and pools

    def _dispatch(self, exchange: Exchange, now_ns: int) -> None:
        assert exchange.endpoint is not None
        pool = self._pool(exchange.endpoint)
        idle_id = pool.take_idle()
        if idle_id is not None:
            upstream = self._upstream[idle_id]
            self._deadlines.cancel(("pool-idle", idle_id))
            self._bind(exchange, upstream, now_ns)
        elif pool.has_capacity():
            upstream = self._open_upstream(pool, now_ns)
            upstream.exchange_id = exchange.exchange_id
            exchange.upstream_id = upstream.conn_id
        elif pool.can_queue():
            pool.waiting_exchange_ids.append(exchange.exchange_id)
        else:
            reason = f"{pool.max_connections} connections to {pool.endpoint} busy and {pool.max_waiters} waiting"
            self._fail_after_request(exchange, ProxyError(ProxyErrorKind.POOL_EXHAUSTED, reason), now_ns)

    def _open_upstream(self, pool: EndpointPool, now_ns: int) -> Upstream:
        conn_id = self._new_id()
        upstream = Upstream(conn_id, self._new_upstream_parser(), pool.endpoint)
        self._upstream[conn_id] = upstream
        pool.connection_ids.add(conn_id)
        self._effects.append(Connect(conn_id=conn_id, address=pool.endpoint))
        self._deadlines.set(("connect", conn_id), now_ns + self.config.connect_timeout_ns)
        return upstream

    def _bind(self, exchange: Exchange, upstream: Upstream, now_ns: int) -> None:
        """Write the request head and whatever body is waiting to a ready upstream connection."""
        assert upstream.state is not UpstreamState.BUSY, upstream.conn_id
        exchange.advance(Step.BOUND)
        if exchange.route is not None:
            self._h1_attempt_started(exchange)
        exchange.upstream_id = upstream.conn_id
        upstream.exchange_id = exchange.exchange_id
        upstream.state = UpstreamState.BUSY
        self._send(upstream, self._request_head_bytes(exchange, upstream))  # h1lane.py
        while exchange.pending_body:
            self._send(upstream, upstream.h11.send(h11.Data(data=exchange.pending_body.popleft())))
        exchange.pending_body_bytes = 0
        if exchange.request_received:
            self._finish_request_upstream(exchange, upstream, now_ns)
        downstream = self._downstream.get(exchange.downstream_id)
        if downstream is not None:
            self._sync_reading_downstream(downstream)

    def _finish_request_upstream(self, exchange: Exchange, upstream: Upstream, now_ns: int) -> None:
        self._send(upstream, upstream.h11.send(END_OF_MESSAGE))  # b"" but for a chunked upload
        exchange.advance(Step.REQUEST_DONE)
        if exchange.state is ExchangeState.AWAITING and self.config.response_timeout_ns:
            self._deadlines.set(("response", exchange.exchange_id), now_ns + self.config.response_timeout_ns)

    def _release_upstream(self, upstream: Upstream, now_ns: int) -> None:
        """An upstream connection finished its exchange (or opened for one that left): reuse or close it."""
        pool = self._pool(upstream.endpoint)
        upstream.exchange_id = None
        while pool.waiting_exchange_ids:
            waiting = self._exchange(pool.waiting_exchange_ids.popleft())
            if waiting is not None and waiting.state is ExchangeState.QUEUED:
                upstream.state = UpstreamState.IDLE
                self._bind(waiting, upstream, now_ns)
                return
        if self._draining or not pool.keep_idle(upstream.conn_id):
            self._close_upstream(upstream)
            return
        upstream.state = UpstreamState.IDLE
        self._deadlines.set(("pool-idle", upstream.conn_id), now_ns + self.config.pool_idle_timeout_ns)
        self._set_reading(upstream, True)

    def _serve_waiters(self, pool: EndpointPool, now_ns: int) -> None:
        """A connection to ``pool``'s endpoint went away: open one for the next live waiter, if any."""
        while pool.waiting_exchange_ids and pool.has_capacity():
            waiting = self._exchange(pool.waiting_exchange_ids.popleft())
            if waiting is not None and waiting.state is ExchangeState.QUEUED:
                upstream = self._open_upstream(pool, now_ns)
                upstream.exchange_id = waiting.exchange_id
                waiting.upstream_id = upstream.conn_id

    def _pool(self, endpoint: Address) -> EndpointPool:
        return self._pools.get(endpoint) or pool_for(self._pools, endpoint, self.config)

    # ---------------------------------------------------------------- endpoint side

    def _pump_upstream(self, upstream: Upstream, now_ns: int) -> None:
        while (
            upstream.conn_id in self._upstream
            and upstream.state is UpstreamState.BUSY
            and upstream.tunnel_downstream_id is None  # a switched connection is a byte pipe now
        ):
            try:
                event = upstream.h11.next_event()
            except h11.RemoteProtocolError as error:
                if upstream.eof:
                    # h11 reports an early EOF as a protocol error; say what happened instead.
                    reason = f"{upstream.endpoint} closed the connection before the response was complete"
                    self._upstream_broke(upstream, reason, now_ns)
                else:
                    reason = f"invalid response from {upstream.endpoint}: {http1.describe_protocol_error(error)}"
                    self._upstream_broke(upstream, reason, now_ns, kind=ProxyErrorKind.INVALID_RESPONSE)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            exchange = self._exchange(upstream.exchange_id)
            assert exchange is not None and exchange.live, (upstream.conn_id, upstream.exchange_id)
            if isinstance(event, h11.InformationalResponse):
                self._informational(exchange, upstream, event, now_ns)
            elif isinstance(event, h11.Response):
                self._response_started(exchange, upstream, event, now_ns)
            elif isinstance(event, h11.Data):
                self._response_body(exchange, bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._response_done(exchange, upstream, now_ns)
            elif isinstance(event, h11.ConnectionClosed):
                self._upstream_broke(upstream, f"{upstream.endpoint} closed the connection", now_ns)
        if upstream.conn_id in self._upstream:
            self._sync_reading_upstream(upstream)

    def _informational(
        self, exchange: Exchange, upstream: Upstream, event: h11.InformationalResponse, now_ns: int
    ) -> None:
        if event.status_code == 101:
            if not http1.wants_tunnel(exchange.request):
                reason = f"{upstream.endpoint} switched protocols without being asked to"
                self._upstream_broke(upstream, reason, now_ns, kind=ProxyErrorKind.INVALID_RESPONSE)
                return
            headers = http1.forwarded_headers(http1.pairs(event)) + http1.upgrade_headers(http1.pairs(event))
            self._switch_to_tunnel(exchange, upstream, h11.InformationalResponse(status_code=101, headers=headers))
            return
        downstream = self._downstream.get(exchange.downstream_id)
        if downstream is not None and downstream.h11.our_state is h11.SEND_RESPONSE:
            self._send(
                downstream,
                downstream.h11.send(
                    h11.InformationalResponse(
                        status_code=event.status_code, headers=http1.forwarded_headers(http1.pairs(event))
                    )
                ),
            )

    def _response_started(self, exchange: Exchange, upstream: Upstream, response: h11.Response, now_ns: int) -> None:
        if http1.head_size(response) > self.config.max_header_bytes:
            reason = f"response head from {upstream.endpoint} larger than {self.config.max_header_bytes} bytes"
            self._upstream_broke(upstream, reason, now_ns, kind=ProxyErrorKind.INVALID_RESPONSE)
            return
        if exchange.request.method == b"CONNECT" and 200 <= response.status_code < 300:
            self._switch_to_tunnel(exchange, upstream, http1.downstream_response(response, close=False))
            return
        if exchange.route is not None:
            routed = self._h1_routed_response(exchange, upstream, response)
            if routed is None:
                return  # discarded: the request is retried
            response = routed
        self._deadlines.cancel(("response", exchange.exchange_id))
        exchange.advance(Step.RESPONSE_HEAD)
        exchange.response_status = response.status_code
        if exchange.handle is not None:
            verdict = Outcome.FAILURE if response.status_code >= 500 else Outcome.SUCCESS  # balancing.http_outcome
            self._drop_lease(exchange, exchange.exchange_id, verdict)
        latency_ms = (now_ns - exchange.started_ns) / NS_PER_MS
        self.telemetry.response_started(exchange.service, exchange.labels, response.status_code, latency_ms)
        downstream = self._downstream.get(exchange.downstream_id)
        if downstream is None:
            return
        close = downstream.closing or self._draining
        self._send(downstream, downstream.h11.send(http1.downstream_response(response, close=close)))

    def _response_body(self, exchange: Exchange, data: bytes) -> None:
        if exchange.route is not None:
            self._h1_activity(exchange, exchange.route)
        downstream = self._downstream.get(exchange.downstream_id)
        if downstream is not None and data:
            self._send(downstream, downstream.h11.send(h11.Data(data=data)))

    def _response_done(self, exchange: Exchange, upstream: Upstream, now_ns: int) -> None:
        exchange.advance(Step.RESPONSE_DONE)
        if exchange.route is not None or self._mirror_tickets:
            self._h1_exchange_over(exchange)
        # Bytes after the response (a second, unrequested response) would be read as the answer to the
        # next request on this connection: such a connection is never reused.
        leftover, _closed = upstream.h11.trailing_data
        reusable = upstream.h11.our_state is h11.DONE and upstream.h11.their_state is h11.DONE and not leftover
        if reusable:
            upstream.h11.start_next_cycle()
            self._release_upstream(upstream, now_ns)
        else:
            self._close_upstream(upstream)
        downstream = self._downstream.get(exchange.downstream_id)
        if downstream is not None:
            self._send(downstream, downstream.h11.send(h11.EndOfMessage()))
            self._end_exchange(downstream, exchange, now_ns)
        else:
            self._exchanges.pop(exchange.exchange_id, None)

    def _upstream_broke(
        self,
        upstream: Upstream,
        reason: str,
        now_ns: int,
        *,
        kind: ProxyErrorKind = ProxyErrorKind.UPSTREAM_CLOSED,
        already_closed: bool = False,
    ) -> None:
        exchange = self._exchange(upstream.exchange_id)
        if already_closed:
            self._forget_upstream(upstream)
        else:
            self._close_upstream(upstream, reset=True)
        if exchange is None or not exchange.live:
            return
        if exchange.response_started:
            self._effects.append(
                LogError(conn_id=exchange.downstream_id, message=f"{reason}; aborting the response to the client")
            )
            self._abandon(exchange, now_ns)
            downstream = self._downstream.get(exchange.downstream_id)
            if downstream is not None:
                self._close_downstream(downstream, reset=True)
            return
        self._fail(exchange, ProxyError(kind, reason), now_ns)

    # ---------------------------------------------------------------- ending exchanges

    def _fail(self, exchange: Exchange, error: ProxyError, now_ns: int) -> None:
        """Answer ``exchange`` with a proxy error response (its head has not gone out yet)."""
        assert not exchange.response_started, exchange.exchange_id
        if exchange.route is not None and self._h1_failed_attempt(exchange, error):
            return  # retried (h1traffic.py)
        self._drop_lease(exchange, exchange.exchange_id, error_outcome(error))
        exchange.advance(Step.FAILED)
        self._detach_upstream(exchange)
        latency_ms = (now_ns - exchange.started_ns) / NS_PER_MS
        self.telemetry.response_started(exchange.service, exchange.labels, error.status, latency_ms)
        self.telemetry.proxy_error(exchange.service, error.kind.label)
        self._effects.append(LogError(conn_id=exchange.downstream_id, message=f"{error.status} {error.reason}"))
        downstream = self._downstream.get(exchange.downstream_id)
        if downstream is None:
            self._exchanges.pop(exchange.exchange_id, None)
            if self._mirror_tickets:
                self._release_mirror(exchange.exchange_id)
            return
        # Keep the connection only if the request has fully arrived; otherwise the rest of an upload
        # would have to be read and thrown away first.
        if not exchange.request_received:
            downstream.closing = True
        close = downstream.closing or self._draining
        parser = downstream.h11
        if parser.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self._close_downstream(downstream, reset=True)
            return
        self._write_h1_error(downstream, error, close=close)
        self._end_exchange(downstream, exchange, now_ns)

    def _write_h1_error(self, downstream: Downstream, error: ProxyError, *, close: bool) -> None:
        """The whole response the proxy answers ``error`` with, on an HTTP/1.1 client connection."""
        parser = downstream.h11
        phrase = HTTPStatus(error.status).phrase.encode() if error.status in HTTPStatus._value2member_map_ else b""
        head = h11.Response(status_code=error.status, reason=phrase, headers=error_response_headers(error, close=close))
        self._send(downstream, parser.send(head))
        if not parser.answering_head:  # a HEAD's answer keeps the Content-Length and drops the body
            self._send(downstream, parser.send(h11.Data(data=error_body(error))))
        self._send(downstream, parser.send(END_OF_MESSAGE))

    def _fail_after_request(self, exchange: Exchange, error: ProxyError, now_ns: int) -> None:
        """Answer with ``error`` once the request has been read, so the connection can be kept.

        A small upload is read and discarded first; one larger than ``max_buffered_bytes`` is answered at
        that point and the connection closed (see ``_request_body``).
        """
        if exchange.request_received:
            self._fail(exchange, error, now_ns)
        else:
            exchange.deferred_error = error

    def _end_exchange(self, downstream: Downstream, exchange: Exchange, now_ns: int) -> None:
        """The response went out in full: take the next request on this connection, or close it."""
        self._exchanges.pop(exchange.exchange_id, None)
        self._next_request(downstream, now_ns)

    def _next_request(self, downstream: Downstream, now_ns: int) -> None:
        downstream.exchange_id = None
        parser = downstream.h11
        if downstream.closing or self._draining or not parser.next_cycle_if_done():
            self._close_downstream(downstream)
            return
        self._deadlines.set(("idle", downstream.conn_id), now_ns + self.config.idle_timeout_ns)
        if parser.nothing_to_read():
            self._sync_reading_downstream(downstream)  # all that pumping would do
        else:
            self._pump_downstream(downstream, now_ns)  # a pipelined request is already buffered

    def _abandon(self, exchange: Exchange, now_ns: int) -> None:
        """The exchange ends without a response reaching its client (the client left, or the endpoint died
        after the head went out)."""
        self._drop_lease(exchange, exchange.exchange_id, Outcome.CANCELLED)
        if exchange.route is not None or self._mirror_tickets:
            self._h1_exchange_over(exchange)
        exchange.advance(Step.FAILED)
        self._exchanges.pop(exchange.exchange_id, None)
        self.telemetry.aborted(exchange.service)
        self._detach_upstream(exchange)

    def _detach_upstream(self, exchange: Exchange) -> None:
        """Release whatever upstream connection the (now failed) exchange held."""
        self._deadlines.cancel(("response", exchange.exchange_id))
        upstream = self._upstream.get(exchange.upstream_id) if exchange.upstream_id is not None else None
        exchange.upstream_id = None
        if upstream is None or upstream.exchange_id != exchange.exchange_id:
            return
        upstream.exchange_id = None
        if upstream.state is UpstreamState.BUSY:
            # Half a request went out on it: it cannot carry another one.
            self._close_upstream(upstream, reset=True)
        # A CONNECTING connection stays: once open it joins the pool or serves a waiter.
