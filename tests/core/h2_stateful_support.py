"""The driver, peers, bounds and shared base machine of the HTTP/2 state machine tests (test_h2_stateful.py).

``Net`` plays the network for one or more ``Proxy`` machines. Every connection a proxy knows is a ``Conn``
on the driver's side, whose far end is a test peer (an h2 or h11 client or endpoint) or a connection of
another proxy (the meshed hop). Bytes move like this, each step under the state machine's control:

- a peer writes: its bytes are cut at random points into the ``outbox`` of its ``Conn``; ``deliver``
  hands pieces to ``proxy.received`` while (and only while) the proxy reads that connection;
- a proxy writes (``Send``): the bytes wait in ``unacked`` until ``ack`` takes them (``proxy.sent``) and
  hands them to the far end: a peer parses them at once, another proxy finds them in its outbox;
- ``Close`` hands the far end what was sent first (unless it is a reset), then the end of the connection.

So an unacknowledged byte is one the peer has not seen: the peers' WINDOW_UPDATEs can only cover
acknowledged bytes, and that is what makes the window bounds below sound.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import h11
from h2.errors import ErrorCodes
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tether.core.address import Address
from tether.core.config import MS, S
from tether.core.effects import Close, Connect, Effect, LogError, Send, SetReading
from tether.core.proxy import Proxy
from tether.core.proxy.h2session import DEFAULT_WINDOW, keep_open_after_goaway

EOF = b""
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, WINDOW_UPDATE = 0, 1, 8  # frame types
TEARDOWN_NS = 10 * 60 * S

# Known, unfixed proxy bugs (reproduced in test_h2_regressions.py) whose trigger the machines avoid or tolerate
# (``if avoided("name")``), so that they keep guarding everything else while a fix is pending;
# TETHER_H2_STATEFUL_KNOWN_BUGS="all" (or a comma-separated list) explores them anyway. Empty now: the twelve bugs
# found are fixed (b4a5131, 04636a1, 78f35de) and test_h2_regressions.py keeps their reproductions.
KNOWN_BUGS: frozenset[str] = frozenset()
_EXPLORED = set(os.environ.get("TETHER_H2_STATEFUL_KNOWN_BUGS", "").replace(" ", "").split(","))


def avoided(bug: str) -> bool:
    """Whether the machines steer clear of the known bug ``bug``."""
    return bug in KNOWN_BUGS and not (bug in _EXPLORED or "all" in _EXPLORED)


# Short timeouts so that the advance_time rule reaches every one of them.
TIMEOUTS = {
    "connect_timeout_ns": 1 * S,
    "response_timeout_ns": 5 * S,
    "idle_timeout_ns": 30 * S,
    "pool_idle_timeout_ns": 10 * S,
    "drain_timeout_ns": 2 * S,
    "h2_keepalive_interval_ns": 10 * S,
    "h2_keepalive_timeout_ns": 3 * S,
}
# "tight": the smallest buffer and windows the config allows, so bodies of a few hundred KiB need many
# round trips; "roomy": a buffer larger than a stream window, so backpressure hinges on windows alone.
LIMITS = {
    "default": {},
    "tight": {"max_buffered_bytes": 1024, "h2_stream_window": 65_535, "h2_connection_window": 65_535},
    "roomy": {"max_buffered_bytes": 256 * 1024, "h2_connection_window": 128 * 1024},
}
# Time steps: mostly a few milliseconds, sometimes past one timeout or all of them.
TIME_STEPS_MS = [0, 1, 5, 20, 50, 200, 0, 1, 5, 20, 1_100, 2_100, 3_100, 10_100, 30_100]

# Allowances of the per-connection bound (see check_bounds).
FRAME_HEADER = 9
PER_STREAM_FRAMES = 1024  # HEADERS (a response head or trailers of this test, <= 400 bytes each) and RST_STREAM
CONNECTION_WINDOW_UPDATE = 13
ONE_INPUT = 4096  # control frames answering the one piece read after the connection crossed the limit
H1_FRAMING = 8192  # an HTTP/1.1 head, an error response, and chunk framing (<= 12 bytes per chunk)


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


class Net:
    def __init__(self, rng: random.Random, *, auto_ack: bool) -> None:
        self.rng = rng
        self.auto_ack = auto_ack
        self.now_ns = 0
        self.proxies: list[Proxy] = []
        self.conns: dict[tuple[int, int], Conn] = {}
        self.dialing: dict[tuple[int, int], Address] = {}
        self.errors: list[str] = []
        self._write_errors: list[Conn] = []
        self.failed_connects: set[tuple[int, int]] = set()

    def add_proxy(self, proxy: Proxy) -> int:
        self.proxies.append(proxy)
        return len(self.proxies) - 1

    def accept(self, proxy_index: int, *, h2: bool) -> Conn:
        """A client connects; the caller puts a peer at the far end, then drains the proxy's effects."""
        conn_id = self.proxies[proxy_index].accepted(self.now_ns)
        return self._new_conn(proxy_index, conn_id, h2=h2, preamble=False)

    def _new_conn(self, proxy_index: int, conn_id: int, *, h2: bool, preamble: bool) -> Conn:
        key = (proxy_index, conn_id)
        assert key not in self.conns and key not in self.dialing, key
        conn = self.conns[key] = Conn(proxy_index, conn_id, FrameScanner(preamble=preamble) if h2 else None)
        return conn

    def connected(self, key: tuple[int, int], *, h2: bool) -> Conn:
        """The connect ``key`` succeeded; the caller puts a peer (or another proxy) at the far end."""
        del self.dialing[key]
        conn = self._new_conn(*key, h2=h2, preamble=True)
        conn.upstream = True
        return conn

    def open_connection(self, conn: Conn) -> None:
        self.proxies[conn.proxy_index].connected(conn.conn_id, self.now_ns)
        self.drain()

    def connect_failed(self, key: tuple[int, int]) -> None:
        del self.dialing[key]
        self.failed_connects.add(key)
        self.proxies[key[0]].connect_failed(key[1], "connection refused", self.now_ns)
        self.drain()

    def lose(self, conn: Conn) -> None:
        """The driver reports ``conn`` lost (the peer reset it)."""
        if conn.closed:
            return
        conn.closed = True
        conn.outbox.clear()
        conn.unacked.clear()
        self.proxies[conn.proxy_index].closed(conn.conn_id, self.now_ns)
        self.drain()

    # ------------------------------------------------------------------ moving bytes

    def deliver(self, conn: Conn, count: int) -> None:
        proxy = self.proxies[conn.proxy_index]
        for _ in range(count):
            if conn.closed or not conn.reading or not conn.outbox:
                return
            piece = conn.outbox.popleft()
            conn.delivered += len(piece)
            conn.max_piece = max(conn.max_piece, len(piece))
            proxy.received(conn.conn_id, piece, self.now_ns)
            self.drain()
            conn.note_delivered()

    def ack(self, conn: Conn, count: int) -> None:
        self._ack(conn, count)
        self.drain()

    def _ack(self, conn: Conn, count: int) -> None:
        count = min(count, len(conn.unacked))
        if not count or conn.closed:
            return
        data = bytes(conn.unacked[:count])
        del conn.unacked[:count]
        if conn.scanner is not None:
            conn.scanner.ack(count)
        self.proxies[conn.proxy_index].sent(conn.conn_id, count, self.now_ns)
        self._to_far_end(conn, data)

    def _to_far_end(self, conn: Conn, data: bytes) -> None:
        if conn.peer is not None:
            conn.peer.take(data)
        elif conn.partner is not None and not conn.partner.closed:
            conn.partner.queue([data])

    def drain(self) -> None:
        for _ in range(100_000):
            moved = False
            for index, proxy in enumerate(self.proxies):
                for effect in proxy.effects():
                    moved = True
                    self._apply(index, effect)
            if self.auto_ack:
                for conn in list(self.conns.values()):
                    if conn.unacked and not conn.closed:
                        self._ack(conn, len(conn.unacked))
                        moved = True
            while self._write_errors:
                conn = self._write_errors.pop()
                if not conn.closed:
                    conn.closed = True
                    conn.unacked.clear()
                    conn.outbox.clear()
                    self.proxies[conn.proxy_index].closed(conn.conn_id, self.now_ns)
                    moved = True
            if not moved:
                return
        raise AssertionError("the proxies never stopped producing effects")

    def _apply(self, index: int, effect: Effect) -> None:
        key = (index, getattr(effect, "conn_id", None))
        if isinstance(effect, LogError):
            self.errors.append(effect.message)
            return
        if isinstance(effect, Connect):
            assert key not in self.conns and key not in self.dialing, effect
            self.dialing[key] = effect.address  # type: ignore[index]
            return
        if isinstance(effect, Close) and key in self.dialing:
            del self.dialing[key]  # a connect that timed out, cancelled
            return
        if isinstance(effect, Close) and key in self.failed_connects and key not in self.conns:
            # ``_stream_upstream_failed`` closes a connection whose connect the driver reported failed (the
            # HTTP/1.1 pools just forget it). Both drivers ignore a Close of an id they no longer hold: tolerated.
            self.failed_connects.discard(key)  # type: ignore[arg-type]
            return
        assert key not in self.dialing, f"{effect!r} on a connection still connecting"
        conn = self.conns.get(key)  # type: ignore[arg-type]
        assert conn is not None, f"{effect!r} names a connection the proxy never had"
        assert not conn.closed, f"{effect!r} after the connection closed"
        if isinstance(effect, Send):
            assert effect.data, effect
            conn.unacked += effect.data
            if conn.scanner is not None:
                conn.check_frames(conn.scanner.feed(effect.data))
            if conn.far_gone:
                self._write_errors.append(conn)
        elif isinstance(effect, SetReading):
            conn.reading = effect.enabled
        elif isinstance(effect, Close):
            conn.closed = True
            data, reset = bytes(conn.unacked), effect.reset
            conn.unacked.clear()
            conn.outbox.clear()
            if not reset and data:
                self._to_far_end(conn, data)
            if conn.peer is not None:
                conn.peer.connection_closed(reset)
            elif conn.partner is not None and not conn.partner.closed:
                if reset:
                    self._write_errors.append(conn.partner)  # the other proxy sees the reset
                else:
                    conn.partner.queue([EOF])
                    conn.partner.far_gone = True
        else:
            raise AssertionError(f"unexpected effect {effect!r}")

    # ------------------------------------------------------------------ time

    def fire_timers(self) -> None:
        for _ in range(1000):
            due = [proxy for proxy in self.proxies if (proxy.next_deadline_ns() or self.now_ns + 1) <= self.now_ns]
            if not due:
                return
            for proxy in due:
                proxy.on_timer(self.now_ns)
            self.drain()
        raise AssertionError("on_timer keeps leaving deadlines in the past")

    def settle(self) -> bool:
        """Acknowledge and deliver everything the driver holds until nothing moves; whether anything did."""
        anything = False
        for _ in range(10_000):
            moved = False
            for conn in list(self.conns.values()):
                if conn.unacked and not conn.closed:
                    self.ack(conn, len(conn.unacked))
                    moved = True
                if conn.outbox and conn.reading and not conn.closed:
                    self.deliver(conn, len(conn.outbox))
                    moved = True
            self.fire_timers()
            if not moved:
                return anything
            anything = True
        raise AssertionError("the driver never settled")

    def run_until(self, end_ns: int, between: Callable[[], None]) -> None:
        """Let virtual time run to ``end_ns``, timer by timer, calling ``between`` after each."""
        for _ in range(100_000):
            deadlines = [d for d in (proxy.next_deadline_ns() for proxy in self.proxies) if d is not None]
            if not deadlines or min(deadlines) > end_ns:
                break
            self.now_ns = max(self.now_ns, min(deadlines))
            self.fire_timers()
            between()
        self.now_ns = end_ns

    # ------------------------------------------------------------------ invariants

    def check_open_connections(self) -> None:
        for index, proxy in enumerate(self.proxies):
            held = sum(1 for key in self.dialing if key[0] == index)
            held += sum(1 for conn in self.conns.values() if conn.proxy_index == index and not conn.closed)
            assert proxy.open_connections == held, (index, proxy.open_connections, held)

    def check_bounds(self) -> None:
        for index, proxy in enumerate(self.proxies):
            check_bounds(proxy, {key[1]: conn for key, conn in self.conns.items() if key[0] == index}, self)


