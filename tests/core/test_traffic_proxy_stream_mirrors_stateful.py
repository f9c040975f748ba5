"""Stateful test of mirroring on HTTP/2 streams: the copies never touch what the client gets, nor hold it back.

One HTTP/2 client sends requests through a proxy whose route mirrors every request to ``shadow``. The
client uploads bodies (up to past the gate's body limit, with or without a content-length, sometimes with
trailers) as its window allows, and may reset a stream. The endpoint ``A`` answers each request once it
has it whole. The shadow's connections are accepted (in one example all generous, or all "stingy": a zero
stream window and never a WINDOW_UPDATE) or refused; a shadow answers (past the proxy's stream window, at
times), resets a stream or closes its connection. Time advances past the response timeout. The gate is the
default one or a small one (3 in flight, 8 KiB body, 4 KiB backlog).

The model is naive: per request, its path, body and trailers, and whether the client reset it. Checks:

1. after every step: the gate's tickets are exactly the proxy's live copies (a stream whose client
   connection does not exist), never more than the gate allows, each holding no more than the gate's
   backlog; the client never sees a byte or a header of a shadow's answer;
2. a copy the shadow received is a prefix of its request's body (whole, with the trailers, when ended);
3. liveness at teardown (every connect settled, every upload finished, the endpoint answering while ten
   virtual minutes pass): every request the client did not reset got the endpoint's answer, whatever the shadows did,
   and no copy, ticket or stream is left.
"""

from __future__ import annotations

from dataclasses import dataclass

from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError
from h2.settings import SettingCodes
from h2_peers import H2Peer, client_for
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tether.core.address import Address
from tether.core.config import S
from tether.core.discovery import StaticResolver
from tether.core.effects import Connect
from tether.core.proxy.routing import RoutesUpdated
from tether.core.traffic.faults import MirrorGate
from tether.core.traffic.route_config import load_route_yaml

