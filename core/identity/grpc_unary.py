"""A sans-IO unary gRPC client on the core's HTTP/2 machine: the proxy's calls to the control plane.

Theory of operation
-------------------
One ``GrpcUnaryClient`` is one HTTP/2 connection (``H2Session`` from core/proxy/h2session.py, which brings
flow control and flood limits) carrying unary calls. The driver owns the socket: it writes
``data_to_send()``, feeds what it reads to ``receive(data, now_ns)`` (``b""`` when the server closed), and
calls ``on_timer(now_ns)`` once ``next_deadline_ns()`` has passed. Nothing here reads a clock.

A call (``start_call``) is one stream: HEADERS (``:method POST``, the path, ``content-type:
application/grpc``, ``te: trailers``, ``grpc-timeout``), one length-prefixed message, END_STREAM. Its answer
is one ``UnaryResult``: the response message and ``grpc-status`` / ``grpc-message`` from the trailers, or from
the headers of a trailers-only answer. Everything that ends a call early becomes a result too, with the
status the gRPC spec gives it (PROTOCOL-HTTP2.md, "Errors"): the deadline (DEADLINE_EXCEEDED, and the stream
is reset with CANCEL), a RST_STREAM from the server, a GOAWAY that did not cover the stream (UNAVAILABLE:
the server never saw it, so retrying is safe), the connection closing or breaking HTTP/2 (UNAVAILABLE).
Every started call produces exactly one result.

After a GOAWAY or a connection failure the client takes no new calls (``usable`` is False); the driver
makes a new connection. Limits: ``max_calls`` concurrent calls, ``max_response_bytes`` per response
message (past it the call fails RESOURCE_EXHAUSTED and its stream is reset), and the HTTP/2 limits below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h2.events
from h2.errors import ErrorCodes

from tether.core.grpc_codes import GrpcStatus
from tether.core.proxy.h2session import H2Limits, H2Session, H2SessionError

MESSAGE_PREFIX_BYTES = 5  # a compressed flag and a 32-bit length (PROTOCOL-HTTP2.md, "Length-Prefixed-Message")
DEFAULT_LIMITS = H2Limits(
    max_concurrent_streams=0,  # what the server may open towards us: nothing (no push, no server streams)
    initial_stream_window=65_535,
    connection_window=1 << 20,
    max_header_bytes=16 * 1024,
    max_control_frames_per_second=100,
)
_TIMEOUT_UNITS = (("n", 1), ("u", 1_000), ("m", 1_000_000), ("S", 10**9), ("M", 60 * 10**9), ("H", 3600 * 10**9))
_TIMEOUT_DIGITS_MAX = 10**8  # grpc-timeout carries at most 8 digits


# RST_STREAM codes as gRPC reads them (PROTOCOL-HTTP2.md, "Errors"); any other code is INTERNAL.
_RESET_STATUS = {
    ErrorCodes.REFUSED_STREAM: GrpcStatus.UNAVAILABLE,
    ErrorCodes.CANCEL: GrpcStatus.CANCELLED,
    ErrorCodes.ENHANCE_YOUR_CALM: GrpcStatus.RESOURCE_EXHAUSTED,
    ErrorCodes.INADEQUATE_SECURITY: GrpcStatus.PERMISSION_DENIED,
}
# An HTTP status without grpc-status (a proxy in the way answered), per grpc/doc/http-grpc-status-mapping.md.
_HTTP_STATUS = {
    400: GrpcStatus.INTERNAL,
    401: GrpcStatus.UNAUTHENTICATED,
    403: GrpcStatus.PERMISSION_DENIED,
    404: GrpcStatus.UNIMPLEMENTED,
    429: GrpcStatus.UNAVAILABLE,
    502: GrpcStatus.UNAVAILABLE,
    503: GrpcStatus.UNAVAILABLE,
    504: GrpcStatus.UNAVAILABLE,
}


class GrpcUnaryUsageError(Exception):
    """The caller started a call the client cannot take (unusable connection, too many calls)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UnaryResult:
    """The end of call ``call_id``: ``response`` is the message when ``status`` is OK, else None."""

    call_id: int
    status: int
    message: str
    response: bytes | None = None

    def __repr__(self) -> str:
        response = "None" if self.response is None else f"<{len(self.response)} bytes>"
        return (
            f"UnaryResult(call_id={self.call_id}, status={self.status}, message={self.message!r}, response={response})"
        )


@dataclass(slots=True)
class _Call:
    deadline_ns: int
    http_status: int | None = None
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[bytes, bytes] | None = None