def check_bounds(proxy: Proxy, conns: dict[int, Conn], net: Net) -> None:
    """What one proxy holds stays within its windows and ``max_buffered_bytes``; the argument is in the
    module docstring of test_h2_stateful.py (section "Bounds")."""
    config = proxy.config
    limit = config.max_buffered_bytes
    stream_window = config.h2_stream_window
    biggest_piece = max((conn.max_piece for conn in net.conns.values()), default=0)
    queue_cap = max(stream_window, limit + biggest_piece)
    for connection in [*proxy._downstream.values(), *proxy._upstream.values()]:
        conn = conns.get(connection.conn_id)
        if conn is None:
            continue  # still connecting
        assert connection.unsent_bytes == len(conn.unacked), (conn.name, connection.unsent_bytes, len(conn.unacked))
        if connection.h2 is not None:
            assert conn.scanner is not None
            payload, data_frames, streams, window_updates = conn.scanner.unacked()
            if isinstance(conn.peer, H2Peer):
                window = conn.peer.h2.inbound_flow_control_window
            else:
                assert conn.partner is not None, conn.name
                window = net.proxies[conn.partner.proxy_index].config.h2_connection_window
            assert payload <= window, f"{conn.name}: {payload} DATA bytes unacked, peer window {window}"
            overhead = len(conn.unacked) - payload
            allowed = limit + FRAME_HEADER * data_frames + PER_STREAM_FRAMES * streams + ONE_INPUT
            allowed += CONNECTION_WINDOW_UPDATE * window_updates
            assert overhead <= allowed, f"{conn.name}: {overhead} bytes of frames unacked (allowed {allowed})"
            for stream_id, outgoing in connection.h2._outgoing.items():
                assert outgoing.size <= queue_cap, f"{conn.name} stream {stream_id}: {outgoing.size} queued"
        elif proxy._in_stream_world(connection):
            allowed = limit + stream_window + H1_FRAMING
            assert connection.unsent_bytes <= allowed, f"{conn.name}: {connection.unsent_bytes} bytes unsent"
    unacked_by_source: dict[int, int] = {}
    unacked_by_sink: dict[int, int] = {}
    for exchange in proxy._streams.values():
        source = proxy._downstream.get(exchange.source_id)
        sink = proxy._sink_connection(exchange)
        where = f"exchange {exchange.exchange_id} ({exchange.head.path.decode()})"
        if exchange.source_stream is not None:
            assert exchange.source_unacked <= stream_window, (where, exchange.source_unacked)
            assert proxy._sink_queued(exchange) <= exchange.source_unacked, (where, proxy._sink_queued(exchange))
            key = exchange.source_id
            unacked_by_source[key] = unacked_by_source.get(key, 0) + exchange.source_unacked
        elif source is not None:
            piece = conns[source.conn_id].max_piece if source.conn_id in conns else 0
            assert proxy._sink_queued(exchange) <= limit + piece, (where, proxy._sink_queued(exchange))
        source_queued = 0
        if source is not None and source.h2 is not None and exchange.source_stream is not None:
            source_queued = source.h2.queued_bytes(exchange.source_stream)
        if sink is not None and sink.h2 is not None:
            assert exchange.sink_unacked <= stream_window, (where, exchange.sink_unacked)
            assert source_queued <= exchange.sink_unacked, (where, source_queued, exchange.sink_unacked)
            unacked_by_sink[sink.conn_id] = unacked_by_sink.get(sink.conn_id, 0) + exchange.sink_unacked
        elif sink is not None and sink.conn_id in conns:
            assert source_queued <= limit + conns[sink.conn_id].max_piece, (where, source_queued)
    for conn_id, total in [*unacked_by_source.items(), *unacked_by_sink.items()]:
        assert total <= config.h2_connection_window, (conns[conn_id].name, total)


