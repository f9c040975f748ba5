"""The proxy's identity agent: the identity client, its Certify calls, and its one connection to the service.

Theory of operation
-------------------
One ``IdentityAgent`` per proxy process. It composes three parts and adds the one thing they lack, a
connection:

- ``IdentityClient`` (client.py) decides when to ask for a certificate and what to make of the answer;
- ``GrpcUnaryClient`` (grpc_unary.py) turns a call into HTTP/2 bytes on one connection, and bytes into a result;
- the wire codec (wire.py) encodes the ``CertifyRequest`` and decodes the ``CertifyResponse``.

The client's ``CallCertify`` never reaches the driver: the agent makes it a gRPC call on its connection to the
identity service, opening that connection first if there is none. Everything else the client emits
(``RequestKey``, ``ReadToken``, ``CertificateReady``, ``CertificateExpired``, ``LogError``) passes through
unchanged, in order, between the agent's own ``Connect``, ``Send`` and ``Close``.

The connection (``_LINK_TRANSITIONS``; a pair missing from the table is a bug)::

    IDLE --call--> CONNECTING --connected--> OPEN --lost, GOAWAY drained, call timed out--> IDLE
                        |--connect failed, or the attempt ended while connecting: Close--> IDLE

It is opened when a call needs it and kept for the next refresh (hours later; Linkerd's proxy keeps its
control-plane connections too). Each connection gets a new id, so the driver's late reports about an old
one are recognised and ignored. A call that timed out closes its connection: a peer that went away
without a FIN would otherwise swallow every later call, and the next attempt opens a fresh one.

Reconnecting: the agent has no timer of its own. An attempt opens at most one connection, and a connection
that fails (refused, reset, closed, GOAWAY before the call was seen, timed out) fails that attempt at once
with the reason, so the client's backoff paces reconnections: 0.5-1 s after the first failure, doubling to
15-30 s, with jitter from the injected RNG, and never more than one connection attempt in flight. An
attempt's deadline (``attempt_timeout_ns``, 10 s) covers reading the token, connecting and the call; the
call's ``grpc-timeout`` is what is left of it.

Transport: plaintext HTTP/2 (h2c), as ``tether identity serve`` speaks today. Linkerd's proxy verifies the
identity service's own certificate (a server name from its configuration, against the trust anchors) before
it sends its token. The seam for that is ``_to_wire`` / ``_from_wire``: a ``TlsSession.client`` (tls.py,
with ``client_context(trust_anchors, None)``: no client certificate yet) would sit between them and the
gRPC client, and ``connected`` would wait for its handshake before the first call.

Driver contract (adapters/identity_agent.py on sockets; a control-plane host in the simulator)
--------------------------------------------------------------------------------------------------
Inputs, every one with the monotonic ``now_ns``; those that can accept a certificate also take
``wall_time_s``, the wall clock at that moment (certificate validity is judged on it):

    start(now_ns, wall_time_s)                      once
    key_issued(key, now_ns)                         answers RequestKey: an ECDSA P-256 private key
    token_read(attempt, token, now_ns)              answers ReadToken(attempt)
    token_unreadable(attempt, reason, now_ns)       ... when the token cannot be read
    connected(conn_id, now_ns)                      answers Connect(conn_id, address)
    connect_failed(conn_id, reason, now_ns)         ... when it could not be opened
    received(conn_id, data, now_ns, wall_time_s)    bytes read from the connection; b"" = the service closed
    closed(conn_id, now_ns)                         the connection broke (reset) without a b""
    on_timer(now_ns, wall_time_s)                   once ``next_deadline_ns()`` has passed

Outputs: ``effects()`` hands over, in order, ``Connect`` / ``Send`` / ``Close`` (core/effects.py) for the
agent's connection, and the client's ``RequestKey``, ``ReadToken``, ``CertificateReady``,
``CertificateExpired`` and ``LogError``. On ``CertificateReady`` the driver builds ``TlsContexts`` once and
gives every proxy of the process ``control(CertificateUpdate(contexts, wall_time_s), now_ns)``; on
``CertificateExpired``, ``control(mtls.CertificateExpired(reason), now_ns)``. ``Close`` may name a connection
that is still connecting: the driver abandons the dial and reports nothing more about it. The agent needs no
``sent`` reports: at most one call (about 2 KB) is in flight, so there is nothing to pace.

State for the process's ``/ready`` and ``/metrics``: ``ready``, ``expired``, ``last_failure`` (why the latest
attempt failed, for a 503's body) and ``metrics()`` (the client's). Connection ids are allocated from
``first_conn_id`` upwards, one per connection, so a driver that shares one table between several machines
gives each a range of its own.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from tether.core.address import Address
from tether.core.effects import Close, Connect, LogError, Send
from tether.core.identity.client import (
    CallCertify,
    CertificateExpired,
    CertificateReady,
    IdentityClient,
    IdentityClientConfig,
    IdentityMetrics,
    Phase,
    ReadToken,
    RequestKey,
)
from tether.core.identity.grpc_unary import GrpcStatus, GrpcUnaryClient, GrpcUnaryUsageError, UnaryResult
from tether.core.identity.wire import CertifyRequest, WireError, decode_certify_response, encode_certify_request

CERTIFY_PATH = "/io.linkerd.proxy.identity.Identity/Certify"
# A CertifyResponse is a leaf (~700 bytes) and one intermediate (~600 bytes); 64 KiB leaves room for long
# chains and refuses a confused server's megabytes.
RESPONSE_BYTES_MAX = 64 * 1024

AgentEffect = Connect | Send | Close | RequestKey | ReadToken | CertificateReady | CertificateExpired | LogError


class IdentityAgentUsageError(Exception):
    """The driver reported on a connection the agent never asked for, or out of order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityAgentConfig:
    """Who the proxy is (``client``) and where the identity service listens.

    ``service_authority`` is the calls' ``:authority`` (Linkerd sends the service's DNS name); empty means
    the address itself.
    """

    client: IdentityClientConfig
    service_address: Address
    service_authority: str = ""
    response_bytes_max: int = RESPONSE_BYTES_MAX

    def __post_init__(self) -> None:
        assert self.response_bytes_max > 0, self.response_bytes_max

    @property
    def authority(self) -> str:
        return self.service_authority or str(self.service_address)


