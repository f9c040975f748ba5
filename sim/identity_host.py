"""Identity in the simulator: a control-plane host that certifies, and one identity agent per meshed host.

Theory of operation
-------------------
``ControlPlane`` is the identity service on a virtual host: an h2c server (sim/h2_wire.py) answering
``io.linkerd.proxy.identity.Identity/Certify`` with the core CA, as adapters/identity_service.py does on
grpcio: decode (wire.py) -> ``check_request`` -> the embedded token verifier -> ``certify`` -> encode, and a
``CertifyError`` becomes a trailers-only answer with the gRPC status of its kind. Its trust anchor, issuer and
token key are made when the world is built, with keys derived from the world's seeded RNG; serial numbers
come from that RNG too, so one seed issues the same serials in the same order.

``SimIdentityAgent`` is the simulator's driver of a core ``IdentityAgent`` (core/identity/agent.py, whose
docstring is the contract): its ``Connect`` / ``Send`` / ``Close`` ride virtual sockets to the control plane,
``RequestKey`` is answered with a P-256 key derived from the host's RNG, ``ReadToken`` with a token the world
mints for the host's service account, and ``CertificateReady`` / ``CertificateExpired`` reach every proxy on
the host (its outbound proxy and its inbound role) as ``control`` inputs. A crash of the host ends the agent
with it; the restart starts a fresh one (a new key, a new certificate), as a restarted pod's proxy does.

Time: the virtual wall clock is ``EPOCH_S`` plus virtual time. Certificates are judged on it everywhere (the
CA's validity windows, the client's refresh and expiry, the TLS sessions' peer checks).

Traces: lines name identities, serials and expiry times; never sizes of certificates, responses or TLS
records, which differ between runs (ECDSA signatures are 70 to 72 bytes, and OpenSSL draws its own nonces).

A misissued host (``certificate_for``) claims one identity (its proxies answer TLS for that name) while its
agent is certified for another: the scenario for a peer presenting the wrong identity.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import h2.events
import h2.exceptions
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from tether.core.address import Address
from tether.core.effects import Close, Connect, LogError, Send
from tether.core.grpc_codes import GrpcStatus
from tether.core.identity.agent import IdentityAgent, IdentityAgentConfig
from tether.core.identity.ca import DAY_S, Issuer, build_issuer, build_trust_anchor, utc_text
from tether.core.identity.client import (
    CertificateExpired,
    CertificateReady,
    IdentityClientConfig,
    ReadToken,
    RequestKey,
)
from tether.core.identity.errors import CertifyError, Problem
from tether.core.identity.names import Mesh, WorkloadIdentity
from tether.core.identity.service import CERTIFY_STATUS, answer_certify
from tether.core.identity.tokens import EmbeddedTokenVerifier, TokenKey, mint_token
from tether.core.proxy import mtls
from tether.sim.h2_wire import GRPC_CONTENT_TYPE, H2Wire, grpc_frame, grpc_messages, header_value
from tether.sim.kernel import MachineTimer
from tether.sim.network import Network, VirtualSocket
from tether.sim.proxy_host import SimProxy

S = 1_000_000_000
EPOCH_S = 1_767_225_600  # 2026-01-01T00:00:00Z: virtual time 0 on the wall clock
CERTIFY_PATH = b"/io.linkerd.proxy.identity.Identity/Certify"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
SERIAL_BITS = 127
TOKEN_VALIDITY_S = 3600  # minted afresh for every read, as a projected Kubernetes token is rotated
# gRPC status codes of the CA's error kinds (as adapters/identity_service.py maps them).


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentitySpec:
    """The scenario's ``identity:``: where the control plane runs and how long leaves live."""

    host: str = "identity"
    port: int = 8080
    leaf_lifetime_s: int = DAY_S
    trust_domain: str = "cluster.local"
    control_plane_namespace: str = "linkerd"
    namespace: str = "default"  # the workloads' namespace

    @property
    def mesh(self) -> Mesh:
        return Mesh(control_plane_namespace=self.control_plane_namespace, trust_domain=self.trust_domain)

    def identity_of(self, serviceaccount: str) -> str:
        return WorkloadIdentity(namespace=self.namespace, serviceaccount=serviceaccount, mesh=self.mesh).name


def wall_time_s(now_ns: int) -> float:
    return EPOCH_S + now_ns / S


def derived_key(rng: random.Random) -> ec.EllipticCurvePrivateKey:
    """A P-256 key from the seeded RNG, so one seed gives the same keys (cryptography does the curve maths)."""
    return ec.derive_private_key(rng.randrange(1, P256_ORDER), ec.SECP256R1())


