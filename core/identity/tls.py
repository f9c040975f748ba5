"""Mutual TLS between proxies: TLS 1.3 sessions over ``ssl.MemoryBIO``, their contexts, and the inbound choice.

Theory of operation
-------------------
``TlsSession`` wraps one ``ssl.SSLObject`` between two ``MemoryBIO`` buffers, so OpenSSL does the real
handshake and record protection while the session touches no socket: the driver feeds it the bytes it read
(``receive``, ``b""`` for the end of the stream) and writes what ``data_to_send`` returns. The application
hands it plaintext (``send``) and gets plaintext back as events. One session plays one role:

- client (outbound): sends SNI = the identity it expects of the server, verifies the server's chain to the
  trust anchors and that the server certificate's DNS SAN is exactly that identity, presents its own
  certificate;
- server (inbound): presents its certificate, requires a client certificate chained to the trust anchors, and
  reports the client's identity (the DNS SAN of its verified leaf) in ``HandshakeCompleted``.

The inbound side first decides, from the connection's first bytes and without consuming them, whether to
terminate TLS at all: ``inbound_decision`` terminates only a ClientHello whose SNI is this proxy's own identity
and passes everything else (plain text, TLS meant for the application) through untouched.

States (``_ALLOWED`` says which call is legal in which state; anything else is a ``TlsUsageError``):
HANDSHAKING -> ESTABLISHED -> CLOSE_SENT (our close_notify went out; the peer may still send), and
FAILED from any state after a ``TlsError``. Before failing, OpenSSL often writes an alert for the peer: send
``data_to_send()`` and then close the connection.

In TLS 1.3 the client finishes its handshake before the server has looked at the client certificate, so a
client may see ``HandshakeCompleted`` and then, on its next ``receive``, a ``TlsHandshakeError`` carrying the
server's refusal (no client certificate, unknown issuer).

Time: OpenSSL would check certificate validity against the machine's real clock, which the simulator cannot
move. Contexts therefore turn that check off (``X509_V_FLAG_NO_CHECK_TIME``) and the session checks the peer
leaf's validity window itself against the ``wall_time_s`` it was created with. What this gives up: the
validity windows of intermediates and trust anchors are not checked (Python 3.11 exposes only the peer leaf);
they live for months or years, and a compromised issuer calls for a new trust anchor anyway.

Traces: OpenSSL draws its own randomness (key shares, ECDSA nonces), so ciphertext differs between runs and so
do handshake sizes by a few bytes (an ECDSA signature is 70 to 72 bytes of DER). Events carry plaintext sizes
and identities only; a deterministic trace records events, never ciphertext or handshake byte counts.
"""

from __future__ import annotations

import contextlib
import enum
import os
import ssl
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tether.core.identity.client_hello import InboundDecision, inbound_decision
from tether.core.identity.tls_events import (
    CloseNotifyReceived,
    EndOfStream,
    HandshakeCompleted,
    PlaintextReceived,
    TlsError,
    TlsEvent,
    TlsFailure,
    TlsHandshakeError,
    TlsProtocolError,
    TlsUsageError,
)

__all__ = [
    "CloseNotifyReceived",
    "EndOfStream",
    "HandshakeCompleted",
    "InboundDecision",
    "PlaintextReceived",
    "TlsContexts",
    "TlsError",
    "TlsEvent",
    "TlsFailure",
    "TlsHandshakeError",
    "TlsProtocolError",
    "TlsSession",
    "TlsUsageError",
    "TlsCredentials",
    "client_context",
    "inbound_decision",
    "server_context",
]

READ_CHUNK_BYTES = 16 * 1024  # one TLS record's worth of plaintext per read
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (x509_vfy.h): verify chains without reading the clock (module docstring).
VERIFY_NO_CHECK_TIME = 0x200000


# ---------------------------------------------------------------------------------------------- ssl errors


