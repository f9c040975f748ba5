"""The proxy machine: every connection of one proxy process, and the inputs that drive them.

Theory of operation
-------------------
One ``Proxy`` owns every connection of one proxy process and hands out their integer ids. Downstream
connections are the ones a client opened to us (``accepted``); upstream connections are the ones we open
to endpoints (the ``Connect`` effect). This module routes each driver input to the flow that owns the
connection, and keeps the bookkeeping every flow shares (ids, effects, deadlines, byte counts):

- tunnel.py: protocol detection, opaque TCP tunnels, and upgrades (WebSocket, CONNECT);
- h1flows.py: HTTP/1.1 to HTTP/1.1, one ``Exchange`` per request (exchange.py); h1lane.py takes the common
  case (a whole request in one read, a whole response in one read) without h11 events;
- h2flows.py and h2upstream.py: every request that touches HTTP/2, one ``StreamExchange`` per request
  (streams.py): HTTP/2 clients, HTTP/1.1 clients of meshed peers, and HTTP/2 or restored HTTP/1.1 endpoints.

Backpressure: every ``Send`` adds to its connection's ``unsent_bytes`` and every ``sent()`` report
subtracts. Past ``max_buffered_bytes`` the flow stops reading the connection feeding it (``SetReading``)
or, for HTTP/2, stops reopening the producer's window.

Time: every input carries ``now_ns``. Deadlines (connect, response, idle, pool idle, detect, ping, drain)
live in one ``Deadlines`` heap; the driver calls ``on_timer`` when ``next_deadline_ns()`` has passed.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import h11

from tether.core.address import Address
from tether.core.balance import Picker
from tether.core.config import ProxyConfig
from tether.core.discovery import Resolver
from tether.core.effects import Close, Effect, Send, SetReading
from tether.core.proxy.connections import Downstream, Mode, Upstream, UpstreamState
from tether.core.proxy.errors import ProxyError, ProxyErrorKind
from tether.core.proxy.exchange import Exchange, ExchangeState
from tether.core.proxy.h1fast import H1Connection
from tether.core.proxy.h1flows import H1Flows
from tether.core.proxy.h1heads import FieldMemo
from tether.core.proxy.h1lane import H1Lane
from tether.core.proxy.h2flows import H2Flows
from tether.core.proxy.h2upstream import H2Upstream
from tether.core.proxy.mtls import LOOPBACK, CertificateExpired, CertificateUpdate, MeshTls
from tether.core.proxy.pool import EndpointPool
from tether.core.proxy.routing import RoutesUpdated
from tether.core.proxy.stats import ProxyStats
from tether.core.proxy.streams import H2Pool, StreamExchange
from tether.core.proxy.telemetry import NO_TLS_LABEL, Telemetry
from tether.core.proxy.tunnel import TunnelFlows
from tether.core.timers import Deadlines
from tether.core.traffic.breaker import Outcome

if TYPE_CHECKING:  # route_config.py pulls in the YAML parser, which the running proxy never needs
    from tether.core.traffic.route_config import RouteConfig

NS_PER_MS = 1_000_000
MERGE_LIMIT = 16 * 1024  # consecutive Sends to one connection merge up to this size; larger ones stay apart


class Proxy(MeshTls, H1Lane, H1Flows, TunnelFlows, H2Flows, H2Upstream):
    """All connections of one proxy; see the module docstring."""

    def __init__(
        self,
        config: ProxyConfig,
        resolver: Resolver,
        rng: random.Random,
        *,
        picker: Picker | None = None,
        direction: str = "outbound",
        routes: RouteConfig | None = None,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.telemetry = Telemetry(direction=direction)
        self._rng = rng
        # An explicit picker replaces the balancers (balancing.py): stateless choice, no failfast, no breaker.
        self._picker: Picker | None = picker
        self._effects: list[Effect] = []
        self._last_id = 0
        self._downstream: dict[int, Downstream] = {}
        self._upstream: dict[int, Upstream] = {}
        self._exchanges: dict[int, Exchange] = {}
        self._pools: dict[Address, EndpointPool] = {}
        self._streams: dict[int, StreamExchange] = {}
        self._h2_pools: dict[tuple[Address, bytes], H2Pool] = {}
        self._h1_sink_pools: dict[Address, EndpointPool] = {}
        self._deadlines = Deadlines()
        # Heads seen before, shared by every HTTP/1.1 parser of this proxy (bounded: h1heads.FieldMemo).
        self._field_memo = FieldMemo()
        self._draining = False
        self._now_ns = 0  # the latest time any input carried; helpers without a now_ns argument use it
        self._init_mtls()
        self._init_balancing(config.balancer, config.breaker_config(), direction == "inbound")
        self._mirror_tickets: dict[int, list[int]] = {}
        self._init_routing(routes, 0)

    @property
    def stats(self) -> ProxyStats:
        """Per-service counters (the Linkerd-shaped families are in ``telemetry``)."""
        return self.telemetry.services

    # ------------------------------------------------------------------ driver inputs

    def accepted(
        self,
        now_ns: int,
        *,
        peer: Address | None = None,
        target: str | None = None,
        identity: str | None = None,
    ) -> int:
        """A client connected; returns the id the driver must use for this connection from now on."""
        self._now_ns = now_ns
        conn_id = self._new_id()
        holding = not self._draining and self._tls_holds_first_bytes(conn_id)
        tls_label = self.tls_labels(None, None) if self.telemetry.direction == "inbound" else LOOPBACK
        self.telemetry.tcp_opened(
            conn_id, "src", "", now_ns, tls_label if self.local_identity else NO_TLS_LABEL, settled=not holding
        )
        if self._draining:
            self._effects.append(Close(conn_id=conn_id))
            self.telemetry.tcp_closed(conn_id, now_ns)
            return conn_id
        parser = H1Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes, memo=self._field_memo)
        downstream = self._downstream[conn_id] = Downstream(conn_id, parser, peer, target, identity)
        self._deadlines.set(("idle", conn_id), now_ns + self.config.idle_timeout_ns)
        self._start_detecting(downstream, now_ns)
        return conn_id

    def received(self, conn_id: int, data: bytes, now_ns: int) -> None:
        """Bytes arrived on ``conn_id``; ``b""`` means the peer closed its sending side."""
        self._now_ns = now_ns
        self.telemetry.tcp_read(conn_id, len(data))
        if self._tls_deciding and conn_id in self._tls_deciding:
            self._tls_decide(conn_id, data, now_ns)
        elif self._tls and conn_id in self._tls:
            self._tls_received(conn_id, data, now_ns)
        else:
            self._received_plain(conn_id, data, now_ns)

    def _received_plain(self, conn_id: int, data: bytes, now_ns: int) -> None:
        downstream = self._downstream.get(conn_id)
        if downstream is not None:
            if downstream.mode is Mode.HTTP1:
                if downstream.exchange_id is not None or not self._lane_request(downstream, data, now_ns):
                    downstream.h11.receive_data(data)
                    self._pump_downstream(downstream, now_ns)
            elif downstream.mode is Mode.HTTP2:
                self._h2_downstream_received(downstream, data, now_ns)
            elif downstream.mode is Mode.DETECT:
                self._detect_received(downstream, data, now_ns)
            else:
                self._tunnel_from_client(downstream, data)
            return
        upstream = self._upstream.get(conn_id)
        if upstream is None:
            return  # already closed on our side; late bytes are dropped
        if upstream.tunnel_downstream_id is not None:
            self._tunnel_from_endpoint(upstream, data)
            return
        if upstream.stream_world:
            self._stream_upstream_received(upstream, data)
            return
        if upstream.state is UpstreamState.IDLE:
            # Nothing was asked on this connection: bytes are a protocol violation and EOF a close.
            self._close_upstream(upstream, reset=bool(data))
            return
        upstream.eof = upstream.eof or not data
        if data and upstream.state is UpstreamState.BUSY and self._lane_response(upstream, data, now_ns):
            return
        upstream.h11.receive_data(data)
        self._pump_upstream(upstream, now_ns)

    def sent(self, conn_id: int, byte_count: int, now_ns: int) -> None:
        """The driver handed ``byte_count`` bytes of ``conn_id`` to the kernel (or the virtual network)."""
        self._now_ns = now_ns
        connection = self._downstream.get(conn_id) or self._upstream.get(conn_id)
        if connection is None:
            return
        was_backed_up = connection.unsent_bytes >= self.config.max_buffered_bytes
        connection.unsent_bytes -= byte_count
        assert connection.unsent_bytes >= 0, (conn_id, connection.unsent_bytes)
        if connection.exchange_id is None and type(connection) is Downstream and connection.mode is Mode.HTTP1:
            return  # an HTTP/1.1 client between requests (its answer went out): nothing waits on it to drain
        if self._in_stream_world(connection):
            if was_backed_up:
                self._stream_connection_drained(connection)
            return
        self._sync_reading_all_for(connection)

    def connected(self, conn_id: int, now_ns: int) -> None:
        self._now_ns = now_ns
        upstream = self._upstream.get(conn_id)
        if upstream is None or upstream.state is not UpstreamState.CONNECTING:
            return
        if self._tls_wanted and self._tls_connected(conn_id, now_ns):
            return  # the flows hear ``connected`` when the handshake is done (mtls.py)
        self.telemetry.tcp_opened(conn_id, "dst", str(upstream.endpoint), now_ns, self.tls_labels(None, None))
        self._connected_plain(conn_id, now_ns)

    def _connected_plain(self, conn_id: int, now_ns: int) -> None:
        upstream = self._upstream.get(conn_id)
        if upstream is None:
            return
        self._deadlines.cancel(("connect", conn_id))
        if upstream.tunnel_downstream_id is not None:
            self._tunnel_connected(upstream)
            return
        if upstream.stream_world:
            self._stream_upstream_connected(upstream)
            return
        exchange = self._exchange(upstream.exchange_id)
        if exchange is not None and exchange.state is ExchangeState.QUEUED:
            self._bind(exchange, upstream, now_ns)
        else:
            upstream.exchange_id = None
            self._release_upstream(upstream, now_ns)

    def connect_failed(self, conn_id: int, reason: str, now_ns: int) -> None:
        self._now_ns = now_ns
        upstream = self._upstream.get(conn_id)
        if upstream is None:
            return
        if upstream.tunnel_downstream_id is not None:
            self._tunnel_failed(upstream, f"connect to {upstream.endpoint} failed: {reason}")
            return
        if upstream.stream_world:
            self._stream_upstream_failed(
                upstream, f"connect to {upstream.endpoint} failed: {reason}", driver_gave_up=True
            )
            return
        exchange = self._exchange(upstream.exchange_id)
        self._forget_upstream(upstream)
        if exchange is not None and exchange.live:
            error = ProxyError(ProxyErrorKind.CONNECT_FAILED, f"connect to {upstream.endpoint} failed: {reason}")
            self._fail(exchange, error, now_ns)

    def closed(self, conn_id: int, now_ns: int) -> None:
        """The driver lost ``conn_id`` (reset, write error): drop it without writing anything more to it."""
        self._now_ns = now_ns
        self._tls_forget(conn_id)
        self._closed_plain(conn_id, now_ns)

    def _closed_plain(self, conn_id: int, now_ns: int) -> None:
        downstream = self._downstream.get(conn_id)
        if downstream is not None:
            self._forget_downstream(downstream)
            self._tunnel_client_lost(downstream)
            self._abandon_client_streams(downstream)
            exchange = self._exchange(downstream.exchange_id)
            if exchange is not None and exchange.live:
                self._abandon(exchange, now_ns)
            return
        upstream = self._upstream.get(conn_id)
        if upstream is not None and upstream.tunnel_downstream_id is not None:
            self._tunnel_failed(upstream, f"{upstream.endpoint} reset the connection")
        elif upstream is not None and upstream.stream_world:
            self._sink_connection_lost(upstream, f"{upstream.endpoint} reset the connection", already_closed=True)
        elif upstream is not None:
            self._upstream_broke(upstream, "connection to endpoint was reset", now_ns, already_closed=True)

    def control(self, update: CertificateUpdate | CertificateExpired | RoutesUpdated, now_ns: int) -> None:
        """A control-plane event: our certificate (mtls.py), or the routes (routing.py); discovery will join."""
        self._now_ns = now_ns
        if isinstance(update, CertificateUpdate):
            self._certificate_update(update, now_ns)
        elif isinstance(update, RoutesUpdated):
            self._set_routes(update.routes, now_ns)
        else:
            self._certificate_expired(update)

    def on_timer(self, now_ns: int) -> None:
        self._now_ns = now_ns
        for key in self._deadlines.pop_expired(now_ns):
            kind, ident = key
            if kind == "connect":
                self._connect_timed_out(ident, now_ns)
            elif kind == "response":
                self._response_timed_out(ident, now_ns)
            elif kind == "idle":
                self._downstream_idle(ident, now_ns)
            elif kind == "pool-idle":
                self._pool_idle(ident, now_ns)
            elif kind == "drain":
                self._drain_expired(now_ns)
            elif kind == "detect":
                self._detect_timed_out(ident, now_ns)
            elif kind == "ping":
                self._ping_due(ident, now_ns)
            elif kind == "backend":
                self._backend_timer(ident, now_ns)
            elif kind == "route":
                self._route_timer(ident)

    def shutdown(self, now_ns: int) -> None:
        """Stop taking requests: close idle client connections now, busy ones after their response."""
        self._now_ns = now_ns
        if self._draining:
            return
        self._draining = True
        self._deadlines.set(("drain", 0), now_ns + self.config.drain_timeout_ns)
        for downstream in list(self._downstream.values()):
            downstream.closing = True
            if downstream.mode is Mode.HTTP2:
                self._close_finished_h2(downstream)  # GOAWAY now; close once the open streams end
            elif downstream.exchange_id is None and downstream.mode is not Mode.OPAQUE:
                self._close_downstream(downstream)  # tunnels run on until the drain timeout
        for upstream in list(self._upstream.values()):
            if upstream.state is UpstreamState.IDLE or (upstream.state is UpstreamState.READY and not upstream.streams):
                self._close_upstream(upstream)

    # ------------------------------------------------------------------ driver outputs

    def effects(self) -> list[Effect]:
        """Everything to do since the last call, in order; the list is handed over, not copied."""
        out, self._effects = self._effects, []
        return out

    def next_deadline_ns(self) -> int | None:
        return self._deadlines.next_ns()

    def is_drained(self) -> bool:
        return self._draining and not self._downstream

    @property
    def open_connections(self) -> int:
        return len(self._downstream) + len(self._upstream)

    # ------------------------------------------------------------------ timers

    def _downstream_idle(self, conn_id: int, now_ns: int) -> None:
        downstream = self._downstream.get(conn_id)
        if downstream is not None and downstream.exchange_id is None and downstream.mode in (Mode.HTTP1, Mode.DETECT):
            self._close_downstream(downstream)  # tunnels have no idle timeout, as in Linkerd
        elif downstream is not None and downstream.mode is Mode.HTTP2:
            self._h2_idle(downstream)

    def _pool_idle(self, conn_id: int, now_ns: int) -> None:
        upstream = self._upstream.get(conn_id)
        if upstream is not None and upstream.state is UpstreamState.IDLE:
            self._close_upstream(upstream)
        elif upstream is not None and upstream.state is UpstreamState.READY and not upstream.streams:
            self._close_upstream(upstream)  # an HTTP/2 connection with no streams left

    def _connect_timed_out(self, conn_id: int, now_ns: int) -> None:
        upstream = self._upstream.get(conn_id)
        if upstream is None or upstream.state is not UpstreamState.CONNECTING:
            return
        timeout_ms = self.config.connect_timeout_ns // NS_PER_MS
        if upstream.tunnel_downstream_id is not None:
            self._tunnel_failed(upstream, f"connect to {upstream.endpoint} timed out after {timeout_ms} ms")
            return
        if upstream.stream_world:
            self._stream_upstream_failed(upstream, f"connect to {upstream.endpoint} timed out after {timeout_ms} ms")
            return
        exchange = self._exchange(upstream.exchange_id)
        self._close_upstream(upstream, reset=True)
        if exchange is not None and exchange.live:
            timeout_ms = self.config.connect_timeout_ns // NS_PER_MS
            reason = f"connect to {upstream.endpoint} timed out after {timeout_ms} ms"
            self._fail(exchange, ProxyError(ProxyErrorKind.CONNECT_TIMEOUT, reason), now_ns)

    def _response_timed_out(self, exchange_id: int, now_ns: int) -> None:
        stream_exchange = self._streams.get(exchange_id)
        if stream_exchange is not None and not stream_exchange.response_started:
            timeout_ms = self.config.response_timeout_ns // NS_PER_MS
            who = stream_exchange.endpoint or f"no endpoint of {stream_exchange.service}"  # still queued
            reason = f"{who} did not answer within {timeout_ms} ms"
            self._stream_fail(stream_exchange, ProxyError(ProxyErrorKind.RESPONSE_TIMEOUT, reason))
            return
        exchange = self._exchange(exchange_id)
        if exchange is None or exchange.state is not ExchangeState.AWAITING:
            return
        upstream = self._upstream.get(exchange.upstream_id) if exchange.upstream_id is not None else None
        if upstream is not None:
            upstream.exchange_id = None
            self._close_upstream(upstream, reset=True)
        timeout_ms = self.config.response_timeout_ns // NS_PER_MS
        who = exchange.endpoint or f"no endpoint of {exchange.service}"  # it waited in the failfast queue
        reason = f"{who} did not answer within {timeout_ms} ms"
        self._fail(exchange, ProxyError(ProxyErrorKind.RESPONSE_TIMEOUT, reason), now_ns)

    def _route_timer(self, request_id: int) -> None:
        exchange = self._exchanges.get(request_id)
        if exchange is not None:
            self._h1_route_timer(exchange)
            return
        stream = self._streams.get(request_id)
        if stream is not None:
            self._stream_route_timer(stream)

    def _drain_expired(self, now_ns: int) -> None:
        for downstream in list(self._downstream.values()):
            if downstream.mode is Mode.HTTP2:
                self._h2_downstream_lost(downstream, "", reset=True)
                continue
            self._close_downstream(downstream, reset=True)  # first: abandoning must not close it gracefully
            self._abandon_client_streams(downstream)
            exchange = self._exchange(downstream.exchange_id)
            if exchange is not None and exchange.live:
                self._abandon(exchange, now_ns)
            self._tunnel_client_lost(downstream)

    # ------------------------------------------------------------------ connection bookkeeping

    def _close_downstream(self, downstream: Downstream, *, reset: bool = False) -> None:
        if downstream.conn_id not in self._downstream:
            return
        if self._tls and not reset:
            self._tls_close_notify(downstream)
        self._effects.append(Close(conn_id=downstream.conn_id, reset=reset))
        self._forget_downstream(downstream)

    def _forget_downstream(self, downstream: Downstream) -> None:
        del self._downstream[downstream.conn_id]
        if downstream.backend is not None:  # an opaque tunnel's endpoint, held for the connection's life
            upstream = self._upstream.get(downstream.tunnel_upstream_id or -1)
            connecting = upstream is not None and upstream.state is UpstreamState.CONNECTING
            self._drop_lease(downstream, downstream.conn_id, Outcome.CANCELLED if connecting else Outcome.SUCCESS)
        self._tls_forget(downstream.conn_id)
        for kind in ("idle", "detect", "ping"):
            self._deadlines.cancel((kind, downstream.conn_id))
        self.telemetry.tcp_closed(downstream.conn_id, self._now_ns)

    def _close_upstream(self, upstream: Upstream, *, reset: bool = False) -> None:
        if upstream.conn_id not in self._upstream:
            return
        if self._tls and not reset:
            self._tls_close_notify(upstream)
        self._effects.append(Close(conn_id=upstream.conn_id, reset=reset))
        self._forget_upstream(upstream)

    def _forget_upstream(self, upstream: Upstream) -> None:
        if self._upstream.pop(upstream.conn_id, None) is None:
            return
        self._tls_forget(upstream.conn_id)
        self.telemetry.tcp_closed(upstream.conn_id, self._now_ns)
        for kind in ("connect", "pool-idle", "ping"):
            self._deadlines.cancel((kind, upstream.conn_id))
        if upstream.stream_world:
            self._forget_stream_upstream(upstream)
            return
        pool = self._pool(upstream.endpoint)
        pool.forget(upstream.conn_id)
        if pool.waiting_exchange_ids:
            self._serve_waiters(pool, self._now_ns)  # a waiter may now open a connection of its own

    def _send(self, connection: Downstream | Upstream, data: bytes | None) -> None:
        if data and self._tls:
            link = self._tls.get(connection.conn_id)
            if link is not None:
                data = self._tls_encrypt(link, data)
        if data:
            connection.unsent_bytes += len(data)
            self.telemetry.tcp_written(connection.conn_id, len(data))
            effects = self._effects
            last = effects[-1] if effects else None
            if type(last) is Send and last.conn_id == connection.conn_id and len(last.data) + len(data) <= MERGE_LIMIT:
                # A response head and its small body leave in one write (one system call, one segment).
                effects[-1] = Send(conn_id=connection.conn_id, data=last.data + data)
            else:
                effects.append(Send(conn_id=connection.conn_id, data=data))

    def _set_reading(self, connection: Downstream | Upstream, enabled: bool) -> None:
        if connection.reading != enabled:
            connection.reading = enabled
            self._effects.append(SetReading(conn_id=connection.conn_id, enabled=enabled))

    def _new_upstream_parser(self) -> H1Connection:
        return H1Connection(h11.CLIENT, max_incomplete_event_size=self.config.max_header_bytes, memo=self._field_memo)

    def _exchange(self, exchange_id: int | None) -> Exchange | None:
        return self._exchanges.get(exchange_id) if exchange_id is not None else None

    def _new_id(self) -> int:
        self._last_id += 1
        return self._last_id
