"""Stateful test of the HTTP/1.1 proxy machine: Hypothesis is the driver, every client and every endpoint.

The test calls ``Proxy`` directly, the way the anyio adapter and the simulator do, and plays both ends with
h11 of its own: clients (GET, or POST framed by content-length or chunked; pipelined up to two deep; now and
then malformed bytes or a chunked body cut off by a bad chunk header) and endpoints (connects accepted or
refused; responses whole, close-delimited, cut off mid-response, not HTTP at all, or with an oversized head;
half-closes and resets). Bytes in either direction are split at drawn points and wait in a per-connection
outbox until a ``deliver`` rule (or teardown) hands them to ``proxy.received``, and only while the proxy
reads that connection (``SetReading``). ``Send`` effects go straight into the peer's parser; their
``proxy.sent`` acknowledgement is immediate or, in the delayed mode the initialize rule may draw, left to
``acknowledge`` rules, which is what exercises backpressure. ``advance_time`` runs the proxy's timers.

The model is deliberately naive: a ``RequestRecord`` per request (its unique x-request-id, its body, what
the endpoint saw and answered, what the client saw). Checks, numbered as in the test plan:

1. every request gets exactly one response or a close of its connection (teardown, after 10 virtual
   minutes, so every timeout has fired);
2. bodies arrive byte for byte in both directions, and a response carrying ``l5d-proxy-error`` has one of
   the proxy's statuses (400 or 431 for malformed bytes);
3. a client only ever sees the response to its own request (the endpoint echoes x-request-id);
4. an endpoint that dies mid-response never yields a complete response at the client, and a client that
   already has that response's head sees its connection closed.

Plus protocol and driver bookkeeping: hop-by-hop headers and a content-length beside transfer-encoding
never reach an endpoint; no effect names a connection the proxy already closed; ``proxy.open_connections``
always equals the connections the driver holds open, and is 0 once everything has timed out.

Bugs the machine found are kept as plain reproductions at the end of the file. While a newly found bug
stands, the inputs that trigger it can be left out of the machine by naming them in ``KNOWN_BUGS``.
"""

from __future__ import annotations

import random
from typing import Any

import h11
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)
from stateful_support import (
    BAD_CHUNK_HEADER,
    BODIES,
    CONNECTION_OPTIONS,
    ENDPOINTS,
    EOF,
    HOP_BY_HOP,
    INVALID_RESPONSE,
    MALFORMED,
    MALFORMED_MAX,
    MALFORMED_REQUEST_STATUSES,
    MAX_CLIENTS,
    MAX_CLIENTS_OPEN,
    MOSTLY_TRUE,
    PROXY_ERROR_STATUSES,
    REQUEST_KINDS,
    RESPONSE_FATES,
    RESPONSE_STATUSES,
    SPLITS,
    TEARDOWN_NS,
    TIGHT_LIMITS,
    TIMEOUTS,
    UNSOLICITED_RESPONSE,
    ClientPeer,
    EndpointPeer,
    Peer,
    RequestRecord,
    _close_delimited_head,
    _connection_headers,
    _header,
    _split,
    _step,
)

from tether.core.address import Address
from tether.core.config import MS, ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.effects import Close, Connect, Effect, LogError, Send, SetReading
from tether.core.proxy import Proxy