# Certificate verification results (OpenSSL x509_vfy.h) that mean "no chain to a trust anchor".
_NO_CHAIN_CODES = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    27: "certificate not trusted",
}
_HOSTNAME_MISMATCH = 62
# Alerts from the peer about our certificate (OpenSSL's reason names for received alerts).
_PEER_REJECTED_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_ACCESS_DENIED",
}
_VERSION_REASONS = {"UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "WRONG_VERSION_NUMBER"}
_HANDSHAKE_FAILURES = {
    TlsFailure.UNKNOWN_CA,
    TlsFailure.PEER_REJECTED_CERTIFICATE,
    TlsFailure.WRONG_SERVER_IDENTITY,
    TlsFailure.NO_CLIENT_CERTIFICATE,
    TlsFailure.BAD_PEER_CERTIFICATE,
    TlsFailure.NOT_TLS13,
}


def classify_ssl_error(
    error: ssl.SSLError, *, server_side: bool, server_identity: str | None, handshaking: bool
) -> TlsError:
    """Turn OpenSSL's error into a typed one whose message says what to check."""
    failure, message = _describe_ssl_error(error, server_side=server_side, server_identity=server_identity)
    kind = TlsHandshakeError if handshaking or failure in _HANDSHAKE_FAILURES else TlsProtocolError
    return kind(failure, message)


def _describe_ssl_error(
    error: ssl.SSLError, *, server_side: bool, server_identity: str | None
) -> tuple[TlsFailure, str]:
    peer = "client" if server_side else "server"
    reason = str(error.reason or "")
    if isinstance(error, ssl.SSLCertVerificationError):
        code = error.verify_code
        if code == _HOSTNAME_MISMATCH:
            return TlsFailure.WRONG_SERVER_IDENTITY, (
                f"the server's certificate is not for {server_identity!r}: the address belongs to another "
                "workload, or discovery names the wrong identity"
            )
        if code in _NO_CHAIN_CODES:
            return TlsFailure.UNKNOWN_CA, (
                f"the {peer}'s certificate does not chain to this proxy's trust anchors ({_NO_CHAIN_CODES[code]}): "
                "both proxies must share a trust anchor"
            )
        return TlsFailure.BAD_PEER_CERTIFICATE, f"the {peer}'s certificate failed verification: {error.verify_message}"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return TlsFailure.NO_CLIENT_CERTIFICATE, (
            "the client presented no certificate: meshed clients must present their identity (is the client a "
            "proxy that has its certificate yet?)"
        )
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return TlsFailure.NO_CLIENT_CERTIFICATE, "the server requires a client certificate and this proxy sent none"
    if reason in _PEER_REJECTED_ALERTS:
        alert = reason.split("ALERT_", 1)[-1].lower().replace("_", " ")
        return TlsFailure.PEER_REJECTED_CERTIFICATE, (
            f"the {peer} rejected this proxy's certificate (TLS alert: {alert}): it does not trust our issuer, "
            "or expected another identity"
        )
    if reason in _VERSION_REASONS:
        return TlsFailure.NOT_TLS13, (
            f"the {peer} does not speak TLS 1.3 ({reason.lower().replace('_', ' ')}); mesh TLS requires TLS 1.3 on "
            "both sides"
        )
    if reason == "HTTP_REQUEST":
        return TlsFailure.PROTOCOL_ERROR, "the client sent plain HTTP where TLS was expected"
    return TlsFailure.PROTOCOL_ERROR, f"TLS failed: {reason.lower().replace('_', ' ') or error}"


# ---------------------------------------------------------------------------------------------- contexts


@dataclass(frozen=True, slots=True)
class TlsCredentials:
    """A proxy's certificate chain (leaf first) and private key, as PEM held in memory only."""

    chain_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        return f"TlsCredentials(chain_pem=<{len(self.chain_pem)} bytes>, key_pem=<hidden>)"

    @classmethod
    def from_der(
        cls, leaf_der: bytes, intermediates_der: tuple[bytes, ...] | list[bytes], key: ec.EllipticCurvePrivateKey
    ) -> TlsCredentials:
        chain = "".join(ssl.DER_cert_to_PEM_cert(der) for der in (leaf_der, *intermediates_der))
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cls(chain.encode("ascii"), key_pem)


def client_context(trust_anchors_pem: bytes | str, credentials: TlsCredentials | None) -> ssl.SSLContext:
    """An outbound context: TLS 1.3 only, the server verified against the trust anchors and by name (SNI =
    the expected identity, checked against the DNS SAN), our chain presented when we have one."""
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT, trust_anchors_pem)
    assert context.check_hostname and context.verify_mode is ssl.CERT_REQUIRED
    if credentials is not None:
        _load_cert_chain_from_memory(context, credentials)
    return context


def server_context(trust_anchors_pem: bytes | str, credentials: TlsCredentials) -> ssl.SSLContext:
    """An inbound context: TLS 1.3 only, our chain presented, a client certificate chained to the trust
    anchors required (CERT_REQUIRED)."""
    context = _base_context(ssl.PROTOCOL_TLS_SERVER, trust_anchors_pem)
    context.verify_mode = ssl.CERT_REQUIRED
    # No session tickets: nothing is resumed (each connection proves its identity afresh) and none of
    # OpenSSL's ticket keys or ticket bytes enter a trace.
    context.num_tickets = 0
    _load_cert_chain_from_memory(context, credentials)
    return context


