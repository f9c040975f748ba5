"""One HTTP/2 connection, client or server side: settings, flow-controlled writes, flood limits.

Theory of operation
-------------------
h2conn.py keeps the protocol's state (it replaced the h2 library here: same events, same frames, a
fraction of the CPU); this wrapper adds what a proxy needs on top of it.

Writes respect the peer's windows. ``send_data`` never writes more than the stream's and connection's
send windows allow; the rest waits in a per-stream queue, followed by the stream's end (a flag or
trailers). ``flush`` writes what the windows now allow and reports, per stream, how many queued bytes
went out: the proxy acknowledges the producing peer only for bytes that left, so a slow reader on one
side closes the window of the writer on the other, and the queue of a stream never holds more than the
window the proxy advertised to its producer.

Reads are bounded by what we advertise: ``INITIAL_WINDOW_SIZE`` per stream and a larger connection
window, ``MAX_CONCURRENT_STREAMS`` and ``MAX_HEADER_LIST_SIZE``; a frame longer than the frame size we
advertised is refused from its 9-byte header, before its payload is buffered. Frames that cost the proxy
work but carry no request (SETTINGS, PING, RST_STREAM from the peer, and empty DATA frames) are counted
per second; a peer past ``max_control_frames_per_second`` is flooding (the "rapid reset" and "settings
flood" attacks) and gets GOAWAY ENHANCE_YOUR_CALM.

Any protocol violation by the peer surfaces as ``H2SessionError`` with a sentence for the log; the
caller closes the connection (the GOAWAY is already queued).

The h2 library is still used here for its event classes and error codes, and by ``keep_open_after_goaway``
for the h2 peers that tests and the simulator run against the proxy.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

import h2.connection
import h2.events
import h2.exceptions
import h2.stream
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from tether.core.proxy.h2conn import ConnectionProtocolError, H2Connection
from tether.core.proxy.h2headers import Block, MalformedHeaders, received_fields
from tether.core.proxy.hpack_codec import Decoder, StaticEncoder

NS_PER_S = 1_000_000_000
DEFAULT_WINDOW = 65_535
DECODED_HEADER_BYTES_MAX = 65_536  # what h2 gave its HPACK decoder (RFC 7541 section 4.1 sizes)


class H2SessionError(Exception):
    """The peer broke HTTP/2 (or flooded us); the message says how."""


@dataclass(frozen=True, slots=True)
class H2Limits:
    max_concurrent_streams: int
    initial_stream_window: int
    connection_window: int
    max_header_bytes: int
    max_control_frames_per_second: int


@dataclass(slots=True)
class _Outgoing:
    """What waits to be written on one stream: data, then (optionally) its end."""

    chunks: deque[bytes] = field(default_factory=deque)
    size: int = 0
    end: bool = False
    trailers: list[tuple[bytes, bytes]] | None = None
    reset_after: int | None = None  # RST_STREAM with this code once the end has gone out


class H2Session:
    def __init__(self, *, client: bool, limits: H2Limits) -> None:
        # Outbound headers were validated on their way in (by h2headers.py or h11) and are rewritten only
        # by this proxy, so they are not checked a second time. Received headers are checked (and split
        # cookies joined) by h2headers.py in one pass.
        decoder = Decoder()
        # h2's limits for the decoder, kept: the advertised MAX_HEADER_LIST_SIZE is enforced on the
        # decoded block (h2headers.py and the proxy's own limits); this bounds the work of decoding.
        decoder.max_header_list_size = DECODED_HEADER_BYTES_MAX
        decoder.max_allowed_table_size = 4096
        # The stream limit goes out in SETTINGS; the proxy enforces it itself, per stream (REFUSED_STREAM,
        # RFC 9113 section 5.1.2, see ``refuse``), so the connection counts no inbound streams.
        settings = {
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.initial_stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
        }
        self._h2 = H2Connection(client=client, settings=settings, encoder=StaticEncoder(), decoder=decoder)
        self._limits = limits
        self._h2.initiate_connection()
        if limits.connection_window > DEFAULT_WINDOW:
            self._h2.increment_flow_control_window(limits.connection_window - DEFAULT_WINDOW)
        self._outgoing: dict[int, _Outgoing] = {}
        self._flood_window_start_ns = 0
        self._flood_count = 0
        self.goaway_sent = False
        self.goaway_received = False
        self.last_peer_stream_id = 0  # the highest stream the peer opened (for a graceful GOAWAY)

    # ---------------------------------------------------------------- input

    def receive(self, data: bytes, now_ns: int) -> list[h2.events.Event]:
        try:
            events = self._h2.receive_data(data)
        except ConnectionProtocolError as error:
            if not error.answered:
                self.goaway(error.error_code)
            raise H2SessionError(f"HTTP/2 protocol error: {_describe(error)}") from None
        for event in events:
            kind = type(event)  # h2's event classes have no subclasses
            block = _HEADER_BLOCKS.get(kind)
            if block is not None:
                try:
                    event.headers = received_fields(event.headers, block)
                except MalformedHeaders as error:
                    self.goaway(ErrorCodes.PROTOCOL_ERROR)  # what h2 does for a block it refuses itself
                    raise H2SessionError(f"HTTP/2 protocol error: {error}") from None
            if kind is h2.events.RequestReceived:
                self.last_peer_stream_id = max(self.last_peer_stream_id, event.stream_id)
            elif kind is h2.events.ConnectionTerminated:
                self.goaway_received = True
            if kind in _MAYBE_CONTROL and _is_control(event) and self._count_control(now_ns):
                self.goaway(ErrorCodes.ENHANCE_YOUR_CALM)
                raise H2SessionError(
                    f"HTTP/2 flood: more than {self._limits.max_control_frames_per_second} SETTINGS, PING, "
                    "RST_STREAM or empty DATA frames in one second"
                )
        return events

    def _count_control(self, now_ns: int) -> bool:
        if now_ns - self._flood_window_start_ns >= NS_PER_S:
            self._flood_window_start_ns = now_ns
            self._flood_count = 0
        self._flood_count += 1
        return self._flood_count > self._limits.max_control_frames_per_second

    # ---------------------------------------------------------------- output

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    def new_stream_id(self) -> int:
        return self._h2.get_next_available_stream_id()

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False) -> None:
        self._h2.send_headers(stream_id, headers, end_stream=end_stream)

    def send_data(self, stream_id: int, data: bytes) -> int:
        """Queue ``data`` on the stream and write what the windows allow; returns the bytes written now."""
        outgoing = self._outgoing.setdefault(stream_id, _Outgoing())
        outgoing.chunks.append(data)
        outgoing.size += len(data)
        return self._flush_stream(stream_id, outgoing)

    def end_stream(
        self,
        stream_id: int,
        trailers: list[tuple[bytes, bytes]] | None = None,
        *,
        reset_after: int | None = None,
        data: bytes = b"",
    ) -> None:
        """End the stream (with trailers, if any) once everything queued before, then ``data``, has been
        written; then reset it with ``reset_after`` if given (a complete answer to an upload that is to stop).
        Without trailers the end rides on the last DATA frame."""
        outgoing = self._outgoing.setdefault(stream_id, _Outgoing())
        if data:
            outgoing.chunks.append(data)
            outgoing.size += len(data)
        outgoing.end = True
        outgoing.trailers = trailers
        outgoing.reset_after = reset_after
        self._flush_stream(stream_id, outgoing)

    def flush(self) -> list[tuple[int, int]]:
        """Write what the windows allow on every stream with queued data: [(stream id, bytes written)]."""
        written = []
        for stream_id, outgoing in list(self._outgoing.items()):
            count = self._flush_stream(stream_id, outgoing)
            if count:
                written.append((stream_id, count))
        return written

    def queued_bytes(self, stream_id: int) -> int:
        outgoing = self._outgoing.get(stream_id)
        return outgoing.size if outgoing is not None else 0

    def acknowledge(self, stream_id: int, byte_count: int) -> None:
        """Bytes the peer sent on ``stream_id`` were passed on: open the windows they used."""
        if byte_count <= 0:
            return
        # If the stream closed meanwhile h2 raises, having credited the connection window already.
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.acknowledge_received_data(byte_count, stream_id)

    def reset(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        self._outgoing.pop(stream_id, None)
        with contextlib.suppress(h2.exceptions.ProtocolError):  # closed on both sides: nothing to reset
            self._h2.reset_stream(stream_id, code)

    def forget(self, stream_id: int) -> None:
        self._outgoing.pop(stream_id, None)

    def goaway(self, code: int = ErrorCodes.NO_ERROR) -> None:
        """Tell the peer to open no more streams; streams up to the last one it opened still finish."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        self._h2.close_connection(code, last_stream_id=self.last_peer_stream_id)

    def refuse(self, stream_id: int, now_ns: int) -> bool:
        """Refuse a stream over the limit (REFUSED_STREAM: the client may retry it). Refusals count towards
        the flood limit; returns True when this one went past it (the connection then gets GOAWAY)."""
        self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
        if self._count_control(now_ns):
            self.goaway(ErrorCodes.ENHANCE_YOUR_CALM)
            return True
        return False

    def ping(self, payload: bytes) -> None:
        self._h2.ping(payload)

    # ---------------------------------------------------------------- state

    @property
    def open_outbound_streams(self) -> int:
        return self._h2.open_outbound_streams

    @property
    def peer_max_concurrent_streams(self) -> int:
        return self._h2.peer_max_concurrent_streams

    def _flush_stream(self, stream_id: int, outgoing: _Outgoing) -> int:
        written = 0
        ended = False  # END_STREAM went out on the last DATA frame
        chunks = outgoing.chunks
        try:
            while chunks:
                window = self._h2.local_flow_control_window(stream_id)
                if window <= 0:
                    break
                chunk = chunks.popleft()
                piece = min(window, self._h2.max_outbound_frame_size, len(chunk))
                if piece < len(chunk):
                    chunks.appendleft(chunk[piece:])
                    chunk = chunk[:piece]
                ended = outgoing.end and not chunks and not outgoing.trailers
                self._h2.send_data(stream_id, chunk, end_stream=ended)
                outgoing.size -= piece
                written += piece
            if outgoing.end and not chunks:
                del self._outgoing[stream_id]
                if outgoing.trailers:
                    self._h2.send_headers(stream_id, outgoing.trailers, end_stream=True)
                elif not ended:
                    self._h2.end_stream(stream_id)
                if outgoing.reset_after is not None:
                    self._h2.reset_stream(stream_id, outgoing.reset_after)
        except h2.exceptions.ProtocolError:
            # The stream was reset or closed under us; whatever was queued for it is moot.
            self._outgoing.pop(stream_id, None)
        return written