class GrpcUnaryClient:
    """Unary gRPC calls over one HTTP/2 connection; see the module docstring."""

    def __init__(
        self,
        *,
        authority: str,
        scheme: str = "http",
        max_calls: int = 16,
        max_response_bytes: int = 1 << 20,
        limits: H2Limits = DEFAULT_LIMITS,
    ) -> None:
        assert max_calls >= 1 and max_response_bytes >= 0
        self._session = H2Session(client=True, limits=limits)
        self._authority = authority.encode("ascii")
        self._scheme = scheme.encode("ascii")
        self._max_calls = max_calls
        self._max_response_bytes = max_response_bytes
        self._calls: dict[int, _Call] = {}
        self._usable = True

    @property
    def usable(self) -> bool:
        """False after a GOAWAY or a connection failure: start calls on a new client."""
        return self._usable and not self._session.goaway_received

    @property
    def open_calls(self) -> int:
        return len(self._calls)

    def data_to_send(self) -> bytes:
        return self._session.data_to_send()

    def next_deadline_ns(self) -> int | None:
        return min((call.deadline_ns for call in self._calls.values()), default=None)

    # ---------------------------------------------------------------- calls

    def start_call(
        self,
        path: str,
        request: bytes,
        now_ns: int,
        timeout_ns: int,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> int:
        """Send one unary request; returns its call id. Its result comes from ``receive`` or ``on_timer``."""
        if not self.usable:
            raise GrpcUnaryUsageError("this connection took a GOAWAY or failed; open a new one")
        if len(self._calls) >= self._max_calls:
            raise GrpcUnaryUsageError(f"{self._max_calls} calls are already open on this connection")
        if self._session.open_outbound_streams >= self._session.peer_max_concurrent_streams:
            raise GrpcUnaryUsageError("the server allows no more concurrent streams on this connection")
        assert path.startswith("/") and timeout_ns > 0, (path, timeout_ns)
        call_id = self._session.new_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", self._scheme),
            (b":path", path.encode("ascii")),
            (b":authority", self._authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-timeout", encode_grpc_timeout(timeout_ns).encode("ascii")),
            *((name.lower().encode("ascii"), value.encode("ascii")) for name, value in metadata),
        ]
        self._session.send_headers(call_id, headers)
        self._session.send_data(call_id, b"\x00" + len(request).to_bytes(4, "big") + request)
        self._session.end_stream(call_id)
        self._calls[call_id] = _Call(deadline_ns=now_ns + timeout_ns)
        return call_id

    def cancel(self, call_id: int) -> None:
        """Abandon a call (RST_STREAM CANCEL); it produces no result."""
        if self._calls.pop(call_id, None) is not None:
            self._session.reset(call_id, ErrorCodes.CANCEL)

    def on_timer(self, now_ns: int) -> list[UnaryResult]:
        """Fail the calls whose deadline passed (DEADLINE_EXCEEDED) and reset their streams."""
        results = []
        for call_id, call in list(self._calls.items()):
            if call.deadline_ns <= now_ns:
                self.cancel(call_id)
                results.append(UnaryResult(call_id=call_id, status=GrpcStatus.DEADLINE_EXCEEDED, message="deadline"))
        return results

    # ---------------------------------------------------------------- input

    def receive(self, data: bytes, now_ns: int) -> list[UnaryResult]:
        """Bytes from the server (``b""``: it closed); returns the calls they ended."""
        if not data:
            return self._fail_all(GrpcStatus.UNAVAILABLE, "the server closed the connection")
        try:
            events = self._session.receive(data, now_ns)
        except H2SessionError as error:
            return self._fail_all(GrpcStatus.UNAVAILABLE, str(error))
        results: list[UnaryResult] = []
        for event in events:
            result = self._handle(event)
            if isinstance(result, UnaryResult):
                results.append(result)
            elif result:
                results.extend(result)
        self._session.flush()  # a WINDOW_UPDATE may have let more of a request out
        return results

    def _handle(self, event: h2.events.Event) -> UnaryResult | list[UnaryResult] | None:
        if isinstance(event, h2.events.ConnectionTerminated):
            return self._goaway(event)
        stream_id = getattr(event, "stream_id", None)
        call = self._calls.get(stream_id) if stream_id is not None else None
        if call is None:
            return None  # a connection-level event, or a stream we already ended
        assert stream_id is not None
        if isinstance(event, h2.events.ResponseReceived):
            call.http_status = _http_status(event.headers)
            call.trailers = dict(event.headers) if b"grpc-status" in dict(event.headers) else None
        elif isinstance(event, h2.events.TrailersReceived):
            call.trailers = dict(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            return self._data(stream_id, call, event)
        elif isinstance(event, h2.events.StreamEnded):
            del self._calls[stream_id]
            return _finish(stream_id, call)
        elif isinstance(event, h2.events.StreamReset):
            del self._calls[stream_id]
            status = _RESET_STATUS.get(event.error_code, GrpcStatus.INTERNAL)
            return UnaryResult(
                call_id=stream_id, status=status, message=f"stream reset by the server ({event.error_code!r})"
            )
        return None

    def _data(self, stream_id: int, call: _Call, event: h2.events.DataReceived) -> UnaryResult | None:
        self._session.acknowledge(stream_id, event.flow_controlled_length)  # buffered here, bounded below
        call.body += event.data
        if len(call.body) > self._max_response_bytes + MESSAGE_PREFIX_BYTES:
            self.cancel(stream_id)
            return UnaryResult(
                call_id=stream_id,
                status=GrpcStatus.RESOURCE_EXHAUSTED,
                message=f"the response is larger than {self._max_response_bytes} bytes",
            )
        return None

    def _goaway(self, event: h2.events.ConnectionTerminated) -> list[UnaryResult]:
        last = event.last_stream_id if event.last_stream_id is not None else 0
        unseen = [call_id for call_id in self._calls if call_id > last]
        for call_id in unseen:
            del self._calls[call_id]
        message = f"the server is going away (GOAWAY {event.error_code!r}) before it saw this call"
        return [UnaryResult(call_id=call_id, status=GrpcStatus.UNAVAILABLE, message=message) for call_id in unseen]

    def _fail_all(self, status: GrpcStatus, message: str) -> list[UnaryResult]:
        self._usable = False
        results = [UnaryResult(call_id=call_id, status=status, message=message) for call_id in self._calls]
        self._calls.clear()
        return results


def _http_status(headers: list[tuple[bytes, bytes]]) -> int | None:
    value = dict(headers).get(b":status", b"")
    return int(value) if value.isdigit() else None


def _finish(call_id: int, call: _Call) -> UnaryResult:
    """The result of a call whose stream ended: the status from the trailers, then the message."""
    trailers = call.trailers
    if trailers is None or not trailers.get(b"grpc-status", b"").isdigit():
        if call.http_status not in (None, 200):
            status = _HTTP_STATUS.get(call.http_status, GrpcStatus.UNKNOWN)
            return UnaryResult(call_id=call_id, status=status, message=f"HTTP {call.http_status} without grpc-status")
        return UnaryResult(call_id=call_id, status=GrpcStatus.INTERNAL, message="the response had no grpc-status")
    status = int(trailers[b"grpc-status"])
    message = decode_grpc_message(trailers.get(b"grpc-message", b""))
    if status != GrpcStatus.OK:
        return UnaryResult(call_id=call_id, status=status, message=message)
    body = bytes(call.body)
    if len(body) < MESSAGE_PREFIX_BYTES:
        return UnaryResult(call_id=call_id, status=GrpcStatus.INTERNAL, message="OK without a response message")
    length = int.from_bytes(body[1:5], "big")
    if body[0] != 0:
        return UnaryResult(
            call_id=call_id, status=GrpcStatus.INTERNAL, message="a compressed response was not asked for"
        )
    if len(body) != MESSAGE_PREFIX_BYTES + length:
        return UnaryResult(
            call_id=call_id, status=GrpcStatus.INTERNAL, message="the response is not exactly one message"
        )
    return UnaryResult(call_id=call_id, status=GrpcStatus.OK, message=message, response=body[MESSAGE_PREFIX_BYTES:])


def encode_grpc_timeout(timeout_ns: int) -> str:
    """grpc-timeout: at most 8 digits and a unit, rounded up so the server never gives up before us."""
    assert timeout_ns > 0, timeout_ns
    for unit, size in _TIMEOUT_UNITS:
        value = -(-timeout_ns // size)
        if value < _TIMEOUT_DIGITS_MAX:
            return f"{value}{unit}"
    return f"{_TIMEOUT_DIGITS_MAX - 1}H"


def decode_grpc_message(raw: bytes) -> str:
    """grpc-message is percent-encoded UTF-8 (PROTOCOL-HTTP2.md); a malformed escape is kept as it is."""
    out = bytearray()
    index = 0
    while index < len(raw):
        byte = raw[index]
        escape = raw[index + 1 : index + 3]
        if byte == 0x25 and len(escape) == 2 and all(c in b"0123456789abcdefABCDEF" for c in escape):
            out.append(int(escape, 16))
            index += 3
        else:
            out.append(byte)
            index += 1
    return out.decode("utf-8", errors="replace")