def _base_context(protocol: ssl._SSLMethod, trust_anchors_pem: bytes | str) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    anchors = trust_anchors_pem.decode("ascii") if isinstance(trust_anchors_pem, bytes) else trust_anchors_pem
    context.load_verify_locations(cadata=anchors)
    context.verify_flags |= VERIFY_NO_CHECK_TIME  # the session checks the leaf against its own wall_time_s
    context.hostname_checks_common_name = False  # identities are DNS SANs, never the subject's CN
    context.options |= ssl.OP_NO_TICKET
    return context


def _load_cert_chain_from_memory(context: ssl.SSLContext, credentials: TlsCredentials) -> None:
    """Load our chain and key into ``context`` without writing the key to any filesystem.

    ``SSLContext.load_cert_chain`` takes only file paths (Python exposes no in-memory variant), and a
    temporary file would put the key on a disk or a shared tmpfs, where it could outlive the process. A
    ``memfd_create`` file is anonymous memory: no name in any directory, reachable only through this
    process's descriptor table (``/proc/self/fd/N``), freed when the descriptor closes, which happens
    before this function returns. Linux only (3.17+); elsewhere this refuses rather than fall back to disk.
    """
    if not hasattr(os, "memfd_create"):
        raise RuntimeError("loading a TLS private key needs Linux memfd_create (the key is never written to disk)")
    descriptor = os.memfd_create("tether-identity", os.MFD_CLOEXEC)
    try:
        data = memoryview(credentials.chain_pem + b"\n" + credentials.key_pem)
        while data:
            data = data[os.write(descriptor, data) :]
        context.load_cert_chain(f"/proc/self/fd/{descriptor}")
    finally:
        os.close(descriptor)


@dataclass(frozen=True, slots=True)
class TlsContexts:
    """Both contexts for one certificate of one identity.

    Build one per certificate rotation (a ``CertificateReady`` from the identity client) and share it by
    every connection until the next: building both parses the anchors, the chain and the key, about 10 ms
    (a handshake costs about 3 ms a side), so never build them per connection. Sessions keep the context
    they started with.
    """

    identity: str
    client: ssl.SSLContext
    server: ssl.SSLContext

    @classmethod
    def build(
        cls,
        *,
        identity: str,
        leaf_der: bytes,
        intermediates_der: tuple[bytes, ...] | list[bytes],
        key: ec.EllipticCurvePrivateKey,
        trust_anchors_pem: bytes | str,
    ) -> TlsContexts:
        credentials = TlsCredentials.from_der(leaf_der, intermediates_der, key)
        return cls(
            identity=identity.lower(),
            client=client_context(trust_anchors_pem, credentials),
            server=server_context(trust_anchors_pem, credentials),
        )


# ---------------------------------------------------------------------------------------------- states


class _State(enum.Enum):
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    CLOSE_SENT = "closing (close_notify sent)"
    FAILED = "failed"


class _Call(enum.Enum):
    RECEIVE = "receive"
    SEND = "send"
    CLOSE = "close"


_ALLOWED: dict[tuple[_State, _Call], bool] = {
    (_State.HANDSHAKING, _Call.RECEIVE): True,
    (_State.HANDSHAKING, _Call.SEND): False,  # TLS 1.3 without early data: nothing to encrypt with yet
    (_State.HANDSHAKING, _Call.CLOSE): True,  # gives up: the driver closes the connection
    (_State.ESTABLISHED, _Call.RECEIVE): True,
    (_State.ESTABLISHED, _Call.SEND): True,
    (_State.ESTABLISHED, _Call.CLOSE): True,
    (_State.CLOSE_SENT, _Call.RECEIVE): True,  # after our close_notify the peer may still be talking
    (_State.CLOSE_SENT, _Call.SEND): False,
    (_State.CLOSE_SENT, _Call.CLOSE): True,
    (_State.FAILED, _Call.RECEIVE): False,
    (_State.FAILED, _Call.SEND): False,
    (_State.FAILED, _Call.CLOSE): True,
}


# ---------------------------------------------------------------------------------------------- session


