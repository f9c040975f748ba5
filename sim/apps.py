"""Virtual applications: an HTTP server and a workload client that checks every answer it gets.

The client is also the invariant checker. Each request carries ``x-request-id`` and asks the server for
a response body of a given size; the server answers with a body computed from the request id and the
SHA-256 of the request body it received. So the client can tell, byte for byte, that

- the request body reached the server intact (the digest the server echoes matches),
- the response body reached the client intact and complete,
- the response belongs to this request and no other (the id matches),
- each request ends exactly once: a response, or an error (connection closed or reset, timeout).
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
from h11._headers import Headers

from tether.core.address import Address
from tether.core.proxy.h1fast import H1Connection
from tether.sim.behaviour import Behaviour, Latency, Tally
from tether.sim.kernel import Kernel
from tether.sim.network import Network, VirtualSocket

MS = 1_000_000


def expected_body(request_id: str, request_digest: str, size: int) -> bytes:
    """The response body a virtual server sends: a header line, then filler derived from the id."""
    head = f"{request_id} {request_digest}\n".encode()
    seed = hashlib.sha256(request_id.encode()).digest()
    filler = (seed * (size // len(seed) + 1))[: max(0, size - len(head))]
    return head + filler


# The apps parse with core's H1Connection: h11's interface and, for every input, h11's verdict (a
# differential Hypothesis test in tests/core/test_h1fast.py holds it to that), at a fraction of h11's cost;
# anything out of the common case is handed to a real h11.Connection. STRICT_H11 = True makes every app
# connection a plain h11.Connection (tests/sim/test_sim_speed_choices.py checks both give the same trace).
STRICT_H11 = False


def _parser(role: type[h11._util.Sentinel]) -> H1Connection | h11.Connection:
    return h11.Connection(role) if STRICT_H11 else H1Connection(role)


def _own_headers(pairs: list[tuple[bytes, bytes]]) -> Headers:
    """Headers the apps write themselves (lower-case names, values they made): h11's validation of every
    head, at about a fifth of a request's simulator cost, would only check the apps' own code."""
    return Headers([(name, name, value) for name, value in pairs])


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSpec:
    port: int = 8080
    latency_min_ns: int = 1 * MS
    latency_tail_mean_ns: int = 2 * MS
    failure_rate: float = 0.0  # share of requests answered 500
    # HTTP servers: another latency model, failure status, and time windows (sim/behaviour.py); when None,
    # the three fields above as an exponential latency and status 500.
    behaviour: Behaviour | None = None

    def http_behaviour(self) -> Behaviour:
        if self.behaviour is not None:
            return self.behaviour
        latency = Latency(min_ns=self.latency_min_ns, tail_mean_ns=self.latency_tail_mean_ns)
        return Behaviour(latency=latency, failure_rate=self.failure_rate)


class VirtualHttpServer:
    """An HTTP/1.1 server on one virtual host; its latency and failures come from its own RNG.

    With a ``caller`` (a chain: this service calls the next through its own outbound proxy), each request
    that is not failed on purpose makes one call, and its answer's status is the call's (502 when the call
    ended in an error). ``tally`` counts what the host saw, across restarts.
    """

    def __init__(
        self,
        network: Network,
        host: str,
        spec: ServerSpec,
        rng: random.Random,
        *,
        tally: Tally | None = None,
        caller: CallerClient | None = None,
    ) -> None:
        self.network = network
        self.kernel = network.kernel
        self.host = host
        self.spec = spec
        self.behaviour = spec.http_behaviour()
        self.rng = rng
        self.tally = tally if tally is not None else Tally()
        self.caller = caller
        network.listen(host, spec.port, self._accept)

    def _accept(self, sock: VirtualSocket) -> _ServerConnection:
        return _ServerConnection(self, sock)


class _H11Peer:
    """Feeds a virtual socket's bytes to an h11 parser; subclasses say what to do with the events."""

    parser: H1Connection | h11.Connection

    def on_data(self, sock: VirtualSocket, data: bytes) -> None:
        self.parser.receive_data(data)
        self._pump()

    def on_eof(self, sock: VirtualSocket) -> None:
        self.parser.receive_data(b"")
        self._pump()

    def _pump(self) -> None:
        raise NotImplementedError


