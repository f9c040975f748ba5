"""Stateful tests of the proxy's HTTP/2 handling: Hypothesis is the driver, every client and every endpoint.

``H2ProxyMachine`` puts h2 clients in front of one ``Proxy`` and h2 endpoints behind it. Clients open streams
(GET, POST with bodies up to ~200 KiB so windows matter, gRPC-shaped requests with trailers), over the proxy's
MAX_CONCURRENT_STREAMS before they have read it, hold a request open or end it later (with trailers), reset
streams, withhold WINDOW_UPDATEs and release them, change SETTINGS_INITIAL_WINDOW_SIZE, say GOAWAY, and close
or reset their connections. Endpoints accept or refuse connects, answer (status, body, trailers, grpc-status,
a 103 first, a trailers-only gRPC answer) at any point of the request, even before its body ended (then
sometimes reset the stream with NO_ERROR, as RFC 9113 section 8.1 has it), reset streams, send GOAWAY (letting
through every stream or only some), do what clients do with windows, and close or reset their connections.
The driver (h2_stateful_support.py) delivers bytes in random pieces and in any interleaving of connections, only
while the proxy reads a connection; it acknowledges writes at once or only when a rule says so; time advances
past every timeout; the proxy may be shut down. Half the examples are "chaos" ones (resets, closes, GOAWAYs).

``MeshedMachine`` (tests/core/test_h2_meshed_stateful.py) runs the meshed path: HTTP/1.1 clients of a meshed
service through an outbound proxy, whose HTTP/2 connection (with its transport header) is the inbound proxy's
client connection, whose endpoints are HTTP/1.1 workloads (which may answer early or die mid-response).

The model is naive: a record per request, with the body the client sent, what the endpoint received, what
it answered and what the client got. Every request carries its id in ``:path`` and ``x-request-id``, the
endpoint echoes it, and every reset carries a code unique to its request (0x1000 + n from the client,
0x2000 + n from the endpoint). Checks, after every event or step:

1. the proxy never raises and never names a closed connection in an effect; ``open_connections`` and every
   connection's ``unsent_bytes`` are what the driver holds; the peers never see invalid HTTP/2 or HTTP/1.1,
   and the proxy never logs that a peer broke the protocol;
2. a response reaches only the client that asked (echoed id), with the endpoint's status, and a completed
   response is byte for byte the endpoint's body and trailers (a cut one is never completed); request bodies
   and trailers reach the endpoint byte for byte; a request reaches one endpoint stream, or two when the
   first is beyond its endpoint's GOAWAY (a replay, RFC 9113 section 6.8), and then no body went to the first;
3. a reset with a request's unique code reaches only that request's other side; a NO_ERROR reset only follows
   a complete response; a proxy error has a proxy status (a gRPC one is a trailers-only 200 with grpc-status);
   an HTTP/1.1 client gets a FIN without a response only if its request head had not reached the proxy;
4. once the RST_STREAM of a client (or an endpoint) reached the proxy, the proxy writes no DATA or HEADERS on
   that stream; once an endpoint's GOAWAY reached it, the proxy opens no stream on that connection;
5. bounds (below), after every step;
6. liveness, at teardown: once every connect is accepted, every endpoint answers, every client ends its
   uploads, every WINDOW_UPDATE is released and every write acknowledged, every client stream has ended (a
   complete response, or a reset, or its connection closed), every endpoint stream it opened is closed,
   ``proxy._streams`` is empty and no session queues data; after ten more virtual minutes every connection
   is closed.

Bounds
------
An unacknowledged byte has not reached the peer, so the peer cannot have reopened the window it used: the
DATA payload the proxy holds unsent on a connection is at most the peer's current receive window (for the
meshed hop, the receiving proxy's configured connection window). The proxy stops reading an HTTP/2
connection whose unsent bytes reach ``max_buffered_bytes`` (``_sync_h2_reading``), so past that point it
only adds frames that other connections cause: per stream a head, trailers and a reset (<= 1 KiB here), a
9-byte header per DATA frame, connection WINDOW_UPDATEs for bytes it took in before, and the replies to the
one piece it read after it crossed the limit (4 KiB). For an HTTP/1.1 connection fed by an HTTP/2 stream the
proxy acknowledges that stream only while the connection holds less than ``max_buffered_bytes``, so it holds
at most that plus one stream window (plus heads and chunk framing, 8 KiB). Inside the proxy, per exchange:
what waits for the sink is at most what the HTTP/2 source sent unacknowledged, which is at most the stream
window the proxy advertised (for an HTTP/1.1 source: ``max_buffered_bytes`` plus the last piece read); the
sum per connection is at most the connection window; and any stream's send queue is at most a stream window
(or ``max_buffered_bytes`` plus a piece, when an HTTP/1.1 endpoint fills it).

Bugs found are reproduced in tests/core/test_h2_regressions.py. ``TETHER_H2_STATEFUL_EXAMPLES`` multiplies
the number of examples (bug hunting: ``TETHER_H2_STATEFUL_EXAMPLES=20``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import h2.events
from h2.errors import ErrorCodes
from h2_peer_support import (
    H2Peer,
    Outgoing,
    body_bytes,
)
from h2_stateful_support import (
    CHUNKS,
    CLIENT_CODES,
    ENDPOINT_CODES,
    EXAMPLES,
    LIMITS,
    MAX_REQUESTS,
    PROXY_ERROR_STATUSES,
    SIZES,
    TIMEOUTS,
    Net,
    NetMachine,
    pick_one,
    step,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule

from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.proxy import Proxy

ENDPOINTS = (Address("10.0.0.1", 80), Address("10.0.0.2", 80))
# What the proxy itself may reset a client's stream with: REFUSED_STREAM after its GOAWAY, INTERNAL_ERROR
# when the endpoint's connection broke mid-response, NO_ERROR after a complete response (checked apart).
PROXY_RESET_CODES = frozenset({ErrorCodes.NO_ERROR, ErrorCodes.REFUSED_STREAM, ErrorCodes.INTERNAL_ERROR})
# What the proxy may reset an endpoint's stream with when the client's side went away or failed.
PROXY_UPSTREAM_RESET_CODES = frozenset({ErrorCodes.NO_ERROR, ErrorCodes.CANCEL, ErrorCodes.INTERNAL_ERROR})


@dataclass(eq=False)
class Request:
    """One HTTP/2 request and what each side saw of it."""

    number: int
    kind: str  # GET, POST or GRPC
    client: H2Peer
    stream_id: int
    body: bytes
    trailers: list[tuple[bytes, bytes]] | None
    held: bool  # the client keeps the request open until client_finishes
    ended: bool = False  # the client wrote its end
    client_reset: int | None = None
    # the client's view of the response
    head: dict[bytes, bytes] | None = None
    proxy_error: bool = False
    data: bytearray = field(default_factory=bytearray)
    response_trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    complete: bool = False
    reset: int | None = None
    # the endpoint's view
    endpoint: H2Peer | None = None
    upstream_stream: int | None = None
    upstream_body: bytearray = field(default_factory=bytearray)
    upstream_trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    upstream_reset: int | None = None
    upstream_ended: bool = False
    refused: bool = False  # beyond the endpoint's GOAWAY: it never processes the request
    # the endpoint's answer
    status: int | None = None
    answer_body: bytes = b""
    answer_trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    answered: bool = False  # the endpoint wrote the end of its response
    endpoint_reset: int | None = None

    @property
    def rid(self) -> str:
        return f"r{self.number}"

    @property
    def finished(self) -> bool:
        return self.complete or self.reset is not None or self.client_reset is not None or self.client.gone


# ---------------------------------------------------------------------------------------------------------
# HTTP/2 clients, one proxy, HTTP/2 endpoints


class H2ProxyMachine(NetMachine):
    def __init__(self) -> None:
        super().__init__()
        self.config: ProxyConfig | None = None
        self.clients: list[H2Peer] = []
        self.endpoints: list[H2Peer] = []
        self.requests: dict[str, Request] = {}
        self.by_client: dict[tuple[H2Peer, int], Request] = {}
        self.by_endpoint: dict[tuple[H2Peer, int], Request] = {}
        self.refused_streams: set[tuple[H2Peer, int]] = set()  # beyond their endpoint's GOAWAY
        self.client_window = self.endpoint_window = 65_535
        self.chaos = False  # resets, closes and GOAWAYs happen (half the examples, so the rest get deep)
        self.eager = False  # endpoints answer on their own as requests arrive (sometimes before the body ended)
        self.shutdown_after: int | None = None

    @initialize(
        seed=st.integers(0, 2**32 - 1),
        limits=st.sampled_from(sorted(LIMITS)),
        max_streams=st.sampled_from([2, 100]),
        pool=st.sampled_from([(1, 1), (2, 100), (256, 100)]),
        auto_ack=st.booleans(),
        protocol=st.sampled_from(["http1", "detect"]),
        windows=st.sampled_from([(65_535, 65_535), (1 << 20, 65_535), (65_535, 1 << 20)]),
        chaos=st.booleans(),
        eager=st.booleans(),
        shutdown_after=st.sampled_from([None, None, 2, 6]),
    )
    @step
    def start(
        self,
        seed: int,
        limits: str,
        max_streams: int,
        pool: tuple[int, int],
        auto_ack: bool,
        protocol: str,
        windows: tuple[int, int],
        chaos: bool,
        eager: bool,
        shutdown_after: int | None,
    ) -> None:
        """``pool``: connections per endpoint and waiters; ``windows``: the connection windows that clients and
        endpoints advertise (h2's 64 KiB default, or 1 MiB); ``shutdown_after``: the shutdown rule is enabled
        once this many requests were sent (None: never)."""
        self.chaos, self.eager, self.shutdown_after = chaos, eager, shutdown_after
        self.config = ProxyConfig(
            **TIMEOUTS,
            **LIMITS[limits],
            h2_max_concurrent_streams=max_streams,
            pool_max_connections_per_endpoint=pool[0],
            pool_max_waiters_per_endpoint=pool[1],
            protocol=protocol,
        )
        self.client_window, self.endpoint_window = windows
        self.net = Net(random.Random(seed), auto_ack=auto_ack)
        self.net.add_proxy(Proxy(self.config, StaticResolver(default=list(ENDPOINTS)), random.Random(seed)))
        self._open_client()

    def _proxy(self) -> Proxy:
        return self._net().proxies[0]

    # ------------------------------------------------------------------ clients

    @precondition(lambda self: sum(not c.gone for c in self.clients) < 3 and len(self.clients) < 8)
    @rule()
    @step
    def open_client(self) -> None:
        self._open_client()

    def _open_client(self) -> None:
        conn = self._net().accept(0, h2=True)
        self.clients.append(
            H2Peer(self._net(), conn, client=True, on_event=self._client_event, window=self.client_window)
        )
        self._net().drain()
        # The preface goes in at once: a client that says nothing for the detect timeout is not HTTP/2.
        self._net().deliver(conn, len(conn.outbox))

    def _usable_clients(self) -> list[H2Peer]:
        assert self.config is not None
        # A client keeps to the MAX_CONCURRENT_STREAMS it knows, which is unlimited until it has read the proxy's
        # SETTINGS: it may open streams over the proxy's limit, and the proxy must refuse just those.
        return [
            c
            for c in self.clients
            if c.writable
            and not c.goaway_received
            and c.goaway_sent is None
            and c.h2.open_outbound_streams < min(c.h2.remote_settings.max_concurrent_streams, 4)
        ]

    @precondition(lambda self: len(self.requests) < MAX_REQUESTS and bool(self._usable_clients()))
    @rule(
        pick=st.integers(0, 63),
        kind=st.sampled_from(["GET", "POST", "POST", "GRPC"]),
        size=SIZES,
        chunk=CHUNKS,
        held=st.sampled_from([False, False, True]),
        with_trailers=st.booleans(),
        deliver_now=st.booleans(),
    )
    @step
    def open_stream(
        self, pick: int, kind: str, size: int, chunk: int, held: bool, with_trailers: bool, deliver_now: bool
    ) -> None:
        client = pick_one(self._usable_clients(), pick)
        number = len(self.requests) + 1
        body = b"" if kind == "GET" else body_bytes(number, size)
        trailers = [(b"x-request-trailer", f"r{number}".encode())] if with_trailers and kind != "GET" else None
        headers = [
            (b":method", b"GET" if kind == "GET" else b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"svc"),
            (b":path", f"/r/{number}".encode()),
            (b"x-request-id", f"r{number}".encode()),
        ]
        if kind == "GRPC":
            headers += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
        record = Request(number, kind, client, 0, body, trailers, held)
        self.requests[record.rid] = record
        outgoing = Outgoing(bytearray(body), chunk, not held, None if held else trailers, on_end=lambda: _ended(record))
        record.stream_id = client.open_stream(headers, outgoing)
        self.by_client[(client, record.stream_id)] = record
        if deliver_now:
            self._net().deliver(client.conn, len(client.conn.outbox))

    def _held(self) -> list[Request]:
        return [
            r
            for r in self.requests.values()
            if r.held
            and not r.ended
            and r.client.writable
            and r.stream_id in r.client.sendq
            and r.client.can_send(r.stream_id)
        ]

    @precondition(lambda self: bool(self._held()))
    @rule(pick=st.integers(0, 63))
    @step
    def client_finishes(self, pick: int) -> None:
        """A client ends a request it held open (with its trailers, if it has any)."""
        record = pick_one(self._held(), pick)
        record.client.finish(record.stream_id, record.trailers)

    def _resettable(self) -> list[Request]:
        return [
            r
            for r in self.requests.values()
            if not r.finished and r.client.writable and r.client.stream_open(r.stream_id)
        ]

    @precondition(lambda self: self.chaos and bool(self._resettable()))
    @rule(pick=st.integers(0, 63))
    @step
    def client_resets_stream(self, pick: int) -> None:
        record = pick_one(self._resettable(), pick)
        record.client_reset = CLIENT_CODES + record.number
        record.client.reset(record.stream_id, record.client_reset)

    def _h2_peers(self) -> list[H2Peer]:
        return [peer for peer in [*self.clients, *self.endpoints] if not peer.gone]

    @precondition(lambda self: self.chaos and bool(self._h2_peers()))
    @rule(pick=st.integers(0, 63), reset=st.sampled_from([False, True, True]))
    @step
    def peer_closes(self, pick: int, reset: bool) -> None:
        """A client or an endpoint half-closes (EOF after what it queued) or resets its connection."""
        pick_one(self._h2_peers(), pick).close(reset)

    @precondition(lambda self: bool(self._h2_peers()))
    @rule(pick=st.integers(0, 63), withhold=st.booleans())
    @step
    def peer_window_updates(self, pick: int, withhold: bool) -> None:
        """A peer stops acknowledging the DATA it receives (the proxy's windows close), or acknowledges all it
        withheld and goes back to acknowledging at once."""
        peers = [peer for peer in self._h2_peers() if peer.withhold != withhold]
        if peers:
            peer = pick_one(peers, pick)
            if withhold:
                peer.withhold = True
            else:
                peer.release()

    # ------------------------------------------------------------------ endpoints

    @precondition(lambda self: self.net is not None and bool(self.net.dialing))
    @rule(pick=st.integers(0, 63), succeed=st.sampled_from([True, True, True, False]))
    @step
    def answer_connect(self, pick: int, succeed: bool) -> None:
        net = self._net()
        key = pick_one(sorted(net.dialing), pick)
        assert net.dialing[key] in ENDPOINTS, net.dialing[key]
        if succeed:
            self._accept_connect(key)
        else:
            net.connect_failed(key)

    def _accept_connect(self, key: tuple[int, int]) -> None:
        net = self._net()
        conn = net.connected(key, h2=True)
        self.endpoints.append(
            H2Peer(net, conn, client=False, on_event=self._endpoint_event, window=self.endpoint_window)
        )
        net.open_connection(conn)

    def _answerable(self) -> list[Request]:
        return [
            r
            for r in self.requests.values()
            if r.endpoint is not None
            and r.endpoint.writable
            and not (r.refused or r.status is not None)
            and r.endpoint.can_send(r.upstream_stream or 0)
        ]

    @precondition(lambda self: bool(self._answerable()))
    @rule(
        pick=st.integers(0, 63),
        status=st.sampled_from([200, 200, 404, 500, 503]),
        size=SIZES,
        chunk=CHUNKS,
        trailers=st.sampled_from(["none", "some", "grpc-fail", "trailers-only"]),
        informational=st.sampled_from([False, False, True]),
        reset_after=st.booleans(),
    )
    @step
    def endpoint_answers(
        self, pick: int, status: int, size: int, chunk: int, trailers: str, informational: bool, reset_after: bool
    ) -> None:
        """An endpoint answers one request it received, whether or not the request body has ended."""
        self._answer(pick_one(self._answerable(), pick), status, size, chunk, trailers, informational, reset_after)

    def _answer(
        self,
        record: Request,
        status: int,
        size: int,
        chunk: int,
        trailers: str,
        informational: bool,
        reset_after: bool,
    ) -> None:
        endpoint, rid = record.endpoint, record.rid.encode()
        assert endpoint is not None and record.upstream_stream is not None
        headers = [(b":status", str(status).encode()), (b"x-request-id", rid), (b"x-app", b"1")]
        body = body_bytes(ENDPOINT_CODES + record.number, size)
        answer_trailers = [(b"x-trailer", rid)] if trailers != "none" else []
        if record.kind == "GRPC":
            headers[0] = (b":status", b"200")
            headers.append((b"content-type", b"application/grpc"))
            code = b"14" if trailers in ("grpc-fail", "trailers-only") else b"0"
            if trailers == "trailers-only":
                headers.append((b"grpc-status", code))
                body, answer_trailers = b"", []
            else:
                answer_trailers = [(b"grpc-status", code), (b"x-trailer", rid)]
        record.status = int(headers[0][1])
        record.answer_body, record.answer_trailers = body, answer_trailers
        outgoing = Outgoing(
            bytearray(body), chunk, True, answer_trailers or None, reset_after, lambda: _answered(record)
        )
        endpoint.answer(record.upstream_stream, headers, outgoing, informational)

    def _endpoint_resettable(self) -> list[Request]:
        return [
            r
            for r in self.requests.values()
            if r.endpoint is not None
            and r.endpoint.writable
            and not (r.refused or r.endpoint_reset is not None)
            and r.endpoint.stream_open(r.upstream_stream or 0)
        ]

    @precondition(lambda self: self.chaos and bool(self._endpoint_resettable()))
    @rule(pick=st.integers(0, 63))
    @step
    def endpoint_resets_stream(self, pick: int) -> None:
        record = pick_one(self._endpoint_resettable(), pick)
        assert record.endpoint is not None and record.upstream_stream is not None
        record.endpoint_reset = ENDPOINT_CODES + record.number
        record.endpoint.reset(record.upstream_stream, record.endpoint_reset)

    def _live_endpoints(self) -> list[H2Peer]:
        return [e for e in self.endpoints if e.writable]

    @precondition(lambda self: self.chaos and any(e.goaway_sent is None for e in self._live_endpoints()))
    @rule(pick=st.integers(0, 63), depth=st.sampled_from([0, 0, 1, 2]))
    @step
    def endpoint_sends_goaway(self, pick: int, depth: int) -> None:
        """GOAWAY letting through every stream the endpoint saw, or (``depth``) not the latest few of those it
        has not touched yet; it never processes those, and the proxy must fail them."""
        endpoint = pick_one([e for e in self._live_endpoints() if e.goaway_sent is None], pick)
        mine = [r for r in self.requests.values() if r.endpoint is endpoint]
        touched = [r.upstream_stream or 0 for r in mine if r.status is not None or r.endpoint_reset is not None]
        low = max(touched, default=0)
        candidates = [s for s in [0, *sorted(r.upstream_stream or 0 for r in mine)] if s >= low]
        last = candidates[max(0, len(candidates) - 1 - depth)]
        for record in mine:
            if (record.upstream_stream or 0) > last:
                record.refused = True
                self.refused_streams.add((endpoint, record.upstream_stream or 0))
        endpoint.goaway(last)

    @precondition(lambda self: self.chaos and any(c.writable and c.goaway_sent is None for c in self.clients))
    @rule(pick=st.integers(0, 63))
    @step
    def client_sends_goaway(self, pick: int) -> None:
        """The client is done with the connection: the proxy finishes its streams, then closes it."""
        pick_one([c for c in self.clients if c.writable and c.goaway_sent is None], pick).goaway(0)

    @precondition(lambda self: bool(self._h2_peers()))
    @rule(pick=st.integers(0, 63), size=st.sampled_from([16_384, 65_535, 200_000]))
    @step
    def peer_resizes_stream_windows(self, pick: int, size: int) -> None:
        """A peer changes SETTINGS_INITIAL_WINDOW_SIZE: the proxy's send windows shrink (below zero, maybe) or
        grow, and what waited on them must go out once they allow."""
        peer = pick_one(self._h2_peers(), pick)
        if peer.writable and not peer.settings_unacked:
            peer.resize_stream_windows(size)

    # ------------------------------------------------------------------ shutdown

    @precondition(
        lambda self: (
            not self.shut_down and self.shutdown_after is not None and len(self.requests) >= self.shutdown_after
        )
    )
    @rule()
    @step
    def shutdown(self) -> None:
        self.shut_down.add(0)
        self._proxy().shutdown(self._net().now_ns)
        self._net().drain()

    # ------------------------------------------------------------------ the client's view

    def _client_event(self, client: H2Peer, event: h2.events.Event) -> None:
        stream_id = getattr(event, "stream_id", 0)
        if not stream_id or isinstance(event, h2.events.WindowUpdated):
            return
        record = self.by_client.get((client, stream_id))
        assert record is not None, f"{client.name}: {event!r} on a stream it never opened"
        assert record.client_reset is None, f"{record.rid}: {event!r} after the client reset the stream"
        if isinstance(event, h2.events.ResponseReceived):
            self._check_response_head(record, dict(event.headers))
        elif isinstance(event, h2.events.InformationalResponseReceived):
            assert dict(event.headers).get(b"x-request-id") == record.rid.encode(), (record.rid, event.headers)
        elif isinstance(event, h2.events.DataReceived):
            assert record.head is not None and not record.complete, (record.rid, event)
            record.data += event.data
            if not record.proxy_error:
                assert record.answer_body.startswith(record.data), f"{record.rid}: response body differs"
        elif isinstance(event, h2.events.TrailersReceived):
            record.response_trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            self._check_response_complete(record)
        elif isinstance(event, h2.events.StreamReset):
            self._check_client_stream_reset(record, event.error_code)
        else:
            raise AssertionError(f"{record.rid}: unexpected {event!r}")

    def _check_response_head(self, record: Request, head: dict[bytes, bytes]) -> None:
        assert record.head is None, (record.rid, head)
        record.head = head
        status = int(head[b":status"])
        if b"l5d-proxy-error" in head:
            record.proxy_error = True
            if record.kind == "GRPC":
                assert status == 200 and head.get(b"grpc-status", b"0") != b"0", (record.rid, head)
            else:
                assert status in PROXY_ERROR_STATUSES, (record.rid, head)
            return
        echoed = head.get(b"x-request-id")
        assert echoed == record.rid.encode(), f"{record.rid} got the response to {echoed!r}"
        assert record.status == status, (record.rid, record.status, status)

    def _check_response_complete(self, record: Request) -> None:
        assert record.head is not None, record.rid
        record.complete = True
        if record.proxy_error:
            assert record.kind == "GRPC" or bytes(record.data).endswith(b"\n"), (record.rid, bytes(record.data))
            return
        assert record.answered, f"{record.rid}: complete at the client before the endpoint ended it"
        assert bytes(record.data) == record.answer_body, (
            f"{record.rid}: response body differs ({len(record.data)} bytes received, {len(record.answer_body)} sent)"
        )
        assert record.response_trailers == record.answer_trailers, (record.rid, record.response_trailers)

    def _check_client_stream_reset(self, record: Request, code: int) -> None:
        record.reset = code
        if code >= ENDPOINT_CODES:
            assert record.endpoint_reset == code, f"{record.rid} reset with {code:#x}, another request's code"
        elif code == ErrorCodes.NO_ERROR:
            assert record.complete, f"{record.rid}: reset with NO_ERROR before its response was complete"
        else:
            assert code in PROXY_RESET_CODES, (record.rid, code)

    # ------------------------------------------------------------------ the endpoint's view

    def _endpoint_event(self, endpoint: H2Peer, event: h2.events.Event) -> None:
        stream_id = getattr(event, "stream_id", 0)
        if not stream_id or isinstance(event, h2.events.WindowUpdated):
            return
        if isinstance(event, h2.events.RequestReceived):
            self._check_request_head(endpoint, stream_id, dict(event.headers))
            return
        record = self.by_endpoint.get((endpoint, stream_id))
        assert record is not None, f"{endpoint.name}: {event!r} on a stream nobody opened"
        if (endpoint, stream_id) != (record.endpoint, record.upstream_stream):
            # A stream the proxy replayed elsewhere: it may only end or be reset, carrying no body.
            empty = isinstance(event, h2.events.DataReceived) and not event.data  # an END_STREAM of its own
            ends = (h2.events.StreamEnded, h2.events.StreamReset, h2.events.TrailersReceived)
            assert empty or isinstance(event, ends), (record.rid, event)
            assert not isinstance(event, h2.events.StreamEnded) or not record.body, (record.rid, event)
            return
        if isinstance(event, h2.events.DataReceived):
            record.upstream_body += event.data
            assert record.body.startswith(record.upstream_body), f"{record.rid}: request body differs"
        elif isinstance(event, h2.events.TrailersReceived):
            record.upstream_trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            record.upstream_ended = True
            assert record.ended, f"{record.rid}: ended at the endpoint before the client ended it"
            assert bytes(record.upstream_body) == record.body, f"{record.rid}: request body differs"
            assert record.upstream_trailers == (record.trailers or []), (record.rid, record.upstream_trailers)
            if self.eager:
                self._answer_at_random(record)
        elif isinstance(event, h2.events.StreamReset):
            record.upstream_reset = event.error_code
            if event.error_code >= CLIENT_CODES:
                assert record.client_reset == event.error_code, f"{record.rid}: reset with another's code"
            elif event.error_code == ErrorCodes.NO_ERROR:
                assert record.answered, f"{record.rid}: the proxy reset NO_ERROR before the response ended"
            else:
                assert event.error_code in PROXY_UPSTREAM_RESET_CODES, (record.rid, event.error_code)
        else:
            raise AssertionError(f"{record.rid}: unexpected {event!r}")

    def _check_request_head(self, endpoint: H2Peer, stream_id: int, head: dict[bytes, bytes]) -> None:
        rid = head.get(b"x-request-id", b"").decode()
        record = self.requests.get(rid)
        assert record is not None, f"{endpoint.name} got a request no client sent: {head}"
        assert head[b":path"] == f"/r/{record.number}".encode() and head[b":authority"] == b"svc", head
        assert head[b":method"] == (b"GET" if record.kind == "GET" else b"POST"), head
        assert b"l5d-orig-proto" not in head, head
        if record.kind == "GRPC":
            assert head.get(b"content-type") == b"application/grpc" and head.get(b"te") == b"trailers", head
        refused = endpoint.goaway_sent is not None and stream_id > endpoint.goaway_sent
        self.by_endpoint[(endpoint, stream_id)] = record
        if refused:
            self.refused_streams.add((endpoint, stream_id))
        if record.endpoint is not None:
            # RFC 9113 section 6.8 lets the proxy replay a stream beyond an endpoint's GOAWAY elsewhere, which it
            # does while none of the body left (it keeps no body bytes). Both copies ride different connections
            # and may arrive in either order, but one of them is beyond its endpoint's GOAWAY.
            assert refused or record.refused, f"{rid} reached two endpoint streams"
            if refused:
                return  # the copy its endpoint never processes, which carries no body (checked per event)
            assert not record.upstream_body, f"{rid} replayed after {len(record.upstream_body)} body bytes left"
            record.upstream_trailers = []
        record.endpoint, record.upstream_stream, record.refused = endpoint, stream_id, refused
        if self.eager and self._net().rng.random() < 0.2:
            self._answer_at_random(record)  # before the request body (if any) ended

    def _answer_at_random(self, record: Request) -> None:
        if record in self._answerable():
            rng = self._net().rng
            size = rng.choice([0, 10, 3000, 100_000])
            trailers = rng.choice(["none", "some", "grpc-fail", "trailers-only"])
            self._answer(record, rng.choice([200, 404, 503]), size, rng.choice([700, 16_384]), trailers, False, False)

    # ------------------------------------------------------------------ teardown

    def _serve_round(self) -> bool:
        net = self._net()
        moved = False
        for peer in self._h2_peers():
            if peer.withhold or peer.owed:
                peer.release()
                moved = True
        for key in sorted(net.dialing):
            self._accept_connect(key)
            moved = True
        for record in self._held():
            record.client.finish(record.stream_id, record.trailers)
            moved = True
        for record in self._answerable():
            self._answer_at_random(record)
            moved = True
        return moved

    def _check_quiescent(self) -> None:
        super()._check_quiescent()
        for record in self.requests.values():
            assert record.finished, f"{record.rid}: its stream never ended ({record})"
        for endpoint in self.endpoints:
            for stream_id, stream in endpoint.h2.streams.items():
                record = self.by_endpoint[(endpoint, stream_id)]
                refused = (endpoint, stream_id) in self.refused_streams
                assert endpoint.gone or refused or stream.closed, f"{record.rid}: endpoint stream still open"


def _ended(record: Request) -> None:
    record.ended = True


def _answered(record: Request) -> None:
    record.answered = True


H2ProxyMachine.TestCase.settings = settings(
    max_examples=int(300 * EXAMPLES),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
test_h2_proxy_machine = H2ProxyMachine.TestCase
