"""The common case of HTTP/1.1 to HTTP/1.1, without h11 events: a whole request in, a whole response out.

Theory of operation
-------------------
Most proxied HTTP/1.1 traffic is the same exchange over and over: a keep-alive client sends a request head
with no body or a small Content-Length one, in one read; the endpoint answers with a head and a
Content-Length body, in one read. h1flows.py handles that as a dozen h11 events, each one dispatched,
checked against the exchange's state and written out on its own. This module handles it as two inputs:

- ``_lane_request``: a client's bytes when its connection waits for a request. ``H1Connection.receive_head``
  parses the head exactly as ``next_event`` would. If the request is the lane's (the whole body is here, no
  routes or rate limit are configured, the destination is not a meshed peer, the head is well under the size
  limit), the exchange is made and dispatched with its upstream head already written out (``Exchange.prepared``,
  used by ``_bind``). Otherwise the head goes on as the ``h11.Request`` event it is, to ``_request_started``,
  and the parser takes it from there: nothing the lane declines is handled differently.
- ``_lane_response``: an endpoint's bytes when its connection waits for the response to an exchange that
  sent its whole request, has no route and no mirrors, and whose client is still connected (whichever path
  its request took). The same split: a whole Content-Length response goes to the client in one write and
  the exchange ends; any other head goes on as its ``h11.Response`` event to ``_response_started``, then
  ``_pump_upstream``.

Everything observable stays as the event path makes it, in the same order: the effects (a head and its body
still merge into one ``Send``; under TLS they stay two records), the deadlines, the metrics, the balancer's
lease and its outcome, keep-alive decisions and backpressure. The lane only skips work: building events
nobody keeps, re-validating heads this process just parsed, and dispatching per event. Each branch below
names the event-path step it stands for. tests/core/test_h1lane.py runs the same traffic through both paths
and compares what comes out.

This class holds only methods; the state lives in the ``Proxy`` that inherits it (machine.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h11

from tether.core.discovery import EndpointSet
from tether.core.proxy.connections import Downstream, Upstream, UpstreamState
from tether.core.proxy.exchange import Exchange, ExchangeState, Step
from tether.core.proxy.h1fast import END_OF_MESSAGE, H1Connection
from tether.core.proxy.h1heads import FullItems, Head, Row, request_event, response_event, write_head
from tether.core.proxy.http1 import HOP_BY_HOP, NEVER_HOP_BY_HOP
from tether.core.proxy.parts import ProxyParts
from tether.core.traffic.breaker import Outcome

if TYPE_CHECKING:
    from tether.core.address import Address
    from tether.core.proxy.balancing import Leaseholder
    from tether.core.proxy.errors import ProxyError
    from tether.core.proxy.pool import EndpointPool
    from tether.core.proxy.telemetry import HttpLabels

NS_PER_MS = 1_000_000
_TUNNEL_METHODS = (b"HEAD", b"CONNECT")  # their responses are framed (or switched) differently


class H1Lane(ProxyParts):
    if TYPE_CHECKING:  # defined by the flows
        _traffic_on: bool
        _tls: dict[int, object]
        _mirror_tickets: dict[int, list[int]]
        local_identity: str | None

        def _request_started(
            self,
            downstream: Downstream,
            request: h11.Request,
            authority: str,
            endpoint_set: EndpointSet | None,
            now_ns: int,
        ) -> None: ...
        def _pump_downstream(self, downstream: Downstream, now_ns: int) -> None: ...
        def _pump_upstream(self, upstream: Upstream, now_ns: int) -> None: ...
        def _response_started(
            self, exchange: Exchange, upstream: Upstream, response: h11.Response, now_ns: int
        ) -> None: ...
        def _h1_choose(self, exchange: Exchange, endpoint_set: EndpointSet) -> ProxyError | None: ...
        def _dispatch(self, exchange: Exchange, now_ns: int) -> None: ...
        def _request_body(self, downstream: Downstream, data: bytes) -> None: ...
        def _request_done(self, downstream: Downstream, now_ns: int) -> None: ...
        def _release_upstream(self, upstream: Upstream, now_ns: int) -> None: ...
        def _pool(self, endpoint: Address) -> EndpointPool: ...
        def _next_request(self, downstream: Downstream, now_ns: int) -> None: ...
        def _sync_reading_downstream(self, downstream: Downstream) -> None: ...
        def _sync_reading_upstream(self, upstream: Upstream) -> None: ...
        def _drop_lease(self, holder: Leaseholder, request_id: int, outcome: Outcome) -> None: ...
        def _mesh_lane_request(
            self, downstream: Downstream, head: Head, authority: str, endpoint_set: EndpointSet, now_ns: int
        ) -> bool: ...

    # ---------------------------------------------------------------- requests

    def _lane_request(self, downstream: Downstream, data: bytes, now_ns: int) -> bool:
        """``data`` from a client whose connection waits for a request; False: nothing happened, the parser
        takes it as usual."""
        head = downstream.h11.receive_head(data)
        if head is None:
            return False
        authority = downstream.target or head.host.decode("ascii", "replace")  # http1.request_authority
        endpoint_set = self.resolver.resolve(authority)
        meshed = endpoint_set is not None and endpoint_set.meshed_inbound_port is not None
        if meshed and self._mesh_lane_request(downstream, head, authority, endpoint_set, now_ns):  # type: ignore[arg-type]
            return True  # meshlane.py took it
        body = None
        if (
            endpoint_set is not None
            and endpoint_set.endpoints
            and endpoint_set.meshed_inbound_port is None
            and not self._traffic_on
            # http1.head_size of a request counts at most its wire length - 2 + one byte a line (a field
            # with no space after its colon): within that, the head is certainly within the limit.
            and head.length - 2 + len(head.fields) <= self.config.max_header_bytes
        ):
            body = downstream.h11.take_body()
        if body is None or endpoint_set is None:  # (the second test is for the type checker)
            # Not the lane's: the event path from this head on (_pump_downstream's h11.Request branch).
            self._request_started(downstream, head.event(), authority, endpoint_set, now_ns)
            self._pump_downstream(downstream, now_ns)
            return True
        self._lane_request_started(downstream, head, body, authority, endpoint_set, now_ns)
        return True

    def _lane_request_started(
        self, downstream: Downstream, head: Head, body: bytes, authority: str, endpoint_set: EndpointSet, now_ns: int
    ) -> None:
        """A whole request the lane takes: ``_h1_request_started`` for a head known to be within its limit and
        to have endpoints, then ``_request_body`` and ``_request_done`` as the parser's events would call them
        (in between, the exchange may pause or resume the client's connection just as on the event path)."""
        self._deadlines.cancel(("idle", downstream.conn_id))
        rows, lines = _forwarded_request(head)
        request = request_event(head.method, head.target, list(rows))
        wire = b"%s %s HTTP/1.1\r\n" % (head.method, head.target) + lines
        service = endpoint_set.name
        exchange = Exchange(self._new_id(), downstream.conn_id, request, service, now_ns)
        exchange.prepared = (request, wire, head.framing)
        self._exchanges[exchange.exchange_id] = exchange
        downstream.exchange_id = exchange.exchange_id
        refusal = self._h1_choose(exchange, endpoint_set)
        exchange.labels = self._lane_labels(downstream, authority, exchange.endpoint)
        self.telemetry.request_started(service, exchange.labels)
        if refusal is None and exchange.endpoint is not None and self._lane_bind(exchange, downstream, body, now_ns):
            return
        if refusal is not None:
            exchange.deferred_error = refusal  # _fail_after_request, before the body is read
        elif exchange.endpoint is not None:
            self._dispatch(exchange, now_ns)
        # else: it waits in the backend's failfast queue
        self._lane_request_rest(downstream, body, now_ns)

    def _lane_request_rest(self, downstream: Downstream, body: bytes, now_ns: int) -> None:
        """A whole request's body and end after its head, as _pump_downstream hands on the parser's Data and
        EndOfMessage events; any step may have closed the client. meshlane.py's lane ends the same way."""
        if downstream.conn_id in self._downstream and body:
            self._request_body(downstream, body)
        if downstream.conn_id in self._downstream:
            self._request_done(downstream, now_ns)
        if downstream.conn_id in self._downstream:
            self._sync_reading_downstream(downstream)  # the end of _pump_downstream

    def _lane_labels(self, downstream: Downstream, authority: str, endpoint: Address | None) -> HttpLabels:
        """The request's metric labels as ``_h1_request_started`` makes them, kept on the connection: its
        requests mostly name the same authority and reach the same endpoint."""
        identity = self.local_identity  # tls_labels reads it (and the connection's own identity, fixed)
        cached = downstream.lane_labels
        if (
            cached is not None
            and cached[0] == authority
            and (cached[1] is endpoint or cached[1] == endpoint)  # the balancer hands out its own Address
            and cached[2] == identity
        ):
            return cached[3]
        target_addr = str(endpoint) if endpoint is not None else ""
        labels = self.telemetry.http_labels(authority, target_addr, self.tls_labels(downstream, None))
        downstream.lane_labels = (authority, endpoint, identity, labels)
        return labels

    def _lane_bind(self, exchange: Exchange, downstream: Downstream, body: bytes, now_ns: int) -> bool:
        """The rest of a lane request when its endpoint's pool has an idle connection (most requests on
        keep-alive traffic): ``_dispatch``, ``_bind``, ``_request_body``, ``_request_done`` and the end of
        ``_pump_downstream`` as they run for a new exchange with its whole request read, without their
        lookups and checks. False: no idle connection, and nothing changed."""
        assert exchange.endpoint is not None and exchange.route is None and not exchange.pending_body
        idle_id = self._pool(exchange.endpoint).take_idle()
        if idle_id is None:
            return False
        upstream = self._upstream[idle_id]
        assert upstream.state is not UpstreamState.BUSY, idle_id
        self._deadlines.cancel(("pool-idle", idle_id))
        exchange.advance(Step.BOUND)  # _bind
        exchange.upstream_id = idle_id
        upstream.exchange_id = exchange.exchange_id
        upstream.state = UpstreamState.BUSY
        self._send(upstream, self._request_head_bytes(exchange, upstream))
        if (upstream.unsent_bytes < self.config.max_buffered_bytes) is not downstream.reading:
            self._sync_reading_downstream(downstream)  # _bind's, which changes something only here
        if body:  # _request_body
            self._send(upstream, upstream.h11.send(h11.Data(data=body)))
        exchange.request_received = True  # _request_done, and its _finish_request_upstream:
        end = upstream.h11.send(END_OF_MESSAGE)  # b"" (a lane request has a Content-Length or no body)
        if end:
            self._send(upstream, end)
        exchange.advance(Step.REQUEST_DONE)
        if exchange.state is ExchangeState.AWAITING and self.config.response_timeout_ns:
            self._deadlines.set(("response", exchange.exchange_id), now_ns + self.config.response_timeout_ns)
        self._sync_reading_downstream(downstream)  # the end of _pump_downstream
        return True

    def _request_head_bytes(self, exchange: Exchange, upstream: Upstream) -> bytes:
        """``upstream.h11.send(exchange.request)`` for ``_bind``, from the bytes the lane wrote out if it did."""
        prepared = exchange.prepared
        if prepared is not None and prepared[0] is exchange.request:  # not replaced since (h1traffic.py)
            return upstream.h11.send_prepared(exchange.request, prepared[1], prepared[2])
        return upstream.h11.send(exchange.request)

    # ---------------------------------------------------------------- responses

    def _lane_response(self, upstream: Upstream, data: bytes, now_ns: int) -> bool:
        """``data`` from an endpoint whose connection carries an exchange; False: nothing happened, the parser
        takes it as usual."""
        exchange = self._exchanges.get(upstream.exchange_id)  # type: ignore[arg-type]
        if (
            exchange is None
            or exchange.state is not ExchangeState.AWAITING
            or exchange.route is not None
            or self._mirror_tickets
            or exchange.request.method in _TUNNEL_METHODS
        ):
            return False
        if exchange.downstream_id not in self._downstream:
            return False  # the event path has the rare answers nobody reads
        read = whole_response(upstream.h11, data, self.config.max_header_bytes)
        if read is None:
            return False
        head, body = read
        if body is None:
            # Not the lane's: the event path from this head on (_pump_upstream's h11.Response branch).
            self._response_started(exchange, upstream, head.event(), now_ns)
            self._pump_upstream(upstream, now_ns)
            return True
        self._lane_respond(exchange, upstream, head, body, now_ns)
        # The end of _pump_upstream: _sync_reading_upstream, which has nothing to do unless the connection
        # went straight to an exchange that waited for it.
        if upstream.state is UpstreamState.BUSY and upstream.conn_id in self._upstream:
            self._sync_reading_upstream(upstream)
        return True

    def _lane_respond(self, exchange: Exchange, upstream: Upstream, head: Head, body: bytes, now_ns: int) -> None:
        """A whole response the lane takes: ``_response_started``, ``_response_body``, ``_response_done``."""
        self._deadlines.cancel(("response", exchange.exchange_id))
        exchange.advance(Step.RESPONSE_HEAD)
        status = head.status
        exchange.response_status = status
        if exchange.handle is not None:
            verdict = Outcome.FAILURE if status >= 500 else Outcome.SUCCESS  # balancing.http_outcome
            self._drop_lease(exchange, exchange.exchange_id, verdict)
        latency_ms = (now_ns - exchange.started_ns) / NS_PER_MS
        self.telemetry.response_started(exchange.service, exchange.labels, status, latency_ms)
        downstream = self._downstream.get(exchange.downstream_id)
        if downstream is not None:
            close = downstream.closing or self._draining
            if close:
                forwarded = _forwarded(head)
                forwarded.append((b"connection", b"connection", b"close"))
                rows = tuple(forwarded)
                lines = write_head(b"", forwarded, in_order=not head.hosts)
            else:
                rows, lines = _forwarded_response(head)
            wire = b"HTTP/1.1 %d %s\r\n" % (status, head.reason) + lines
            keep = not close

            def event() -> h11.Response:  # for h11, should the client's connection ever need it
                return response_event(status, head.reason, list(rows))

            data = downstream.h11.send_whole(event, wire, body, keep_alive=keep)
            if self._tls and body and downstream.conn_id in self._tls:
                self._send(downstream, data[: -len(body)])  # two TLS records, as the event path writes them
                self._send(downstream, data[-len(body) :])
            else:
                self._send(downstream, data)
        exchange.advance(Step.RESPONSE_DONE)
        # Bytes after the response would be read as the answer to the next request: never reuse such a
        # connection (_response_done).
        if upstream.h11.next_cycle_if_clean():
            self._release_upstream(upstream, now_ns)
        else:
            self._close_upstream(upstream)
        self._exchanges.pop(exchange.exchange_id, None)  # _end_exchange
        downstream = self._downstream.get(exchange.downstream_id)
        if downstream is not None:
            self._next_request(downstream, now_ns)


def _forwarded_request(head: Head) -> tuple[tuple[Row, ...], bytes]:
    """http1.upstream_request's rows for a lane request (which names no header in Connection but keep-alive,
    and has exactly one Host), and its field lines as written: worked out once per remembered block."""
    block = head.block
    if block is not None and block.forwarded is not None:
        return block.forwarded
    forwarded = [(name, name, value) for _, name, value in head.fields if name not in HOP_BY_HOP]
    in_order = bool(forwarded) and forwarded[0][1] == b"host"  # first, the only Host is in h11's place
    made = (tuple(forwarded), write_head(b"", forwarded, in_order=in_order))
    if block is not None:
        block.forwarded = made
    return made


def _forwarded_response(head: Head) -> tuple[tuple[Row, ...], bytes]:
    """``_forwarded`` for a response the client's connection stays open after, and its field lines as
    written: worked out once per remembered block."""
    block = head.block
    if block is not None and block.forwarded is not None:
        return block.forwarded
    forwarded = _forwarded(head)
    made = (tuple(forwarded), write_head(b"", forwarded, in_order=not head.hosts))
    if block is not None:
        block.forwarded = made
    return made


def _forwarded(head: Head) -> FullItems:
    """http1.forwarded_headers for a lane response (framed by Content-Length: no Transfer-Encoding)."""
    named = head.connection  # names the Connection header makes hop-by-hop (only keep-alive and close here)
    dropped = HOP_BY_HOP | (named - NEVER_HOP_BY_HOP) if named else HOP_BY_HOP
    return [(name, name, value) for _, name, value in head.fields if name not in dropped]


def whole_response(connection: H1Connection, data: bytes, max_header_bytes: int) -> tuple[Head, bytes | None] | None:
    """A lane's reading of an endpoint's bytes: None when no whole head is here yet (the parser keeps the
    bytes). Else the head, with its whole body, or with None when the body is not a lane's to take (no
    Content-Length framing, a 204 or 304, or a head near the size limit): the event path goes on from
    that head."""
    head = connection.receive_head(data)
    if head is None:
        return None
    body = None
    if (
        head.framing >= 0
        and head.status not in (204, 304)
        # http1.head_size of a response counts at most its wire length + 9 + one byte a line.
        and head.length + 9 + len(head.fields) <= max_header_bytes
    ):
        body = connection.take_body()
    return head, body
