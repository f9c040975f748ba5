"""The driver, bounds and shared base machine of the HTTP/2 state machine tests (test_h2_stateful.py and
test_h2_meshed_stateful.py); the peers are in h2_peer_support.py.

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

import functools
import os
import random
from collections.abc import Callable
from typing import Any, TypeVar

from h2_peer_support import (
    EOF,
    FRAME_HEADER,
    Conn,
    FrameScanner,
    H2Peer,
)
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tether.core.address import Address
from tether.core.config import MS, S
from tether.core.effects import Close, Connect, Effect, LogError, Send, SetReading
from tether.core.proxy import Proxy

TEARDOWN_NS = 10 * 60 * S

# Known, unfixed proxy bugs (reproduced in test_h2_regressions.py) whose trigger the machines avoid or tolerate
# (``if avoided("name")``), so that they keep guarding everything else while a fix is pending;
# TETHER_H2_STATEFUL_KNOWN_BUGS="all" (or a comma-separated list) explores them anyway. Empty now: the fourteen bugs
# found are fixed (b4a5131, 04636a1, 78f35de, adc6ae0, 51460f3) and test_h2_regressions.py keeps their reproductions.
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
PER_STREAM_FRAMES = 1024  # HEADERS (a response head or trailers of this test, <= 400 bytes each) and RST_STREAM
CONNECTION_WINDOW_UPDATE = 13
ONE_INPUT = 4096  # control frames answering the one piece read after the connection crossed the limit
H1_FRAMING = 8192  # an HTTP/1.1 head, an error response, and chunk framing (<= 12 bytes per chunk)


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
            # A write error is reported before any acknowledgement: a real driver tells the proxy the moment a
            # write fails, and applies what each input produced before giving it the next one (acknowledging
            # first would hand the proxy ``closed`` while effects of its ``sent`` were still unapplied).
            while self._write_errors:
                conn = self._write_errors.pop()
                if not conn.closed:
                    conn.closed = True
                    conn.unacked.clear()
                    conn.outbox.clear()
                    self.proxies[conn.proxy_index].closed(conn.conn_id, self.now_ns)
                    moved = True
            if moved:
                continue  # apply what the lost connections produced before acknowledging anything
            if self.auto_ack:
                for conn in list(self.conns.values()):
                    if conn.unacked and not conn.closed:
                        self._ack(conn, len(conn.unacked))
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
        self._wait_out_queued_requests()
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

    def _wait_out_queued_requests(self) -> None:
        """A request may wait for an endpoint: in its service's failfast queue (3 s) while circuit breaking
        has every endpoint ejected (a backoff of at most 60 s, plus jitter). Only such requests, with no
        endpoint yet, are given that virtual time; any other stream still open is stuck, and the check after
        this says so."""
        net = self._net()
        limit_ns = net.now_ns + 130 * S
        while net.now_ns < limit_ns:
            waiting = [e for proxy in net.proxies for e in proxy._streams.values()]
            if not waiting or any(e.endpoint is not None for e in waiting):
                return
            net.run_until(net.now_ns + S, self._serve_everything)
            self._serve_everything()

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
