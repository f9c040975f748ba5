"""The HTTP/1.1 lane (h1lane.py) against the event path it stands for: the same traffic, the same everything.

Two proxies get the same inputs: one as shipped, one with the lane closed (every byte through h11 events,
h1flows.py). Traffic is mostly the common case the lane takes (whole requests and responses in one read,
keep-alive, Content-Length bodies) mixed with what it must decline (chunked bodies, split reads, HEAD,
Connection: close, 1xx and 204 answers, pipelining, hostile bytes, oversized heads), with connects that fail,
timeouts that fire and writes acknowledged late. After every input the effects (with their bytes) and the
next deadline must be equal; at the end, the metrics and the balancer's view of every endpoint.

TETHER_H1LANE_EXAMPLES raises the example count for a longer local run.
"""

from __future__ import annotations

import os
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_h1fast import message

from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.effects import Connect, Effect, Send
from tether.core.proxy import Proxy
from tether.core.proxy.event_path import EventPathProxy

ENDPOINTS = [Address("10.0.0.1", 80), Address("10.0.0.2", 80)]
MS = 1_000_000
EXAMPLES = int(os.environ.get("TETHER_H1LANE_EXAMPLES", "300"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

COMMON_REQUESTS = [
    b"GET /index.html HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nTE: trailers\r\nKeep-Alive: 5\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /x HTTP/1.1\r\nhost:b\r\ncontent-length:0\r\nX-Tab:\tv\t\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET /big HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 960 + b"\r\n\r\n",  # near a 1 KiB head limit
    b"GET /big HTTP/1.1\r\nHost: a\r\nX-Big:" + b"b" * 990 + b"\r\n\r\n",
    b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 1100\r\n\r\n" + b"u" * 1100,  # over a 1 KiB buffer
]
COMMON_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/html\r\nContent-Length: 12\r\n"
    b"Connection: keep-alive\r\n\r\nhello world\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy",
    b"HTTP/1.1 404\r\nHost: odd\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nno",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nClose: named\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 950 + b"\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 200\r\nX-Big:" + b"b" * 990 + b"\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1100\r\n\r\n" + b"d" * 1100,
]


class LaneProxy(Proxy):
    """The proxy as shipped, counting what its lane took whole."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.whole_requests = self.whole_responses = 0

    def _lane_request_started(self, *args: Any) -> None:
        self.whole_requests += 1
        super()._lane_request_started(*args)  # type: ignore[arg-type]

    def _lane_respond(self, *args: Any) -> None:
        self.whole_responses += 1
        super()._lane_respond(*args)  # type: ignore[arg-type]


def _described(effect: Effect) -> Any:
    return (type(effect).__name__, effect.data) if type(effect) is Send else effect


class Run:
    """One proxy driven by a script of actions; ``log`` is everything it did, in order."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.now_ns = 1
        self.log: list[Any] = []
        self.unacked: dict[int, int] = {}
        self.connecting: list[int] = []
        self.upstreams: list[int] = []  # ids of endpoint connections, newest last
        self.closed: set[int] = set()
        self.ended: set[int] = set()  # peers that sent their EOF: TCP carries nothing after it
        self.client = proxy.accepted(self.now_ns)
        self._flush()

    def _flush(self) -> None:
        for effect in self.proxy.effects():
            self.log.append(_described(effect))
            if type(effect) is Connect:
                self.connecting.append(effect.conn_id)
            elif type(effect) is Send:
                self.unacked[effect.conn_id] = self.unacked.get(effect.conn_id, 0) + len(effect.data)
                if effect.conn_id in self.upstreams:  # the one written to last is the one that answers
                    self.upstreams.remove(effect.conn_id)
                    self.upstreams.append(effect.conn_id)
            elif hasattr(effect, "reset"):
                self.closed.add(effect.conn_id)
        self.log.append(("deadline", self.proxy.next_deadline_ns()))

    def act(self, action: tuple[Any, ...]) -> None:
        kind = action[0]
        proxy = self.proxy
        if kind == "client" and self.client not in self.closed and self.client not in self.ended:
            proxy.received(self.client, action[1], self.now_ns)
            if not action[1]:
                self.ended.add(self.client)
        elif kind == "connect" and self.connecting:
            conn_id = self.connecting.pop(0)
            if action[1]:
                proxy.connected(conn_id, self.now_ns)
                self.upstreams.append(conn_id)
            else:
                proxy.connect_failed(conn_id, "refused", self.now_ns)
        elif kind == "endpoint":
            live = [conn_id for conn_id in self.upstreams if conn_id not in self.closed]
            if live and live[-1] not in self.ended:
                proxy.received(live[-1], action[1], self.now_ns)
                if not action[1]:
                    self.ended.add(live[-1])
        elif kind == "ack":
            for conn_id, count in sorted(self.unacked.items()):
                proxy.sent(conn_id, count, self.now_ns)
            self.unacked.clear()
        elif kind == "advance":
            self.now_ns += action[1] * MS
            deadline = proxy.next_deadline_ns()
            if deadline is not None and deadline <= self.now_ns:
                proxy.on_timer(self.now_ns)
        self._flush()

    def outcome(self) -> Any:
        return self.log, proxy_outcome(self.proxy, self.now_ns)


def proxy_outcome(proxy: Proxy, now_ns: int) -> Any:
    """What a run leaves in a proxy besides its effects: the metrics and each balancer's view."""
    telemetry = proxy.telemetry
    balancers = {}
    for key, backend in sorted(proxy._backends.items()):
        balancer = backend.balancer
        balancers[key] = (
            balancer.stats,
            [
                (e, balancer.pending(e), balancer.endpoint_state(e), balancer.rtt_estimate_ns(e, now_ns))
                for e in balancer.endpoints()
            ],
        )
    return (
        telemetry.request_total,
        telemetry.response_total,
        telemetry.response_latency_ms,
        telemetry.tcp_open_total,
        telemetry.tcp_close_total,
        telemetry.tcp_open_connections,
        telemetry.tcp_read_bytes_total,
        telemetry.tcp_write_bytes_total,
        telemetry.tcp_connection_duration_ms,
        telemetry.services,
        balancers,
    )


def pieces(data: bytes, cut: int) -> list[bytes]:
    """``data`` whole (most often), or cut in two."""
    if cut <= 0 or cut >= len(data):
        return [data]
    return [data[:cut], data[cut:]]


@st.composite
def round_of_traffic(
    draw: st.DrawFn,
    *,
    answerer: str = "endpoint",
    before_answer: tuple[Any, ...] = ("ack",),
    before_answer_odds: int = 7,
) -> list[tuple[Any, ...]]:
    """One request's worth of actions: the request, maybe a connect, the response from ``answerer``,
    acknowledgements, time. One round in ``before_answer_odds`` puts ``before_answer`` between the request
    and the answer (here: the request written out first; test_meshlane.py: the client half-closes)."""
    common = draw(st.integers(0, 3)) > 0
    request = draw(st.sampled_from(COMMON_REQUESTS)) if common else draw(message(request=True))
    if draw(st.integers(0, 5)) == 0:  # a pipelined second request in the same read
        request += draw(st.sampled_from(COMMON_REQUESTS))
    cut = draw(st.integers(0, 40)) if draw(st.integers(0, 4)) == 0 else 0
    actions: list[tuple[Any, ...]] = [("client", piece) for piece in pieces(request, cut)]
    actions.append(("connect", draw(st.integers(0, 9)) > 0))
    if draw(st.integers(0, before_answer_odds - 1)) == 0:
        actions.append(before_answer)
    common = draw(st.integers(0, 3)) > 0
    response = draw(st.sampled_from(COMMON_RESPONSES)) if common else draw(message(request=False))
    cut = draw(st.integers(0, 40)) if draw(st.integers(0, 4)) == 0 else 0
    actions += [(answerer, piece) for piece in pieces(response, cut)]
    if draw(st.booleans()):
        actions.append(("ack",))
    advance = draw(st.sampled_from([0, 0, 0, 1, 5_000, 20_000, 70_000]))
    if advance:
        actions.append(("advance", advance))
    return actions


@SETTINGS
@given(
    rounds=st.lists(round_of_traffic(), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
    limits=st.sampled_from([(16 * 1024, 64 * 1024), (1024, 64 * 1024), (16 * 1024, 1024)]),
    ending=st.sampled_from([[], [("client", b"")], [("endpoint", b"")]]),
)
def test_lane_matches_the_event_path(
    rounds: list[list[tuple[Any, ...]]], seed: int, limits: tuple[int, int], ending: list[tuple[Any, ...]]
) -> None:
    max_header_bytes, max_buffered_bytes = limits
    config = ProxyConfig(max_header_bytes=max_header_bytes, max_buffered_bytes=max_buffered_bytes)
    runs = [
        Run(cls(config, StaticResolver(default=ENDPOINTS), random.Random(seed))) for cls in (LaneProxy, EventPathProxy)
    ]
    for action in [action for actions in rounds for action in actions] + ending + [("ack",)]:
        for run in runs:
            run.act(action)
        assert runs[0].log == runs[1].log, action
    assert runs[0].outcome() == runs[1].outcome()


def test_lane_takes_the_common_exchange_whole() -> None:
    """The point of the lane: a plain keep-alive exchange is one call each way, with the same bytes out."""
    config = ProxyConfig()
    runs = [
        Run(cls(config, StaticResolver(default=ENDPOINTS), random.Random(1))) for cls in (LaneProxy, EventPathProxy)
    ]
    for _ in range(3):
        for action in [("client", COMMON_REQUESTS[0]), ("connect", True), ("endpoint", COMMON_RESPONSES[0]), ("ack",)]:
            for run in runs:
                run.act(action)
    lane = runs[0].proxy
    assert isinstance(lane, LaneProxy)
    # A connection's first bytes pass protocol detection (tunnel.py), which hands a whole request to the lane.
    assert (lane.whole_requests, lane.whole_responses) == (3, 3)
    assert runs[0].outcome() == runs[1].outcome()
    forwarded = b"GET /index.html HTTP/1.1\r\nhost: bench\r\nuser-agent: wrk\r\naccept: */*\r\n\r\n"
    assert ("Send", forwarded) in runs[0].log