# ---------------------------------------------------------------------------------------------- service


class ControlPlane:
    """The identity service on ``spec.host``; ``issued`` counts certificates by identity."""

    def __init__(self, network: Network, spec: IdentitySpec, rng: random.Random) -> None:
        self.network = network
        self.kernel = network.kernel
        self.spec = spec
        self.rng = rng
        mesh = spec.mesh
        anchor_key, issuer_key = derived_key(rng), derived_key(rng)
        # Made a day before virtual time 0, so a leaf's back-dated not-before (clock skew) stays inside them.
        made_s = EPOCH_S - DAY_S
        anchor = build_trust_anchor(anchor_key, mesh, wall_time_s=made_s, serial=self.serial())
        issuer = build_issuer(
            issuer_key, mesh, anchor=anchor, anchor_key=anchor_key, wall_time_s=made_s, serial=self.serial()
        )
        self.issuer = Issuer.of(issuer, issuer_key, mesh)
        self.trust_anchors_pem = anchor.public_bytes(Encoding.PEM)
        self.token_key = TokenKey(rng.randbytes(32))
        self.verifier = EmbeddedTokenVerifier(self.token_key)
        self.issued: dict[str, int] = {}
        self.refused: dict[str, int] = {}  # by the CA's problem label
        self.listen()

    @property
    def address(self) -> Address:
        return Address(self.spec.host, self.spec.port)

    def listen(self) -> None:
        """At world creation, and again when the host restarts after a crash."""
        self.network.listen(self.spec.host, self.spec.port, self._accept)

    def serial(self) -> int:
        return self.rng.getrandbits(SERIAL_BITS) + 1

    def token_for(self, serviceaccount: str, now_ns: int) -> bytes:
        token = mint_token(
            self.token_key,
            namespace=self.spec.namespace,
            serviceaccount=serviceaccount,
            wall_time_s=wall_time_s(now_ns),
            valid_for_s=TOKEN_VALIDITY_S,
        )
        return token.encode("ascii")

    def _accept(self, sock: VirtualSocket) -> H2Wire:
        connection = _CertifyConnection(self)
        connection.wire.attach(sock)
        return connection.wire

    def certify(self, request: bytes) -> bytes:
        """One Certify call at the current virtual time: the encoded response; CertifyError says why not."""
        issued, response = answer_certify(
            request,
            issuer=self.issuer,
            verifier=self.verifier,
            wall_time_s=wall_time_s(self.kernel.now_ns),
            serial=self.serial,
            leaf_validity_s=self.spec.leaf_lifetime_s,
        )
        self.issued[issued.identity] = self.issued.get(issued.identity, 0) + 1
        self.kernel.log(
            self.spec.host, f"certified {issued.identity} serial {issued.serial:x} until {utc_text(issued.not_after_s)}"
        )
        return response


@dataclass(slots=True)
class _Call:
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)


class _CertifyConnection:
    """One client's h2c connection to the service; calls are answered as soon as their stream ends."""

    def __init__(self, service: ControlPlane) -> None:
        self.service = service
        self.wire = H2Wire(self, client=False)
        self.calls: dict[int, _Call] = {}

    def on_h2_event(self, wire: H2Wire, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.calls[event.stream_id] = _Call(list(event.headers))
        elif isinstance(event, h2.events.DataReceived) and event.stream_id in self.calls:
            self.calls[event.stream_id].body += event.data
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id in self.calls:
            self._answer(event.stream_id, self.calls.pop(event.stream_id))
        elif isinstance(event, h2.events.StreamReset):
            self.calls.pop(event.stream_id, None)

    def on_h2_broken(self, wire: H2Wire, reason: str) -> None:
        self.calls.clear()

    def _answer(self, stream_id: int, call: _Call) -> None:
        head = [(b":status", b"200"), (b"content-type", GRPC_CONTENT_TYPE)]
        messages = grpc_messages(bytes(call.body))
        try:
            if header_value(call.headers, b":path") != CERTIFY_PATH:
                raise _Unimplemented()
            if messages is None or len(messages) != 1:
                raise CertifyError(Problem.MALFORMED_MESSAGE, "a Certify call carries exactly one message")
            response = self.service.certify(messages[0])
        except _Unimplemented:
            self._trailers_only(stream_id, head, GrpcStatus.UNIMPLEMENTED, "unknown method")
            return
        except CertifyError as error:
            label = error.problem.label
            self.service.refused[label] = self.service.refused.get(label, 0) + 1
            self.service.kernel.log(self.service.spec.host, f"refused ({label}): {error.message}")
            self._trailers_only(stream_id, head, CERTIFY_STATUS[error.kind], error.message)
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):  # the caller reset the stream meanwhile
            self.wire.h2.send_headers(stream_id, head)
            self.wire.send(stream_id, grpc_frame(response), trailers=[(b"grpc-status", b"0")])

    def _trailers_only(self, stream_id: int, head: list[tuple[bytes, bytes]], status: int, message: str) -> None:
        trailers = [(b"grpc-status", b"%d" % status), (b"grpc-message", _percent_encoded(message))]
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.wire.h2.send_headers(stream_id, head + trailers, end_stream=True)
            self.wire.flush()


