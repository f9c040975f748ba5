"""A small event-driven world for traffic tests: one proxy, HTTP/1.1 clients and endpoints, a virtual clock.

Endpoints are h11 servers with a behaviour each (latency, status, refusing connections, a body to answer
with) that the test may change at any time; clients send one request at a time per connection and keep
what they got. Effects are carried out at once; connects and responses are events on a heap ordered by
(time, sequence), so a run is a pure function of its inputs and the proxy's RNG.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import h11

from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.discovery import EndpointSet
from tether.core.effects import Close, Connect, LogError, Send, SetReading, ShutdownWrite
from tether.core.proxy import Proxy
from tether.core.traffic.route_config import RouteConfig

MS = 1_000_000
S = 1_000_000_000


@dataclass
class Behaviour:
    latency_ns: int = 1 * MS
    status: int = 200
    refuse: bool = False  # connections are refused
    silent: bool = False  # requests are read and never answered
    body: bytes = b"ok"
    headers: tuple[tuple[str, str], ...] = ()
    failures_left: int = 0  # the next this-many requests get failure_status, then ``status``
    failure_status: int = 503
    silent_left: int = 0  # the next this-many requests are never answered


class MutableResolver:
    """Resolves named services to endpoint lists the test may change (a new tuple: a discovery update)."""

    def __init__(self, services: dict[str, list[Address]]) -> None:
        self.services = {name: tuple(addresses) for name, addresses in services.items()}

    def set(self, name: str, addresses: list[Address]) -> None:
        self.services[name] = tuple(addresses)

    def resolve(self, authority: str) -> EndpointSet | None:
        host = authority.split(":")[0].lower()
        endpoints = self.services.get(host)
        return EndpointSet(host, endpoints) if endpoints is not None else None


@dataclass
class Answer:
    """What a client got for one request."""

    request_id: int
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    reset: bool = False  # its connection was reset or closed before a complete response
    sent_ns: int = 0
    answered_ns: int | None = None


class World:
    def __init__(
        self,
        services: dict[str, list[Address]],
        *,
        config: ProxyConfig | None = None,
        routes: RouteConfig | None = None,
        seed: int = 7,
        **proxy_options: object,
    ) -> None:
        self.resolver = MutableResolver(services)
        self.proxy = Proxy(config or ProxyConfig(), self.resolver, random.Random(seed), routes=routes, **proxy_options)
        self.now_ns = 0
        self.behaviour: dict[Address, Behaviour] = {}
        self.requests_seen: dict[Address, list[h11.Request]] = {}
        self.bodies_seen: dict[Address, list[bytes]] = {}
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self._events: list[tuple[int, int, Callable[[], None]]] = []
        self._sequence = 0
        self._upstream: dict[int, tuple[Address, h11.Connection]] = {}
        self._clients: dict[int, tuple[h11.Connection, Answer | None]] = {}
        self._closed: set[int] = set()
        self.answered_twice: list[int] = []
        self.arrivals: list[Address] = []  # every request an endpoint received, in order

    # ---------------------------------------------------------------- events and effects

    def at(self, when_ns: int, action: Callable[[], None]) -> None:
        self._sequence += 1
        heapq.heappush(self._events, (when_ns, self._sequence, action))

    def run(self, until_ns: int | None = None) -> None:
        """Run events and proxy timers until nothing is left (or ``until_ns``)."""
        while True:
            deadline = self.proxy.next_deadline_ns()
            event_ns = self._events[0][0] if self._events else None
            candidates = [t for t in (deadline, event_ns) if t is not None]
            if not candidates:
                return
            when = min(candidates)
            if until_ns is not None and when > until_ns:
                self.now_ns = max(self.now_ns, until_ns)
                return
            self.now_ns = max(self.now_ns, when)
            if event_ns is not None and event_ns == when:
                _, _, action = heapq.heappop(self._events)
                action()
            else:
                self.proxy.on_timer(self.now_ns)
            self.pump()

    def pump(self) -> None:
        for effect in self.proxy.effects():
            if isinstance(effect, Send):
                assert effect.conn_id not in self._closed, f"write after close on {effect.conn_id}"
                self.proxy.sent(effect.conn_id, len(effect.data), self.now_ns)
                self._deliver(effect.conn_id, effect.data)
            elif isinstance(effect, Connect):
                self._connect(effect)
            elif isinstance(effect, Close):
                self._closed.add(effect.conn_id)
                self._peer_closed(effect.conn_id, effect.reset)
            elif isinstance(effect, LogError):
                self.errors.append(effect.message)
            elif isinstance(effect, SetReading | ShutdownWrite):
                pass  # clients send one request at a time; nothing to pace

    def _connect(self, effect: Connect) -> None:
        behaviour = self.behaviour.setdefault(effect.address, Behaviour())
        conn_id = effect.conn_id

        def done() -> None:
            if behaviour.refuse:
                self.proxy.connect_failed(conn_id, "connection refused", self.now_ns)
                return
            self._upstream[conn_id] = (effect.address, h11.Connection(h11.SERVER))
            self.proxy.connected(conn_id, self.now_ns)

        self.at(self.now_ns + 100_000, done)

    def _deliver(self, conn_id: int, data: bytes) -> None:
        if conn_id in self._upstream:
            self._endpoint_received(conn_id, data)
        elif conn_id in self._clients:
            self._client_received(conn_id, data)

    def _peer_closed(self, conn_id: int, reset: bool) -> None:
        self._upstream.pop(conn_id, None)
        client = self._clients.pop(conn_id, None)
        if client is not None and client[1] is not None and client[1].answered_ns is None:
            client[1].reset = True
            client[1].answered_ns = self.now_ns

    # ---------------------------------------------------------------- endpoints

    def _endpoint_received(self, conn_id: int, data: bytes) -> None:
        address, parser = self._upstream[conn_id]
        parser.receive_data(data)
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.requests_seen.setdefault(address, []).append(event)
                self.arrivals.append(address)
                self.bodies_seen.setdefault(address, []).append(b"")
            elif isinstance(event, h11.Data):
                self.bodies_seen[address][-1] += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                behaviour = self.behaviour.setdefault(address, Behaviour())
                if behaviour.silent_left:
                    behaviour.silent_left -= 1
                    return
                status = behaviour.status
                if behaviour.failures_left:
                    behaviour.failures_left -= 1
                    status = behaviour.failure_status
                if not behaviour.silent:
                    self.at(
                        self.now_ns + behaviour.latency_ns,
                        lambda c=conn_id, b=behaviour, s=status: self._respond(c, b, s),
                    )
                return
            else:
                return

    def _respond(self, conn_id: int, behaviour: Behaviour, status: int) -> None:
        if conn_id not in self._upstream or conn_id in self._closed:
            return
        _address, parser = self._upstream[conn_id]
        if parser.our_state is not h11.SEND_RESPONSE:
            return
        headers = [("content-length", str(len(behaviour.body))), *behaviour.headers]
        data = parser.send(h11.Response(status_code=status, headers=headers))
        data += parser.send(h11.Data(data=behaviour.body)) + parser.send(h11.EndOfMessage())
        parser.start_next_cycle()
        self.proxy.received(conn_id, data, self.now_ns)
        self.pump()

    # ---------------------------------------------------------------- clients

    def send(
        self,
        authority: str,
        path: str = "/",
        *,
        body: bytes = b"",
        headers: tuple[tuple[str, str], ...] = (),
        method: str = "GET",
    ) -> Answer:
        """Open a client connection and send one request on it; the answer fills in as the world runs."""
        conn_id = self.proxy.accepted(self.now_ns)
        parser = h11.Connection(h11.CLIENT)
        answer = Answer(request_id=len(self.answers), sent_ns=self.now_ns)
        self.answers.append(answer)
        self._clients[conn_id] = (parser, answer)
        fields = [("host", authority), ("content-length", str(len(body))), *headers]
        data = parser.send(h11.Request(method=method, target=path, headers=fields))
        data += parser.send(h11.Data(data=body)) if body else b""
        data += parser.send(h11.EndOfMessage())
        self.pump()
        self.proxy.received(conn_id, data, self.now_ns)
        self.pump()
        return answer

    def _client_received(self, conn_id: int, data: bytes) -> None:
        parser, answer = self._clients[conn_id]
        assert answer is not None
        parser.receive_data(data)
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError:
                answer.reset = True
                return
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.Response):
                if answer.status is not None:
                    self.answered_twice.append(answer.request_id)
                answer.status = event.status_code
                answer.headers = {name.decode(): value.decode() for name, value in event.headers}
            elif isinstance(event, h11.Data):
                answer.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                answer.answered_ns = self.now_ns
                self._clients[conn_id] = (parser, None)
                return

    def counts(self) -> dict[Address, int]:
        return {address: len(requests) for address, requests in self.requests_seen.items()}