# ---------------------------------------------------------------------------------------------------------
# What both state machines share: rules that move bytes and time, the invariants, and the teardown

CLIENT_CODES, ENDPOINT_CODES = 0x1000, 0x2000
PROXY_ERROR_STATUSES = frozenset({400, 431, 502, 503, 504})
MAX_REQUESTS = 40
SIZES = st.one_of(st.just(0), st.integers(1, 3000), st.integers(60_000, 200_000))
CHUNKS = st.sampled_from([700, 4096, 16_384])
EXAMPLES = float(os.environ.get("TETHER_H2_STATEFUL_EXAMPLES", "1"))

F = TypeVar("F", bound=Callable[..., Any])


def step(function: F) -> F:
    """Mark the machine failed until the step returns, so teardown does not pile a second error on top."""

    @functools.wraps(function)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.step_failed = True
        result = function(self, *args, **kwargs)
        self.step_failed = False
        return result

    return wrapper  # type: ignore[return-value]


def pick_one(items: list[Any], pick: int) -> Any:
    return items[pick % len(items)]


class NetMachine(RuleBasedStateMachine):
    """What both machines share: the network, delivery, acknowledgements, time and the invariants."""

    # What the proxy may never log: its peers (h2's and h11's own) never break the protocol on purpose.
    forbidden_errors: tuple[str, ...] = ("protocol error", "flood", "invalid response")

    def __init__(self) -> None:
        super().__init__()
        self.net: Net | None = None
        self.step_failed = False
        self.shut_down: set[int] = set()

    def _net(self) -> Net:
        assert self.net is not None
        return self.net

    def _conns(self, wanted: Callable[[Conn], bool]) -> list[Conn]:
        return [conn for conn in self._net().conns.values() if not conn.closed and wanted(conn)]

    @precondition(lambda self: self.net is not None)
    @rule(pick=st.integers(0, 63), count=st.integers(1, 4))
    @step
    def deliver(self, pick: int, count: int) -> None:
        """Hand the next pieces a peer (or the other proxy) wrote to the proxy, if it reads that connection."""
        conns = self._conns(lambda conn: bool(conn.outbox) and conn.reading)
        if conns:
            self._net().deliver(pick_one(conns, pick), count)

    @precondition(lambda self: self.net is not None)
    @rule(rounds=st.integers(1, 6))
    @step
    def network_moves(self, rounds: int) -> None:
        """A few rounds of everything at once: each connection, in a random order, gets its next piece
        delivered and (when writes are not acknowledged at once) a random share of its writes acknowledged;
        pending connects are accepted now and then."""
        net = self._net()
        for _ in range(rounds):
            for key in sorted(net.dialing):
                if net.rng.random() < 0.3:
                    self._accept_connect(key)
            conns = self._conns(lambda conn: True)
            net.rng.shuffle(conns)
            for conn in conns:
                if net.rng.random() < 0.8:
                    net.deliver(conn, 1)
                if conn.unacked and not conn.closed and net.rng.random() < 0.8:
                    net.ack(conn, net.rng.choice([len(conn.unacked), net.rng.randint(1, len(conn.unacked))]))

    @precondition(lambda self: self.net is not None and not self.net.auto_ack)
    @rule(pick=st.integers(0, 63), count=st.one_of(st.integers(1, 100), st.integers(1, 2**18)))
    @step
    def acknowledge(self, pick: int, count: int) -> None:
        """The driver hands ``count`` bytes the proxy wrote to the kernel: ``sent()``, and the far end reads them."""
        conns = self._conns(lambda conn: bool(conn.unacked))
        if conns:
            self._net().ack(pick_one(conns, pick), count)

    @precondition(lambda self: self.net is not None)
    @rule(delta_ms=st.sampled_from(TIME_STEPS_MS))
    @step
    def advance_time(self, delta_ms: int) -> None:
        net = self._net()
        net.now_ns += delta_ms * MS
        net.fire_timers()

    @invariant()
    @step
    def proxy_holds_what_driver_holds(self) -> None:
        if self.net is not None:
            self.net.check_open_connections()

    @invariant()
    @step
    def bytes_held_stay_bounded(self) -> None:
        if self.net is not None:
            self.net.check_bounds()

    @invariant()
    @step
    def peers_never_break_the_protocol(self) -> None:
        """Every peer here speaks correct HTTP/2 (h2's own), so the proxy never finds it broke the protocol."""
        if self.net is not None:
            broken = [e for e in self.net.errors if any(words in e for words in self.forbidden_errors)]
            assert not broken, broken

    def teardown(self) -> None:
        if self.net is None or self.step_failed:
            return  # nothing ran, or a step already failed: report that failure alone
        net = self.net
        net.auto_ack = True
        self._serve_everything()
        self._check_quiescent()
        net.run_until(net.now_ns + TEARDOWN_NS, self._serve_everything)
        self._serve_everything()
        assert not net.dialing, f"connects never resolved: {sorted(net.dialing)}"
        still_open = [conn.name for conn in net.conns.values() if not conn.closed]
        assert not still_open, f"connections still open 10 minutes after the last input: {still_open}"
        assert all(proxy.open_connections == 0 for proxy in net.proxies)

    def _serve_everything(self) -> None:
        """Accept every connect, answer every request, release every window, until nothing moves."""
        for _ in range(1000):
            moved = self._net().settle()
            moved = self._serve_round() or moved
            if not moved:
                return
        raise AssertionError("the peers never caught up")

    def _serve_round(self) -> bool:
        raise NotImplementedError

    def _accept_connect(self, key: tuple[int, int]) -> None:
        raise NotImplementedError

    def _check_quiescent(self) -> None:
        net = self._net()
        for proxy in net.proxies:
            stuck = [(e.exchange_id, e.head.path.decode(), e.response_status) for e in proxy._streams.values()]
            assert not stuck, f"exchanges stuck with every peer answering and every window open: {stuck}"
            for connection in [*proxy._downstream.values(), *proxy._upstream.values()]:
                if connection.h2 is not None:
                    queued = {s: o.size for s, o in connection.h2._outgoing.items()}
                    assert not queued, f"data queued with every window open: {queued}"
        for conn in net.conns.values():
            assert conn.closed or not (conn.unacked or (conn.outbox and conn.reading)), conn.name