class _Unimplemented(Exception):
    pass


def _percent_encoded(message: str) -> bytes:
    """grpc-message's encoding (PROTOCOL-HTTP2.md): printable ASCII but '%' as is, every other byte %XX."""
    return b"".join(
        bytes([byte]) if 0x20 <= byte <= 0x7E and byte != 0x25 else f"%{byte:02X}".encode()
        for byte in message.encode("utf-8")
    )


# ---------------------------------------------------------------------------------------------- agent


@dataclass(frozen=True, slots=True, kw_only=True)
class HostIdentity:
    """A meshed host's identity: ``serviceaccount`` names it; ``certificate_for`` (a misissued host) names
    the service account its certificate is really for."""

    serviceaccount: str
    certificate_for: str | None = None


@dataclass(slots=True)
class AgentReport:
    """What one host's agents did, across restarts."""

    identity: str
    certified_as: str
    certificates: int = 0  # CertificateReady count: the first one and every rotation
    expiries: int = 0
    failures: int = 0  # failed attempts (LogError)
    last_valid_until: str = ""
    last_failure: str = ""

    @property
    def rotations(self) -> int:
        return max(0, self.certificates - 1)

    def as_json(self) -> dict[str, object]:
        return {
            "identity": self.identity,
            "certified_as": self.certified_as,
            "certificates": self.certificates,
            "rotations": self.rotations,
            "expiries": self.expiries,
            "failed_attempts": self.failures,
            "valid_until": self.last_valid_until,
            "last_failure": self.last_failure,
        }


class _AgentSocket:
    """The handler of one agent connection's socket; reports go to the agent generation that opened it."""

    def __init__(self, owner: SimIdentityAgent, generation: int, conn_id: int) -> None:
        self.owner = owner
        self.generation = generation
        self.conn_id = conn_id

    def on_data(self, sock: VirtualSocket, data: bytes) -> None:
        self.owner.received(self, data)

    def on_eof(self, sock: VirtualSocket) -> None:
        self.owner.received(self, b"")

    def on_reset(self, sock: VirtualSocket) -> None:
        self.owner.reset(self)


