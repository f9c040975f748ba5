"""An in-memory identity service and a driver harness for ``IdentityAgent`` tests (no sockets, no clock).

``FakeService`` is the server side of one HTTP/2 connection on the h2 library: it reads the gRPC requests the
agent writes, decodes them with the wire codec, and answers as the test says (a real certificate for the
agent's key from the test PKI, an error status, garbage, nothing, a GOAWAY). ``Harness`` plays the driver: it
keeps the table of connections the agent asked for and checks every effect against it (a ``Send`` only on a
connected connection, a ``Connect`` only with a fresh id, a ``Close`` only of a held one).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes
from tls_certs import EPOCH_S, Pki, new_key

from tether.core.address import Address
from tether.core.effects import Close, Connect, LogError, Send
from tether.core.identity.agent import CERTIFY_PATH, IdentityAgent, IdentityAgentConfig
from tether.core.identity.client import IdentityClientConfig, ReadToken, RequestKey
from tether.core.identity.wire import (
    CertifyRequest,
    CertifyResponse,
    Timestamp,
    decode_certify_request,
    encode_certify_response,
)
from tether.core.proxy.h2session import keep_open_after_goaway

S = 1_000_000_000
IDENTITY = "web.shop.serviceaccount.identity.tether.cluster.local"
SERVICE = Address("10.0.0.9", 8080)
PKI = Pki.create("root.agent-tests.test")


@dataclass
class Call:
    stream_id: int
    headers: dict[bytes, bytes]
    request: CertifyRequest


@dataclass
class FakeService:
    """The identity service's end of one connection."""

    h2: h2.connection.H2Connection = field(
        default_factory=lambda: h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
    )
    calls: list[Call] = field(default_factory=list)  # complete requests not answered yet
    reset_streams: list[int] = field(default_factory=list)
    seen_calls: int = 0
    _heads: dict[int, dict[bytes, bytes]] = field(default_factory=dict)
    _bodies: dict[int, bytearray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keep_open_after_goaway(self.h2)  # as grpcio finishes the streams it took after its GOAWAY
        self.h2.initiate_connection()

    def feed(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self._heads[event.stream_id] = dict(event.headers)
                self._bodies[event.stream_id] = bytearray()
            elif isinstance(event, h2.events.DataReceived):
                self._bodies[event.stream_id] += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                body = bytes(self._bodies.pop(event.stream_id))
                assert body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5, "one uncompressed message"
                request = decode_certify_request(body[5:])
                self.calls.append(Call(event.stream_id, self._heads.pop(event.stream_id), request))
                self.seen_calls += 1
            elif isinstance(event, h2.events.StreamReset):
                self.reset_streams.append(event.stream_id)
                self.calls = [call for call in self.calls if call.stream_id != event.stream_id]

    def output(self) -> bytes:
        return self.h2.data_to_send()

    def take_call(self) -> Call:
        call = self.calls.pop(0)
        assert call.headers[b":path"] == CERTIFY_PATH.encode()
        assert call.headers[b"content-type"] == b"application/grpc" and call.headers[b"te"] == b"trailers"
        return call

    def answer(self, call: Call, message: bytes, *, status: int = 0, grpc_message: str = "") -> None:
        self.h2.send_headers(call.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        if status == 0:
            self.h2.send_data(call.stream_id, b"\x00" + len(message).to_bytes(4, "big") + message)
        trailers = [(b"grpc-status", str(status).encode())]
        if grpc_message:
            trailers.append((b"grpc-message", grpc_message.encode()))
        self.h2.send_headers(call.stream_id, trailers, end_stream=True)

    def certify(self, call: Call, key: object, *, wall_s: float, lifetime_s: int = 3600) -> CertifyResponse:
        """Answer with a real leaf for ``key`` valid ``lifetime_s`` from ``wall_s``."""
        leaf = PKI.leaf(IDENTITY, key=key, not_before_s=wall_s - 20, lifetime_s=lifetime_s + 20)
        not_after = int(leaf.certificate.not_valid_after_utc.timestamp())
        response = CertifyResponse(
            leaf_certificate=leaf.der,
            intermediate_certificates=leaf.chain_der,
            valid_until=Timestamp(seconds=not_after),
        )
        self.answer(call, encode_certify_response(response))
        return response

    def refuse(self, call: Call, status: int, message: str) -> None:
        self.answer(call, b"", status=status, grpc_message=message)

    def goaway(self, last_stream_id: int) -> None:
        self.h2.close_connection(error_code=ErrorCodes.NO_ERROR, last_stream_id=last_stream_id)


def agent_config(**client_options: int) -> IdentityAgentConfig:
    client = IdentityClientConfig(identity=IDENTITY, trust_anchors_pem=PKI.root.pem, **client_options)
    return IdentityAgentConfig(client=client, service_address=SERVICE)


class Harness:
    """The driver: connections by id, both clocks, the key; every effect checked as it comes out."""

    def __init__(self, *, seed: int = 1, **client_options: int) -> None:
        self.agent = IdentityAgent(agent_config(**client_options), random.Random(seed))
        self.now_ns = 0
        self.wall_s = float(EPOCH_S)
        self.key = new_key()
        self.connecting: set[int] = set()
        self.open: dict[int, FakeService] = {}
        self.peer_closed: set[int] = set()  # the service sent its end of stream
        self.connects: list[int] = []
        self.closes: list[Close] = []
        self.logs: list[str] = []
        self.token_requests: list[int] = []
        self.other: list[object] = []  # CertificateReady, CertificateExpired

    def start(self) -> None:
        self.agent.start(self.now_ns, self.wall_s)
        assert self.agent.effects() == [RequestKey()]
        self.agent.key_issued(self.key, self.now_ns)
        self.drain()

    def drain(self) -> list[object]:
        """Carry out the agent's effects, checking each against the connection table."""
        effects = self.agent.effects()
        for effect in effects:
            if isinstance(effect, Connect):
                assert effect.address == SERVICE
                assert not self.connecting and not self.open, "one connection at a time"
                assert not self.connects or effect.conn_id == self.connects[-1] + 1, "ids are fresh and in order"
                self.connects.append(effect.conn_id)
                self.connecting.add(effect.conn_id)
            elif isinstance(effect, Send):
                assert effect.conn_id in self.open, f"Send on {effect.conn_id}, which is not connected"
                if effect.conn_id not in self.peer_closed:
                    self.open[effect.conn_id].feed(effect.data)
            elif isinstance(effect, Close):
                assert effect.conn_id in self.open or effect.conn_id in self.connecting, effect
                self.open.pop(effect.conn_id, None)
                self.connecting.discard(effect.conn_id)
                self.closes.append(effect)
            elif isinstance(effect, ReadToken):
                self.token_requests = [effect.attempt]  # an earlier request's attempt is over
            elif isinstance(effect, LogError):
                self.logs.append(effect.message)
            else:
                self.other.append(effect)
        return effects

    # ---------------------------------------------------------------- the driver's reports

    def give_token(self, token: bytes = b"token") -> None:
        attempt = self.token_requests.pop()
        self.agent.token_read(attempt, token, self.now_ns)
        self.drain()

    def connect(self) -> FakeService:
        [conn_id] = self.connecting
        self.connecting.clear()
        service = self.open[conn_id] = FakeService()
        self.agent.connected(conn_id, self.now_ns)
        self.drain()
        self.deliver(conn_id)
        return service

    def refuse_connect(self, reason: str = "Connection refused") -> None:
        [conn_id] = self.connecting
        self.connecting.clear()
        self.agent.connect_failed(conn_id, reason, self.now_ns)
        self.drain()

    def deliver(self, conn_id: int | None = None) -> None:
        """Move what the service wrote to the agent."""
        conn_id = conn_id if conn_id is not None else self.current
        data = self.open[conn_id].output()
        if data:
            self.agent.received(conn_id, data, self.now_ns, self.wall_s)
            self.drain()

    def service_closes(self) -> None:
        """The service's end of stream: the driver keeps the socket until the agent closes it."""
        conn_id = self.current
        self.deliver(conn_id)
        self.peer_closed.add(conn_id)
        self.agent.received(conn_id, b"", self.now_ns, self.wall_s)
        self.drain()

    def reset(self) -> None:
        conn_id = self.current
        self.open.pop(conn_id)
        self.agent.closed(conn_id, self.now_ns)
        self.drain()

    def advance(self, delta_ns: int) -> None:
        self.now_ns += delta_ns
        self.wall_s += delta_ns / S
        deadline = self.agent.next_deadline_ns()
        if deadline is not None and deadline <= self.now_ns:
            self.agent.on_timer(self.now_ns, self.wall_s)
            self.drain()

    def advance_to_deadline(self) -> None:
        deadline = self.agent.next_deadline_ns()
        assert deadline is not None
        self.advance(max(0, deadline - self.now_ns))

    @property
    def current(self) -> int:
        [conn_id] = self.open
        return conn_id

    @property
    def service(self) -> FakeService:
        return self.open[self.current]