class Link(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    OPEN = "open"


class _LinkInput(enum.Enum):
    CALL = "a call needs the connection"
    CONNECTED = "connected"
    FAILED = "connect failed"
    ABANDONED = "abandoned while connecting"
    LOST = "lost"


_LINK_TRANSITIONS: dict[tuple[Link, _LinkInput], Link] = {
    (Link.IDLE, _LinkInput.CALL): Link.CONNECTING,
    (Link.CONNECTING, _LinkInput.CONNECTED): Link.OPEN,
    (Link.CONNECTING, _LinkInput.FAILED): Link.IDLE,
    (Link.CONNECTING, _LinkInput.ABANDONED): Link.IDLE,
    (Link.OPEN, _LinkInput.LOST): Link.IDLE,
}


@dataclass(frozen=True, slots=True)
class _InFlight:
    call_id: int
    attempt: int


@dataclass(frozen=True, slots=True)
class _Waiting:
    """A call waiting for the connection; its deadline is the attempt's, fixed when the client made it."""

    call: CallCertify
    deadline_ns: int


class IdentityAgent:
    """See the module docstring."""

    def __init__(self, config: IdentityAgentConfig, rng: random.Random, *, first_conn_id: int = 1) -> None:
        assert first_conn_id >= 1, first_conn_id
        self.config = config
        self._client = IdentityClient(config.client, rng)
        self._effects: list[AgentEffect] = []
        self._link = Link.IDLE
        self._first_conn_id = first_conn_id
        self._conn_id: int | None = None  # the current connection, while CONNECTING or OPEN
        self._last_conn_id = first_conn_id - 1
        self._grpc: GrpcUnaryClient | None = None  # while OPEN
        self._waiting: _Waiting | None = None  # a call for the connection being opened
        self._in_flight: _InFlight | None = None
        self._last_failure = ""
        self._connects = 0

    # ---------------------------------------------------------------- state

    @property
    def ready(self) -> bool:
        """A valid certificate is held (the process's /ready)."""
        return self._client.ready

    @property
    def expired(self) -> bool:
        return self._client.expired

    @property
    def identity(self) -> str:
        return self.config.client.identity

    @property
    def link(self) -> Link:
        return self._link

    @property
    def conn_id(self) -> int | None:
        """The connection being opened or open, if any."""
        return self._conn_id

    @property
    def connects(self) -> int:
        """Connections asked for so far (each ``Connect``)."""
        return self._connects

    @property
    def last_failure(self) -> str:
        """Why the latest attempt failed (empty before any failure): the body of a 503 from /ready."""
        return self._last_failure

    def unready_reason(self) -> str | None:
        """None while a valid certificate is held; else why not, in words (the body of /ready's 503)."""
        if self.ready:
            return None
        if self.expired:
            return (
                f"the certificate of {self.identity} expired and was not renewed ({self._last_failure or 'no answer'})"
            )
        waiting = f"no certificate yet for {self.identity} from the identity service at {self.config.service_address}"
        return f"{waiting}; last failure: {self._last_failure}" if self._last_failure else waiting

    @property
    def client(self) -> IdentityClient:
        """The composed client, read-only use (its phase and schedule, for tests and the simulator's trace)."""
        return self._client

    def metrics(self) -> IdentityMetrics:
        return self._client.metrics()

    def effects(self) -> list[AgentEffect]:
        effects, self._effects = self._effects, []
        return effects

    def next_deadline_ns(self) -> int | None:
        deadlines = [self._client.next_deadline_ns(), self._grpc.next_deadline_ns() if self._grpc else None]
        armed = [deadline for deadline in deadlines if deadline is not None]
        return min(armed) if armed else None

    # ---------------------------------------------------------------- inputs: the client's side

    def start(self, now_ns: int, wall_time_s: float) -> None:
        self._client.start(now_ns, wall_time_s)
        self._pump(now_ns)

    def key_issued(self, key: ec.EllipticCurvePrivateKey, now_ns: int) -> None:
        self._client.key_issued(key, now_ns)
        self._pump(now_ns)

    def token_read(self, attempt: int, token: bytes, now_ns: int) -> None:
        self._client.token_read(attempt, token, now_ns)
        self._pump(now_ns)

    def token_unreadable(self, attempt: int, reason: str, now_ns: int) -> None:
        self._client.certify_failed(attempt, f"cannot read the token: {reason}", now_ns)
        self._pump(now_ns)

    def on_timer(self, now_ns: int, wall_time_s: float) -> None:
        """Deadlines: the call's (DEADLINE_EXCEEDED), then the client's (attempt timeout, refresh, expiry)."""
        if self._grpc is not None:
            for result in self._grpc.on_timer(now_ns):
                self._result(result, now_ns, wall_time_s)
            self._flush()
        self._client.on_timer(now_ns, wall_time_s)
        self._pump(now_ns)

    # ---------------------------------------------------------------- inputs: the connection's side

    def connected(self, conn_id: int, now_ns: int) -> None:
        if not self._is_current(conn_id):
            return
        if self._link is not Link.CONNECTING:
            raise IdentityAgentUsageError(f"connected({conn_id}) while the connection is {self._link.value}")
        self._move(_LinkInput.CONNECTED)
        self._grpc = GrpcUnaryClient(
            authority=self.config.authority, max_calls=1, max_response_bytes=self.config.response_bytes_max
        )
        waiting, self._waiting = self._waiting, None
        if waiting is not None and waiting.deadline_ns > now_ns:
            self._start_call(waiting.call, waiting.deadline_ns, now_ns)
        elif waiting is not None:
            self._waiting = waiting  # connected as the attempt ran out: the client's timer ends it, not a call
        self._flush()
        self._pump(now_ns)

    def connect_failed(self, conn_id: int, reason: str, now_ns: int) -> None:
        if not self._is_current(conn_id):
            return
        if self._link is not Link.CONNECTING:
            raise IdentityAgentUsageError(f"connect_failed({conn_id}) while the connection is {self._link.value}")
        self._move(_LinkInput.FAILED)
        self._conn_id = None
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            reason = f"cannot connect to the identity service at {self._where()}: {reason}"
            self._call_failed(waiting.call.attempt, reason, now_ns)
        self._pump(now_ns)

    def received(self, conn_id: int, data: bytes, now_ns: int, wall_time_s: float) -> None:
        if not self._is_current(conn_id):
            return
        if self._grpc is None:
            raise IdentityAgentUsageError(f"bytes on connection {conn_id} before connected()")
        for result in self._grpc.receive(self._from_wire(data), now_ns):
            self._result(result, now_ns, wall_time_s)
        if self._grpc is not None and not self._grpc.usable and not self._grpc.open_calls:
            self._lose(close=True)  # GOAWAY, a broken HTTP/2 stream, or the service's end of stream
        self._flush()
        self._pump(now_ns)

    def closed(self, conn_id: int, now_ns: int) -> None:
        """The connection broke without an end of stream (a reset): its call, if any, failed."""
        if not self._is_current(conn_id):
            return
        if self._link is Link.CONNECTING:
            self.connect_failed(conn_id, "the connection was reset", now_ns)
            return
        in_flight = self._in_flight
        self._lose(close=False)
        if in_flight is not None:
            reason = f"UNAVAILABLE: the connection to {self._where()} was reset"
            self._call_failed(in_flight.attempt, reason, now_ns)
        self._pump(now_ns)

    # ---------------------------------------------------------------- the client's effects

    def _pump(self, now_ns: int) -> None:
        """Move the client's effects out: calls become gRPC calls, the rest goes to the driver in order.
        Then drop what the client gave up on (an attempt that timed out)."""
        while True:
            effects = self._client.effects()
            if not effects:
                break
            for effect in effects:
                if isinstance(effect, CallCertify):
                    self._call(effect, now_ns)
                else:
                    if isinstance(effect, LogError):
                        self._last_failure = effect.message
                    self._effects.append(effect)
        self._abandon_stale_calls()

    def _call(self, call: CallCertify, now_ns: int) -> None:
        assert self._waiting is None and self._in_flight is None, "the client makes one attempt at a time"
        deadline_ns = now_ns + call.timeout_ns
        if self._link is Link.OPEN:
            self._start_call(call, deadline_ns, now_ns)
            self._flush()
            return
        self._waiting = _Waiting(call, deadline_ns)
        if self._link is Link.IDLE:
            self._move(_LinkInput.CALL)
            self._last_conn_id += 1
            self._conn_id = self._last_conn_id
            self._connects += 1
            self._effects.append(Connect(conn_id=self._conn_id, address=self.config.service_address))

    def _start_call(self, call: CallCertify, deadline_ns: int, now_ns: int) -> None:
        """Send the call; its grpc-timeout is what is left of the attempt (connecting took some of it)."""
        assert self._grpc is not None and self._in_flight is None
        assert deadline_ns > now_ns, "an attempt past its deadline has ended and its call was dropped"
        request = CertifyRequest(identity=call.identity, token=call.token, certificate_signing_request=call.csr_der)
        message = encode_certify_request(request)
        try:
            call_id = self._grpc.start_call(CERTIFY_PATH, message, now_ns, deadline_ns - now_ns)
        except GrpcUnaryUsageError as error:  # the server allows no stream, or the connection is going away
            self._lose(close=True)
            self._call_failed(call.attempt, f"UNAVAILABLE: {error}", now_ns)
            return
        self._in_flight = _InFlight(call_id, call.attempt)

    def _abandon_stale_calls(self) -> None:
        """The client's attempt ended on its own (it timed out): cancel its call, or stop connecting for it."""
        if self._in_flight is not None and not self._awaits_answer(self._in_flight.attempt):
            assert self._grpc is not None
            self._grpc.cancel(self._in_flight.call_id)
            self._in_flight = None
            self._lose(close=True)  # no answer in the whole attempt: the connection may be dead (module docstring)
        if self._waiting is not None and not self._awaits_answer(self._waiting.call.attempt):
            self._waiting = None
            if self._link is Link.CONNECTING:
                assert self._conn_id is not None
                self._effects.append(Close(conn_id=self._conn_id, reset=True))
                self._move(_LinkInput.ABANDONED)
                self._conn_id = None

    # ---------------------------------------------------------------- results

    def _result(self, result: UnaryResult, now_ns: int, wall_time_s: float) -> None:
        in_flight = self._in_flight
        if in_flight is None or result.call_id != in_flight.call_id:
            return  # a call we cancelled: its result is nobody's
        self._in_flight = None
        if result.status != GrpcStatus.OK or result.response is None:
            if result.status == GrpcStatus.DEADLINE_EXCEEDED:
                self._lose(close=True)  # see the module docstring: a silent peer is not trusted again
            self._call_failed(in_flight.attempt, f"{_status_name(result.status)}: {result.message}", now_ns)
            return
        try:
            response = decode_certify_response(result.response)
        except WireError as error:
            self._call_failed(in_flight.attempt, f"the CertifyResponse does not decode: {error}", now_ns)
            return
        if response.valid_until is None:
            self._call_failed(in_flight.attempt, "the CertifyResponse has no valid_until", now_ns)
            return
        valid_until_s = response.valid_until.seconds + response.valid_until.nanos / 1e9
        self._client.certify_succeeded(
            in_flight.attempt,
            response.leaf_certificate,
            response.intermediate_certificates,
            valid_until_s,
            now_ns,
            wall_time_s,
        )

    def _call_failed(self, attempt: int, reason: str, now_ns: int) -> None:
        self._client.certify_failed(attempt, reason, now_ns)

    def _awaits_answer(self, attempt: int) -> bool:
        """Whether the client still waits for Certify's answer to ``attempt`` (it may have timed out)."""
        return self._client.attempt == attempt and self._client.phase is Phase.CALLING

    # ---------------------------------------------------------------- the connection

    def _lose(self, *, close: bool) -> None:
        """Forget the open connection (closing it if the peer has not), failing nothing: callers do that."""
        if self._link is not Link.OPEN:
            return
        assert self._conn_id is not None
        if close:
            self._flush()
            self._effects.append(Close(conn_id=self._conn_id))
        self._move(_LinkInput.LOST)
        self._conn_id = None
        self._grpc = None
        self._in_flight = None

    def _flush(self) -> None:
        if self._grpc is None or self._conn_id is None:
            return
        data = self._to_wire(self._grpc.data_to_send())
        if data:
            self._effects.append(Send(conn_id=self._conn_id, data=data))

    def _to_wire(self, plaintext: bytes) -> bytes:
        return plaintext  # the TLS seam (module docstring): encrypt here

    def _from_wire(self, data: bytes) -> bytes:
        return data  # the TLS seam: decrypt here

    def _move(self, event: _LinkInput) -> None:
        target = _LINK_TRANSITIONS.get((self._link, event))
        assert target is not None, f"{event.value} while the connection is {self._link.value}"
        self._link = target

    def _is_current(self, conn_id: int) -> bool:
        if not self._first_conn_id <= conn_id <= self._last_conn_id:
            raise IdentityAgentUsageError(f"connection {conn_id} was never asked for")
        return conn_id == self._conn_id

    def _where(self) -> str:
        return str(self.config.service_address)


def _status_name(status: int) -> str:
    try:
        return GrpcStatus(status).name
    except ValueError:
        return f"gRPC status {status}"
