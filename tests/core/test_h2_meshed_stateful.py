"""Stateful test of the meshed path: HTTP/1.1 clients, an outbound proxy, HTTP/2 with a transport header
between the proxies, an inbound proxy, HTTP/1.1 workloads.

``MeshedMachine`` drives both proxies with the driver and checks of tests/core/h2_stateful_support.py; the
model, the checks and the bounds are those described in tests/core/test_h2_stateful.py. Each proxy's bytes
reach the other through the driver, with the same delays; either proxy may be shut down, and a workload may
answer early or die mid-response.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import h11
from h2_peer_support import (
    CUT_SHORT,
    H1Peer,
    body_bytes,
    cut,
)
from h2_stateful_support import (
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

# ---------------------------------------------------------------------------------------------------------
# HTTP/1.1 clients, an outbound proxy, HTTP/2 between the proxies, an inbound proxy, HTTP/1.1 workloads

WEB = Address("10.0.0.9", 8080)  # the meshed service "web": its inbound proxy listens on 4143
WEB_INBOUND = Address("10.0.0.9", 4143)
WORKLOAD = Address("127.0.0.1", 8080)  # where the inbound proxy restores HTTP/1.1 (the transport header's port)
OUT, IN = 0, 1


@dataclass(eq=False)
class H1Request:
    """One HTTP/1.1 request through both proxies, and what each end saw of it."""

    number: int
    client: H1Peer
    method: bytes
    body: bytes
    # the client's view
    status: int | None = None
    proxy_error: bool = False
    data: bytearray = field(default_factory=bytearray)
    complete: bool = False
    # the workload's view, and its answer
    workload: H1Peer | None = None
    upstream_body: bytearray = field(default_factory=bytearray)
    upstream_ended: bool = False
    answer_status: int | None = None
    answer_body: bytes = b""
    answer_trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    broken: bool = False  # the workload died mid-response: the client must never see it complete
    head_end: int = 0  # where the request head ends in what the client sent on its connection

    @property
    def rid(self) -> str:
        return f"m{self.number}"


class MeshedMachine(NetMachine):
    forbidden_errors = ("protocol error", "flood")  # a workload dying mid-response is an invalid response

    def __init__(self) -> None:
        super().__init__()
        self.clients: list[H1Peer] = []
        self.workloads: list[H1Peer] = []
        self.requests: dict[str, H1Request] = {}
        self.chaos = False
        self.shutdown_after: tuple[int, int] | None = None

    @initialize(
        seed=st.integers(0, 2**32 - 1),
        limits=st.sampled_from(sorted(LIMITS)),
        auto_ack=st.booleans(),
        chaos=st.booleans(),
        shutdown_after=st.sampled_from([None, None, (OUT, 2), (IN, 2)]),
    )
    @step
    def start(
        self, seed: int, limits: str, auto_ack: bool, chaos: bool, shutdown_after: tuple[int, int] | None
    ) -> None:
        """``shutdown_after``: which proxy the shutdown rule stops, once that many requests were sent."""
        self.chaos, self.shutdown_after = chaos, shutdown_after
        self.net = Net(random.Random(seed), auto_ack=auto_ack)
        outbound = ProxyConfig(**TIMEOUTS, **LIMITS[limits])
        resolver = StaticResolver(by_host={"web": [WEB]}, meshed_hosts={"web": WEB_INBOUND.port})
        self.net.add_proxy(Proxy(outbound, resolver, random.Random(seed)))
        inbound = ProxyConfig(**TIMEOUTS, **LIMITS[limits], protocol="detect")
        local = StaticResolver(default=[Address("127.0.0.1", 80)])
        self.net.add_proxy(Proxy(inbound, local, random.Random(seed + 1), direction="inbound"))
        self._open_client()

    @precondition(lambda self: sum(not c.gone for c in self.clients) < 3 and len(self.clients) < 8)
    @rule()
    @step
    def open_client(self) -> None:
        self._open_client()

    def _open_client(self) -> None:
        conn = self._net().accept(OUT, h2=False)
        self.clients.append(H1Peer(self._net(), conn, role=h11.CLIENT, on_event=self._client_event))
        self._net().drain()

    def _idle_clients(self) -> list[H1Peer]:
        return [c for c in self.clients if c.writable and c.record is None and c.parser.our_state is h11.IDLE]

    @precondition(lambda self: len(self.requests) < MAX_REQUESTS and bool(self._idle_clients()))
    @rule(
        pick=st.integers(0, 63),
        method=st.sampled_from([b"GET", b"POST", b"POST"]),
        size=SIZES,
        chunked=st.booleans(),
        deliver_now=st.booleans(),
    )
    @step
    def send_request(self, pick: int, method: bytes, size: int, chunked: bool, deliver_now: bool) -> None:
        """A GET, or a POST framed by content-length or chunked, with a body up to ~200 KiB."""
        client = pick_one(self._idle_clients(), pick)
        number = len(self.requests) + 1
        body = b"" if method == b"GET" else body_bytes(number, size)
        record = self.requests[f"m{number}"] = H1Request(number, client, method, body)
        headers = [(b"host", b"web"), (b"x-request-id", record.rid.encode())]
        if method == b"POST":
            headers.append((b"transfer-encoding", b"chunked") if chunked else (b"content-length", b"%d" % len(body)))
        client.record = record
        head = client.parser.send(h11.Request(method=method, target=f"/r/{number}", headers=headers)) or b""
        record.head_end = client.conn.queued + len(head)
        pieces = [h11.Data(data=piece) for piece in cut(body, self._net().rng)]
        client.send_bytes(head + b"".join(client.parser.send(event) or b"" for event in [*pieces, h11.EndOfMessage()]))
        if deliver_now:
            self._net().deliver(client.conn, len(client.conn.outbox))

    @precondition(lambda self: self.net is not None and bool(self.net.dialing))
    @rule(pick=st.integers(0, 63), succeed=st.sampled_from([True, True, True, False]))
    @step
    def answer_connect(self, pick: int, succeed: bool) -> None:
        """A connect of the outbound proxy reaches the inbound one (its HTTP/2 connection to the meshed peer), or
        a connect of the inbound proxy reaches a workload; or it is refused."""
        net = self._net()
        key = pick_one(sorted(net.dialing), pick)
        if succeed:
            self._accept_connect(key)
        else:
            net.connect_failed(key)

    def _accept_connect(self, key: tuple[int, int]) -> None:
        net = self._net()
        if key[0] == OUT:
            assert net.dialing[key] == WEB_INBOUND, net.dialing[key]
            outgoing = net.connected(key, h2=True)
            incoming = net.accept(IN, h2=True)
            outgoing.partner, incoming.partner = incoming, outgoing
            net.drain()
        else:
            assert net.dialing[key] == WORKLOAD, net.dialing[key]
            outgoing = net.connected(key, h2=False)
            self.workloads.append(H1Peer(net, outgoing, role=h11.SERVER, on_event=self._workload_event))
        net.open_connection(outgoing)
        if outgoing.partner is not None:
            # The transport header goes in at once: an inbound proxy that hears nothing for its detect timeout
            # takes the connection for a server-speaks-first protocol (an opaque tunnel), as it should.
            net.ack(outgoing, len(outgoing.unacked))
            net.deliver(outgoing.partner, len(outgoing.partner.outbox))

    def _answerable(self) -> list[H1Peer]:
        return [w for w in self.workloads if w.writable and w.record is not None and w.record.answer_status is None]

    @precondition(lambda self: bool(self._answerable()))
    @rule(
        pick=st.integers(0, 63),
        status=st.sampled_from([200, 200, 404, 500, 503]),
        size=SIZES,
        chunked=st.booleans(),
        with_trailers=st.booleans(),
        dies=st.sampled_from([False, False, False, True]),
    )
    @step
    def workload_responds(
        self, pick: int, status: int, size: int, chunked: bool, with_trailers: bool, dies: bool
    ) -> None:
        """The workload answers its request, whether or not the request body ended; or (``dies``) closes the
        connection part of the way into the response."""
        self._respond(pick_one(self._answerable(), pick), status, size, chunked, with_trailers, dies)

    def _respond(self, workload: H1Peer, status: int, size: int, chunked: bool, trailers: bool, dies: bool) -> None:
        record = workload.record
        assert record is not None
        record.answer_status, record.answer_body = status, body_bytes(ENDPOINT_CODES + record.number, size)
        framing = (b"transfer-encoding", b"chunked") if chunked else (b"content-length", b"%d" % size)
        record.answer_trailers = [(b"x-trailer", record.rid.encode())] if chunked and trailers else []
        parser = workload.parser
        wire = parser.send(h11.Response(status_code=status, headers=[(b"x-request-id", record.rid.encode()), framing]))
        for piece in cut(record.answer_body, self._net().rng):
            wire += parser.send(h11.Data(data=piece)) or b""
        wire += parser.send(h11.EndOfMessage(headers=record.answer_trailers)) or b""
        if dies:
            record.broken = True
            workload.send_bytes(wire[: self._net().rng.randrange(1, len(wire))])
            workload.close(reset=False)
            return
        workload.send_bytes(wire)
        self._next_cycle(workload)

    def _next_cycle(self, workload: H1Peer) -> None:
        if workload.parser.our_state is h11.DONE and workload.parser.their_state is h11.DONE:
            workload.parser.start_next_cycle()
            workload.record = None

    def _h1_peers(self) -> list[H1Peer]:
        return [peer for peer in [*self.clients, *self.workloads] if not peer.gone]

    @precondition(lambda self: self.chaos and bool(self._h1_peers()))
    @rule(pick=st.integers(0, 63), reset=st.sampled_from([False, True, True]))
    @step
    def peer_closes(self, pick: int, reset: bool) -> None:
        """A client or a workload half-closes (EOF after what it queued) or resets its connection."""
        peer = pick_one(self._h1_peers(), pick)
        if reset and peer.record is not None and peer in self.workloads and any(peer.conn.outbox):
            peer.record.broken = True  # the reset drops what the proxy has not read of the response yet
        peer.close(reset)

    @precondition(
        lambda self: (
            self.shutdown_after is not None
            and self.shutdown_after[0] not in self.shut_down
            and len(self.requests) >= self.shutdown_after[1]
        )
    )
    @rule()
    @step
    def shutdown(self) -> None:
        assert self.shutdown_after is not None
        which = self.shutdown_after[0]
        self.shut_down.add(which)
        self._net().proxies[which].shutdown(self._net().now_ns)
        self._net().drain()

    # ------------------------------------------------------------------ what the ends see

    def _client_event(self, client: H1Peer, event: Any) -> None:
        if isinstance(event, h11.ConnectionClosed):
            return
        record = client.record
        assert isinstance(record, H1Request), f"{client.name} got {event!r} with no request outstanding"
        if event is CUT_SHORT:
            # A FIN before the proxy had the request's head is the usual race with an idle close; after it, an
            # abandoned exchange ends with a reset, so that no client takes a cut response for whole (h1flows.py).
            assert record.status is None and client.conn.delivered < record.head_end, f"{record.rid}: cut by FIN"
            return
        if isinstance(event, h11.Response):
            record.status = event.status_code
            headers = dict(event.headers)
            if b"l5d-proxy-error" in headers:
                assert event.status_code in PROXY_ERROR_STATUSES, (record.rid, event)
                record.proxy_error = True
                return
            assert headers.get(b"x-request-id") == record.rid.encode(), f"{record.rid} got {headers}"
            assert event.status_code == record.answer_status, (record.rid, event.status_code, record.answer_status)
        elif isinstance(event, h11.Data):
            record.data += event.data
            if not record.proxy_error:
                assert record.answer_body.startswith(record.data), f"{record.rid}: response body differs"
        elif isinstance(event, h11.EndOfMessage):
            record.complete = True
            if not record.proxy_error:
                assert not record.broken, f"{record.rid}: the workload died mid-response; the client saw it whole"
                assert bytes(record.data) == record.answer_body, f"{record.rid}: response body differs"
                assert list(event.headers) == record.answer_trailers, (record.rid, event.headers)
            if client.parser.our_state is h11.DONE and client.parser.their_state is h11.DONE:
                client.parser.start_next_cycle()
                client.record = None
        elif not isinstance(event, h11.InformationalResponse):
            raise AssertionError(f"{record.rid}: unexpected {event!r}")

    def _workload_event(self, workload: H1Peer, event: Any) -> None:
        if isinstance(event, h11.ConnectionClosed):
            return
        if event is CUT_SHORT:
            # Only after the workload answered may the rest of the upload be dropped (RFC 9112 section 9.6);
            # an upload the proxy gives up on otherwise ends with a reset.
            record = workload.record
            assert record is not None and record.answer_status is not None, f"{workload.name}: request cut by FIN"
            return
        if isinstance(event, h11.Request):
            headers = dict(event.headers)
            rid = headers.get(b"x-request-id", b"").decode()
            record = self.requests.get(rid)
            assert record is not None, f"{workload.name} got a request no client sent: {event!r}"
            assert record.workload is None and workload.record is None, f"{rid} reached a workload twice"
            assert event.target == f"/r/{record.number}".encode() and event.method == record.method, event
            assert headers.get(b"host") == b"web" and b"l5d-orig-proto" not in headers, headers
            record.workload, workload.record = workload, record
            return
        record = workload.record
        assert isinstance(record, H1Request), f"{workload.name} got {event!r} outside a request"
        if isinstance(event, h11.Data):
            record.upstream_body += event.data
            assert record.body.startswith(record.upstream_body), f"{record.rid}: request body differs"
        elif isinstance(event, h11.EndOfMessage):
            record.upstream_ended = True
            assert bytes(record.upstream_body) == record.body, f"{record.rid}: request body differs"
            self._next_cycle(workload)
        else:
            raise AssertionError(f"{record.rid}: unexpected {event!r}")

    # ------------------------------------------------------------------ teardown

    def _serve_round(self) -> bool:
        net = self._net()
        moved = False
        for key in sorted(net.dialing):
            self._accept_connect(key)
            moved = True
        for workload in self._answerable():
            size = net.rng.choice([0, 10, 3000, 100_000])
            self._respond(workload, 200, size, net.rng.random() < 0.5, True, False)
            moved = True
        return moved

    def _check_quiescent(self) -> None:
        super()._check_quiescent()
        for proxy in self._net().proxies:
            assert not proxy._exchanges, list(proxy._exchanges)
        for record in self.requests.values():
            assert record.complete or record.client.gone, f"{record.rid} got neither a response nor a close"


MeshedMachine.TestCase.settings = settings(
    max_examples=int(150 * EXAMPLES),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
test_meshed_machine = MeshedMachine.TestCase
