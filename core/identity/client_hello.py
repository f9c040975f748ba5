"""Peek at the first bytes of a connection: is it TLS, and which server name (SNI) does it ask for?

Theory of operation
-------------------
The inbound proxy decides, before it consumes a byte, whether to terminate TLS (the client asks for this
proxy's own identity) or to pass the connection through untouched (anything else: plain text, or TLS meant
for the application). ``peek_client_hello(first_bytes)`` is a pure function of the bytes read so far and
answers one of three things:

- ``NeedMoreBytes``: the bytes so far are a valid beginning of a TLS ClientHello; read more and ask again;
- ``NotTls``: this is not a TLS ClientHello (or not one we can read), with the reason;
- ``ClientHello``: a complete ClientHello, with its server name (``None`` when the client sent no SNI).

``inbound_decision(first_bytes, local_identity)`` turns that into what the inbound proxy does: TERMINATE a
ClientHello whose SNI is its own identity, PASS_THROUGH anything else, or wait for more bytes.

The answer for a prefix never contradicts the answer for a longer prefix: once ``NotTls`` or ``ClientHello``,
more bytes do not change it (tests/core/identity/test_tls.py checks this over arbitrary splits).

Layout read (RFC 8446 sections 5.1 and 4.1.2, RFC 6066 section 3): TLS records of type handshake (22) carry
the handshake message, which may be split over several records; the message is type client_hello (1) with a
24-bit length; inside, after the version, the random, the session id, the cipher suites and the compression
methods, come the extensions; extension server_name (0) holds a list of names, of which the host_name (0)
entry is the SNI.

Limit: a ClientHello is read only while it fits in ``MAX_PEEK_BYTES`` (16 KiB) of records. A typical one is
0.5 KiB, about 1.8 KiB with a post-quantum key share; one that does not fit by then is ``NotTls`` ("too
large"), so a client cannot make the proxy buffer without bound before deciding.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_PEEK_BYTES = 16 * 1024
RECORD_HEADER_BYTES = 5
HANDSHAKE_HEADER_BYTES = 4
CONTENT_TYPE_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXTENSION_SERVER_NAME = 0
NAME_TYPE_HOST_NAME = 0
MAX_RECORD_PAYLOAD = 2**14  # RFC 8446 section 5.1: a plaintext record carries at most 2^14 bytes


@dataclass(frozen=True, slots=True)
class NeedMoreBytes:
    """The bytes so far begin a TLS ClientHello; ask again with more (up to ``MAX_PEEK_BYTES``)."""


@dataclass(frozen=True, slots=True)
class NotTls:
    """The connection does not start with a TLS ClientHello we can read; ``reason`` says why."""

    reason: str


@dataclass(frozen=True, slots=True)
class ClientHello:
    """A complete TLS ClientHello; ``server_name`` is its SNI in lower case, or None if it sent none."""

    server_name: str | None


PeekResult = NeedMoreBytes | NotTls | ClientHello


class _Malformed(Exception):
    """A ClientHello whose fields run past their container; the message names the field."""


def peek_client_hello(first_bytes: bytes, *, max_bytes: int = MAX_PEEK_BYTES) -> PeekResult:
    """Classify the first bytes of a connection without consuming them; see the module docstring."""
    assert max_bytes >= RECORD_HEADER_BYTES, max_bytes
    data = first_bytes[:max_bytes]
    gathered = _gather_handshake(data)
    if not isinstance(gathered, bytes):
        return gathered
    if len(gathered) >= 1 and gathered[0] != HANDSHAKE_CLIENT_HELLO:
        return NotTls(f"the first handshake message has type {gathered[0]}, not client_hello (1)")
    if len(gathered) < HANDSHAKE_HEADER_BYTES:
        return _need_more(first_bytes, max_bytes)
    body_length = int.from_bytes(gathered[1:4], "big")
    if HANDSHAKE_HEADER_BYTES + body_length > max_bytes:
        return NotTls(f"a ClientHello of {body_length} bytes is larger than the {max_bytes}-byte peek limit")
    if len(gathered) < HANDSHAKE_HEADER_BYTES + body_length:
        return _need_more(first_bytes, max_bytes)
    body = gathered[HANDSHAKE_HEADER_BYTES : HANDSHAKE_HEADER_BYTES + body_length]
    try:
        return ClientHello(server_name=_server_name(body))
    except _Malformed as error:
        return NotTls(f"malformed ClientHello: {error}")


def _need_more(first_bytes: bytes, max_bytes: int) -> PeekResult:
    if len(first_bytes) >= max_bytes:
        return NotTls(f"no complete ClientHello in the first {max_bytes} bytes")
    return NeedMoreBytes()


def _gather_handshake(data: bytes) -> bytes | NotTls | NeedMoreBytes:
    """The handshake bytes of the leading handshake records (a message may span records).

    Gathering stops once the first message is whole: what follows it (early data, say) is not looked at,
    so more bytes never change an answer once the ClientHello is complete."""
    fragments: list[bytes] = []
    head = bytearray()  # the first message's 4-byte header, gathered across fragments
    gathered_bytes = 0
    offset = 0
    while offset < len(data) and not _is_whole(head, gathered_bytes):
        header = data[offset : offset + RECORD_HEADER_BYTES]
        verdict = _check_record_header(header)
        if verdict is not None:
            return verdict
        if len(header) < RECORD_HEADER_BYTES:
            break
        length = int.from_bytes(header[3:5], "big")
        fragment = data[offset + RECORD_HEADER_BYTES : offset + RECORD_HEADER_BYTES + length]
        fragments.append(fragment)
        head += fragment[: HANDSHAKE_HEADER_BYTES - len(head)]
        gathered_bytes += len(fragment)
        offset += RECORD_HEADER_BYTES + length
    if not fragments:
        return NeedMoreBytes() if len(data) < RECORD_HEADER_BYTES else b""
    return b"".join(fragments)


def _is_whole(head: bytearray, gathered_bytes: int) -> bool:
    if len(head) < HANDSHAKE_HEADER_BYTES:
        return False
    return gathered_bytes >= HANDSHAKE_HEADER_BYTES + int.from_bytes(head[1:4], "big")


def _check_record_header(header: bytes) -> NotTls | None:
    """Reject what cannot begin a handshake record; None while the (possibly partial) header is plausible."""
    if len(header) >= 1 and header[0] != CONTENT_TYPE_HANDSHAKE:
        return NotTls(f"the first byte is {header[0]:#04x}, not a TLS handshake record (0x16)")
    if len(header) >= 2 and header[1] != 3:
        return NotTls(f"record version {header[1]}.x is not TLS (3.x)")
    if len(header) >= 5:
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > MAX_RECORD_PAYLOAD:
            return NotTls(f"a handshake record of {length} bytes is not valid TLS")
    return None


class _Reader:
    """Reads big-endian fields from a bounded view; running past the end is malformed, not 'need more'."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._offset = 0
        self._what = what

    def take(self, count: int, field: str) -> bytes:
        if self._offset + count > len(self._data):
            raise _Malformed(f"{field} runs past the end of the {self._what}")
        piece = self._data[self._offset : self._offset + count]
        self._offset += count
        return piece

    def integer(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, length_size: int, field: str) -> bytes:
        return self.take(self.integer(length_size, f"{field} length"), field)

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset


