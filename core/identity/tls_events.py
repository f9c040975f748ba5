"""What a TLS session reports: its events and its errors, without importing ``ssl``.

These are split from tls.py so that a proxy running without mTLS (core/proxy/mtls.py handles both cases)
can name them without loading ``ssl`` and ``cryptography`` (about 19 MB of resident memory between them);
tls.py, which does the TLS, loads them when a certificate arrives.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "CloseNotifyReceived",
    "EndOfStream",
    "HandshakeCompleted",
    "PlaintextReceived",
    "TlsError",
    "TlsEvent",
    "TlsFailure",
    "TlsHandshakeError",
    "TlsProtocolError",
    "TlsUsageError",
]


# ---------------------------------------------------------------------------------------------- errors


class TlsFailure(enum.Enum):
    """Why a TLS session failed, for metrics and for the operator's log."""

    UNKNOWN_CA = "unknown CA"  # we could not chain the peer's certificate to our trust anchors
    PEER_REJECTED_CERTIFICATE = "peer rejected our certificate"  # the peer sent an alert about ours
    WRONG_SERVER_IDENTITY = "wrong server identity"
    NO_CLIENT_CERTIFICATE = "no client certificate"
    BAD_PEER_CERTIFICATE = "bad peer certificate"  # chained, but not an identity certificate
    CERTIFICATE_EXPIRED = "certificate expired"
    CERTIFICATE_NOT_YET_VALID = "certificate not yet valid"
    NOT_TLS13 = "not TLS 1.3"
    CLOSED_DURING_HANDSHAKE = "closed during handshake"
    PROTOCOL_ERROR = "protocol error"


class TlsError(Exception):
    """The peer, its certificate or the bytes on the wire failed; ``failure`` says how, the message what to
    check. The session is FAILED: send ``data_to_send()`` (an alert, if OpenSSL made one), then close."""

    def __init__(self, failure: TlsFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message


class TlsHandshakeError(TlsError):
    """The handshake failed, or (TLS 1.3 client) the server refused our certificate right after it."""


class TlsProtocolError(TlsError):
    """An established session broke: a record that does not authenticate, an unexpected message."""


class TlsUsageError(Exception):
    """The caller used the session out of order (send before the handshake, receive after a failure)."""


# ---------------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeCompleted:
    """The handshake finished and the peer's certificate passed every check.

    ``peer_identity`` is the DNS SAN of the peer's verified leaf: the server's identity for a client session
    (equal to the one it expected), the client's identity for a server session.
    """

    peer_identity: str
    tls_version: str
    cipher: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaintextReceived:
    """Application bytes the peer sent, decrypted and authenticated."""

    data: bytes

    def __repr__(self) -> str:
        return f"PlaintextReceived(data=<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseNotifyReceived:
    """The peer will send nothing more (TLS close_notify); we may still send until we ``close()``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfStream:
    """The transport ended (``receive(b"")``). ``clean`` is False when no close_notify came first: the
    peer's data may have been cut short, which matters only where the length was not framed otherwise."""

    clean: bool


TlsEvent = HandshakeCompleted | PlaintextReceived | CloseNotifyReceived | EndOfStream