A, SHADOW = Address("10.0.0.1", 80), Address("10.0.0.9", 80)
MIRROR = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow}, percent: 100}}]}]
"""
BODY_SIZES = [0, 10, 5_000, 6_000, 30_000, 70_000]
SHADOW_MARK = b"SHADOW"


@dataclass
class Request:
    stream: int
    path: bytes
    body: bytes
    trailers: bool
    sent: int = 0
    ended: bool = False
    reset: bool = False


class StreamMirrorMachine(RuleBasedStateMachine):
    def __init__(self, make_harness) -> None:
        super().__init__()
        self.make_harness = make_harness

    @initialize(seed=st.integers(0, 2**16), small_gate=st.booleans(), stingy=st.booleans())
    def start(self, seed: int, small_gate: bool, stingy: bool) -> None:
        resolver = StaticResolver(default=[A], by_host={"shadow": [SHADOW]})
        # No keepalive or idle closes in the way: the endpoint side of the story is kept simple on purpose.
        self.h = h = self.make_harness(resolver=resolver, idle_timeout_ns=3600 * S, h2_keepalive_interval_ns=3600 * S)
        h.proxy._rng.seed(seed)
        h.proxy.control(RoutesUpdated(routes=load_route_yaml(MIRROR, "m.yaml")), h.now_ns)
        if small_gate:
            h.proxy._mirror_gate = MirrorGate(max_in_flight=3, max_body_bytes=8192, max_unsent_bytes=4096)
        self.gate_max = h.proxy._mirror_gate.max_in_flight
        self.stingy = stingy  # how the shadow's connections go, when accepted
        self.client = client_for(h)
        self.requests: list[Request] = []
        self.settled: set[int] = set()  # connects handled
        self.primaries: dict[int, H2Peer] = {}
        self.shadows: dict[int, H2Peer] = {}
        self.answered: set[tuple[int, int]] = set()  # (connection, stream) the endpoint or a shadow answered
        self.shadow_unsent: dict[tuple[int, int], int] = {}  # a shadow's answer bytes its window holds back

    # ---------------------------------------------------------------- the client

    @precondition(lambda self: len(self.requests) < 12)
    @rule(
        size=st.sampled_from(BODY_SIZES),
        declared=st.booleans(),
        trailers=st.booleans(),
        grpc=st.booleans(),
        shadow=st.sampled_from(["later", "accepted", "refused"]),  # what becomes of a shadow connect, now
    )
    def open_request(self, size: int, declared: bool, trailers: bool, grpc: bool, shadow: str) -> None:
        path = f"/{len(self.requests)}".encode()
        extra = [(b"content-length", str(size).encode())] if declared else []
        extra += [(b"content-type", b"application/grpc")] if grpc else []
        body = bytes([len(self.requests) % 251]) * size
        stream = self.client.request(path.decode(), end=size == 0 and not trailers, extra=extra)
        self.requests.append(Request(stream, path, body, trailers, ended=size == 0 and not trailers))
        for connect in self._pending(A):  # the endpoint takes every connection at once
            self._settle_connect(connect, accept=True, stingy=False)
        for connect in self._pending(SHADOW) if shadow != "later" else []:
            self._settle_connect(connect, accept=shadow == "accepted", stingy=self.stingy)

    @precondition(lambda self: any(not r.ended and not r.reset for r in self.requests))
    @rule(data=st.data(), piece_bytes=st.sampled_from([1000, 16_384]))
    def upload(self, data: st.DataObject, piece_bytes: int) -> None:
        request = data.draw(st.sampled_from([r for r in self.requests if not r.ended and not r.reset]))
        self._upload(request, piece_bytes)
        self.client.read()  # the proxy's WINDOW_UPDATEs, and any answer

    def _upload(self, request: Request, piece_bytes: int = 16_384) -> None:
        client = self.client.h2
        try:
            while request.sent < len(request.body):
                window = min(client.local_flow_control_window(request.stream), piece_bytes)
                if window == 0:
                    return
                piece = request.body[request.sent : request.sent + window]
                request.sent += len(piece)
                last = request.sent == len(request.body) and not request.trailers
                client.send_data(request.stream, piece, end_stream=last)
                self.client.flush()
            if request.trailers:
                client.send_headers(request.stream, [(b"x-trailer", request.path)], end_stream=True)
            elif not request.body:
                client.end_stream(request.stream)
        except StreamClosedError:  # the proxy answered or reset it first
            request.reset = True
        else:
            self.client.flush()
        request.ended = True

    @precondition(lambda self: any(not r.reset for r in self.requests))
    @rule(data=st.data())
    def client_reset(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from([r for r in self.requests if not r.reset]))
        request.reset = True
        try:
            self.client.h2.reset_stream(request.stream, ErrorCodes.CANCEL)
        except StreamClosedError:
            return
        self.client.flush()

    # ---------------------------------------------------------------- connects

    def _pending(self, address: Address) -> list[Connect]:
        return [c for c in self.h.connects if c.address == address and c.conn_id not in self.settled]

    @precondition(lambda self: self._pending(SHADOW))
    @rule(accept=st.booleans())
    def settle_shadow_connect(self, accept: bool) -> None:
        self._settle_connect(self._pending(SHADOW)[0], accept=accept, stingy=self.stingy)

    def _settle_connect(self, connect: Connect, *, accept: bool, stingy: bool) -> None:
        self.settled.add(connect.conn_id)
        shadow = connect.address == SHADOW
        if not accept and shadow:
            self.h.proxy.connect_failed(connect.conn_id, "connection refused", self.h.now_ns)
            self.h.pump()
            return
        self.h.connected(connect.conn_id)
        peer = H2Peer(self.h, connect.conn_id, client=False, auto_ack=not (shadow and stingy))
        if shadow and stingy:
            peer.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
        (self.shadows if shadow else self.primaries)[connect.conn_id] = peer
        peer.flush()
        peer.read()

    # ---------------------------------------------------------------- the endpoint and the shadows

    @precondition(lambda self: self.requests)
    @rule()
    def endpoint_answers(self) -> None:
        for peer in list(self.primaries.values()):
            if peer.conn_id in self.h.closed:
                continue
            peer.read()
            for stream_id, stream in list(peer.streams.items()):
                if stream.ended and stream.reset is None and (peer.conn_id, stream_id) not in self.answered:
                    self.answered.add((peer.conn_id, stream_id))
                    headers = dict(stream.headers)
                    path = headers[b":path"]
                    # A gRPC answer carries its status: without one it is a failure, and seven in a row would
                    # eject the endpoint (a breaker's story, not this test's).
                    grpc = [(b"grpc-status", b"0")] if headers.get(b"content-type") == b"application/grpc" else []
                    peer.respond(stream_id, 200, b"endpoint:" + path, extra=[(b"x-path", path), *grpc])

    def _shadow_stream(self, data: st.DataObject) -> tuple[H2Peer, int] | None:
        """A shadow's stream it has not answered yet (None: there is none)."""
        for conn_id in [c for c in self.shadows if c in self.h.closed]:
            del self.shadows[conn_id]
        choices = []
        for conn_id, peer in sorted(self.shadows.items()):
            peer.read()
            for stream_id, stream in sorted(peer.streams.items()):
                if stream.reset is None and (conn_id, stream_id) not in self.answered:
                    choices.append((conn_id, stream_id))
        if not choices:
            return None
        conn_id, stream_id = data.draw(st.sampled_from(choices))
        self.answered.add((conn_id, stream_id))
        return self.shadows[conn_id], stream_id

    @precondition(lambda self: self.shadows)
    @rule(data=st.data(), size=st.sampled_from([600, 200_000]))  # 200,000: past the proxy's stream window
    def shadow_answers(self, data: st.DataObject, size: int) -> None:
        chosen = self._shadow_stream(data)
        if chosen is not None:
            peer, stream_id = chosen
            peer.h2.send_headers(stream_id, [(b":status", b"503"), (b"x-shadow", b"1")])
            self.shadow_unsent[(peer.conn_id, stream_id)] = size
            self._push(peer)

    @precondition(lambda self: self.shadows)
    @rule(data=st.data())
    def shadow_resets(self, data: st.DataObject) -> None:
        chosen = self._shadow_stream(data)
        if chosen is not None:
            peer, stream_id = chosen
            peer.h2.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)
            peer.flush()

    @precondition(lambda self: self.shadows)
    @rule(data=st.data())
    def shadow_closes(self, data: st.DataObject) -> None:
        conn_id = data.draw(st.sampled_from(sorted(self.shadows)))
        del self.shadows[conn_id]
        if conn_id not in self.h.closed:
            self.h.recv(conn_id, b"")

    @precondition(lambda self: self.shadow_unsent)
    @rule()
    def shadow_pushes(self) -> None:
        for conn_id, peer in list(self.shadows.items()):
            if conn_id not in self.h.closed:
                peer.read()  # the proxy's WINDOW_UPDATEs
                self._push(peer)

    def _push(self, peer: H2Peer) -> None:
        """The shadow sends what the proxy's windows let it of its answers."""
        for (conn_id, stream_id), left in list(self.shadow_unsent.items()):
            if conn_id != peer.conn_id:
                continue
            try:
                while left:
                    window = min(peer.h2.local_flow_control_window(stream_id), peer.h2.max_outbound_frame_size, left)
                    if window <= 0:
                        break
                    left -= window
                    piece = (SHADOW_MARK * (window // len(SHADOW_MARK) + 1))[:window]
                    peer.h2.send_data(stream_id, piece, end_stream=left == 0)
            except StreamClosedError:  # the proxy reset it
                left = 0
            self.shadow_unsent[(conn_id, stream_id)] = left
            if not left:
                del self.shadow_unsent[(conn_id, stream_id)]
        peer.flush()

    @precondition(lambda self: self.requests)
    @rule(seconds=st.sampled_from([0.001, 0.5, 11.0]))
    def advance(self, seconds: float) -> None:
        for _round in range(5):  # the endpoint answers what it has whole before the clock moves
            self.client.read()
            self.endpoint_answers()
        self.h.advance(seconds)

    # ---------------------------------------------------------------- checks

    @invariant()
    def tickets_are_the_live_copies(self) -> None:
        if not hasattr(self, "h"):
            return
        proxy = self.h.proxy
        copies = {i for i, s in proxy._streams.items() if s.source_id not in proxy._downstream and not s.done}
        assert set(proxy._mirror_tickets) == copies
        assert proxy._mirror_gate.in_flight == len(copies) <= self.gate_max
        for copy_id in copies:  # what the proxy holds for a shadow stays within the gate's backlog
            assert proxy._sink_queued(proxy._streams[copy_id]) <= proxy._mirror_gate.max_unsent_bytes

    @invariant()
    def the_client_never_sees_the_shadow(self) -> None:
        if not hasattr(self, "h"):
            return
        for stream in self.client.streams.values():
            assert SHADOW_MARK not in bytes(stream.data) and b"x-shadow" not in dict(stream.headers)

    @invariant()
    def copies_carry_their_request(self) -> None:
        if not hasattr(self, "h"):
            return
        by_path = {r.path: r for r in self.requests}
        for peer in self.shadows.values():
            for stream in peer.streams.values():
                if not stream.headers:
                    continue
                request = by_path[dict(stream.headers)[b":path"]]
                assert request.body.startswith(bytes(stream.data))
                if stream.ended:
                    assert bytes(stream.data) == request.body
                    assert stream.trailers == ([(b"x-trailer", request.path)] if request.trailers else [])

    def teardown(self) -> None:
        if not hasattr(self, "h"):
            return
        h = self.h
        # The endpoint keeps answering while time moves (a request may wait for a connection, or a timer).
        for step_s in [0.001] * 50 + [1.0] * 15 + [600.0]:
            for connect in [*self._pending(A), *self._pending(SHADOW)]:
                self._settle_connect(connect, accept=True, stingy=self.stingy)
            for request in self.requests:
                if not request.ended and not request.reset:
                    self._upload(request)
            self.endpoint_answers()
            for peer in list(self.shadows.values()):
                if peer.conn_id not in h.closed:
                    peer.read()
                    self._push(peer)
            self.client.read()
            h.advance(step_s)
            if all(r.reset or r.ended for r in self.requests) and self._all_answered() and not self.shadow_unsent:
                break
        h.advance(600.0)
        self.client.read()
        assert self._all_answered()
        live = {key for key in self.shadow_unsent if key[0] not in h.closed}
        assert not live, f"the proxy stopped taking a shadow's answer: {live}"
        proxy = h.proxy
        assert proxy._mirror_tickets == {} and proxy._mirror_gate.in_flight == 0 and proxy._streams == {}

    def _all_answered(self) -> bool:
        for request in self.requests:
            if request.reset:
                continue
            stream = self.client.streams.get(request.stream)
            if stream is None or not stream.ended:
                return False
            assert stream.reset is None, request
            assert bytes(stream.data) == b"endpoint:" + request.path, (request, bytes(stream.data))
        return True


def test_stream_mirrors_never_reach_or_hold_back_the_client(make_harness) -> None:
    run_state_machine_as_test(
        lambda: StreamMirrorMachine(make_harness),
        settings=settings(
            max_examples=100, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
        ),
    )