class SimIdentityAgent:
    """Drives one host's ``IdentityAgent``; ``proxies`` are told of every certificate (see the module docstring)."""

    def __init__(
        self,
        network: Network,
        host: str,
        who: HostIdentity,
        control_plane: ControlPlane,
        proxies: Callable[[], Sequence[SimProxy]],
        rng_for: Callable[[int], random.Random],
    ) -> None:
        self.network = network
        self.kernel = network.kernel
        self.host = host
        self.who = who
        self.control_plane = control_plane
        self.proxies = proxies
        self.rng_for = rng_for
        spec = control_plane.spec
        self.identity = spec.identity_of(who.serviceaccount)
        self.certified_as = spec.identity_of(who.certificate_for or who.serviceaccount)
        self.report = AgentReport(identity=self.identity, certified_as=self.certified_as)
        self.generation = 0
        self._sockets: dict[int, VirtualSocket] = {}
        self._pending: dict[int, Callable[[], None]] = {}
        self._timer = MachineTimer(
            self.kernel, lambda: self.agent.next_deadline_ns(), self._timer_fired, lambda: network.hosts[host].alive
        )
        self.agent = self._new_agent()

    def _new_agent(self) -> IdentityAgent:
        client = IdentityClientConfig(
            identity=self.certified_as, trust_anchors_pem=self.control_plane.trust_anchors_pem
        )
        address = self.control_plane.address
        config = IdentityAgentConfig(client=client, service_address=address)
        return IdentityAgent(config, self.rng_for(self.generation))

    def start(self) -> None:
        self.agent.start(self.kernel.now_ns, wall_time_s(self.kernel.now_ns))
        self._apply()

    def restart(self) -> None:
        """After the host's crash: a fresh agent (new key, new certificate); the old one's sockets are gone."""
        self.generation += 1
        self._sockets.clear()
        self._pending.clear()
        self._timer.reset()
        self.agent = self._new_agent()
        self.start()

    # ---------------------------------------------------------------- sockets -> agent

    def _alive(self, generation: int) -> bool:
        return generation == self.generation and self.network.hosts[self.host].alive

    def received(self, handler: _AgentSocket, data: bytes) -> None:
        if self._alive(handler.generation):
            now_ns = self.kernel.now_ns
            self.agent.received(handler.conn_id, data, now_ns, wall_time_s(now_ns))
            self._apply()

    def reset(self, handler: _AgentSocket) -> None:
        if self._alive(handler.generation):
            self._sockets.pop(handler.conn_id, None)
            self.agent.closed(handler.conn_id, self.kernel.now_ns)
            self._apply()

    def _connect_result(self, conn_id: int, generation: int, sock: VirtualSocket | None, reason: str) -> None:
        if not self._alive(generation) or self._pending.pop(conn_id, None) is None:
            if sock is not None:
                sock.reset()
            return
        if sock is None:
            self.kernel.log(self.host, f"identity: connect failed: {reason}")
            self.agent.connect_failed(conn_id, reason, self.kernel.now_ns)
        else:
            sock.attach(_AgentSocket(self, generation, conn_id))
            self._sockets[conn_id] = sock
            self.agent.connected(conn_id, self.kernel.now_ns)
        self._apply()

    # ---------------------------------------------------------------- agent effects

    def _apply(self) -> None:
        while effects := self.agent.effects():
            for effect in effects:
                self._carry_out(effect)
        self._timer.arm()

    def _carry_out(self, effect: object) -> None:
        now_ns = self.kernel.now_ns
        if isinstance(effect, Send):
            sock = self._sockets.get(effect.conn_id)
            if sock is not None:
                sock.send(effect.data)
        elif isinstance(effect, Connect):
            generation = self.generation
            self.kernel.log(self.host, f"identity: connect to {effect.address}")
            self._pending[effect.conn_id] = self.network.connect(
                self.host,
                effect.address,
                lambda sock, reason: self._connect_result(effect.conn_id, generation, sock, reason),
            )
        elif isinstance(effect, Close):
            self._close(effect.conn_id)
        elif isinstance(effect, RequestKey):
            self.agent.key_issued(derived_key(self.rng_for(self.generation + 1_000_000)), now_ns)
        elif isinstance(effect, ReadToken):
            serviceaccount = self.who.certificate_for or self.who.serviceaccount
            self.agent.token_read(effect.attempt, self.control_plane.token_for(serviceaccount, now_ns), now_ns)
        elif isinstance(effect, CertificateReady):
            self._certificate_ready(effect)
        elif isinstance(effect, CertificateExpired):
            self._certificate_expired(effect)
        elif isinstance(effect, LogError):
            self.report.failures += 1
            self.report.last_failure = effect.message
            self.kernel.log(self.host, f"identity: {effect.message}")

    def _close(self, conn_id: int) -> None:
        cancel = self._pending.pop(conn_id, None)
        if cancel is not None:
            cancel()
            return
        sock = self._sockets.pop(conn_id, None)
        if sock is not None:
            sock.close()

    def _certificate_ready(self, ready: CertificateReady) -> None:
        # The host's proxies answer TLS for the identity it claims; their certificate is what the CA issued.
        update = mtls.certificate_update(ready, wall_time_s(self.kernel.now_ns), identity=self.identity)
        self.report.certificates += 1
        self.report.last_valid_until = utc_text(ready.valid_until_s)
        self.kernel.log(self.host, f"identity: certificate for {ready.identity} until {utc_text(ready.valid_until_s)}")
        for proxy in self.proxies():
            proxy.control(update)

    def _certificate_expired(self, expired: CertificateExpired) -> None:
        self.report.expiries += 1
        until = utc_text(expired.valid_until_s)
        self.kernel.log(self.host, f"identity: certificate of {expired.identity} expired at {until}")
        update = mtls.certificate_expired(expired)
        for proxy in self.proxies():
            proxy.control(update)

    # ---------------------------------------------------------------- timer

    def _timer_fired(self, now_ns: int) -> None:
        self.agent.on_timer(now_ns, wall_time_s(now_ns))
        self._apply()