_HEADER_BLOCKS = {
    h2.events.RequestReceived: Block.REQUEST,
    h2.events.PushedStreamReceived: Block.REQUEST,
    h2.events.ResponseReceived: Block.RESPONSE,
    h2.events.InformationalResponseReceived: Block.RESPONSE,
    h2.events.TrailersReceived: Block.TRAILERS,
}
_MAYBE_CONTROL = frozenset(
    {h2.events.PingReceived, h2.events.RemoteSettingsChanged, h2.events.StreamReset, h2.events.DataReceived}
)


def _is_control(event: h2.events.Event) -> bool:
    if isinstance(event, h2.events.PingReceived | h2.events.RemoteSettingsChanged):
        return True
    if isinstance(event, h2.events.StreamReset):
        return event.remote_reset
    return isinstance(event, h2.events.DataReceived) and not event.data and not event.stream_ended


def _describe(error: h2.exceptions.ProtocolError) -> str:
    text = str(error) or type(error).__name__
    return text[:200]


def keep_open_after_goaway(connection: h2.connection.H2Connection) -> None:
    """Let streams finish after a GOAWAY, sent or received, as RFC 9113 section 6.8 intends.

    h2 moves its connection state machine to CLOSED on any GOAWAY, after which a response to a stream
    the GOAWAY let through would be a protocol error: graceful shutdown would be impossible on either
    side. This instance's transition table keeps an open connection open instead; the proxy itself
    opens no new stream after a GOAWAY (``goaway_sent`` / ``goaway_received``). Checked by
    tests/core/test_h2.py (the GOAWAY tests), so an h2 release that changes the table fails loudly.
    """
    machine = connection.state_machine
    table = dict(machine._transitions)  # noqa: SLF001 - h2 offers no public switch for this
    open_states = (h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN)
    for state in open_states:
        for goaway in (h2.connection.ConnectionInputs.SEND_GOAWAY, h2.connection.ConnectionInputs.RECV_GOAWAY):
            action, _closed = table[(state, goaway)]
            table[(state, goaway)] = (action, state)
    machine._transitions = table  # noqa: SLF001


def _ignore_informational_on_closed_streams() -> None:
    """A 1xx response that crosses the proxy's RST_STREAM is ignored, as RFC 9113 section 5.1 asks for
    frames on a stream the receiver reset. h2's stream table has no entry for it, so h2 would fail the
    whole connection; this gives it the one h2 uses for a final response on such a stream."""
    table = h2.stream._transitions  # noqa: SLF001 - h2 offers no public switch for this
    closed = h2.stream.StreamState.CLOSED
    table.setdefault(
        (closed, h2.stream.StreamInputs.RECV_INFORMATIONAL_HEADERS),
        table[(closed, h2.stream.StreamInputs.RECV_HEADERS)],
    )


_ignore_informational_on_closed_streams()