class ProxyMachine(RuleBasedStateMachine):
    clients = Bundle("clients")
    endpoints = Bundle("endpoints")

    def __init__(self) -> None:
        super().__init__()
        self.proxy: Proxy | None = None
        self.step_failed = False
        self.now_ns = 0
        self.auto_ack = True
        self.endpoints_serve_at_end = False
        self.shutdown_after: int | None = None
        self.client_peers: dict[int, ClientPeer] = {}
        self.endpoint_peers: dict[int, EndpointPeer] = {}
        self.dialing: dict[int, Address] = {}  # Connect effects not yet answered
        self.records: dict[str, RequestRecord] = {}
        self.next_request = 0
        self.shut_down = False
        self.malformed_sent = 0

    # ------------------------------------------------------------------ setup

    @initialize(
        target=clients,
        seed=st.integers(0, 2**32 - 1),
        tight=st.booleans(),
        auto_ack=st.booleans(),
        endpoints_serve_at_end=st.booleans(),
        shutdown_after=st.sampled_from([None, None, 2, 6]),
    )
    @_step
    def start_proxy(
        self, seed: int, tight: bool, auto_ack: bool, endpoints_serve_at_end: bool, shutdown_after: int | None
    ) -> Any:
        """Build the proxy and open two client connections.

        ``endpoints_serve_at_end``: at teardown the endpoints accept every connect and answer every request
        whole before time runs on; otherwise whatever is pending is left to the proxy's timeouts.
        ``shutdown_after``: the shutdown rule is enabled once this many requests were sent (None: never).
        """
        limits = {**TIMEOUTS, **(TIGHT_LIMITS if tight else {})}
        resolver = StaticResolver(default=list(ENDPOINTS))
        self.proxy = Proxy(ProxyConfig(**limits), resolver, random.Random(seed))
        self.auto_ack = auto_ack
        self.endpoints_serve_at_end = endpoints_serve_at_end
        self.shutdown_after = shutdown_after
        return multiple(self._open_client(), self._open_client())

    def _proxy(self) -> Proxy:
        assert self.proxy is not None
        return self.proxy

    # ------------------------------------------------------------------ clients
    #
    # Rules that act on a connection consume its id and hand it back while it is open, so ids of closed
    # connections drop out of the bundle instead of turning later steps into no-ops.

    @precondition(
        lambda self: (
            sum(peer.open for peer in self.client_peers.values()) < MAX_CLIENTS_OPEN
            and len(self.client_peers) < MAX_CLIENTS
        )
    )
    @rule(target=clients)
    @_step
    def open_client(self) -> Any:
        return self._open_client()

    def _open_client(self) -> int:
        peer_address = Address("192.0.2.1", 40_000 + len(self.client_peers))
        conn_id = self._proxy().accepted(self.now_ns, peer=peer_address)
        assert conn_id not in self.client_peers and conn_id not in self.endpoint_peers, conn_id
        self.client_peers[conn_id] = ClientPeer(conn_id, h11.Connection(h11.CLIENT))
        self._drain_effects()
        return conn_id

    @rule(
        target=clients,
        client=consumes(clients),
        kind=st.sampled_from(REQUEST_KINDS),
        body=BODIES,
        chunks=SPLITS,
        splits=SPLITS,
        keep_alive=MOSTLY_TRUE,
        connection_option=st.sampled_from(CONNECTION_OPTIONS),
        deliver_now=st.booleans(),
    )
    @_step
    def send_request(
        self,
        client: int,
        kind: str,
        body: bytes,
        chunks: list[int],
        splits: list[int],
        keep_alive: bool,
        connection_option: str,
        deliver_now: bool,
    ) -> Any:
        """A GET, or a POST framed by content-length or chunked; "-cut" breaks the chunked body off with a
        bad chunk header, which the proxy must refuse; "+length" adds a content-length to a chunked body,
        which a proxy must drop before forwarding (RFC 9112 section 6.3).

        ``connection_option`` goes into the Connection header: "x-hop" names an x-hop header the request
        also carries, "framing" names the request's own content-length or transfer-encoding. Either way the
        named header is hop-by-hop and must not reach the endpoint, while the body still must."""
        peer = self.client_peers[client]
        if peer.can_send():
            self._send_request(peer, kind, body, chunks, splits, keep_alive, connection_option)
            if deliver_now:
                self._deliver(peer, len(peer.outbox))
        return self._keep(peer)

    def _send_request(
        self,
        peer: ClientPeer,
        kind: str,
        body: bytes,
        chunks: list[int],
        splits: list[int],
        keep_alive: bool,
        connection_option: str,
    ) -> None:
        self.next_request += 1
        request_id = f"req-{self.next_request}"
        method = b"GET" if kind == "GET" else b"POST"
        body = b"" if kind == "GET" else body
        corrupt = kind == "POST-chunked-cut"
        target = f"/items/{self.next_request}".encode()
        headers = [(b"host", b"svc.test"), (b"x-request-id", request_id.encode())]
        if kind == "POST-length":
            headers.append((b"content-length", str(len(body)).encode()))
        elif kind.startswith("POST-chunked"):
            headers.append((b"transfer-encoding", b"chunked"))
        if kind == "POST-chunked+length":
            headers.append((b"content-length", str(len(body) // 2).encode()))
        headers += _connection_headers(kind, keep_alive, connection_option)
        encoder = h11.Connection(h11.CLIENT)
        wire = encoder.send(h11.Request(method=method, target=target, headers=headers)) or b""
        for piece in _split(body, chunks):
            wire += encoder.send(h11.Data(data=piece)) or b""
        if corrupt:
            wire += BAD_CHUNK_HEADER  # the chunked body never ends: the proxy must refuse it
        else:
            wire += encoder.send(h11.EndOfMessage()) or b""
        record = RequestRecord(request_id, peer.conn_id, method, target, body, whole=not corrupt, keep_alive=keep_alive)
        self.records[request_id] = record
        self._client_sent(peer, record, wire, splits)
        peer.retired = corrupt or not keep_alive  # nothing may follow on this connection

    def _client_sent(self, peer: ClientPeer, record: RequestRecord, wire: bytes, splits: list[int]) -> None:
        peer.records.append(record)
        peer.pending.append(record)
        if len(peer.pending) == 1:
            self._expect_response(peer)
        peer.outbox.extend(_split(wire, splits))

    def _expect_response(self, peer: ClientPeer) -> None:
        """Tell the response parser about the request whose response comes next."""
        record = peer.pending[0]
        parser = peer.parser
        assert parser.our_state is h11.IDLE, (peer.conn_id, parser.our_state)
        headers = [(b"host", b"svc.test")] + ([] if record.keep_alive else [(b"connection", b"close")])
        parser.send(h11.Request(method=record.method, target=record.target, headers=headers))
        if record.whole:
            parser.send(h11.EndOfMessage())

    @precondition(lambda self: self.malformed_sent < MALFORMED_MAX)
    @rule(target=clients, client=consumes(clients), malformed=st.sampled_from(sorted(MALFORMED)), splits=SPLITS)
    @_step
    def send_malformed_bytes(self, client: int, malformed: str, splits: list[int]) -> Any:
        peer = self.client_peers[client]
        if peer.can_send():
            # The response parser gets a stand-in GET, so it reads the proxy's answer (a 400 or 431).
            self.malformed_sent += 1
            record = RequestRecord(None, client, b"GET", b"/", b"", whole=True)
            self._client_sent(peer, record, MALFORMED[malformed], splits)
            peer.retired = True
        return self._keep(peer)

    @rule(target=clients, client=consumes(clients), reset=st.sampled_from([False, False, True]))
    @_step
    def client_closes(self, client: int, reset: bool) -> Any:
        """The client half-closes (EOF after whatever it queued) or resets (the driver reports it lost)."""
        peer = self.client_peers[client]
        self._peer_closes(peer, reset)
        return self._keep(peer)

    @rule(target=clients, client=consumes(clients), count=st.integers(1, 4))
    @_step
    def deliver_from_client(self, client: int, count: int) -> Any:
        peer = self.client_peers[client]
        self._deliver(peer, count)
        return self._keep(peer)

    @precondition(lambda self: not self.auto_ack)
    @rule(target=clients, client=consumes(clients), byte_count=st.integers(1, 2**20))
    @_step
    def acknowledge_client_bytes(self, client: int, byte_count: int) -> Any:
        peer = self.client_peers[client]
        self._acknowledge(peer, byte_count)
        return self._keep(peer)

    # ------------------------------------------------------------------ endpoints

    @precondition(lambda self: bool(self.dialing))
    @rule(target=endpoints, pick=st.integers(0, 15), succeed=st.sampled_from([True, True, True, False]))
    @_step
    def answer_connect(self, pick: int, succeed: bool) -> Any:
        conn_id = sorted(self.dialing)[pick % len(self.dialing)]
        address = self.dialing.pop(conn_id)
        if not succeed:
            self._proxy().connect_failed(conn_id, "connection refused", self.now_ns)
            self._drain_effects()
            return multiple()
        self._connect_succeeded(conn_id, address)
        return self._keep(self.endpoint_peers[conn_id])

    def _connect_succeeded(self, conn_id: int, address: Address) -> None:
        self.endpoint_peers[conn_id] = EndpointPeer(conn_id, h11.Connection(h11.SERVER), address=address)
        self._proxy().connected(conn_id, self.now_ns)
        self._drain_effects()

    @rule(
        target=endpoints,
        endpoint=consumes(endpoints),
        fate=st.sampled_from(RESPONSE_FATES),
        status=RESPONSE_STATUSES,
        body=BODIES,
        chunked=st.booleans(),
        chunks=SPLITS,
        splits=SPLITS,
        cut=st.integers(0, 2**20),
        keep_alive=MOSTLY_TRUE,
        informational=st.sampled_from([None, None, 100, 103]),
        deliver_now=st.booleans(),
    )
    @_step
    def endpoint_responds(
        self,
        endpoint: int,
        fate: str,
        status: int,
        body: bytes,
        chunked: bool,
        chunks: list[int],
        splits: list[int],
        cut: int,
        keep_alive: bool,
        informational: int | None,
        deliver_now: bool,
    ) -> Any:
        """The endpoint answers its current request: whole (framed by content-length or chunked, or
        "close-delimited": no framing, the end is the endpoint closing), or dying ``cut`` bytes into the
        response, or with bytes that are not HTTP, or with a head larger than max_header_bytes, or whole but
        followed, in the same write, by a response nobody asked for (which must reach no client)."""
        peer = self.endpoint_peers[endpoint]
        if peer.can_respond():
            self._respond(peer, fate, status, body, chunked, chunks, splits, cut, keep_alive, informational)
            if deliver_now:
                self._deliver(peer, len(peer.outbox))
        return self._keep(peer)

    def _respond(
        self,
        peer: EndpointPeer,
        fate: str,
        status: int,
        body: bytes,
        chunked: bool,
        chunks: list[int],
        splits: list[int],
        cut: int,
        keep_alive: bool,
        informational: int | None,
    ) -> None:
        record = peer.current
        assert record is not None and record.request_id is not None
        wire = b""
        if informational is not None:
            head = h11.InformationalResponse(
                status_code=informational, headers=[(b"x-request-id", record.request_id.encode())]
            )
            wire += peer.parser.send(head) or b""
        extra = [(b"x-big", b"a" * 17_000)] if fate == "oversized-head" else []
        keep_alive = keep_alive or fate == "whole-then-unsolicited"  # the connection may be reused
        body, response = self._response_bytes(peer, record, status, body, chunked, chunks, keep_alive, extra)
        wire += response
        record.upstream_status = status
        peer.responded = True
        peer.last_answered = record
        if fate == "close-delimited" and status not in (204, 304):
            wire = wire[: len(wire) - len(response)] + _close_delimited_head(status, record.request_id) + body
            keep_alive = False
        if fate in ("whole", "close-delimited", "whole-then-unsolicited"):
            record.upstream_response_body = body
        else:
            record.upstream_response_broken = True
            record.upstream_head_oversized = fate == "oversized-head"
            keep_alive = False
            if fate == "dies-mid-response":
                wire = wire[: cut % len(wire)]  # strictly short of the whole response
            elif fate == "invalid":
                wire = INVALID_RESPONSE
        pieces = _split(wire, splits)
        if fate == "whole-then-unsolicited":
            pieces[-1] += UNSOLICITED_RESPONSE  # in the same read as the end of the real response
        peer.outbox.extend(pieces)
        if not keep_alive:
            peer.eof_sent = True  # a server that said "connection: close" (or failed) closes after the bytes
            peer.outbox.append(EOF)
        self._next_cycle(peer)
        self._endpoint_parse(peer)  # a request the proxy wrote after this one's end would surface now

    @rule(target=endpoints, endpoint=consumes(endpoints), reset=st.sampled_from([False, False, True]))
    @_step
    def endpoint_closes(self, endpoint: int, reset: bool) -> Any:
        """The endpoint half-closes (EOF after whatever it queued) or resets (the driver reports it lost)."""
        peer = self.endpoint_peers[endpoint]
        self._peer_closes(peer, reset)
        return self._keep(peer)

    @rule(target=endpoints, endpoint=consumes(endpoints), count=st.integers(1, 4))
    @_step
    def deliver_from_endpoint(self, endpoint: int, count: int) -> Any:
        peer = self.endpoint_peers[endpoint]
        self._deliver(peer, count)
        return self._keep(peer)

    @precondition(lambda self: not self.auto_ack)
    @rule(target=endpoints, endpoint=consumes(endpoints), byte_count=st.integers(1, 2**20))
    @_step
    def acknowledge_endpoint_bytes(self, endpoint: int, byte_count: int) -> Any:
        peer = self.endpoint_peers[endpoint]
        self._acknowledge(peer, byte_count)
        return self._keep(peer)

    def _keep(self, peer: Peer) -> Any:
        """Hand the id back to its bundle while the connection is open; drop it once closed."""
        return peer.conn_id if peer.open else multiple()

    def _peer_closes(self, peer: Peer, reset: bool) -> None:
        if not peer.open or (peer.eof_sent and not reset):
            return
        if not reset:
            peer.eof_sent = True
            peer.outbox.append(EOF)
            return
        if isinstance(peer, EndpointPeer):
            self._truncate_pending_response(peer)
        peer.closed_by_peer = True
        peer.outbox.clear()
        self._proxy().closed(peer.conn_id, self.now_ns)
        self._drain_effects()

    # ------------------------------------------------------------------ time and shutdown

    # Mostly a few milliseconds; sometimes past one timeout or all of them.
    @rule(delta_ms=st.one_of(st.integers(0, 20), st.sampled_from([900, 1_100, 2_100, 10_100, 30_100])))
    @_step
    def advance_time(self, delta_ms: int) -> None:
        self.now_ns += delta_ms * MS
        self._fire_timers()

    @precondition(
        lambda self: not self.shut_down and self.shutdown_after is not None and len(self.records) >= self.shutdown_after
    )
    @rule()
    @_step
    def shutdown(self) -> None:
        self.shut_down = True
        self._proxy().shutdown(self.now_ns)
        self._drain_effects()

    # ------------------------------------------------------------------ invariants

    @invariant()
    @_step
    def proxy_holds_what_driver_holds(self) -> None:
        if self.proxy is None:
            return
        held = len(self.dialing)
        held += sum(peer.open for peer in self.client_peers.values())
        held += sum(peer.open for peer in self.endpoint_peers.values())
        assert self.proxy.open_connections == held, (self.proxy.open_connections, held)

    def teardown(self) -> None:
        if self.proxy is None or self.step_failed:
            return  # nothing ran, or a step already failed: report that failure alone
        self._settle()
        if self.endpoints_serve_at_end:
            self._serve_everything()
        end_ns = self.now_ns + TEARDOWN_NS
        for _ in range(100_000):
            deadline = self.proxy.next_deadline_ns()
            if deadline is None or deadline > end_ns:
                break
            self.now_ns = max(self.now_ns, deadline)
            self._fire_timers()
            self._settle()
        self.now_ns = end_ns
        self._check_everything_answered()

    def _serve_everything(self) -> None:
        """Accept every connect and answer every request with a small whole response, until quiet."""
        for _ in range(1000):
            if self.dialing:
                conn_id = min(self.dialing)
                self._connect_succeeded(conn_id, self.dialing.pop(conn_id))
            else:
                waiting = [peer for peer in self.endpoint_peers.values() if peer.can_respond()]
                if not waiting:
                    return
                self._respond(waiting[0], "whole", 200, b"served", False, [], [3], 0, True, None)
            self._settle()
        raise AssertionError("the endpoints never caught up")

    def _check_everything_answered(self) -> None:
        for client in self.client_peers.values():
            for record in client.records:
                if client.closed_by_peer:
                    continue  # the client left; nothing is owed to it
                assert record.response_complete or client.closed_by_proxy, (
                    f"{record.request_id or 'malformed bytes'} on connection {client.conn_id} got neither a "
                    "response nor a close"
                )
                saw_upstream_head = record.status is not None and record.proxy_error is None
                if record.upstream_response_broken and saw_upstream_head:
                    assert client.closed_by_proxy and not record.response_complete, record.request_id
        assert not self.dialing, f"connects never resolved: {sorted(self.dialing)}"
        open_ids = [peer.conn_id for peer in [*self.client_peers.values(), *self.endpoint_peers.values()] if peer.open]
        assert not open_ids, f"connections still open 10 minutes after the last input: {open_ids}"
        assert self._proxy().open_connections == 0

    # ------------------------------------------------------------------ driver machinery

    def _deliver(self, peer: Peer, count: int) -> None:
        """Hand up to ``count`` outbox pieces to the proxy, stopping while it does not read ``peer``."""
        proxy = self._proxy()
        for _ in range(count):
            if not (peer.open and peer.reading and peer.outbox):
                return
            proxy.received(peer.conn_id, peer.outbox.popleft(), self.now_ns)
            self._drain_effects()

    def _acknowledge(self, peer: Peer, byte_count: int) -> None:
        byte_count = min(byte_count, peer.unacked_bytes)
        if byte_count and peer.open:
            peer.unacked_bytes -= byte_count
            self._proxy().sent(peer.conn_id, byte_count, self.now_ns)
            self._drain_effects()

    def _fire_timers(self) -> None:
        proxy = self._proxy()
        for _ in range(1000):
            deadline = proxy.next_deadline_ns()
            if deadline is None or deadline > self.now_ns:
                return
            proxy.on_timer(self.now_ns)
            self._drain_effects()
        raise AssertionError("on_timer keeps leaving deadlines in the past")

    def _settle(self) -> None:
        """Deliver and acknowledge everything the driver holds until nothing moves."""
        peers: list[Peer] = [*self.client_peers.values(), *self.endpoint_peers.values()]
        for _ in range(10_000):
            moved = False
            for peer in peers:
                if peer.open and peer.unacked_bytes:
                    self._acknowledge(peer, peer.unacked_bytes)
                    moved = True
                if peer.open and peer.reading and peer.outbox:
                    self._deliver(peer, len(peer.outbox))
                    moved = True
            self._fire_timers()
            if not moved:
                return
            peers = [*self.client_peers.values(), *self.endpoint_peers.values()]
        raise AssertionError("the driver never settled")

    def _drain_effects(self) -> None:
        proxy = self._proxy()
        while effects := proxy.effects():
            for effect in effects:
                self._apply(effect)
            if self.auto_ack:
                for peer in [*self.client_peers.values(), *self.endpoint_peers.values()]:
                    if peer.open and peer.unacked_bytes:
                        peer.unacked_bytes, byte_count = 0, peer.unacked_bytes
                        proxy.sent(peer.conn_id, byte_count, self.now_ns)

    def _peer(self, conn_id: int) -> Peer:
        peer: Peer | None = self.client_peers.get(conn_id) or self.endpoint_peers.get(conn_id)
        assert peer is not None, f"effect for a connection the proxy never had: {conn_id}"
        assert peer.open, f"effect for connection {conn_id} after it closed"
        return peer

    def _apply(self, effect: Effect) -> None:
        if isinstance(effect, LogError):
            return
        if isinstance(effect, Connect):
            known = effect.conn_id in self.client_peers or effect.conn_id in self.endpoint_peers
            assert not known and effect.conn_id not in self.dialing, effect
            assert effect.address in ENDPOINTS, effect
            self.dialing[effect.conn_id] = effect.address
            return
        if isinstance(effect, Close) and effect.conn_id in self.dialing:
            del self.dialing[effect.conn_id]  # a connect that timed out, cancelled
            return
        assert effect.conn_id not in self.dialing, f"{effect!r} on a connection still connecting"
        peer = self._peer(effect.conn_id)
        if isinstance(effect, Send):
            assert effect.data, effect
            peer.unacked_bytes += len(effect.data)
            if isinstance(peer, ClientPeer):
                self._client_received(peer, effect.data)
            else:
                assert isinstance(peer, EndpointPeer)
                self._endpoint_received(peer, effect.data)
        elif isinstance(effect, SetReading):
            peer.reading = effect.enabled
        elif isinstance(effect, Close):
            peer.closed_by_proxy = True
            peer.close_reset = effect.reset
            if isinstance(peer, EndpointPeer):
                self._truncate_pending_response(peer)
            peer.outbox.clear()
            peer.unacked_bytes = 0
        else:
            raise AssertionError(f"unknown effect {effect!r}")

    # ------------------------------------------------------------------ the client's view

    def _client_received(self, peer: ClientPeer, data: bytes) -> None:
        peer.parser.receive_data(data)
        while True:
            try:
                event = peer.parser.next_event()
            except h11.RemoteProtocolError as error:
                message = f"client {peer.conn_id} got invalid HTTP from the proxy: {error}"
                raise AssertionError(message) from error
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            record = peer.current
            assert record is not None, f"client {peer.conn_id} got {event!r} with no request outstanding"
            if isinstance(event, h11.InformationalResponse):
                assert 100 <= event.status_code < 200 and event.status_code != 101, event
                echoed = _header(event.headers, b"x-request-id")
                expected = (record.request_id or "").encode()
                assert echoed is None or echoed == expected, (record.request_id, echoed)
            elif isinstance(event, h11.Response):
                self._check_response_head(peer, record, event)
            elif isinstance(event, h11.Data):
                record.response_body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._check_response_complete(peer, record)
            else:
                raise AssertionError(f"client {peer.conn_id} got unexpected {event!r}")

    def _check_response_head(self, peer: ClientPeer, record: RequestRecord, response: h11.Response) -> None:
        record.status = response.status_code
        error = _header(response.headers, b"l5d-proxy-error")
        if error is not None:
            assert response.status_code in PROXY_ERROR_STATUSES, (response.status_code, error)
            if record.request_id is None:
                assert response.status_code in MALFORMED_REQUEST_STATUSES, (response.status_code, error)
            record.proxy_error = error
            return
        assert record.request_id is not None, f"malformed bytes on {peer.conn_id} were answered: {response!r}"
        assert not record.upstream_head_oversized, f"{record.request_id}: oversized response head forwarded"
        echoed = _header(response.headers, b"x-request-id")
        assert echoed == record.request_id.encode(), (
            f"client {peer.conn_id} asked {record.request_id} and got the response to {echoed!r}"
        )
        assert record.upstream_status == response.status_code, (record.upstream_status, response.status_code)

    def _check_response_complete(self, peer: ClientPeer, record: RequestRecord) -> None:
        record.response_complete = True
        if record.proxy_error is not None:
            assert bytes(record.response_body).endswith(b"\n"), bytes(record.response_body)
        else:
            assert not record.upstream_response_broken, (
                f"{record.request_id}: the endpoint died mid-response; client {peer.conn_id} saw it whole"
            )
            assert record.upstream_response_body is not None, record.request_id
            assert bytes(record.response_body) == record.upstream_response_body, (
                f"{record.request_id}: response body differs ({len(record.response_body)} bytes received, "
                f"{len(record.upstream_response_body)} sent)"
            )
        peer.pending.popleft()
        parser = peer.parser
        if parser.our_state is h11.DONE and parser.their_state is h11.DONE:
            parser.start_next_cycle()
            if peer.pending:
                self._expect_response(peer)
        else:
            peer.retired = True  # connection: close, or a request that never finished

    # ------------------------------------------------------------------ the endpoint's view

    def _endpoint_received(self, peer: EndpointPeer, data: bytes) -> None:
        peer.parser.receive_data(data)
        self._endpoint_parse(peer)

    def _endpoint_parse(self, peer: EndpointPeer) -> None:
        while True:
            try:
                event = peer.parser.next_event()
            except h11.RemoteProtocolError as error:
                message = f"endpoint {peer.conn_id} got invalid HTTP from the proxy: {error}"
                raise AssertionError(message) from error
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._check_request_head(peer, event)
                continue
            record = peer.current
            assert record is not None, f"endpoint {peer.conn_id} got {event!r} outside a request"
            if isinstance(event, h11.Data):
                record.upstream_body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert record.whole, f"{record.request_id}: a request cut short reached the endpoint whole"
                assert bytes(record.upstream_body) == record.body, (
                    f"{record.request_id}: request body differs ({len(record.upstream_body)} bytes received, "
                    f"{len(record.body)} sent)"
                )
                self._next_cycle(peer)
            else:
                raise AssertionError(f"endpoint {peer.conn_id} got unexpected {event!r}")

    def _check_request_head(self, peer: EndpointPeer, request: h11.Request) -> None:
        assert peer.current is None, f"endpoint {peer.conn_id} got a second request head"
        assert not any(peer.outbox), (
            f"endpoint {peer.conn_id} got a new request before the proxy read the last response"
        )
        request_id = (_header(request.headers, b"x-request-id") or b"").decode()
        record = self.records.get(request_id)
        assert record is not None, f"endpoint {peer.conn_id} got a request no client sent: {request!r}"
        assert record.upstream_id is None, f"{request_id} reached {record.upstream_id} and {peer.conn_id}"
        assert (request.method, request.target) == (record.method, record.target), request
        names = {name for name, _value in request.headers}
        forwarded_hop_by_hop = names.intersection(HOP_BY_HOP)
        assert not forwarded_hop_by_hop, f"{request_id}: hop-by-hop headers forwarded: {forwarded_hop_by_hop}"
        # RFC 9112 section 6.3: an intermediary MUST drop content-length when it forwards a chunked message;
        # an endpoint that honours content-length would otherwise read a different body (request smuggling).
        assert not {b"content-length", b"transfer-encoding"} <= names, f"{request_id}: forwarded {request!r}"
        record.upstream_id = peer.conn_id
        peer.current = record
        peer.responded = False

    def _response_bytes(
        self,
        peer: EndpointPeer,
        record: RequestRecord,
        status: int,
        body: bytes,
        chunked: bool,
        chunks: list[int],
        keep_alive: bool,
        extra_headers: list[tuple[bytes, bytes]],
    ) -> tuple[bytes, bytes]:
        """The endpoint's response to ``record`` as bytes; returns (body actually sent, wire bytes)."""
        assert record.request_id is not None
        headers = [(b"x-request-id", record.request_id.encode()), *extra_headers]
        if status in (204, 304):
            body = b""  # these responses never carry a body
        elif chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        else:
            headers.append((b"content-length", str(len(body)).encode()))
        if not keep_alive:
            headers.append((b"connection", b"close"))
        parser = peer.parser
        wire = parser.send(h11.Response(status_code=status, headers=headers)) or b""
        for piece in _split(body, chunks):
            wire += parser.send(h11.Data(data=piece)) or b""
        wire += parser.send(h11.EndOfMessage()) or b""
        return body, wire

    def _next_cycle(self, peer: EndpointPeer) -> None:
        """After a full request and a full response, get ready to parse the next request."""
        parser = peer.parser
        if parser.our_state is h11.DONE and parser.their_state is h11.DONE:
            parser.start_next_cycle()
            peer.current = None
            peer.responded = False

    def _truncate_pending_response(self, peer: EndpointPeer) -> None:
        """The connection dies with response bytes still undelivered: that response can never be whole."""
        if peer.last_answered is not None and any(peer.outbox):
            peer.last_answered.upstream_response_broken = True


ProxyMachine.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_proxy_machine = ProxyMachine.TestCase
