"""Protocol detection and opaque TCP tunnels, as a part of the proxy machine.

Theory of operation
-------------------
A client connection in DETECT mode buffers its first bytes (at most DETECT_MAX_BYTES) until
``detect.detect`` decides. HTTP/1.1 hands the buffer to the connection's h11 parser and goes on as any
HTTP connection. Anything else, or nothing before ``detect_timeout`` (a protocol where the server speaks
first), makes it an opaque tunnel; so does every connection when the proxy runs with protocol "opaque".
An HTTP/2 preface hands the connection to h2flows.py; with protocol "http1" only the preface is looked for.

A tunnel is one downstream and one upstream connection, never pooled. Bytes go through as they arrive;
until the upstream connection is open they wait in ``Downstream.pending`` (bounded by
``max_buffered_bytes``, past which the client is not read). An end of stream on one side becomes a
``ShutdownWrite`` on the other (a TCP half-close), and once both sides have ended both connections
close. A reset on either side resets the other. A failed or timed-out connect resets the client: an
opaque protocol has no way to carry an error message.

This class holds only methods; its state lives in the ``Proxy`` that inherits it (machine.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h11

from tether.core.address import Address, parse_authority
from tether.core.discovery import EndpointSet
from tether.core.effects import LogError
from tether.core.proxy import transport_header
from tether.core.proxy.balancing import OPAQUE, Backend, Leaseholder
from tether.core.proxy.connections import Downstream, Mode, Upstream, UpstreamState
from tether.core.proxy.detect import Protocol, detect, detect_http
from tether.core.proxy.errors import ProxyError
from tether.core.proxy.exchange import Exchange, Step
from tether.core.proxy.parts import ProxyParts
from tether.core.proxy.pool import EndpointPool
from tether.core.traffic.balancer import Handle
from tether.core.traffic.breaker import Outcome


class TunnelFlows(ProxyParts):
    if TYPE_CHECKING:  # defined by the other flows

        def _pump_downstream(self, downstream: Downstream, now_ns: int) -> None: ...
        def _lane_request(self, downstream: Downstream, data: bytes, now_ns: int) -> bool: ...
        def _start_h2_downstream(self, downstream: Downstream, buffered: bytes, now_ns: int) -> None: ...
        def _h2_downstream_received(self, downstream: Downstream, data: bytes, now_ns: int) -> None: ...
        def _pool(self, endpoint: Address) -> EndpointPool: ...
        def _backend(self, name: str, endpoints: tuple[Address, ...], kind: str) -> Backend: ...
        def _take_lease(self, holder: Leaseholder, request_id: int, backend: Backend) -> ProxyError | None: ...
        def _drop_lease(self, holder: Leaseholder, request_id: int, outcome: Outcome) -> None: ...

    # ---------------------------------------------------------------- detection

    def _start_detecting(self, downstream: Downstream, now_ns: int) -> None:
        if self.config.protocol == "opaque" or self._to_opaque_port(downstream):
            self._start_tunnel(downstream, now_ns)
        else:
            # "http1" detects too, but only the HTTP/2 preface: everything else is HTTP/1.1 (or a 400).
            downstream.mode = Mode.DETECT
            self._deadlines.set(("detect", downstream.conn_id), now_ns + self.config.detect_timeout_ns)

    def _to_opaque_port(self, downstream: Downstream) -> bool:
        """A detecting proxy skips detection for a connection redirected to an opaque port (a database, a
        mail server): server-speaks-first protocols would otherwise wait out the detect timeout."""
        if self.config.protocol != "detect" or not downstream.target:
            return False
        _host, port = parse_authority(downstream.target)
        return port in self.config.opaque_ports

    def _detect_received(self, downstream: Downstream, data: bytes, now_ns: int) -> None:
        downstream.detect_buffer += data
        downstream.eof = downstream.eof or not data
        self._decide(downstream, final=downstream.eof, now_ns=now_ns)

    def _detect_timed_out(self, conn_id: int, now_ns: int) -> None:
        downstream = self._downstream.get(conn_id)
        if downstream is not None and downstream.mode is Mode.DETECT:
            self._decide(downstream, final=True, now_ns=now_ns)

    def _decide(self, downstream: Downstream, *, final: bool, now_ns: int) -> None:
        head = bytes(downstream.detect_buffer)
        if head and (head.startswith(transport_header.PREFACE) or transport_header.PREFACE.startswith(head)):
            self._accept_transport_header(downstream, head, final=final, now_ns=now_ns)
            return
        protocol = detect(head, final=final) if self.config.protocol == "detect" else detect_http(head, final=final)
        if protocol is None:
            return
        self._deadlines.cancel(("detect", downstream.conn_id))
        buffered, downstream.detect_buffer = bytes(downstream.detect_buffer), bytearray()
        if protocol is Protocol.HTTP1:
            downstream.mode = Mode.HTTP1
            if buffered and not downstream.eof and self._lane_request(downstream, buffered, now_ns):
                return  # a connection's first request takes the lane as its later ones do (h1lane.py)
            if buffered:  # (b"" would read as the client's end of stream)
                downstream.h11.receive_data(buffered)
            if downstream.eof:
                downstream.h11.receive_data(b"")
            self._pump_downstream(downstream, now_ns)
            return
        if protocol is Protocol.HTTP2:
            self._start_h2_downstream(downstream, buffered, now_ns)
            if downstream.eof and downstream.conn_id in self._downstream:
                self._h2_downstream_received(downstream, b"", now_ns)
            return
        self._start_tunnel(downstream, now_ns)
        if buffered:
            self._tunnel_from_client(downstream, buffered)
        if downstream.eof:
            self._tunnel_from_client(downstream, b"")

    def _accept_transport_header(self, downstream: Downstream, head: bytes, *, final: bool, now_ns: int) -> None:
        """A meshed peer's opaque connection: tunnel it to the workload's port that the header names."""
        try:
            parsed = transport_header.parse(head)
        except transport_header.TransportHeaderError as error:
            self._refuse(downstream, f"invalid transport header: {error}")
            return
        if parsed is None:
            if final:
                self._refuse(downstream, "the connection ended inside its transport header")
            return
        header, used = parsed
        self._deadlines.cancel(("detect", downstream.conn_id))
        downstream.detect_buffer = bytearray()
        workload = self.resolver.resolve(downstream.target or "")
        if workload is None or not workload.endpoints:
            self._refuse(downstream, "transport header on a listener with no local workload")
            return
        if header.session_protocol == "http2":
            # A meshed peer's multiplexed HTTP connection: every stream goes to the named workload port.
            downstream.fixed_endpoint = Address(workload.endpoints[0].host, header.port)
            self._start_h2_downstream(downstream, head[used:], now_ns)
            return
        self._start_tunnel(downstream, now_ns, endpoint=Address(workload.endpoints[0].host, header.port))
        if head[used:]:
            self._tunnel_from_client(downstream, head[used:])
        if downstream.eof:
            self._tunnel_from_client(downstream, b"")

    def _refuse(self, downstream: Downstream, reason: str) -> None:
        self._effects.append(LogError(conn_id=downstream.conn_id, message=reason))
        self._close_downstream(downstream, reset=True)

    # ---------------------------------------------------------------- protocol switches

    def _switch_to_tunnel(
        self, exchange: Exchange, upstream: Upstream, head: h11.InformationalResponse | h11.Response
    ) -> None:
        """The endpoint accepted an upgrade (101) or a CONNECT (2xx): forward ``head``, then pipe bytes.

        The exchange is counted as a response like any other; the upstream connection leaves its pool for
        good. Bytes that already followed the heads (h11 holds them as trailing data) go on first.
        """
        now_ns = self._now_ns
        self._deadlines.cancel(("response", exchange.exchange_id))
        self._drop_lease(exchange, exchange.exchange_id, Outcome.SUCCESS)
        exchange.advance(Step.RESPONSE_HEAD)
        exchange.advance(Step.RESPONSE_DONE)
        self._exchanges.pop(exchange.exchange_id, None)
        latency_ms = (now_ns - exchange.started_ns) / 1_000_000
        self.telemetry.response_started(exchange.service, exchange.labels, head.status_code, latency_ms)
        self._pool(upstream.endpoint).forget(upstream.conn_id)
        upstream.exchange_id = None
        downstream = self._downstream.get(exchange.downstream_id)
        if downstream is None:
            self._close_upstream(upstream, reset=True)
            return
        self._send(downstream, downstream.h11.send(head))
        downstream.exchange_id = None
        downstream.mode = Mode.OPAQUE
        downstream.tunnel_upstream_id = upstream.conn_id
        upstream.tunnel_downstream_id = downstream.conn_id
        self._deadlines.cancel(("idle", downstream.conn_id))
        from_endpoint, endpoint_closed = upstream.h11.trailing_data
        from_client, client_closed = downstream.h11.trailing_data
        if from_client:
            self._send(upstream, bytes(from_client))
        if from_endpoint:
            self._send(downstream, bytes(from_endpoint))
        if client_closed:
            self._tunnel_from_client(downstream, b"")
        if endpoint_closed and upstream.conn_id in self._upstream:
            self._tunnel_from_endpoint(upstream, b"")
        self._sync_tunnel_reading(downstream)

    # ---------------------------------------------------------------- tunnels

    def _start_tunnel(self, downstream: Downstream, now_ns: int, *, endpoint: Address | None = None) -> None:
        """Open the tunnel's upstream connection: to ``endpoint``, or to one the service's balancer picks
        (P2C on open connections; the connection waits in the failfast queue while none is ready)."""
        downstream.mode = Mode.OPAQUE
        if endpoint is not None:
            self._open_tunnel(downstream, endpoint, None, now_ns)
            return
        endpoint_set = self.resolver.resolve(downstream.target or "")
        if endpoint_set is None or not endpoint_set.endpoints:
            self._refuse(downstream, "opaque connection: no endpoints")
            return
        if self._picker is not None:
            self._open_tunnel(downstream, self._picker.pick(endpoint_set, self._rng), endpoint_set, now_ns)
            return
        backend = self._backend(endpoint_set.name, endpoint_set.endpoints, OPAQUE)
        refusal = self._take_lease(downstream, downstream.conn_id, backend)
        if refusal is not None:
            self._refuse(downstream, f"opaque connection: {refusal.reason}")
        elif downstream.handle is not None:
            self._open_tunnel(downstream, downstream.handle.endpoint, endpoint_set, now_ns)
        # else: it waits for an endpoint; its bytes wait in ``pending`` meanwhile

    def _tunnel_endpoint_ready(self, downstream: Downstream, handle: Handle) -> None:
        endpoint_set = self.resolver.resolve(downstream.target or "")
        self._open_tunnel(downstream, handle.endpoint, endpoint_set, self._now_ns)
        self._sync_tunnel_reading(downstream)

    def _tunnel_endpoint_refused(self, downstream: Downstream, error: ProxyError) -> None:
        self._refuse(downstream, f"opaque connection: {error.reason}")

    def _open_tunnel(
        self, downstream: Downstream, endpoint: Address, endpoint_set: EndpointSet | None, now_ns: int
    ) -> None:
        """Connect to ``endpoint``. An endpoint of a meshed peer is reached through the peer's inbound port,
        with a transport header naming the port the connection is for (transport_header.py)."""
        server_identity: str | None = None
        if endpoint_set is not None and endpoint_set.meshed_inbound_port is not None:
            server_identity = endpoint_set.identity
            header = transport_header.TransportHeader(endpoint.port).encode()
            downstream.pending.appendleft(header)
            downstream.pending_bytes += len(header)
            endpoint = Address(endpoint.host, endpoint_set.meshed_inbound_port)
        conn_id = self._new_id()
        upstream = Upstream(conn_id, self._new_upstream_parser(), endpoint, tunnel_downstream_id=downstream.conn_id)
        self._upstream[conn_id] = upstream
        downstream.tunnel_upstream_id = conn_id
        if not self._connect(conn_id, endpoint, server_identity):
            self._drop_lease(downstream, downstream.conn_id, Outcome.CANCELLED)  # our refusal, not the endpoint's
            self._tunnel_failed(upstream, f"mTLS to {server_identity}: {self._tls_refusal}")
            return
        self._deadlines.set(("connect", conn_id), now_ns + self.config.connect_timeout_ns)

    def _tunnel_from_client(self, downstream: Downstream, data: bytes) -> None:
        upstream = self._tunnel_peer_of_downstream(downstream)
        if not data:
            downstream.eof = True
        if upstream is None or upstream.state is UpstreamState.CONNECTING:
            if data:
                downstream.pending.append(data)
                downstream.pending_bytes += len(data)
            self._sync_tunnel_reading(downstream)
            return
        if data:
            self._send(upstream, data)
        else:
            self._shutdown_write(upstream)
            self._end_tunnel_if_done(downstream, upstream)
        self._sync_tunnel_reading(downstream)

    def _tunnel_from_endpoint(self, upstream: Upstream, data: bytes) -> None:
        downstream = self._downstream.get(upstream.tunnel_downstream_id or -1)
        if downstream is None:
            self._close_upstream(upstream, reset=True)
            return
        if data:
            self._send(downstream, data)
        else:
            upstream.eof = True
            self._shutdown_write(downstream)
            self._end_tunnel_if_done(downstream, upstream)
        self._sync_tunnel_reading(downstream)

    def _tunnel_connected(self, upstream: Upstream) -> None:
        upstream.state = UpstreamState.BUSY
        downstream = self._downstream.get(upstream.tunnel_downstream_id or -1)
        if downstream is None:
            self._close_upstream(upstream, reset=True)
            return
        while downstream.pending:
            self._send(upstream, downstream.pending.popleft())
        downstream.pending_bytes = 0
        if downstream.eof:
            self._shutdown_write(upstream)
        self._sync_tunnel_reading(downstream)

    def _tunnel_failed(self, upstream: Upstream, reason: str) -> None:
        """The tunnel's upstream could not open, or one side was reset: reset the other side too."""
        downstream = self._downstream.get(upstream.tunnel_downstream_id or -1)
        if downstream is not None and upstream.state is UpstreamState.CONNECTING:
            self._drop_lease(downstream, downstream.conn_id, Outcome.FAILURE)  # a failed connect counts
        self._close_upstream(upstream, reset=True)
        if downstream is not None:
            self._effects.append(LogError(conn_id=downstream.conn_id, message=f"opaque connection: {reason}"))
            self._close_downstream(downstream, reset=True)

    def _tunnel_client_lost(self, downstream: Downstream) -> None:
        upstream = self._tunnel_peer_of_downstream(downstream)
        if upstream is not None:
            self._close_upstream(upstream, reset=True)

    def _end_tunnel_if_done(self, downstream: Downstream, upstream: Upstream) -> None:
        if downstream.eof and upstream.eof:
            self._close_upstream(upstream)
            self._close_downstream(downstream)

    def _tunnel_peer_of_downstream(self, downstream: Downstream) -> Upstream | None:
        if downstream.tunnel_upstream_id is None:
            return None
        return self._upstream.get(downstream.tunnel_upstream_id)

    def _sync_tunnel_reading(self, downstream: Downstream) -> None:
        limit = self.config.max_buffered_bytes
        upstream = self._tunnel_peer_of_downstream(downstream)
        if downstream.conn_id in self._downstream and not downstream.eof:
            if upstream is None or upstream.state is UpstreamState.CONNECTING:
                self._set_reading(downstream, downstream.pending_bytes < limit)
            else:
                self._set_reading(downstream, upstream.unsent_bytes < limit)
        if upstream is not None and upstream.state is UpstreamState.BUSY and not upstream.eof:
            self._set_reading(upstream, downstream.unsent_bytes < limit)
