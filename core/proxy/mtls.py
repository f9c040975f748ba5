"""Mutual TLS between meshed proxies: a layer between the proxy's connections and its flows.

Theory of operation
-------------------
The flows (h1flows.py, h2flows.py, h2upstream.py, tunnel.py) speak plaintext on connection ids. This layer
sits under them on the connections that carry mTLS, each with one ``TlsSession`` (core/identity/tls.py):
what arrives is decrypted before the flows see it, and what the flows send is encrypted in ``_send`` before
it becomes a ``Send``. Byte counts towards the driver (``unsent_bytes``, the TCP metrics) are TLS bytes, the
ones that cross the wire, so the driver's ``sent()`` needs no translation.

Outbound: a connection opened to a meshed endpoint whose identity discovery knows (``EndpointSet.identity``)
starts a client session when TCP connects: SNI = that identity, which the server's certificate must carry.
The flows are told ``connected`` only when the handshake is done, so the connect timeout covers the
handshake too, and a refused handshake (wrong identity, unknown trust anchor) is a connect failure with the
reason. Without a valid certificate of our own the proxy fails closed: the connection is never opened.

Inbound: a client's first bytes are held until ``inbound_decision`` says what they are. A ClientHello whose
SNI is this proxy's identity is terminated here (a client certificate chained to the trust anchors is
required) and the client's identity labels everything the connection carries; anything else passes through
untouched, as plaintext from an unmeshed client or TLS meant for the application.

Certificates arrive as control inputs (``CertificateUpdate``, ``CertificateExpired``) from the identity
client; each connection keeps the contexts it started with. Limits: the held first bytes are bounded by the
ClientHello peek (16 KiB); a session buffers at most what the flows' own backpressure lets through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tether.core.address import Address
from tether.core.effects import Close, Connect, LogError, Send, ShutdownWrite
from tether.core.identity.client_hello import InboundDecision, inbound_decision
from tether.core.identity.tls_events import (
    CloseNotifyReceived,
    EndOfStream,
    HandshakeCompleted,
    PlaintextReceived,
    TlsError,
    TlsUsageError,
)
from tether.core.proxy.connections import Downstream, Upstream, UpstreamState
from tether.core.proxy.parts import ProxyParts

if TYPE_CHECKING:
    # ssl and cryptography (tls.py, ca.py, client.py) are loaded only once a certificate arrives: a proxy
    # without mTLS never pays their ~19 MB of resident memory.
    from tether.core.identity import client
    from tether.core.identity.tls import TlsContexts, TlsSession

TLS_RECORD_HANDSHAKE = 0x16
# Linkerd's no_tls_reason values: the proxy has no identity; the client spoke plaintext to an inbound proxy;
# discovery named no identity for the endpoint of an outbound connection.
REASON_DISABLED = "disabled"
REASON_NOT_FROM_REMOTE = "not_provided_by_remote"
REASON_NOT_FROM_DISCOVERY = "not_provided_by_service_discovery"
LOOPBACK = ("no_identity", "loopback", "")  # an application's own connection to its outbound proxy


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateUpdate:
    """A new certificate for this proxy (the identity client's ``CertificateReady``), as built contexts.

    ``wall_time_s`` is the wall clock at the ``now_ns`` of the ``control`` call: sessions check the peer's
    certificate against wall time, which the proxy derives from it and its monotonic ``now_ns``.
    """

    contexts: TlsContexts
    wall_time_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateExpired:
    """Our certificate expired with no renewal: meshed connections fail closed until the next update."""

    reason: str


def certificate_update(
    ready: client.CertificateReady, wall_time_s: float, *, identity: str | None = None
) -> CertificateUpdate:
    """The proxies' input for the identity client's new certificate: its contexts, built once for all of
    them. ``identity`` is the name the proxies answer TLS for when it is not the certified one (the
    simulator's misissued host); by default the certificate's own."""
    from tether.core.identity.tls import TlsContexts  # lazily: see TYPE_CHECKING above

    contexts = TlsContexts.build(
        identity=identity or ready.identity,
        leaf_der=ready.leaf_der,
        intermediates_der=ready.intermediates_der,
        key=ready.key,
        trust_anchors_pem=ready.trust_anchors_pem,
    )
    return CertificateUpdate(contexts=contexts, wall_time_s=wall_time_s)


def certificate_expired(expired: client.CertificateExpired) -> CertificateExpired:
    """The proxies' input for a certificate that expired unrenewed: meshed connections fail closed."""
    from tether.core.identity.ca import utc_text  # lazily: see TYPE_CHECKING above

    return CertificateExpired(reason=f"valid until {utc_text(expired.valid_until_s)}, not renewed")


@dataclass(slots=True)
class TlsLink:
    """One connection's TLS: its session, and for outbound ones the identity the server must prove."""

    session: TlsSession
    server_identity: str | None
    ended: bool = False  # the flows heard the end of the stream


class MeshTls(ProxyParts):
    _tls_contexts: TlsContexts | None
    _tls_refusal: str
    _wall_base: tuple[int, float]
    _tls: dict[int, TlsLink]
    _tls_deciding: dict[int, bytearray]
    _tls_wanted: dict[int, str]  # upstream conn id -> server identity, between Connect and connected

    if TYPE_CHECKING:  # defined by Proxy (machine.py)

        def _received_plain(self, conn_id: int, data: bytes, now_ns: int) -> None: ...
        def _connected_plain(self, conn_id: int, now_ns: int) -> None: ...
        def _closed_plain(self, conn_id: int, now_ns: int) -> None: ...
        def connect_failed(self, conn_id: int, reason: str, now_ns: int) -> None: ...

    def _init_mtls(self) -> None:
        self._tls_contexts = None
        self._tls_refusal = "this proxy has no certificate yet"
        self._wall_base = (0, 0.0)
        self._tls = {}
        self._tls_deciding = {}
        self._tls_wanted = {}

    # ---------------------------------------------------------------- certificates

    @property
    def local_identity(self) -> str | None:
        return self._tls_contexts.identity if self._tls_contexts is not None else None

    def _certificate_update(self, update: CertificateUpdate, now_ns: int) -> None:
        self._tls_contexts = update.contexts
        self._wall_base = (now_ns, update.wall_time_s)

    def _certificate_expired(self, expired: CertificateExpired) -> None:
        self._tls_contexts = None
        self._tls_refusal = f"this proxy's certificate expired ({expired.reason})"

    def _wall_time_s(self, now_ns: int) -> float:
        base_ns, base_s = self._wall_base
        return base_s + (now_ns - base_ns) / 1e9

    def tls_labels(self, downstream: Downstream | None, server_identity: str | None) -> tuple[str, str, str]:
        """(tls, no_tls_reason, peer identity) for a request's metrics: the client's identity inbound, the
        server's outbound."""
        if self.telemetry.direction == "inbound":
            if downstream is not None and downstream.identity:
                return "true", "", downstream.identity
            return ("no_identity", REASON_NOT_FROM_REMOTE if self.local_identity else REASON_DISABLED, "")
        if server_identity and self.local_identity:
            return "true", "", server_identity
        return ("no_identity", REASON_NOT_FROM_DISCOVERY if self.local_identity else REASON_DISABLED, "")

    # ---------------------------------------------------------------- outbound

    def _connect(self, conn_id: int, address: Address, server_identity: str | None) -> bool:
        """Ask the driver for a connection; with ``server_identity`` it will carry mTLS. False when it cannot:
        no certificate of our own (the caller fails the request with ``_tls_refusal``)."""
        if server_identity is not None:
            if self._tls_contexts is None:
                return False
            self._tls_wanted[conn_id] = server_identity
        self._effects.append(Connect(conn_id=conn_id, address=address))
        return True

    def _tls_connected(self, conn_id: int, now_ns: int) -> bool:
        """TCP is up: start the handshake instead of telling the flows. True if this connection is TLS."""
        server_identity = self._tls_wanted.pop(conn_id, None)
        upstream = self._upstream.get(conn_id)
        if server_identity is None or upstream is None:
            return False
        contexts = self._tls_contexts
        if contexts is None:
            self._effects.append(Close(conn_id=conn_id, reset=True))
            self.connect_failed(conn_id, self._tls_refusal, now_ns)
            return True
        from tether.core.identity.tls import TlsSession  # loaded with the first certificate

        session = TlsSession.client(contexts, server_identity, self._wall_time_s(now_ns))
        self._tls[conn_id] = TlsLink(session, server_identity)
        self.telemetry.tcp_opened(conn_id, "dst", str(upstream.endpoint), now_ns, ("true", "", server_identity))
        self._tls_flush(upstream)
        return True

    # ---------------------------------------------------------------- inbound

    def _tls_holds_first_bytes(self, conn_id: int) -> bool:
        """Whether an accepted connection waits for the inbound decision (its TCP labels wait with it)."""
        if self.telemetry.direction == "inbound" and self._tls_contexts is not None:
            self._tls_deciding[conn_id] = bytearray()
            return True
        return False

    def _tls_decide(self, conn_id: int, data: bytes, now_ns: int) -> None:
        held = self._tls_deciding[conn_id]
        held += data
        contexts = self._tls_contexts
        if contexts is None or not held or held[0] != TLS_RECORD_HANDSHAKE:
            decision = InboundDecision.PASS_THROUGH
        else:
            decision = inbound_decision(bytes(held), contexts.identity)
        if decision is InboundDecision.NEED_MORE_BYTES and data:
            return
        del self._tls_deciding[conn_id]
        downstream = self._downstream.get(conn_id)
        if decision is InboundDecision.TERMINATE and contexts is not None and downstream is not None:
            from tether.core.identity.tls import TlsSession  # loaded with the first certificate

            self._tls[conn_id] = TlsLink(TlsSession.server(contexts, self._wall_time_s(now_ns)), None)
            self._tls_received(conn_id, bytes(held), now_ns)
            if not data and conn_id in self._tls:
                self._tls_received(conn_id, b"", now_ns)
            return
        self.telemetry.tcp_settled(conn_id)  # plaintext (or TLS for someone else): labelled as opened
        if held:
            self._received_plain(conn_id, bytes(held), now_ns)
        if not data and conn_id in self._downstream:
            self._received_plain(conn_id, b"", now_ns)

    # ---------------------------------------------------------------- both directions

    def _tls_received(self, conn_id: int, data: bytes, now_ns: int) -> None:
        link = self._tls[conn_id]
        try:
            events = link.session.receive(data) if not link.ended else []
        except TlsUsageError:
            return  # bytes after the end of the stream: nothing left to read them
        except TlsError as error:
            self._tls_failed(conn_id, link, error, now_ns)
            return
        connection = self._downstream.get(conn_id) or self._upstream.get(conn_id)
        if connection is not None:
            self._tls_flush(connection)
        for event in events:
            if conn_id not in self._tls:
                return
            if isinstance(event, HandshakeCompleted):
                self._tls_established(conn_id, event, now_ns)
            elif isinstance(event, PlaintextReceived):
                self._received_plain(conn_id, event.data, now_ns)
            elif isinstance(event, (CloseNotifyReceived, EndOfStream)) and not link.ended:
                link.ended = True
                self._received_plain(conn_id, b"", now_ns)

    def _tls_established(self, conn_id: int, event: HandshakeCompleted, now_ns: int) -> None:
        downstream = self._downstream.get(conn_id)
        if downstream is not None:
            downstream.identity = event.peer_identity
            self.telemetry.tcp_settled(conn_id, ("true", "", event.peer_identity))
            return
        self._connected_plain(conn_id, now_ns)

    def _tls_failed(self, conn_id: int, link: TlsLink, error: TlsError, now_ns: int) -> None:
        connection = self._downstream.get(conn_id) or self._upstream.get(conn_id)
        if connection is not None:
            self._tls_flush(connection)  # the alert that tells the peer why
        del self._tls[conn_id]
        side = f"TLS with {link.server_identity}" if link.server_identity else "TLS from a client"
        self._effects.append(LogError(conn_id=conn_id, message=f"{side} failed: {error}"))
        self._effects.append(Close(conn_id=conn_id))
        if isinstance(connection, Upstream) and connection.state is UpstreamState.CONNECTING:
            self.connect_failed(conn_id, f"mTLS handshake failed: {error}", now_ns)
        else:
            self._closed_plain(conn_id, now_ns)

    def _tls_encrypt(self, link: TlsLink, data: bytes) -> bytes:
        try:
            link.session.send(data)
        except (TlsError, TlsUsageError):
            return b""  # the session already failed or closed; its connection is being closed
        return link.session.data_to_send()

    def _tls_flush(self, connection: Downstream | Upstream) -> None:
        link = self._tls.get(connection.conn_id)
        if link is None:
            return
        data = link.session.data_to_send()
        if data:
            connection.unsent_bytes += len(data)
            self.telemetry.tcp_written(connection.conn_id, len(data))
            self._effects.append(Send(conn_id=connection.conn_id, data=data))

    def _tls_close_notify(self, connection: Downstream | Upstream) -> None:
        """Before a graceful close or half-close: tell the peer with close_notify, as TLS requires."""
        link = self._tls.get(connection.conn_id)
        if link is None:
            return
        try:
            link.session.close()
        except TlsError:
            return
        self._tls_flush(connection)

    def _shutdown_write(self, connection: Downstream | Upstream) -> None:
        self._tls_close_notify(connection)
        self._effects.append(ShutdownWrite(conn_id=connection.conn_id))

    def _tls_forget(self, conn_id: int) -> None:
        self._tls.pop(conn_id, None)
        self._tls_deciding.pop(conn_id, None)
        self._tls_wanted.pop(conn_id, None)
