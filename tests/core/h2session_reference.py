"""The proxy's H2Session as it was on the h2 library (commit e5caa17), kept as the reference that
tests/core/test_h2wire_differential.py compares core/proxy/h2session.py (on h2conn.py) against.

One HTTP/2 connection, client or server side, on h2: settings, flow-controlled writes, flood limits.

Theory of operation
-------------------
h2 parses frames and keeps the protocol's state; this wrapper adds what a proxy needs on top of it.

Writes respect the peer's windows. ``send_data`` never writes more than the stream's and connection's
send windows allow; the rest waits in a per-stream queue, followed by the stream's end (a flag or
trailers). ``flush`` writes what the windows now allow and reports, per stream, how many queued bytes
went out: the proxy acknowledges the producing peer only for bytes that left, so a slow reader on one
side closes the window of the writer on the other, and the queue of a stream never holds more than the
window the proxy advertised to its producer.

Reads are bounded by what we advertise: ``INITIAL_WINDOW_SIZE`` per stream and a larger connection
window, ``MAX_CONCURRENT_STREAMS`` and ``MAX_HEADER_LIST_SIZE``. Frames that cost the proxy work but
carry no request (SETTINGS, PING, RST_STREAM from the peer, and empty DATA frames) are counted per
second; a peer past ``max_control_frames_per_second`` is flooding (the "rapid reset" and "settings flood"
attacks) and gets GOAWAY ENHANCE_YOUR_CALM.

Any protocol violation by the peer surfaces as ``H2SessionError`` with a sentence for the log; the
caller closes the connection (h2 has already queued the GOAWAY).
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, RstStreamFrame

from tether.core.proxy.h2headers import Block, MalformedHeaders, received_fields
from tether.core.proxy.hpack_codec import Decoder, StaticEncoder

NS_PER_S = 1_000_000_000
DEFAULT_WINDOW = 65_535


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


class _Connection(h2.connection.H2Connection):
    # h2 remembers up to 65,536 closed streams per connection (a few MB once a busy connection has seen
    # that many). It needs them only to tell a frame for a recently closed stream from a protocol error,
    # and a stream closed thousands of streams ago gets no more frames from a sane peer.
    MAX_CLOSED_STREAMS = 1000

    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        """h2's own, less its first line: ``logger.trace("Received frame: %s", repr(frame))`` formats every
        frame (hex of its payload included) for a logger that discards it, a tenth of h2's receive path. The
        rest is h2 4.x's code unchanged (tests/core/test_h2session.py compares the two on closed streams)."""
        events: list[h2.events.Event]
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as error:
            # A frame on a stream we reset gets RST_STREAM back; on any other closed stream it is fatal.
            if not self._stream_is_closed_by_reset(error.stream_id):
                raise
            reset = RstStreamFrame(error.stream_id)
            reset.error_code = error.error_code
            self._prepare_for_sending([reset])
            events = error._events  # noqa: SLF001 - as h2 does
        except h2.exceptions.StreamIDTooLowError as error:
            # A stream id already used: a stream error if we reset it, else the connection's.
            if self._stream_is_closed_by_reset(error.stream_id):
                reset = RstStreamFrame(error.stream_id)
                reset.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([reset])
                events = []
            elif self._stream_is_closed_by_end(error.stream_id):
                raise h2.exceptions.StreamClosedError(error.stream_id) from error
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events


class H2Session:
    def __init__(self, *, client: bool, limits: H2Limits) -> None:
        # Outbound headers were validated on their way in (by h2 or h11) and are rewritten only by this
        # proxy, so h2 does not check them a second time: that check costs a fifth of a proxied stream.
        # Received headers are checked (and split cookies joined) by h2headers.py in one pass, not by h2.
        config = h2.config.H2Configuration(
            client_side=client,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self._h2 = _Connection(config)
        self._h2.encoder = StaticEncoder()  # no dynamic table: see hpack_codec.py
        decoder = Decoder()  # hpack's decoding in one loop, with the limits h2 gave its own
        decoder.max_header_list_size = self._h2.decoder.max_header_list_size
        decoder.max_allowed_table_size = self._h2.decoder.max_allowed_table_size
        self._h2.decoder = decoder
        keep_open_after_goaway(self._h2)
        self._limits = limits
        settings = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.initial_stream_window,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
        }
        if client:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self._h2.local_settings = h2.settings.Settings(client=client, initial_values=settings)
        self._h2.initiate_connection()
        # The stream limit went out in SETTINGS; the proxy enforces it itself, per stream (REFUSED_STREAM,
        # RFC 9113 section 5.1.2), because h2 would treat one stream too many as a connection error, and
        # before the peer has even seen the limit. So h2's own copy of the limit is lifted.
        self._h2.local_settings._settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = deque([2**31 - 1])  # noqa: SLF001
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
        except h2.exceptions.ProtocolError as error:
            raise H2SessionError(f"HTTP/2 protocol error: {_describe(error)}") from None
        self._refuse_overlong_frame()
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

    def _refuse_overlong_frame(self) -> None:
        """h2 buffers a frame until it is complete and only then checks its length, so a peer could make
        it hold 16 MiB per connection; the header of a partial frame is checked here instead."""
        partial = self._h2.incoming_buffer._data  # noqa: SLF001 - h2 exposes no length check of its own
        if len(partial) >= 9:
            length = int.from_bytes(partial[:3], "big")
            limit = self._h2.max_inbound_frame_size
            if length > limit:
                self.goaway(ErrorCodes.FRAME_SIZE_ERROR)
                raise H2SessionError(f"HTTP/2 protocol error: a {length}-byte frame exceeds the {limit}-byte limit")

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
        return self._h2.remote_settings.max_concurrent_streams

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