class _ServerConnection(_H11Peer):
    def __init__(self, server: VirtualHttpServer, sock: VirtualSocket) -> None:
        self.server = server
        self.sock = sock
        self.parser = _parser(h11.SERVER)
        self.digest = hashlib.sha256()
        self.request: h11.Request | None = None

    def on_reset(self, sock: VirtualSocket) -> None:
        self.request = None

    def _pump(self) -> None:
        while True:
            try:
                event = self.parser.next_event()
            except h11.RemoteProtocolError:
                self.sock.reset()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request = event
                self.digest = hashlib.sha256()
            elif isinstance(event, h11.Data):
                self.digest.update(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._schedule_response()
                return
            elif isinstance(event, h11.ConnectionClosed):
                self.sock.close()
                return

    def _schedule_response(self) -> None:
        server = self.server
        now_ns = server.kernel.now_ns
        delay, failure_status = server.behaviour.draw(server.rng, now_ns)
        server.tally.record(now_ns, failure_status is not None)
        caller = server.caller
        if caller is None or failure_status is not None:
            server.kernel.after(delay, lambda: self._respond(failure_status or 200))
        else:
            server.kernel.after(delay, lambda: caller.call(self._call_ended))

    def _call_ended(self, record: RequestRecord) -> None:
        """The next service answered (or the call failed): answer our own request with its status."""
        self._respond(record.status if record.status is not None else 502)

    def _respond(self, status: int) -> None:
        request = self.request
        if request is None or self.sock.dead or self.parser.our_state is not h11.SEND_RESPONSE:
            return
        headers = dict(request.headers)
        request_id = headers.get(b"x-request-id", b"-").decode()
        size = int(headers.get(b"x-response-bytes", b"0"))
        body = expected_body(request_id, self.digest.hexdigest(), size)
        response_headers = [(b"x-request-id", request_id.encode())]
        if headers.get(b"x-response-chunked") != b"1":
            response_headers.append((b"content-length", str(len(body)).encode()))
        out = self.parser.send(h11.Response(status_code=status, headers=_own_headers(response_headers)))
        if len(body) > 4096:  # several writes, so the network can interleave and split them
            out += self.parser.send(h11.Data(data=body[: len(body) // 2]))
            self.sock.send(out)
            out = self.parser.send(h11.Data(data=body[len(body) // 2 :]))
        else:
            out += self.parser.send(h11.Data(data=body))
        out += self.parser.send(h11.EndOfMessage())
        self.sock.send(out)
        self.request = None
        if self.parser.our_state is h11.DONE and self.parser.their_state is h11.DONE:
            self.parser.start_next_cycle()
            self._pump()
        else:
            self.sock.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadSpec:
    target: Address
    authority: str
    rate_per_s: float = 100.0
    start_ns: int = 0
    stop_ns: int = 10_000 * MS
    max_connections: int = 8
    max_queue: int = 1000  # requests waiting for a connection; past it they fail as "client_queue_full"
    request_bytes: tuple[int, int] = (0, 0)  # a POST body size drawn from this range; 0 means GET
    response_bytes: tuple[int, int] = (64, 512)
    chunked_ratio: float = 0.25  # share of requests and responses framed with chunked encoding
    arrivals: str = "poisson"  # or "uniform": exactly rate_per_s, evenly spaced (an open loop at a fixed rate)
    timeout_ns: int = 60_000 * MS  # from the moment a request is given a connection
    queue_timeout_ns: int = 10_000 * MS  # waiting for a connection; past it: "client_queue_timeout"
    idle_timeout_ns: int = 5_000 * MS  # an idle keep-alive connection is closed after this long


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    started_ns: int
    body: bytes
    response_bytes: int
    chunked: bool
    ended_ns: int | None = None
    status: int | None = None
    grpc_status: int | None = None  # gRPC calls: the grpc-status the call ended with
    error: str | None = None
    proxy_error: str | None = None
    connection: _ClientConnection | None = None
    probe: bool = False  # issued in the liveness phase, after every fault healed
    on_end: Callable[[RequestRecord], None] | None = None  # a chained service's call: who waits for it

    @property
    def done(self) -> bool:
        return self.ended_ns is not None


class OpenLoopClient:
    """Poisson arrivals at ``spec.rate_per_s`` from ``spec.start_ns`` to ``spec.stop_ns``, each ending in a
    RequestRecord; subclasses say what one arrival does (``_issue``)."""

    def __init__(
        self, network: Network, host: str, spec: Any, rng: random.Random, on_violation: Callable[[str], None]
    ) -> None:
        self.network = network
        self.kernel: Kernel = network.kernel
        self.host = host
        self.spec = spec
        self.rng = rng
        self.on_violation = on_violation
        self.records: list[RequestRecord] = []
        self._pending = 0  # records not yet done; kept as a count, the run's stop check reads it per event
        self._probes_due = 0  # probes scheduled but not yet issued: the run must not stop before them
        self._arrivals = 0
        self._uniform = getattr(spec, "arrivals", "poisson") == "uniform"
        self.kernel.at(spec.start_ns, self._next_arrival)

    @property
    def pending(self) -> int:
        return self._pending + self._probes_due

    def probe(self, count: int, spacing_ns: int) -> None:
        """Issue ``count`` liveness probes, one every ``spacing_ns``, starting now."""
        self._probes_due += count
        for index in range(count):
            self.kernel.after(index * spacing_ns, self._issue_probe)

    def _issue_probe(self) -> None:
        self._probes_due -= 1
        self._issue(probe=True)

    def _next_arrival(self) -> None:
        if self.kernel.now_ns >= self.spec.stop_ns or not self.network.hosts[self.host].alive:
            return
        self._issue()
        self._arrivals += 1
        if self._uniform:
            # A fixed rate, without drift: arrival k is at start + k / rate exactly (rounded down to a ns).
            due = self.spec.start_ns + int(self._arrivals * 1e9 / self.spec.rate_per_s)
            self.kernel.at(max(due, self.kernel.now_ns + 1), self._next_arrival)
            return
        gap = int(self.rng.expovariate(self.spec.rate_per_s) * 1e9)
        self.kernel.after(max(1, gap), self._next_arrival)

    def _issue(self, *, probe: bool = False) -> None:
        raise NotImplementedError


class WorkloadClient(OpenLoopClient):
    """HTTP/1.1 requests over a keep-alive pool of at most ``spec.max_connections`` connections."""

    spec: WorkloadSpec

    def __init__(
        self, network: Network, host: str, spec: WorkloadSpec, rng: random.Random, on_violation: Callable[[str], None]
    ) -> None:
        self._idle: list[_ClientConnection] = []
        self._open = 0
        self._queue: deque[RequestRecord] = deque()
        self.authority_bytes = spec.authority.encode()
        super().__init__(network, host, spec, rng, on_violation)

    def _issue(self, *, probe: bool = False) -> None:
        self._dispatch(self._new_record(probe))

    def _new_record(self, probe: bool) -> RequestRecord:
        spec = self.spec
        size = self.rng.randint(*spec.request_bytes)
        record = RequestRecord(
            request_id=f"{self.host}-{len(self.records) + 1}",
            started_ns=self.kernel.now_ns,
            body=self.rng.randbytes(size),
            response_bytes=self.rng.randint(*spec.response_bytes),
            chunked=self.rng.random() < spec.chunked_ratio,
            probe=probe,
        )
        self.records.append(record)
        self._pending += 1
        return record

    def _dispatch(self, record: RequestRecord) -> None:
        spec = self.spec
        if self._idle:
            self._idle.pop().start(record)
        elif self._open < spec.max_connections:
            self._open += 1
            _ClientConnection(self, record)
        elif len(self._queue) < spec.max_queue:
            self._queue.append(record)
            self.kernel.after(spec.queue_timeout_ns, lambda: self._queue_timed_out(record))
        else:
            self.finish(record, error="client_queue_full")

    def finish(self, record: RequestRecord, *, status: int | None = None, error: str | None = None) -> None:
        if record.done:
            self.on_violation(
                f"request {record.request_id} ended twice ({record.status or record.error}, then {status or error})"
            )
            return
        record.ended_ns = self.kernel.now_ns
        self._pending -= 1
        record.status = status
        record.error = error
        record.connection = None
        self.kernel.log(
            self.host, f"{record.request_id} {'status ' + str(status) if status else 'error ' + str(error)}"
        )
        if record.on_end is not None:
            record.on_end(record)

    def connection_free(self, connection: _ClientConnection) -> None:
        while self._queue:
            record = self._queue.popleft()
            if not record.done:
                connection.start(record)
                return
        self._idle.append(connection)
        connection.idle_since_ns = self.kernel.now_ns
        self.kernel.after(self.spec.idle_timeout_ns, lambda: self._maybe_expire(connection))

    def _maybe_expire(self, connection: _ClientConnection) -> None:
        idle_ns = self.kernel.now_ns - connection.idle_since_ns
        if connection in self._idle and idle_ns >= self.spec.idle_timeout_ns:
            self._idle.remove(connection)
            connection.close()

    def connection_gone(self, connection: _ClientConnection) -> None:
        self._open -= 1
        if connection in self._idle:
            self._idle.remove(connection)
        while self._queue and self._open < self.spec.max_connections:
            record = self._queue.popleft()
            if not record.done:
                self._open += 1
                _ClientConnection(self, record)

    def attach(self, record: RequestRecord, connection: _ClientConnection) -> None:
        """``record`` leaves the queue for ``connection``; its timeout starts now."""
        record.connection = connection
        self.kernel.after(self.spec.timeout_ns, lambda: self._timed_out(record, connection))

    def _timed_out(self, record: RequestRecord, connection: _ClientConnection) -> None:
        if record.done or record.connection is not connection:
            return
        self.finish(record, error="client_timeout")
        connection.abort()

    def _queue_timed_out(self, record: RequestRecord) -> None:
        # The client's own overload: the request never got a connection. Not a verdict on the mesh.
        if not record.done and record.connection is None and record in self._queue:
            self._queue.remove(record)
            self.finish(record, error="client_queue_timeout")


class _ClientConnection(_H11Peer):
    def __init__(self, client: WorkloadClient, first: RequestRecord) -> None:
        self.client = client
        self.sock: VirtualSocket | None = None
        self.parser = _parser(h11.CLIENT)
        self.current: RequestRecord | None = first
        self.body = bytearray()
        self.response: h11.Response | None = None
        self.gone = False
        self.idle_since_ns = 0
        client.attach(first, self)
        client.network.connect(client.host, client.spec.target, self._connected)

    def _connected(self, sock: VirtualSocket | None, reason: str) -> None:
        if sock is None:
            self._fail(f"connect_failed: {reason}")
            return
        if self.gone:
            sock.reset()
            return
        self.sock = sock
        sock.attach(self)
        record = self.current
        if record is None or record.done:
            self.current = None
            self.client.connection_free(self)
            return
        self._send(record)

    def start(self, record: RequestRecord) -> None:
        self.current = record
        self.client.attach(record, self)
        self._send(record)

    def _send(self, record: RequestRecord) -> None:
        assert self.sock is not None
        headers = [
            (b"host", self.client.authority_bytes),
            (b"x-request-id", record.request_id.encode()),
            (b"x-response-bytes", b"%d" % record.response_bytes),
        ]
        if record.chunked:
            headers.append((b"x-response-chunked", b"1"))
        method = b"POST" if record.body else b"GET"
        if record.body:
            headers.append(
                (b"transfer-encoding", b"chunked") if record.chunked else (b"content-length", b"%d" % len(record.body))
            )
        target = b"/r/" + record.request_id.encode()
        out = self.parser.send(h11.Request(method=method, target=target, headers=_own_headers(headers)))
        if record.body:
            half = len(record.body) // 2
            out += self.parser.send(h11.Data(data=record.body[:half]))
            self.sock.send(out)
            out = self.parser.send(h11.Data(data=record.body[half:]))
        out += self.parser.send(h11.EndOfMessage())
        self.sock.send(out)
        self.body.clear()
        self.response = None

    def on_reset(self, sock: VirtualSocket) -> None:
        self._fail("connection_reset")

    def _pump(self) -> None:
        while not self.gone:
            if self.current is None and self._nothing_arrived():
                return  # h11 says NEED_DATA here too; asking H1Connection would hand the connection to h11
            try:
                event = self.parser.next_event()
            except h11.RemoteProtocolError:
                self._fail("connection_closed_mid_response" if self.response else "connection_closed")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Response):
                self.response = event
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._response_complete()
            elif isinstance(event, h11.ConnectionClosed):
                self._fail("connection_closed")
                return

    def _nothing_arrived(self) -> bool:
        data, closed = self.parser.trailing_data
        return not data and not closed

    def _response_complete(self) -> None:
        record, response = self.current, self.response
        if record is None or response is None:
            self.client.on_violation(f"{self.client.host}: a response arrived with no request outstanding")
            self.abort()
            return
        self._check(record, response)
        if not record.done:
            self.client.finish(record, status=response.status_code)
        self.current = None
        if self.parser.our_state is h11.DONE and self.parser.their_state is h11.DONE:
            self.parser.start_next_cycle()
            self.client.connection_free(self)
        else:
            self.abort()

    def _check(self, record: RequestRecord, response: h11.Response) -> None:
        headers = dict(response.headers)
        proxy_error = headers.get(b"l5d-proxy-error")
        if proxy_error is not None:
            record.proxy_error = proxy_error.decode()
            return
        answered = headers.get(b"x-request-id", b"").decode()
        if answered != record.request_id:
            self.client.on_violation(f"request {record.request_id} got the response to {answered!r}")
            return
        expected = expected_body(record.request_id, hashlib.sha256(record.body).hexdigest(), record.response_bytes)
        if bytes(self.body) != expected:
            self.client.on_violation(
                f"request {record.request_id}: response body differs ({len(self.body)} bytes, "
                f"expected {len(expected)}; first line {bytes(self.body[:80])!r})"
            )

    def _fail(self, error: str) -> None:
        if self.gone:
            return
        record = self.current
        if record is not None and not record.done:
            self.client.finish(record, error=error)
        self.current = None
        self.abort()

    def close(self) -> None:
        """Close an idle connection cleanly (FIN)."""
        if self.gone:
            return
        self.gone = True
        if self.sock is not None and not self.sock.dead:
            self.sock.close()
        self.client.connection_gone(self)

    def abort(self) -> None:
        if self.gone:
            return
        self.gone = True
        if self.sock is not None and not self.sock.dead:
            self.sock.reset()
        self.client.connection_gone(self)


class CallerClient(WorkloadClient):
    """A chained service's own client: no arrivals of its own, one call per request its server handles,
    through the service's outbound proxy. Its records are checked like any client's (id, body, ending
    once); they are not the run's requests, which are the edge clients'."""

    def __init__(
        self, network: Network, host: str, spec: WorkloadSpec, rng: random.Random, on_violation: Callable[[str], None]
    ) -> None:
        assert spec.stop_ns <= spec.start_ns, "a caller makes no requests of its own"
        super().__init__(network, host, spec, rng, on_violation)

    def call(self, on_end: Callable[[RequestRecord], None]) -> RequestRecord:
        record = self._new_record(probe=False)
        record.on_end = on_end
        self._dispatch(record)
        return record
