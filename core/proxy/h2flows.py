"""HTTP/2 in the proxy machine: the client side of every StreamExchange, and what both sides share.

Theory of operation
-------------------
A client connection becomes HTTP/2 when detection sees the preface (or a meshed peer's transport header
says so). Each stream the client opens is a ``StreamExchange`` (streams.py), routed like an HTTP/1.1
request: the connection's fixed endpoint (a transport header named the workload port), else the
resolver's endpoint set for the target or ``:authority``. An HTTP/1.1 request bound for a meshed peer
becomes a StreamExchange too: it rides HTTP/2 to the peer with ``l5d-orig-proto`` (h2upstream.py).

Flow control is end to end: bytes from an HTTP/2 producer are acknowledged (its window reopened) only
once they left towards the consumer, and the consumer's connection is not backed up past
``max_buffered_bytes`` (``_settle``). HTTP/1.1 producers are paced by not reading them instead.

Errors before the response head reach the client become a response from the proxy (a trailers-only
response with a grpc-status for gRPC, else a status with ``l5d-proxy-error``); after it, the client's
stream is reset (RST_STREAM, with the endpoint's error code when it reset first) or, for an HTTP/1.1
client, its connection. A client's RST_STREAM resets the endpoint's stream, and the other way round.

Shutdown sends GOAWAY and lets open streams finish; a peer's GOAWAY stops new streams on that connection.
Every HTTP/2 connection is pinged every ``h2_keepalive_interval``; no answer within the timeout closes it.
The acknowledgements and read pacing are h2windows.py's. This class holds only methods; the state lives
in the ``Proxy`` that inherits it (machine.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h2.events
import h11
from h2.errors import ErrorCodes

from tether.core.address import Address
from tether.core.discovery import EndpointSet
from tether.core.effects import LogError
from tether.core.proxy import h2translate as tr
from tether.core.proxy.balancing import Backend, Leaseholder, error_outcome, grpc_outcome, http_outcome
from tether.core.proxy.connections import Downstream, Mode, Upstream
from tether.core.proxy.errors import ProxyError, ProxyErrorKind
from tether.core.proxy.h2session import H2Limits, H2Session, H2SessionError
from tether.core.proxy.h2traffic import H2Traffic
from tether.core.proxy.h2windows import H2Windows
from tether.core.proxy.streams import StreamExchange
from tether.core.proxy.telemetry import HttpLabels
from tether.core.traffic.breaker import Outcome

NS_PER_MS = 1_000_000
NO_LABELS = HttpLabels("outbound", "", "")  # until the endpoint is chosen


class H2Flows(H2Windows, H2Traffic):
    if TYPE_CHECKING:  # defined by the other flows

        def _next_request(self, downstream: Downstream, now_ns: int) -> None: ...
        def _write_h1_error(self, downstream: Downstream, error: ProxyError, *, close: bool) -> None: ...
        def _dispatch_stream(self, exchange: StreamExchange, endpoint_set: EndpointSet | None) -> None: ...
        def _to_sink(self, exchange: StreamExchange, data: bytes) -> None: ...
        def _end_sink_request(self, exchange: StreamExchange) -> None: ...
        def _detach_sink(self, exchange: StreamExchange, code: int) -> None: ...
        def _sink_connection(self, exchange: StreamExchange) -> Upstream | None: ...
        def _sink_queued(self, exchange: StreamExchange) -> int: ...
        def _flush_h2(self, connection: Downstream | Upstream) -> None: ...
        def _sink_connection_lost(self, upstream: Upstream, reason: str, *, already_closed: bool = False) -> None: ...
        def _sync_h1_sink_reading(self, upstream: Upstream) -> None: ...
        def _backend(self, name: str, endpoints: tuple[Address, ...], kind: str) -> Backend: ...
        def _source_response_head_bytes(
            self,
            exchange: StreamExchange,
            downstream: Downstream,
            status: int,
            headers: list[tuple[bytes, bytes]],
            close: bool,
        ) -> bytes: ...
        def _take_lease(self, holder: Leaseholder, request_id: int, backend: Backend) -> ProxyError | None: ...
        def _drop_lease(
            self, holder: Leaseholder, request_id: int, outcome: Outcome, *, rtt_ns: int | None = None
        ) -> None: ...

    def _h2_limits(self) -> H2Limits:
        config = self.config
        return H2Limits(
            max_concurrent_streams=config.h2_max_concurrent_streams,
            initial_stream_window=config.h2_stream_window,
            connection_window=config.h2_connection_window,
            max_header_bytes=config.max_header_bytes,
            max_control_frames_per_second=config.h2_max_control_frames_per_second,
        )

    # ---------------------------------------------------------------- HTTP/2 client connections

    def _start_h2_downstream(self, downstream: Downstream, buffered: bytes, now_ns: int) -> None:
        downstream.mode = Mode.HTTP2
        downstream.h2 = H2Session(client=False, limits=self._h2_limits())
        self._deadlines.set(("ping", downstream.conn_id), now_ns + self.config.h2_keepalive_interval_ns)
        self._write_h2(downstream)
        if buffered:  # (b"" would read as the client's end of stream)
            self._h2_downstream_received(downstream, buffered, now_ns)

    def _h2_downstream_received(self, downstream: Downstream, data: bytes, now_ns: int) -> None:
        session = downstream.h2
        assert session is not None
        if not data:
            self._h2_downstream_lost(downstream, "", reset=False)
            return
        try:
            events = session.receive(data, now_ns)
        except H2SessionError as error:
            self._write_h2(downstream)  # the GOAWAY h2 queued
            self._h2_downstream_lost(downstream, str(error), reset=False)
            return
        for event in events:
            if downstream.conn_id not in self._downstream:
                return
            self._h2_downstream_event(downstream, event, now_ns)
        if downstream.conn_id in self._downstream:
            self._write_h2(downstream)
            self._close_finished_h2(downstream)
        if downstream.conn_id in self._downstream:  # (a GOAWAY may just have closed it: nothing more to ask)
            self._sync_h2_reading(downstream)

    def _h2_downstream_event(self, downstream: Downstream, event: h2.events.Event, now_ns: int) -> None:
        exchange = self._streams.get(downstream.streams.get(getattr(event, "stream_id", 0) or 0, -1))
        if isinstance(event, h2.events.RequestReceived):
            self._h2_request(downstream, event, now_ns)
        elif isinstance(event, h2.events.DataReceived):
            downstream.h2.acknowledge(event.stream_id, event.flow_controlled_length - len(event.data))  # type: ignore[union-attr]
            if exchange is None:
                downstream.h2.acknowledge(event.stream_id, len(event.data))  # type: ignore[union-attr]
            elif event.data:
                exchange.source_unacked += len(event.data)
                self._to_sink(exchange, event.data)
                self._settle(exchange)
        elif isinstance(event, h2.events.TrailersReceived) and exchange is not None:
            exchange.request_trailers = [(n, v) for n, v in event.headers if not n.startswith(b":")]
        elif isinstance(event, h2.events.StreamEnded) and exchange is not None:
            self._source_request_ended(exchange, now_ns)
        elif isinstance(event, h2.events.StreamReset):
            downstream.h2.forget(event.stream_id)  # type: ignore[union-attr]
            if exchange is not None:
                self._source_reset(exchange, event.error_code)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._flush_h2(downstream)
        elif isinstance(event, h2.events.PingAckReceived):
            self._ping_answered(downstream, now_ns)
        elif isinstance(event, h2.events.ConnectionTerminated):
            downstream.closing = True

    def _h2_request(self, downstream: Downstream, event: h2.events.RequestReceived, now_ns: int) -> None:
        session = downstream.h2
        assert session is not None
        stream_id = event.stream_id
        if downstream.closing or self._draining:
            session.reset(stream_id, ErrorCodes.REFUSED_STREAM)  # after our GOAWAY: the client may retry
            return
        if len(downstream.streams) >= self.config.h2_max_concurrent_streams:
            if session.refuse(stream_id, now_ns):
                self._write_h2(downstream)
                reason = "HTTP/2 flood: streams over the concurrency limit, refused faster than the flood limit"
                self._h2_downstream_lost(downstream, reason, reset=False)
            return
        self._deadlines.cancel(("idle", downstream.conn_id))
        try:
            head = tr.head_from_h2(list(event.headers), self._field_memo)
        except tr.TranslationError as error:
            head = tr.RequestHead(b"GET", b"http", b"", b"/", [])
            failure = ProxyError(ProxyErrorKind.MALFORMED_REQUEST, f"malformed HTTP/2 request: {error}")
        else:
            failure = None
        authority = downstream.target or head.authority.decode("ascii", "replace")
        endpoint_set = None if downstream.fixed_endpoint is not None else self.resolver.resolve(authority)
        exchange = self._new_stream_exchange(downstream, stream_id, head, authority, endpoint_set, now_ns)
        exchange.request_has_body = event.stream_ended is None
        if failure is not None:
            self._stream_fail(exchange, failure)
        elif head.size() > self.config.max_header_bytes:
            reason = f"request head larger than {self.config.max_header_bytes} bytes"
            self._stream_fail(exchange, ProxyError(ProxyErrorKind.HEADERS_TOO_LARGE, reason))
        else:
            self._dispatch_stream(exchange, endpoint_set)

    def _new_stream_exchange(
        self,
        downstream: Downstream,
        stream_id: int | None,
        head: tr.RequestHead,
        authority: str,
        endpoint_set: EndpointSet | None,
        now_ns: int,
    ) -> StreamExchange:
        fixed = downstream.fixed_endpoint
        service = endpoint_set.name if endpoint_set is not None else (authority or "unknown")
        if fixed is not None:
            service = str(fixed)
        exchange = StreamExchange(
            self._new_id(), downstream.conn_id, stream_id, head, service, now_ns, NO_LABELS, head.is_grpc, fixed
        )
        exchange.endpoint_set = endpoint_set
        self._streams[exchange.exchange_id] = exchange
        if stream_id is None:
            downstream.exchange_id = exchange.exchange_id
        else:
            downstream.streams[stream_id] = exchange.exchange_id
        chosen = endpoint_set if fixed is None else None
        h2c = chosen is not None and stream_id is not None and bool(chosen.h2c_endpoints)
        if self._traffic_on:  # routes (outbound) or a rate limit (inbound): h2traffic.py
            chosen = self._stream_traffic_start(downstream, exchange, authority, chosen)
            h2c = h2c and exchange.route is None
        if chosen is not None:
            self._stream_choose(exchange, chosen, h2c=h2c)
        endpoint = exchange.endpoint
        meshed = endpoint_set is not None and endpoint_set.meshed_inbound_port is not None
        tls = self.tls_labels(downstream, endpoint_set.identity if meshed and endpoint_set is not None else None)
        exchange.labels = self.telemetry.http_labels(authority, str(endpoint) if endpoint is not None else "", tls)
        self.telemetry.request_started(service, exchange.labels)
        return exchange

    def _h2_downstream_lost(self, downstream: Downstream, reason: str, *, reset: bool) -> None:
        """The client connection ended or broke: every stream on it is abandoned."""
        if reason:
            self._effects.append(LogError(conn_id=downstream.conn_id, message=reason))
        self._close_downstream(downstream, reset=reset)  # first: abandoning must not close it gracefully
        self._abandon_client_streams(downstream)

    def _close_finished_h2(self, downstream: Downstream) -> None:
        """A client connection that said (or was told) GOAWAY closes once its last stream ends."""
        session = downstream.h2
        if session is None or downstream.conn_id not in self._downstream:
            return
        if downstream.closing or self._draining or session.goaway_received:
            session.goaway()
            self._write_h2(downstream)
            if not downstream.streams:
                self._close_downstream(downstream)

    def _h2_idle(self, downstream: Downstream) -> None:
        if downstream.h2 is not None and not downstream.streams:
            downstream.h2.goaway()
            self._write_h2(downstream)
            self._close_downstream(downstream)

    # ---------------------------------------------------------------- HTTP/1.1 clients of meshed peers

    def _start_h1_over_h2(
        self, downstream: Downstream, request: h11.Request, authority: str, endpoint_set: EndpointSet
    ) -> None:
        head = tr.head_from_h1(request, authority)
        exchange = self._new_stream_exchange(downstream, None, head, authority, endpoint_set, self._now_ns)
        exchange.request_has_body = tr.h1_has_body(request)
        self._dispatch_stream(exchange, endpoint_set)

    def _h1_source_body(self, exchange: StreamExchange, data: bytes) -> None:
        if not exchange.done and data:
            self._to_sink(exchange, data)

    # ---------------------------------------------------------------- the request side

    def _source_request_ended(self, exchange: StreamExchange, now_ns: int) -> None:
        if exchange.done:
            return
        exchange.request_ended = True
        self._end_sink_request(exchange)
        if exchange.route is not None and exchange.route.mirror_ids:
            self._stream_mirrors_ended(exchange)  # mirrors.py
        if not exchange.response_started and self.config.response_timeout_ns:
            self._deadlines.set(("response", exchange.exchange_id), now_ns + self.config.response_timeout_ns)

    def _source_reset(self, exchange: StreamExchange, code: int) -> None:
        """The client reset its stream: the endpoint's stream is reset with the same code."""
        self._abandon_stream(exchange, code)

    def _abandon_stream(self, exchange: StreamExchange, code: int) -> None:
        """The exchange ends without a complete response reaching its client."""
        if exchange.done:
            return
        self.telemetry.aborted(exchange.service)
        if exchange.grpc and exchange.response_started and not exchange.response_ended:
            self.telemetry.response_finished(exchange.labels, exchange.response_status or 0, None)
        self._detach_sink(exchange, code)
        self._forget_stream(exchange)

    # ---------------------------------------------------------------- the response side

    def _sink_response_head(
        self,
        exchange: StreamExchange,
        status: int,
        headers: list[tuple[bytes, bytes]],
        *,
        ended: bool,
        write: bool = True,
    ) -> None:
        """The response head reached the exchange. ``write=False``: the caller writes the client's HTTP/2
        connection itself, once the bytes that follow at once are queued too (one write instead of two)."""
        if exchange.done:
            return
        if exchange.route is not None:
            routed = self._stream_routed_head(exchange, status, headers, ended=ended)
            if routed is None:
                return  # discarded: the request is retried (h2traffic.py)
            headers = routed
        self._deadlines.cancel(("response", exchange.exchange_id))
        exchange.response_status = status
        exchange.head_ns = self._now_ns
        if exchange.grpc:
            exchange.head_grpc_status = tr.grpc_status(headers)
        if exchange.handle is not None and not exchange.grpc:
            self._drop_lease(exchange, exchange.exchange_id, http_outcome(status))
        latency_ms = (self._now_ns - exchange.started_ns) / NS_PER_MS
        self.telemetry.response_started(exchange.service, exchange.labels, status, latency_ms, count=not exchange.grpc)
        downstream = self._downstream.get(exchange.source_id)
        if downstream is None:
            pass  # a mirror's (mirrors.py): discarded
        elif exchange.source_stream is not None:
            assert downstream.h2 is not None
            downstream.h2.send_headers(
                exchange.source_stream, tr.h2_response_headers(status, headers), end_stream=ended
            )
            if write:
                self._write_h2(downstream)
        else:
            exchange.response_chunked = not tr.has_content_length(headers)
            close = downstream.closing or self._draining
            self._send(downstream, self._source_response_head_bytes(exchange, downstream, status, headers, close))
            if ended:  # a response without a body (HEADERS with END_STREAM): its HTTP/1.1 message ends here
                self._send(downstream, downstream.h11.send(h11.EndOfMessage()))
        if ended:
            exchange.response_ended = True
            self._response_complete(exchange, headers)

    def _sink_informational(self, exchange: StreamExchange, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        downstream = self._downstream.get(exchange.source_id)
        if downstream is None or exchange.done or status == 101:
            return
        if exchange.source_stream is not None and downstream.h2 is not None:
            downstream.h2.send_headers(exchange.source_stream, tr.h2_response_headers(status, headers))
            self._write_h2(downstream)
        elif exchange.source_stream is None and downstream.h11.our_state is h11.SEND_RESPONSE:
            self._send(downstream, downstream.h11.send(h11.InformationalResponse(status_code=status, headers=headers)))

    def _sink_response_data(self, exchange: StreamExchange, data: bytes) -> None:
        downstream = self._downstream.get(exchange.source_id)
        if downstream is None or exchange.done or not data:
            self._settle(exchange)  # a mirror's (mirrors.py): discarded, its window reopened at once; else a no-op
            return
        if exchange.route is not None:
            self._stream_activity(exchange)
        if exchange.source_stream is not None:
            assert downstream.h2 is not None
            downstream.h2.send_data(exchange.source_stream, data)
            self._write_h2(downstream)
        else:
            self._send(downstream, downstream.h11.send(h11.Data(data=data)))
        self._settle(exchange)

    def _sink_response_end(
        self, exchange: StreamExchange, trailers: list[tuple[bytes, bytes]] | None, data: bytes = b""
    ) -> None:
        """The response ends, after ``data`` (its last bytes, given here so that they carry the end: one
        DATA frame with END_STREAM towards an HTTP/2 client instead of two frames)."""
        downstream = self._downstream.get(exchange.source_id)
        if exchange.done or exchange.response_ended:
            return
        exchange.response_ended = True
        if data and exchange.route is not None:
            self._stream_activity(exchange)
        clean = [(n, v) for n, v in trailers or [] if not n.startswith(b":")] or None
        if downstream is not None and exchange.source_stream is not None:
            assert downstream.h2 is not None
            downstream.h2.end_stream(exchange.source_stream, clean, data=data)
            self._write_h2(downstream)
        elif downstream is not None:
            if data:
                self._send(downstream, downstream.h11.send(h11.Data(data=data)))
            end = h11.EndOfMessage(headers=clean or []) if exchange.response_chunked else h11.EndOfMessage()
            self._send(downstream, downstream.h11.send(end))
        self._response_complete(exchange, clean or [])
        if data and not exchange.done:
            self._settle(exchange)  # the bytes that left already are acknowledged, as _sink_response_data does

    def _response_complete(self, exchange: StreamExchange, trailers: list[tuple[bytes, bytes]]) -> None:
        """The endpoint's whole response was handed to the client's side.

        If part of it still waits for the client's window, the exchange stays until that part has left:
        until then its bytes are unacknowledged towards the endpoint, which keeps the proxy's holdings
        within the windows it advertised (``_exchange_progress`` finishes it).
        """
        if exchange.grpc:
            grpc_status = tr.grpc_status(trailers)
            if grpc_status is None:  # a status in the head counts too (a head, a body and no trailers)
                grpc_status = exchange.head_grpc_status
            self.telemetry.response_finished(exchange.labels, exchange.response_status or 0, grpc_status)
            if exchange.handle is not None:
                outcome = grpc_outcome(exchange.response_status or 0, grpc_status)
                rtt_ns = exchange.head_ns - exchange.handle.started_ns if exchange.head_ns is not None else None
                self._drop_lease(exchange, exchange.exchange_id, outcome, rtt_ns=rtt_ns)
        exchange.response_ended = True
        if self._source_queued(exchange) == 0:
            self._finish_stream(exchange)

    def _finish_stream(self, exchange: StreamExchange) -> None:
        """The response has left in full: end the exchange on both sides."""
        if not exchange.request_ended:
            # The endpoint answered before the upload ended (RFC 9113 section 8.1): stop the upload.
            self._detach_sink(exchange, ErrorCodes.NO_ERROR)
            self._reset_source(exchange, ErrorCodes.NO_ERROR)
        else:
            self._detach_sink(exchange, ErrorCodes.NO_ERROR)
        self._forget_stream(exchange)

    # ---------------------------------------------------------------- failures

    def _stream_fail(self, exchange: StreamExchange, error: ProxyError) -> None:
        """Answer the exchange with a proxy error (nothing of the response went out yet)."""
        if exchange.done:
            return
        assert not exchange.response_started, exchange.exchange_id
        if exchange.route is not None and self._stream_failed_attempt(exchange, error):
            return  # retried (h2traffic.py)
        self._drop_lease(exchange, exchange.exchange_id, error_outcome(error))
        self._deadlines.cancel(("response", exchange.exchange_id))
        latency_ms = (self._now_ns - exchange.started_ns) / NS_PER_MS
        grpc_code = tr.grpc_code_for(error) if exchange.grpc else None
        status = 200 if exchange.grpc and exchange.source_stream is not None else error.status
        self.telemetry.response_started(exchange.service, exchange.labels, status, latency_ms, count=False)
        self.telemetry.response_finished(exchange.labels, status, grpc_code)
        self.telemetry.proxy_error(exchange.service, error.kind.label)
        self._effects.append(LogError(conn_id=exchange.source_id, message=f"{error.status} {error.reason}"))
        self._detach_sink(exchange, ErrorCodes.CANCEL)
        downstream = self._downstream.get(exchange.source_id)
        if downstream is not None and exchange.source_stream is not None:
            self._h2_error_response(downstream, exchange, error)
        elif downstream is not None:
            self._h1_error_response(downstream, exchange, error)
        self._forget_stream(exchange)

    def _h2_error_response(self, downstream: Downstream, exchange: StreamExchange, error: ProxyError) -> None:
        session = downstream.h2
        assert session is not None and exchange.source_stream is not None
        if exchange.grpc:
            session.send_headers(exchange.source_stream, tr.grpc_error_headers(error), end_stream=True)
        else:
            headers, body = tr.h2_error_response(error)
            session.send_headers(exchange.source_stream, headers)
            session.send_data(exchange.source_stream, body)
            # An unfinished upload is stopped with RST_STREAM(NO_ERROR), after the answer is complete.
            stop = None if exchange.request_ended else ErrorCodes.NO_ERROR
            session.end_stream(exchange.source_stream, reset_after=stop)
        if exchange.grpc and not exchange.request_ended:
            session.reset(exchange.source_stream, ErrorCodes.NO_ERROR)  # its HEADERS already ended the stream
        self._write_h2(downstream)

    def _h1_error_response(self, downstream: Downstream, exchange: StreamExchange, error: ProxyError) -> None:
        if not exchange.request_ended:
            downstream.closing = True
        parser = downstream.h11
        if parser.our_state is not h11.SEND_RESPONSE:
            self._close_downstream(downstream, reset=True)
            return
        self._write_h1_error(downstream, error, close=downstream.closing or self._draining)

    def _stream_abort(self, exchange: StreamExchange, reason: str, code: int = ErrorCodes.INTERNAL_ERROR) -> None:
        """The response broke after its head went to the client: reset the client's stream."""
        if exchange.done:
            return
        self._effects.append(LogError(conn_id=exchange.source_id, message=f"{reason}; resetting the client's stream"))
        self._drop_lease(exchange, exchange.exchange_id, Outcome.FAILURE)  # the endpoint broke mid-response
        self._reset_source(exchange, code)
        self._abandon_stream(exchange, code)

    def _reset_source(self, exchange: StreamExchange, code: int) -> None:
        downstream = self._downstream.get(exchange.source_id)
        if downstream is None:
            return
        if exchange.source_stream is not None and downstream.h2 is not None:
            downstream.h2.reset(exchange.source_stream, code)
            self._write_h2(downstream)
        elif exchange.source_stream is None and code != ErrorCodes.NO_ERROR:
            self._close_downstream(downstream, reset=True)
        elif exchange.source_stream is None:
            downstream.closing = True  # the upload is cut short: the connection cannot carry another request

    def _forget_stream(self, exchange: StreamExchange) -> None:
        self._drop_lease(exchange, exchange.exchange_id, Outcome.CANCELLED)  # whatever is still held
        if exchange.route is not None:
            self._stream_exchange_over(exchange)
        if self._mirror_tickets:
            self._release_mirror(exchange.exchange_id)  # mirrors.py
        exchange.done = True
        self._credit_all(exchange)
        self._streams.pop(exchange.exchange_id, None)
        self._deadlines.cancel(("response", exchange.exchange_id))
        downstream = self._downstream.get(exchange.source_id)
        if downstream is None:
            return
        if exchange.source_stream is not None:
            downstream.streams.pop(exchange.source_stream, None)
            if not downstream.streams:  # idle from now on (reads such as PING answers do not count)
                self._deadlines.set(("idle", downstream.conn_id), self._now_ns + self.config.idle_timeout_ns)
            self._close_finished_h2(downstream)
        elif downstream.exchange_id == exchange.exchange_id:
            if not exchange.request_ended:
                downstream.closing = True
            self._next_request(downstream, self._now_ns)

    def _abandon_client_streams(self, downstream: Downstream) -> None:
        """The client connection is gone: whatever it had in flight is abandoned."""
        exchange_ids = list(downstream.streams.values())
        if downstream.exchange_id in self._streams:
            exchange_ids.append(downstream.exchange_id)  # type: ignore[arg-type]
        downstream.streams.clear()
        for exchange_id in exchange_ids:
            exchange = self._streams.get(exchange_id)
            if exchange is not None:
                self._abandon_stream(exchange, ErrorCodes.CANCEL)

    # ---------------------------------------------------------------- keepalive

    def _ping_due(self, conn_id: int, now_ns: int) -> None:
        connection = self._downstream.get(conn_id) or self._upstream.get(conn_id)
        if connection is None or connection.h2 is None:
            return
        if connection.ping_due:
            timeout_ms = self.config.h2_keepalive_timeout_ns // NS_PER_MS
            reason = f"HTTP/2 keepalive: no PING answer within {timeout_ms} ms"
            if isinstance(connection, Downstream):
                self._h2_downstream_lost(connection, reason, reset=True)
            else:
                self._sink_connection_lost(connection, reason)
            return
        connection.ping_due = True
        connection.h2.ping(now_ns.to_bytes(8, "big"))
        self._write_h2(connection)
        self._deadlines.set(("ping", conn_id), now_ns + self.config.h2_keepalive_timeout_ns)

    def _ping_answered(self, connection: Downstream | Upstream, now_ns: int) -> None:
        if connection.ping_due:
            connection.ping_due = False
            self._deadlines.set(("ping", connection.conn_id), now_ns + self.config.h2_keepalive_interval_ns)