def _server_name(body: bytes) -> str | None:
    hello = _Reader(body, "ClientHello")
    hello.take(2, "legacy_version")
    hello.take(32, "random")
    hello.vector(1, "legacy_session_id")
    hello.vector(2, "cipher_suites")
    hello.vector(1, "legacy_compression_methods")
    if hello.remaining == 0:
        return None  # a TLS 1.2-style hello without extensions (TLS 1.3 requires them, but that is not ours)
    extensions = _Reader(hello.vector(2, "extensions"), "extensions")
    while extensions.remaining:
        kind = extensions.integer(2, "extension type")
        payload = extensions.vector(2, "extension data")
        if kind == EXTENSION_SERVER_NAME:
            return _host_name(payload)
    return None


def _host_name(payload: bytes) -> str | None:
    names = _Reader(_Reader(payload, "server_name extension").vector(2, "server_name_list"), "server_name_list")
    while names.remaining:
        name_type = names.integer(1, "name_type")
        name = names.vector(2, "host_name")
        if name_type == NAME_TYPE_HOST_NAME:
            if not name or not name.isascii():
                raise _Malformed("the SNI host_name is empty or not ASCII")
            return name.decode("ascii").lower()
    return None


# ---------------------------------------------------------------------------------------------- inbound


class InboundDecision(enum.Enum):
    """What the inbound proxy does with a new connection, decided from its first bytes."""

    NEED_MORE_BYTES = "need more bytes"
    TERMINATE = "terminate TLS"  # a ClientHello for this proxy's own identity
    PASS_THROUGH = "pass through"  # not TLS, or TLS for someone else (the application's own TLS)


def inbound_decision(first_bytes: bytes, local_identity: str) -> InboundDecision:
    """Terminate TLS only when the SNI is ``local_identity``; consumes nothing."""
    peeked = peek_client_hello(first_bytes)
    if isinstance(peeked, NeedMoreBytes):
        return InboundDecision.NEED_MORE_BYTES
    if isinstance(peeked, ClientHello) and peeked.server_name == local_identity.lower():
        return InboundDecision.TERMINATE
    return InboundDecision.PASS_THROUGH