class TlsSession:
    """One TLS 1.3 connection, client or server role, driven by bytes in and bytes out."""

    def __init__(
        self, context: ssl.SSLContext, *, server_identity: str | None, server_side: bool, wall_time_s: float
    ) -> None:
        assert server_side == (server_identity is None), "a client names the server identity; a server does not"
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_identity
        )
        self._server_identity = server_identity
        self._wall_time_s = wall_time_s
        self._state = _State.HANDSHAKING
        self._close_notify_received = False
        self._close_notify_sent = False
        self._end_received = False
        self._pending_error: TlsError | None = None
        self.peer_identity: str | None = None
        self.failure: TlsError | None = None
        if not server_side:
            self._send_client_hello()

    def _send_client_hello(self) -> None:
        """A client speaks first: its ClientHello is in ``data_to_send()`` from the start."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self._ssl.do_handshake()
        assert self._outgoing.pending, "OpenSSL wrote no ClientHello"

    @classmethod
    def client(cls, contexts: TlsContexts | ssl.SSLContext, server_identity: str, wall_time_s: float) -> TlsSession:
        """An outbound session to the proxy whose identity is ``server_identity``."""
        context = contexts.client if isinstance(contexts, TlsContexts) else contexts
        return cls(context, server_identity=server_identity.lower(), server_side=False, wall_time_s=wall_time_s)

    @classmethod
    def server(cls, contexts: TlsContexts | ssl.SSLContext, wall_time_s: float) -> TlsSession:
        """An inbound session (after ``inbound_decision`` said TERMINATE)."""
        context = contexts.server if isinstance(contexts, TlsContexts) else contexts
        return cls(context, server_identity=None, server_side=True, wall_time_s=wall_time_s)

    # ---------------------------------------------------------------- state

    @property
    def established(self) -> bool:
        return self._state in (_State.ESTABLISHED, _State.CLOSE_SENT) and self.peer_identity is not None

    @property
    def handshaking(self) -> bool:
        return self._state is _State.HANDSHAKING

    def _check(self, call: _Call) -> None:
        if not _ALLOWED[(self._state, call)]:
            detail = f": {self.failure}" if self.failure is not None else ""
            raise TlsUsageError(f"{call.value}() is not allowed while the session is {self._state.value}{detail}")

    # ---------------------------------------------------------------- input

    def receive(self, data: bytes) -> list[TlsEvent]:
        """Feed bytes read from the peer (``b""`` = the peer closed its side); returns what they produced.

        Raises a ``TlsError`` when the peer or its certificate fails; the session is then FAILED.
        """
        self._check(_Call.RECEIVE)
        if self._pending_error is not None:
            raise self._fail(self._pending_error)
        if self._end_received:
            raise TlsUsageError("receive() after the end of the stream (receive(b''))")
        if data:
            self._incoming.write(data)
        else:
            self._end_received = True
            self._incoming.write_eof()
        events: list[TlsEvent] = []
        try:
            if self._state is _State.HANDSHAKING:
                completed = self._continue_handshake(at_eof=not data)
                if completed is None:
                    return events
                events.append(completed)
            self._read_plaintext(events, at_eof=not data)
        except TlsError as error:
            if not events:
                raise self._fail(error) from None
            # What came before the failure is real; return it now and raise on the next call (h11 style).
            self._pending_error = error
        return events

    def _continue_handshake(self, *, at_eof: bool) -> HandshakeCompleted | None:
        try:
            self._ssl.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLEOFError):
            if at_eof:
                raise TlsHandshakeError(
                    TlsFailure.CLOSED_DURING_HANDSHAKE,
                    f"the {self._peer_role} closed the connection during the TLS handshake",
                ) from None
            return None
        except ssl.SSLError as error:
            raise self._classify(error) from None
        identity = self._verify_peer()
        self.peer_identity = identity
        self._state = _State.ESTABLISHED
        return HandshakeCompleted(
            peer_identity=identity, tls_version=self._ssl.version() or "", cipher=(self._ssl.cipher() or ("",))[0]
        )

    def _read_plaintext(self, events: list[TlsEvent], *, at_eof: bool) -> None:
        """What the received records decrypt to, as one ``PlaintextReceived``: OpenSSL returns one record per
        read, and a proxy handed each record on its own would parse HTTP/2 (and answer) once per record where
        one read carried several requests, as it does on a plaintext connection."""
        chunks: list[bytes] = []
        try:
            close_notify = not self._close_notify_received and self._read_records(chunks)
        except TlsError:
            if chunks:  # what came before the failure is real (see receive)
                events.append(PlaintextReceived(data=b"".join(chunks)))
            raise
        if chunks:
            events.append(PlaintextReceived(data=b"".join(chunks)))
        if close_notify:
            self._close_notify_received = True
            events.append(CloseNotifyReceived())
        if at_eof:
            events.append(EndOfStream(clean=self._close_notify_received))

    def _read_records(self, chunks: list[bytes]) -> bool:
        """Decrypt every whole record received into ``chunks``; True when close_notify ended them."""
        while True:
            try:
                chunk = self._ssl.read(READ_CHUNK_BYTES)
            except ssl.SSLWantReadError:
                return False
            except ssl.SSLZeroReturnError:
                return True
            except ssl.SSLEOFError:
                return False  # the transport ended without close_notify: reported as an unclean end
            except ssl.SSLError as error:
                raise self._classify(error) from None
            if not chunk:
                return True
            chunks.append(chunk)

    def _verify_peer(self) -> str:
        """The checks OpenSSL does not do for us: exactly one DNS SAN, equal to the expected identity for a
        client (OpenSSL's host name check accepts wildcards, which identities never have), and the leaf's
        validity window against our wall clock (see the module docstring)."""
        certificate = self._ssl.getpeercert()
        assert certificate, "CERT_REQUIRED and a verified chain always leave a peer certificate"
        names = [value for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"]
        role = self._peer_role
        if len(names) != 1:
            raise TlsHandshakeError(
                TlsFailure.BAD_PEER_CERTIFICATE,
                f"the {role} certificate carries {len(names)} DNS names {names}; an identity certificate "
                "carries exactly one, its identity",
            )
        identity = str(names[0]).lower()
        if self._server_identity is not None and identity != self._server_identity:
            raise TlsHandshakeError(
                TlsFailure.WRONG_SERVER_IDENTITY,
                f"the server presented identity {identity!r}, expected {self._server_identity!r}",
            )
        self._check_validity(certificate, identity)
        return identity

    def _check_validity(self, certificate: dict, identity: str) -> None:
        not_before_s = ssl.cert_time_to_seconds(str(certificate["notBefore"]))
        not_after_s = ssl.cert_time_to_seconds(str(certificate["notAfter"]))
        now_s = self._wall_time_s
        if now_s >= not_after_s:
            raise TlsHandshakeError(
                TlsFailure.CERTIFICATE_EXPIRED,
                f"the {self._peer_role} certificate for {identity!r} expired {now_s - not_after_s:.0f} s ago "
                f"(valid until {certificate['notAfter']}): its proxy did not renew it, or a clock is wrong",
            )
        if now_s < not_before_s:
            raise TlsHandshakeError(
                TlsFailure.CERTIFICATE_NOT_YET_VALID,
                f"the {self._peer_role} certificate for {identity!r} is valid only from {certificate['notBefore']}, "
                f"{not_before_s - now_s:.0f} s from now: one of the clocks is behind",
            )

    def _classify(self, error: ssl.SSLError) -> TlsError:
        return classify_ssl_error(
            error,
            server_side=self._server_identity is None,
            server_identity=self._server_identity,
            handshaking=self._state is _State.HANDSHAKING,
        )

    @property
    def _peer_role(self) -> str:
        return "client" if self._server_identity is None else "server"

    def _fail(self, error: TlsError) -> TlsError:
        self._state = _State.FAILED
        self.failure = error
        self._pending_error = None
        return error

    # ---------------------------------------------------------------- output

    def send(self, plaintext: bytes) -> None:
        """Encrypt ``plaintext`` for the peer; the records are in the next ``data_to_send()``."""
        self._check(_Call.SEND)
        if self._pending_error is not None:
            raise self._fail(self._pending_error)
        if plaintext:
            try:
                self._ssl.write(plaintext)
            except ssl.SSLError as error:
                raise self._fail(self._classify(error)) from None

    def close(self) -> None:
        """Send close_notify (once); receiving may go on until the peer's own close_notify or EOF."""
        self._check(_Call.CLOSE)
        if self._state is not _State.ESTABLISHED or self._close_notify_sent:
            if self._state is _State.HANDSHAKING:
                self._state = _State.FAILED
            return
        self._close_notify_sent = True
        self._state = _State.CLOSE_SENT
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # our close_notify is out; OpenSSL would like the peer's, which receive() will report
        except ssl.SSLError as error:
            raise self._fail(self._classify(error)) from None

    def data_to_send(self) -> bytes:
        """Bytes for the peer (handshake, records, alerts; b"" if none); drain after every call."""
        return self._outgoing.read()
