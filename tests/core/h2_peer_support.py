"""The test peers of the HTTP/2 state machine tests: h2 and h11 clients and endpoints that check what they
receive, and the scanner that reads the proxy's frames (see h2_stateful_support.py for the driver)."""

from __future__ import annotations

import contextlib
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import h11
from h2.errors import ErrorCodes

from tether.core.proxy.h2session import DEFAULT_WINDOW, keep_open_after_goaway

if TYPE_CHECKING:
    from h2_stateful_support import Net


EOF = b""
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, WINDOW_UPDATE = 0, 1, 8  # frame types
FRAME_HEADER = 9


def body_bytes(seed: int, size: int) -> bytes:
    """A body that never repeats, so a reordered, duplicated or misrouted piece cannot compare equal."""
    return random.Random(seed).randbytes(size)


def cut(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` in up to five pieces cut at random points; never an empty piece (that means EOF)."""
    if len(data) < 2:
        return [data] if data else []
    points = sorted({rng.randrange(1, len(data)) for _ in range(rng.choice([0, 0, 1, 2, 4]))})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# ---------------------------------------------------------------------------------------------------------
# What the proxy writes, frame by frame


class FrameScanner:
    """Parses the HTTP/2 frames a proxy writes on one connection as it writes them, and keeps, for the bytes
    not yet acknowledged, what they are: DATA payload or anything else (frame headers, HEADERS, control)."""

    def __init__(self, *, preamble: bool) -> None:
        self._buffer = bytearray()
        self._preamble = preamble  # a connection to an endpoint starts with the client preface (and a header)
        self._frames: deque[list[int]] = deque()  # unacknowledged frames: [unacked bytes, type, stream, length]
        self._acked_ahead = 0  # acknowledged bytes of a frame not yet complete

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        """The (type, stream id) of every frame ``data`` completes."""
        self._buffer += data
        complete: list[tuple[int, int]] = []
        if self._preamble:
            end = self._buffer.find(H2_PREFACE)
            if end < 0:
                return complete
            end += len(H2_PREFACE)
            self._add(end, -1, 0, end)
            del self._buffer[:end]
            self._preamble = False
        while len(self._buffer) >= FRAME_HEADER:
            length = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < FRAME_HEADER + length:
                break
            kind, stream_id = self._buffer[3], int.from_bytes(self._buffer[5:9], "big") & 0x7FFF_FFFF
            self._add(FRAME_HEADER + length, kind, stream_id, length)
            complete.append((kind, stream_id))
            del self._buffer[: FRAME_HEADER + length]
        return complete

    def _add(self, size: int, kind: int, stream_id: int, length: int) -> None:
        taken = min(size, self._acked_ahead)
        self._acked_ahead -= taken
        if size - taken:
            self._frames.append([size - taken, kind, stream_id, length])

    def ack(self, count: int) -> None:
        while count and self._frames:
            frame = self._frames[0]
            taken = min(count, frame[0])
            frame[0] -= taken
            count -= taken
            if not frame[0]:
                self._frames.popleft()
        self._acked_ahead += count

    def unacked(self) -> tuple[int, int, int, int]:
        """(DATA payload bytes, DATA frames, streams with other frames, connection WINDOW_UPDATEs), unacked."""
        payload = data_frames = window_updates = 0
        streams: set[int] = set()
        for unacked, kind, stream_id, length in self._frames:
            if kind == DATA:
                payload += min(unacked, length)
                data_frames += 1
            elif stream_id:
                streams.add(stream_id)
            elif kind == WINDOW_UPDATE:
                window_updates += 1
        return payload, data_frames, len(streams), window_updates


# ---------------------------------------------------------------------------------------------------------
# The driver's side of one connection, and the peers at the far end


@dataclass(eq=False)
class Conn:
    proxy_index: int
    conn_id: int
    scanner: FrameScanner | None = None  # set for HTTP/2 connections
    outbox: deque[bytes] = field(default_factory=deque)  # towards the proxy; EOF ends it
    unacked: bytearray = field(default_factory=bytearray)  # written by the proxy, not yet taken
    reading: bool = True
    closed: bool = False  # the proxy closed it, or was told it is lost: no effect may name it again
    far_gone: bool = False  # the far end closed: what the proxy writes now fails (the driver reports it)
    peer: Peer | None = None
    partner: Conn | None = None  # the other proxy's end of a meshed hop
    queued: int = 0  # bytes ever put in the outbox
    delivered: int = 0  # bytes ever handed to proxy.received
    max_piece: int = 0
    marks: list[tuple[int, str, int]] = field(default_factory=list)  # (queued offset, "reset"|"goaway", stream)
    reset_known: set[int] = field(default_factory=set)  # streams whose RST_STREAM reached the proxy
    goaway_limit: int | None = None  # the highest stream the proxy had opened when the peer's GOAWAY reached it
    highest_stream: int = 0  # the highest stream the proxy wrote HEADERS on
    upstream: bool = False  # the proxy connected (and opens the streams)

    @property
    def name(self) -> str:
        return f"{'abcdefgh'[self.proxy_index]}{self.conn_id}"

    def queue(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.outbox.append(piece)
            self.queued += len(piece)

    def check_frames(self, frames: list[tuple[int, int]]) -> None:
        """The proxy writes nothing on a stream its peer reset, and opens none after the peer's GOAWAY."""
        for kind, stream_id in frames:
            if kind in (DATA, HEADERS) and stream_id in self.reset_known:
                raise AssertionError(f"{self.name}: frame type {kind} on stream {stream_id} after its RST_STREAM")
            if kind == HEADERS and stream_id > self.highest_stream and self.upstream:  # a stream the proxy opened
                if self.goaway_limit is not None and stream_id > self.goaway_limit:
                    raise AssertionError(f"{self.name}: opened stream {stream_id} after the peer's GOAWAY")
                self.highest_stream = stream_id

    def note_delivered(self) -> None:
        for mark in [mark for mark in self.marks if mark[0] <= self.delivered]:
            self.marks.remove(mark)
            _offset, kind, stream_id = mark
            if kind == "reset":
                self.reset_known.add(stream_id)
            elif self.goaway_limit is None:
                self.goaway_limit = self.highest_stream


class Peer:
    """A test client or endpoint at the far end of one proxy connection."""

    def __init__(self, net: Net, conn: Conn) -> None:
        self.net = net
        self.conn = conn
        conn.peer = self
        self.gone = False  # the connection is over (either side closed or reset it)
        self.eof_sent = False

    @property
    def name(self) -> str:
        return f"{type(self).__name__}@{self.conn.name}"

    @property
    def writable(self) -> bool:
        return not (self.gone or self.eof_sent)

    def send_bytes(self, data: bytes) -> None:
        if data and not self.gone and not self.eof_sent:
            self.conn.queue(cut(data, self.net.rng))

    def take(self, data: bytes) -> None:
        raise NotImplementedError

    def connection_closed(self, reset: bool) -> None:
        """The proxy closed the connection (after everything it wrote, unless ``reset``)."""
        self.gone = True

    def close(self, reset: bool) -> None:
        """Half-close after what was queued (EOF), or reset (the driver reports the connection lost)."""
        if self.gone:
            return
        if reset:
            self.gone = True
            self.net.lose(self.conn)
        elif not self.eof_sent:
            self.conn.queue([EOF])
            self.eof_sent = True


def _keep_open(connection: h2.connection.H2Connection) -> None:
    """As the proxy's sessions do (``keep_open_after_goaway``), and also before the first stream: a peer may say
    GOAWAY before any stream opened, and frames the proxy wrote before it learned of it still arrive."""
    keep_open_after_goaway(connection)
    machine = connection.state_machine
    table = dict(machine._transitions)
    idle = h2.connection.ConnectionState.IDLE
    for goaway in (h2.connection.ConnectionInputs.SEND_GOAWAY, h2.connection.ConnectionInputs.RECV_GOAWAY):
        action, _closed = table[(idle, goaway)]
        table[(idle, goaway)] = (action, idle)
    machine._transitions = table


_CLOSED_INFORMATIONAL = (h2.stream.StreamState.CLOSED, h2.stream.StreamInputs.RECV_INFORMATIONAL_HEADERS)


@contextlib.contextmanager
def _informational_on_closed_streams() -> Any:
    """h2 has no transition for a 1xx HEADERS on a stream it reset, and raises a connection error where RFC 9113
    section 5.1 wants the frame ignored (a response in flight when the reset left). The test's peers get the
    transition h2 has for any other HEADERS, only while they parse: the table is h2's own, shared with the proxy,
    whose handling of that race is under test (see informational-after-reset)."""
    # core/proxy/h2session.py installs this transition for good (the proxy's fix for that race): then there
    # is nothing to add here, and nothing to take away afterwards.
    installed = _CLOSED_INFORMATIONAL in h2.stream._transitions
    h2.stream._transitions.setdefault(
        _CLOSED_INFORMATIONAL,
        (h2.stream.H2StreamStateMachine.recv_on_closed_stream, h2.stream.StreamState.CLOSED),
    )
    try:
        yield
    finally:
        if not installed:
            del h2.stream._transitions[_CLOSED_INFORMATIONAL]


@dataclass(slots=True)
class Outgoing:
    """What a peer still has to write on one stream, as its windows allow."""

    data: bytearray
    chunk: int
    end: bool
    trailers: list[tuple[bytes, bytes]] | None = None
    reset_after: bool = False  # RST_STREAM(NO_ERROR) once the end is out (RFC 9113 section 8.1)
    on_end: Callable[[], None] | None = None


class H2Peer(Peer):
    """An h2 client or endpoint. It acknowledges received data at once unless it ``withhold``s, writes
    bodies as its send windows allow, and tells the state machine every event (``on_event``)."""

    def __init__(
        self,
        net: Net,
        conn: Conn,
        *,
        client: bool,
        on_event: Callable[[H2Peer, h2.events.Event], None],
        window: int = DEFAULT_WINDOW,
    ) -> None:
        super().__init__(net, conn)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client, header_encoding=None))
        _keep_open(self.h2)
        self.h2.initiate_connection()
        if window > DEFAULT_WINDOW:
            self.h2.increment_flow_control_window(window - DEFAULT_WINDOW)
        self.on_event = on_event
        self.withhold = False
        self.owed: dict[int, int] = {}
        self.sendq: dict[int, Outgoing] = {}
        self.goaway_received = False
        self.goaway_sent: int | None = None  # the last stream id our GOAWAY let through
        self.settings_unacked = 1  # h2 applies every pending SETTINGS at the first ACK: send one at a time
        self.write()

    def write(self) -> None:
        self.send_bytes(self.h2.data_to_send())

    def take(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            with _informational_on_closed_streams():
                events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as error:
            raise AssertionError(f"{self.name} got invalid HTTP/2 from the proxy: {error!r}") from error
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                if self.withhold:
                    self.owed[event.stream_id] = self.owed.get(event.stream_id, 0) + event.flow_controlled_length
                else:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.sendq.pop(event.stream_id, None)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway_received = True
            elif isinstance(event, h2.events.SettingsAcknowledged):
                self.settings_unacked -= 1
            self.on_event(self, event)
        self._reopen_spent_windows()
        self.pump()

    def release(self) -> None:
        """Acknowledge everything withheld (WINDOW_UPDATEs go out), and stop withholding."""
        self.withhold = False
        for stream_id, count in sorted(self.owed.items()):
            self.h2.acknowledge_received_data(count, stream_id)
        self.owed.clear()
        self._reopen_spent_windows()
        self.write()

    def _reopen_spent_windows(self) -> None:
        """h2 sends a stream's WINDOW_UPDATE once half its window was read, or at exactly zero: a window that a
        smaller SETTINGS_INITIAL_WINDOW_SIZE made negative would stay shut. A peer that reads reopens it."""
        if self.withhold or self.gone:
            return
        for stream_id, stream in self.h2.streams.items():
            manager = stream._inbound_window_manager
            if stream.open and manager.current_window_size <= 0 < manager.max_window_size:
                self.h2.increment_flow_control_window(manager.max_window_size - manager.current_window_size, stream_id)

    def open_stream(self, headers: list[tuple[bytes, bytes]], outgoing: Outgoing) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        bare = outgoing.end and not outgoing.data and not outgoing.trailers
        self.h2.send_headers(stream_id, headers, end_stream=bare)
        if bare and outgoing.on_end is not None:
            outgoing.on_end()
        elif not bare:
            self.sendq[stream_id] = outgoing
        self.pump()
        return stream_id

    def answer(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], outgoing: Outgoing, informational: bool
    ) -> None:
        if informational:
            self.h2.send_headers(stream_id, [(b":status", b"103"), *headers[1:2]])
        trailers_only = outgoing.end and not outgoing.data and not outgoing.trailers
        self.h2.send_headers(stream_id, headers, end_stream=trailers_only)
        if trailers_only:
            self._ended(stream_id, outgoing)
        else:
            self.sendq[stream_id] = outgoing
        self.pump()

    def finish(self, stream_id: int, trailers: list[tuple[bytes, bytes]] | None) -> None:
        outgoing = self.sendq[stream_id]
        outgoing.end, outgoing.trailers = True, trailers
        self.pump()

    def reset(self, stream_id: int, code: int) -> None:
        assert not (self.gone or self.eof_sent), self.name
        self.sendq.pop(stream_id, None)
        self.h2.reset_stream(stream_id, code)
        self.write()
        self.conn.marks.append((self.conn.queued, "reset", stream_id))

    def resize_stream_windows(self, size: int) -> None:
        """SETTINGS_INITIAL_WINDOW_SIZE: the proxy's send window of every stream moves by the difference."""
        assert not self.settings_unacked, self.name
        self.settings_unacked += 1
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: size})
        self.write()

    def goaway(self, last_stream_id: int) -> None:
        assert not (self.gone or self.eof_sent), self.name
        self.goaway_sent = last_stream_id
        self.h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=last_stream_id)
        self.write()
        self.conn.marks.append((self.conn.queued, "goaway", 0))

    def stream_open(self, stream_id: int) -> bool:
        stream = self.h2.streams.get(stream_id)
        return stream is not None and not stream.closed

    def can_send(self, stream_id: int) -> bool:
        stream = self.h2.streams.get(stream_id)
        return stream is not None and stream.state_machine.state.name in ("OPEN", "HALF_CLOSED_REMOTE")

    def pump(self) -> None:
        """Write what the send windows allow, then the end of each stream whose data is all out."""
        for stream_id, outgoing in list(self.sendq.items()):
            try:
                while outgoing.data:
                    room = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
                    room = min(room, outgoing.chunk)
                    if room <= 0:
                        break
                    piece = bytes(outgoing.data[:room])
                    del outgoing.data[:room]
                    self.h2.send_data(stream_id, piece)
                if not outgoing.data and outgoing.end:
                    del self.sendq[stream_id]
                    if outgoing.trailers:
                        self.h2.send_headers(stream_id, outgoing.trailers, end_stream=True)
                    else:
                        self.h2.end_stream(stream_id)
                    self._ended(stream_id, outgoing)
            except h2.exceptions.StreamClosedError:
                assert not self.stream_open(stream_id), (self.name, stream_id)
                self.sendq.pop(stream_id, None)  # the proxy reset it meanwhile
        self.write()

    def _ended(self, stream_id: int, outgoing: Outgoing) -> None:
        if outgoing.on_end is not None:
            outgoing.on_end()
        if outgoing.reset_after and self.stream_open(stream_id):
            self.h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)


CUT_SHORT = object()  # what an H1Peer reports when the proxy closes its connection in the middle of a message


class H1Peer(Peer):
    """An h11 client or endpoint: parses what the proxy writes and hands the events to the state machine."""

    def __init__(self, net: Net, conn: Conn, *, role: Any, on_event: Callable[[H1Peer, Any], None]) -> None:
        super().__init__(net, conn)
        self.parser = h11.Connection(role)
        self.on_event = on_event
        self.record: Any = None  # the request this connection is busy with, if any
        self.closing = False

    def take(self, data: bytes) -> None:
        if self.gone:
            return
        self.parser.receive_data(data)
        self.parse()

    def parse(self) -> None:
        while not self.gone:
            try:
                event = self.parser.next_event()
            except h11.RemoteProtocolError as error:
                if self.parser.their_state is h11.ERROR and self.closing:
                    self.on_event(self, CUT_SHORT)  # the proxy closed (FIN) in the middle of a message
                    return
                raise AssertionError(f"{self.name} got invalid HTTP/1.1 from the proxy: {error}") from error
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            self.on_event(self, event)
            if isinstance(event, h11.ConnectionClosed):
                return

    def connection_closed(self, reset: bool) -> None:
        if not reset and not self.gone:
            self.closing = True
            self.take(EOF)
        super().connection_closed(reset)


# ---------------------------------------------------------------------------------------------------------
# The network
