"""Virtual gRPC apps on HTTP/2: an echo server and a workload client that checks every answer it gets.

Theory of operation
-------------------
Both are sans-IO h2 peers (sim/h2_wire.py) on the virtual network, as a grpc-go client and server would
be: one call is one HTTP/2 stream, ``POST /tether.sim.Echo/Call`` with ``content-type: application/grpc``
and ``te: trailers``, one length-prefixed request message and one response message, and the outcome in
the ``grpc-status`` trailer.

A call carries its id twice, in the ``x-call-id`` metadata and at the start of its request message
(``<id>\\n<payload>``); ``x-response-bytes`` asks for a response message of that size. The server checks
the request arrived whole and as gRPC (a proxy that drops ``te`` or mangles a message is caught there),
then, after its latency, answers the message ``expected_body(id, sha256(request message), size)`` with
``grpc-status: 0``, or (a share ``failure_rate`` of calls) a trailers-only response with
``grpc-status: 13``. So the client can tell, byte for byte, that the response belongs to this call and
that both messages crossed intact; each call ends exactly once (a status, or an error: a reset stream, a
lost connection, a deadline). A trailers-only response with ``l5d-proxy-error`` is the proxy's own answer.

The client multiplexes its calls over at most ``max_connections`` connections (gRPC's one, by default),
queueing calls while a connection opens. A call's deadline runs from the moment it is issued; on expiry
the stream is cancelled (RST_STREAM CANCEL), as gRPC does, and the connection lives on. A GOAWAY lets the
calls it covers finish and fails the rest. Idle connections close after ``idle_timeout``.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from tether.core.address import Address
from tether.sim.apps import OpenLoopClient, RequestRecord, ServerSpec, expected_body
from tether.sim.h2_wire import GRPC_CONTENT_TYPE, H2Wire, grpc_frame, grpc_messages, header_value
from tether.sim.network import Network, VirtualSocket

MS = 1_000_000
PATH = b"/tether.sim.Echo/Call"
GRPC_INTERNAL = 13  # what a simulated application failure answers


# ---------------------------------------------------------------------------------------------- server


class VirtualGrpcServer:
    """An h2c gRPC server on one virtual host; its latency and failures come from its own RNG."""

    def __init__(
        self, network: Network, host: str, spec: ServerSpec, rng: random.Random, on_violation: Callable[[str], None]
    ) -> None:
        self.kernel = network.kernel
        self.host = host
        self.spec = spec
        self.rng = rng
        self.on_violation = on_violation
        network.listen(host, spec.port, self._accept)

    def _accept(self, sock: VirtualSocket) -> H2Wire:
        connection = _ServerConnection(self)
        connection.wire.attach(sock)  # writes the server's SETTINGS
        return connection.wire

    def delay_ns(self) -> int:
        spec = self.spec
        tail = int(self.rng.expovariate(1.0 / spec.latency_tail_mean_ns)) if spec.latency_tail_mean_ns else 0
        return spec.latency_min_ns + tail


@dataclass(slots=True)
class _Incoming:
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)


class _ServerConnection:
    def __init__(self, server: VirtualGrpcServer) -> None:
        self.server = server
        self.wire = H2Wire(self, client=False)
        self.calls: dict[int, _Incoming] = {}

    def on_h2_event(self, wire: H2Wire, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.calls[event.stream_id] = _Incoming(list(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            incoming = self.calls.get(event.stream_id)
            if incoming is not None:
                incoming.body += event.data
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id in self.calls:
            failed = self.server.rng.random() < self.server.spec.failure_rate
            stream_id = event.stream_id
            self.server.kernel.after(self.server.delay_ns(), lambda: self._respond(stream_id, failed))
        elif isinstance(event, h2.events.StreamReset):
            self.calls.pop(event.stream_id, None)

    def on_h2_broken(self, wire: H2Wire, reason: str) -> None:
        self.calls.clear()

    def _respond(self, stream_id: int, failed: bool) -> None:
        incoming = self.calls.pop(stream_id, None)
        if incoming is None or self.wire.broken:
            return
        call_id, message, problem = _read_request(incoming)
        head = [(b":status", b"200"), (b"content-type", GRPC_CONTENT_TYPE), (b"x-call-id", call_id)]
        if problem is not None:
            self.server.on_violation(f"gRPC server {self.server.host}: call {call_id.decode()!r}: {problem}")
            self.wire.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):  # the stream closed meanwhile: nobody to answer
            if failed:
                failure = [(b"grpc-status", str(GRPC_INTERNAL).encode()), (b"grpc-message", b"simulated failure")]
                self.wire.h2.send_headers(stream_id, head + failure, end_stream=True)
                self.wire.flush()
                return
            self.wire.h2.send_headers(stream_id, head)
            size = int(header_value(incoming.headers, b"x-response-bytes") or b"0")
            body = expected_body(call_id.decode(), hashlib.sha256(message).hexdigest(), size)
            self.wire.send(stream_id, grpc_frame(body), trailers=[(b"grpc-status", b"0")])


def _read_request(incoming: _Incoming) -> tuple[bytes, bytes, str | None]:
    """The call id, the request message, and what is wrong with the request (None if nothing)."""
    headers = incoming.headers
    call_id = header_value(headers, b"x-call-id") or b"-"
    if header_value(headers, b":method") != b"POST" or header_value(headers, b":path") != PATH:
        return call_id, b"", f"not a call: {header_value(headers, b':method')!r} {header_value(headers, b':path')!r}"
    if header_value(headers, b"content-type") != GRPC_CONTENT_TYPE or header_value(headers, b"te") != b"trailers":
        return call_id, b"", f"not gRPC headers: {[name for name, _ in headers]}"
    messages = grpc_messages(bytes(incoming.body))
    if messages is None or len(messages) != 1:
        return call_id, b"", f"request body is not one gRPC message ({len(incoming.body)} bytes)"
    if not messages[0].startswith(call_id + b"\n"):
        return call_id, b"", f"the message belongs to another call: {messages[0][:40]!r}"
    return call_id, messages[0], None


# ---------------------------------------------------------------------------------------------- client


@dataclass(frozen=True, slots=True, kw_only=True)
class GrpcWorkloadSpec:
    target: Address
    authority: str
    rate_per_s: float = 50.0
    start_ns: int = 0
    stop_ns: int = 10_000 * MS
    max_connections: int = 1
    max_streams_per_connection: int = 100
    max_queue: int = 1000  # calls waiting for a connection; past it they fail as "client_queue_full"
    request_bytes: tuple[int, int] = (0, 1024)  # payload after the call id
    response_bytes: tuple[int, int] = (64, 1024)
    timeout_ns: int = 60_000 * MS  # the call's deadline, from the moment it is issued
    idle_timeout_ns: int = 5_000 * MS
    # What the client lets the proxy send on one connection before it has read more: HTTP/2's initial
    # 64 KiB (where grpc-go starts) by default, so the client's windows, not the proxy's, are what fill up.
    connection_window: int = 65_535
    arrivals: str = "poisson"  # or "uniform", as WorkloadSpec


class GrpcWorkloadClient(OpenLoopClient):
    """Unary calls at Poisson arrivals over multiplexed HTTP/2 connections; see the module docstring."""

    spec: GrpcWorkloadSpec

    def __init__(
        self,
        network: Network,
        host: str,
        spec: GrpcWorkloadSpec,
        rng: random.Random,
        on_violation: Callable[[str], None],
    ) -> None:
        self.connections: list[_ClientConnection] = []
        self._queue: deque[RequestRecord] = deque()
        self._active: dict[str, tuple[_ClientConnection, int]] = {}  # call id -> where it runs
        super().__init__(network, host, spec, rng, on_violation)

    def _issue(self, *, probe: bool = False) -> None:
        spec = self.spec
        record = RequestRecord(
            request_id=f"{self.host}-grpc-{len(self.records) + 1}",
            started_ns=self.kernel.now_ns,
            body=self.rng.randbytes(self.rng.randint(*spec.request_bytes)),
            response_bytes=self.rng.randint(*spec.response_bytes),
            chunked=False,
            probe=probe,
        )
        self.records.append(record)
        self._pending += 1
        if len(self._queue) >= spec.max_queue:
            self.finish(record, error="client_queue_full")
            return
        self.kernel.after(spec.timeout_ns, lambda: self._deadline(record))
        self._queue.append(record)
        self.dispatch()

    def dispatch(self) -> None:
        """Start queued calls on connections with room; open a connection if calls still wait."""
        while self._queue:
            connection = next((c for c in self.connections if c.has_room()), None)
            if connection is None:
                break
            record = self._queue.popleft()
            if not record.done:
                self._active[record.request_id] = (connection, connection.start(record))
        opening = any(connection.connecting for connection in self.connections)
        if self._queue and not opening and len(self.connections) < self.spec.max_connections:
            self.connections.append(_ClientConnection(self))

    def finish(
        self,
        record: RequestRecord,
        *,
        status: int | None = None,
        grpc_status: int | None = None,
        error: str | None = None,
    ) -> None:
        if record.done:
            self.on_violation(f"call {record.request_id} ended twice ({record.status or record.error}, then {error})")
            return
        self._active.pop(record.request_id, None)
        record.ended_ns = self.kernel.now_ns
        record.status, record.grpc_status, record.error = status, grpc_status, error
        self._pending -= 1
        outcome = f"status {status} grpc {grpc_status}" if error is None else f"error {error}"
        self.kernel.log(self.host, f"{record.request_id} {outcome}")

    def connection_gone(self, connection: _ClientConnection, reason: str | None) -> None:
        """``connection`` closed; ``reason`` is set when it never came up: the calls waiting fail at once, as
        a gRPC call that is not wait-for-ready does."""
        if connection in self.connections:
            self.connections.remove(connection)
        if reason is not None:
            while self._queue:
                record = self._queue.popleft()
                if not record.done:
                    self.finish(record, error=reason)
        self.dispatch()

    def _deadline(self, record: RequestRecord) -> None:
        if record.done:
            return
        where = self._active.get(record.request_id)
        if where is None:
            # Still waiting for a connection: the client's own overload, not a verdict on the mesh.
            with contextlib.suppress(ValueError):
                self._queue.remove(record)
            self.finish(record, error="client_queue_timeout")
            return
        connection, stream_id = where
        self.finish(record, error="client_timeout")
        connection.cancel(stream_id)


@dataclass(slots=True)
class _Call:
    record: RequestRecord
    message: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] | None = None


class _ClientConnection:
    def __init__(self, client: GrpcWorkloadClient) -> None:
        self.client = client
        self.wire = H2Wire(self, client=True, connection_window=client.spec.connection_window)
        self.calls: dict[int, _Call] = {}
        self.connecting = True
        self.goaway = False
        self.gone = False
        self.idle_since_ns = client.kernel.now_ns
        client.network.connect(client.host, client.spec.target, self._connected)

    def _connected(self, sock: VirtualSocket | None, reason: str) -> None:
        self.connecting = False
        if sock is None:
            self._gone(f"connect_failed: {reason}")
            return
        if self.gone:
            sock.reset()
            return
        self.wire.attach(sock)
        self.client.dispatch()
        self._maybe_idle()

    def has_room(self) -> bool:
        if self.connecting or self.gone or self.goaway:
            return False
        limit = min(self.client.spec.max_streams_per_connection, self.wire.h2.remote_settings.max_concurrent_streams)
        return len(self.calls) < limit

    def start(self, record: RequestRecord) -> int:
        spec = self.client.spec
        stream_id = self.wire.h2.get_next_available_stream_id()
        message = record.request_id.encode() + b"\n" + record.body
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", PATH),
            (b":authority", spec.authority.encode()),
            (b"content-type", GRPC_CONTENT_TYPE),
            (b"te", b"trailers"),
            (b"x-call-id", record.request_id.encode()),
            (b"x-response-bytes", str(record.response_bytes).encode()),
        ]
        self.wire.h2.send_headers(stream_id, headers)
        self.calls[stream_id] = _Call(record, message)
        self.wire.send(stream_id, grpc_frame(message), end=True)
        return stream_id

    def cancel(self, stream_id: int) -> None:
        """The call's deadline passed: cancel its stream, keep the connection."""
        self.calls.pop(stream_id, None)
        if not self.gone:
            self.wire.reset_stream(stream_id, ErrorCodes.CANCEL)
            self._call_ended()

    # ---------------------------------------------------------------- h2 events

    def on_h2_event(self, wire: H2Wire, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ConnectionTerminated):
            self._goaway_received(event.last_stream_id)
            return
        call = self.calls.get(getattr(event, "stream_id", 0) or 0)
        if call is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            call.headers = list(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            call.body += event.data
        elif isinstance(event, h2.events.TrailersReceived):
            call.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            del self.calls[event.stream_id]
            self._complete(call)
        elif isinstance(event, h2.events.StreamReset):
            del self.calls[event.stream_id]
            self.client.finish(call.record, error=f"stream_reset: {_code_name(event.error_code)}")
            self._call_ended()

    def on_h2_broken(self, wire: H2Wire, reason: str) -> None:
        self._gone(None, fail_calls=reason)

    def _goaway_received(self, last_stream_id: int | None) -> None:
        self.goaway = True
        for stream_id in [s for s in self.calls if last_stream_id is not None and s > last_stream_id]:
            self.client.finish(self.calls.pop(stream_id).record, error="goaway_refused")
        self._maybe_idle()
        self.client.dispatch()

    def _complete(self, call: _Call) -> None:
        record = call.record
        status = int(header_value(call.headers, b":status") or b"0")
        outcome = call.trailers if call.trailers is not None else call.headers  # trailers-only: in the headers
        raw = header_value(outcome, b"grpc-status")
        grpc_status = int(raw) if raw is not None and raw.isdigit() else None
        proxy_error = header_value(call.headers, b"l5d-proxy-error")
        if proxy_error is not None:
            record.proxy_error = proxy_error.decode()
        elif status == 200 and grpc_status is None:
            self.client.on_violation(f"call {record.request_id} ended without a grpc-status ({raw!r})")
        elif status == 200 and grpc_status == 0:
            self._check(call)
        self.client.finish(record, status=status, grpc_status=grpc_status)
        self._call_ended()

    def _check(self, call: _Call) -> None:
        record = call.record
        answered = (header_value(call.headers, b"x-call-id") or b"").decode()
        if answered != record.request_id:
            self.client.on_violation(f"call {record.request_id} got the response to {answered!r}")
            return
        expected = expected_body(record.request_id, hashlib.sha256(call.message).hexdigest(), record.response_bytes)
        messages = grpc_messages(bytes(call.body))
        if messages != [expected]:
            shown = "not gRPC framing" if messages is None else f"{len(messages)} message(s)"
            self.client.on_violation(
                f"call {record.request_id}: response differs ({len(call.body)} bytes, {shown}; expected one "
                f"message of {len(expected)} bytes)"
            )

    # ---------------------------------------------------------------- lifetime

    def _call_ended(self) -> None:
        self.client.dispatch()  # a stream is free: a queued call can have it
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self.gone or self.connecting or self.calls:
            return
        if self.goaway:
            self._close()
            return
        self.idle_since_ns = self.client.kernel.now_ns
        self.client.kernel.after(self.client.spec.idle_timeout_ns, self._expire)

    def _expire(self) -> None:
        idle_ns = self.client.kernel.now_ns - self.idle_since_ns
        if not self.gone and not self.calls and idle_ns >= self.client.spec.idle_timeout_ns:
            self._close()

    def _close(self) -> None:
        self.wire.close()
        self._gone(None)

    def _gone(self, connect_error: str | None, *, fail_calls: str | None = None) -> None:
        if self.gone:
            return
        self.gone = True
        calls, self.calls = self.calls, {}
        for call in calls.values():
            if not call.record.done:
                self.client.finish(call.record, error=fail_calls or "connection_closed")
        self.client.connection_gone(self, connect_error)


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)
