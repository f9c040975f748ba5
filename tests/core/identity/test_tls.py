"""TLS sessions over MemoryBIO: real handshakes between two TlsSessions in memory, and the ClientHello peek.

Each handshake test runs both sides and checks what each one reports: identities on success, the typed
failure on each side otherwise (the side that refuses, and the side that gets the alert).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tls_certs import EPOCH_S, Issued, Pki

from tether.core.identity.client_hello import (
    MAX_PEEK_BYTES,
    ClientHello,
    NeedMoreBytes,
    NotTls,
    peek_client_hello,
)
from tether.core.identity.tls import (
    CloseNotifyReceived,
    EndOfStream,
    HandshakeCompleted,
    InboundDecision,
    PlaintextReceived,
    TlsContexts,
    TlsCredentials,
    TlsError,
    TlsFailure,
    TlsHandshakeError,
    TlsProtocolError,
    TlsSession,
    TlsUsageError,
    client_context,
    inbound_decision,
    server_context,
)

WEB = "web.shop.serviceaccount.identity.tether.cluster.local"
API = "api.shop.serviceaccount.identity.tether.cluster.local"
NOW_S = EPOCH_S


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create("root.tether.test")


@pytest.fixture(scope="module")
def other_pki() -> Pki:
    return Pki.create("root.elsewhere.test")


@pytest.fixture(scope="module")
def web(pki: Pki) -> TlsContexts:
    return contexts_for(pki, pki.leaf(WEB))


@pytest.fixture(scope="module")
def api(pki: Pki) -> TlsContexts:
    return contexts_for(pki, pki.leaf(API))


def contexts_for(pki: Pki, leaf: Issued, identity: str = "") -> TlsContexts:
    return TlsContexts.build(
        identity=identity or leaf.certificate.subject.rfc4514_string().removeprefix("CN="),
        leaf_der=leaf.der,
        intermediates_der=leaf.chain_der,
        key=leaf.key,
        trust_anchors_pem=pki.root.pem,
    )


@dataclass
class Side:
    """One end of an in-memory connection: its session (or a raw SSLObject peer), what it saw, how it failed."""

    session: TlsSession
    events: list = field(default_factory=list)
    error: TlsError | None = None

    def feed(self, data: bytes) -> None:
        if self.error is None:
            try:
                self.events.extend(self.session.receive(data))
            except TlsError as error:
                self.error = error

    @property
    def completed(self) -> HandshakeCompleted | None:
        return next((event for event in self.events if isinstance(event, HandshakeCompleted)), None)

    def plaintext(self) -> bytes:
        return b"".join(event.data for event in self.events if isinstance(event, PlaintextReceived))


def shuttle(client: Side, server: Side) -> None:
    """Carry bytes both ways until neither side has anything to say (alerts of a failed side included)."""
    for _ in range(20):
        to_server, to_client = client.session.data_to_send(), server.session.data_to_send()
        if not to_server and not to_client:
            return
        if to_server:
            server.feed(to_server)
        if to_client:
            client.feed(to_client)
    raise AssertionError("the sessions kept talking")


def connect(client_contexts, server_contexts, expected: str = WEB) -> tuple[Side, Side]:
    client = Side(TlsSession.client(client_contexts, expected, NOW_S))
    server = Side(TlsSession.server(server_contexts, NOW_S))
    shuttle(client, server)
    return client, server


def failure(side: Side) -> TlsFailure | None:
    return side.error.failure if side.error is not None else None


# ------------------------------------------------------------------------------------------- handshakes


def test_TlsSession_handshake_exchanges_identities_and_data(web: TlsContexts, api: TlsContexts):
    client, server = connect(api, web)
    assert client.error is None and server.error is None
    expected = HandshakeCompleted(peer_identity=WEB, tls_version="TLSv1.3", cipher=client_cipher(client))
    assert client.completed == expected
    assert server.completed is not None and server.completed.peer_identity == API
    assert client.session.peer_identity == WEB and server.session.peer_identity == API
    client.session.send(b"GET / HTTP/1.1\r\n\r\n")
    server.session.send(b"x" * 40_000)  # more than two records
    shuttle(client, server)
    assert server.plaintext() == b"GET / HTTP/1.1\r\n\r\n"
    assert client.plaintext() == b"x" * 40_000


def client_cipher(side: Side) -> str:
    cipher = side.session._ssl.cipher()  # noqa: SLF001 - the test checks the event against OpenSSL's own answer
    assert cipher is not None
    return cipher[0]


def test_TlsSession_close_notify_then_end_of_stream_is_clean(web: TlsContexts, api: TlsContexts):
    client, server = connect(api, web)
    client.session.close()
    shuttle(client, server)
    assert server.events[-1] == CloseNotifyReceived()
    server.session.send(b"late answer")  # TLS 1.3 half-close: the other direction still works
    server.session.close()
    shuttle(client, server)
    assert client.plaintext() == b"late answer"
    assert client.events[-1] == CloseNotifyReceived()
    server.feed(b"")
    client.feed(b"")
    assert server.events[-1] == EndOfStream(clean=True) and client.events[-1] == EndOfStream(clean=True)
    with pytest.raises(TlsUsageError):
        client.session.send(b"after close")


def test_TlsSession_end_during_handshake_is_a_handshake_error(web: TlsContexts):
    server = Side(TlsSession.server(web, NOW_S))
    server.feed(b"")
    assert failure(server) is TlsFailure.CLOSED_DURING_HANDSHAKE
    assert isinstance(server.error, TlsHandshakeError)


def test_TlsSession_refuses_a_server_with_another_identity(web: TlsContexts, api: TlsContexts):
    client, server = connect(api, web, expected="db.shop.serviceaccount.identity.tether.cluster.local")
    assert failure(client) is TlsFailure.WRONG_SERVER_IDENTITY
    assert "db.shop" in str(client.error)
    assert failure(server) is TlsFailure.PEER_REJECTED_CERTIFICATE  # the client's alert reached it
    assert server.completed is None


def test_TlsSession_refuses_a_wildcard_server_certificate(pki: Pki, api: TlsContexts):
    # OpenSSL's host name check accepts "*.shop..." for WEB; identities have no wildcards, so the session does not.
    wildcard = contexts_for(pki, pki.leaf("*.shop.serviceaccount.identity.tether.cluster.local"), identity=WEB)
    client, _server = connect(api, wildcard)
    assert failure(client) is TlsFailure.WRONG_SERVER_IDENTITY
    assert client.completed is None


def test_TlsSession_server_refuses_a_client_without_certificate(pki: Pki, web: TlsContexts):
    anonymous = client_context(pki.root.pem, None)
    client, server = connect(anonymous, web)
    assert failure(server) is TlsFailure.NO_CLIENT_CERTIFICATE
    assert server.completed is None
    # TLS 1.3: the client finished its side before the server looked at it, then got the refusal.
    assert client.completed is not None
    assert failure(client) is TlsFailure.NO_CLIENT_CERTIFICATE
    assert isinstance(client.error, TlsHandshakeError)


def test_TlsSession_server_refuses_a_client_of_another_trust_anchor(other_pki: Pki, pki: Pki, web: TlsContexts):
    stranger = TlsCredentials.from_der(*_leaf_parts(other_pki.leaf(API)))
    client, server = connect(client_context(pki.root.pem, stranger), web)
    assert failure(server) is TlsFailure.UNKNOWN_CA
    assert "trust anchor" in str(server.error)
    assert failure(client) is TlsFailure.PEER_REJECTED_CERTIFICATE


def test_TlsSession_client_refuses_a_server_of_another_trust_anchor(other_pki: Pki, pki: Pki, api: TlsContexts):
    impostor = server_context(pki.root.pem, TlsCredentials.from_der(*_leaf_parts(other_pki.leaf(WEB))))
    client, server = connect(api, impostor)
    assert failure(client) is TlsFailure.UNKNOWN_CA
    assert failure(server) is TlsFailure.PEER_REJECTED_CERTIFICATE


def _leaf_parts(leaf: Issued) -> tuple:
    return leaf.der, leaf.chain_der, leaf.key


def test_TlsSession_server_refuses_a_tls12_only_client(pki: Pki, web: TlsContexts):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_verify_locations(cadata=pki.root.pem.decode())
    client, server = connect(old, web)
    assert failure(server) is TlsFailure.NOT_TLS13
    assert failure(client) is TlsFailure.NOT_TLS13  # the protocol_version alert


def test_TlsSession_client_refuses_a_tls12_only_server(pki: Pki, api: TlsContexts, tmp_path):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    leaf = pki.leaf(WEB)
    old.load_cert_chain(*_pem_files(leaf, tmp_path))
    client, server = connect(api, old)
    assert failure(server) is TlsFailure.NOT_TLS13
    assert failure(client) is TlsFailure.NOT_TLS13


def _pem_files(leaf: Issued, folder) -> tuple[str, str]:
    """The raw TLS 1.2 server is a test peer, not ours: files are fine for its key."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(leaf.chain_pem)
    key.write_bytes(leaf.key_pem)
    return str(cert), str(key)


@pytest.mark.parametrize(
    ("not_before_s", "lifetime_s", "expected"),
    [
        (NOW_S - 100, 100, TlsFailure.CERTIFICATE_EXPIRED),  # expires exactly now
        (NOW_S + 60, 3600, TlsFailure.CERTIFICATE_NOT_YET_VALID),
        (NOW_S, 1, None),  # valid from exactly now
    ],
)
def test_TlsSession_checks_the_peer_leaf_against_its_own_wall_clock(pki, api, not_before_s, lifetime_s, expected):
    leaf = pki.leaf(WEB, not_before_s=not_before_s, lifetime_s=lifetime_s)
    client, _server = connect(api, contexts_for(pki, leaf))
    assert failure(client) is expected
    if expected is not None:
        assert "clock" in str(client.error)


def test_TlsSession_server_refuses_a_client_certificate_with_two_names(pki: Pki, web: TlsContexts):
    two = contexts_for(pki, pki.leaf(API, dns_names=[API, WEB]))
    client, server = connect(two, web)
    assert failure(server) is TlsFailure.BAD_PEER_CERTIFICATE
    assert "2 DNS names" in str(server.error)


def test_TlsSession_server_names_plain_http(web: TlsContexts):
    server = Side(TlsSession.server(web, NOW_S))
    server.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert failure(server) is TlsFailure.PROTOCOL_ERROR
    assert "plain HTTP" in str(server.error)


def test_TlsSession_corrupt_record_after_plaintext_fails_on_the_next_receive(web: TlsContexts, api: TlsContexts):
    client, server = connect(api, web)
    client.session.send(b"hello")
    client.session.send(b"world")
    records = bytearray(client.session.data_to_send())
    records[-1] ^= 0xFF  # the second record no longer authenticates
    events = server.session.receive(bytes(records))
    assert events == [PlaintextReceived(data=b"hello")]
    with pytest.raises(TlsProtocolError):
        server.session.receive(b"")
    with pytest.raises(TlsUsageError):
        server.session.receive(b"more")


def test_TlsSession_records_read_together_come_out_as_one_plaintext(web: TlsContexts, api: TlsContexts):
    """A proxy parses what one read carried in one go, as on a plaintext connection, not record by record."""
    client, server = connect(api, web)
    for part in (b"one ", b"two ", b"three"):
        client.session.send(part)  # a record each
    client.session.close()
    events = server.session.receive(client.session.data_to_send())
    assert events == [PlaintextReceived(data=b"one two three"), CloseNotifyReceived()]
    assert server.session.receive(b"") == [EndOfStream(clean=True)]


def test_TlsSession_send_before_the_handshake_is_a_usage_error(web: TlsContexts):
    with pytest.raises(TlsUsageError):
        TlsSession.client(web, API, NOW_S).send(b"too early")


def test_TlsSession_receive_after_the_end_of_stream_is_a_usage_error(web: TlsContexts, api: TlsContexts):
    _client, server = connect(api, web)
    assert server.session.receive(b"") == [EndOfStream(clean=False)]
    with pytest.raises(TlsUsageError):
        server.session.receive(b"more")


def test_TlsSession_close_during_the_handshake_gives_up(web: TlsContexts):
    client = TlsSession.client(web, API, NOW_S)
    client.close()
    with pytest.raises(TlsUsageError):
        client.receive(b"\x16\x03\x03")


def test_TlsSession_contexts_serve_many_connections(web: TlsContexts, api: TlsContexts):
    for _ in range(3):
        client, server = connect(api, web)
        assert client.completed is not None and server.completed is not None


# ------------------------------------------------------------------------------------------- inbound choice


def test_inbound_decision_terminates_only_its_own_identity(web: TlsContexts, api: TlsContexts):
    hello_for_web = TlsSession.client(api, WEB, NOW_S).data_to_send()
    assert inbound_decision(hello_for_web, WEB) is InboundDecision.TERMINATE
    assert inbound_decision(hello_for_web, WEB.upper()) is InboundDecision.TERMINATE
    assert inbound_decision(hello_for_web, API) is InboundDecision.PASS_THROUGH
    assert inbound_decision(hello_for_web[:40], WEB) is InboundDecision.NEED_MORE_BYTES
    assert inbound_decision(b"GET / HTTP/1.1\r\n", WEB) is InboundDecision.PASS_THROUGH
    assert inbound_decision(b"", WEB) is InboundDecision.NEED_MORE_BYTES


def test_inbound_decision_passes_through_tls_without_sni(pki: Pki):
    anonymous = client_context(pki.root.pem, None)
    anonymous.check_hostname = False
    raw = anonymous.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=None)
    with pytest.raises(ssl.SSLWantReadError):
        raw.do_handshake()
    hello = outgoing.read()
    assert peek_client_hello(hello) == ClientHello(server_name=None)
    assert inbound_decision(hello, WEB) is InboundDecision.PASS_THROUGH


# ------------------------------------------------------------------------------------------- ClientHello peek

NAMES = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,4}", fullmatch=True)


@pytest.fixture(scope="module")
def hello_context(pki: Pki) -> ssl.SSLContext:
    return client_context(pki.root.pem, None)


def client_hello(context: ssl.SSLContext, name: str) -> bytes:
    return TlsSession.client(context, name, NOW_S).data_to_send()


def as_records(handshake: bytes, cuts: list[int]) -> bytes:
    """Re-frame one handshake message into several records, cut at ``cuts`` (RFC 8446 allows fragmenting)."""
    points = sorted({0, len(handshake), *(cut for cut in cuts if 0 < cut < len(handshake))})
    out = bytearray()
    for start, end in zip(points, points[1:], strict=False):
        out += bytes([22, 3, 1]) + (end - start).to_bytes(2, "big") + handshake[start:end]
    return bytes(out)


SPLIT_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SPLIT_SETTINGS
@given(name=NAMES, cut=st.integers(min_value=0), tail=st.binary(max_size=64))
def test_peek_client_hello_needs_every_byte_then_finds_the_sni(hello_context, name, cut, tail):
    hello = client_hello(hello_context, name)
    prefix = hello[: cut % len(hello)]
    assert peek_client_hello(prefix) == NeedMoreBytes()
    # Whatever follows a complete ClientHello (early data, garbage) does not change the answer.
    assert peek_client_hello(hello + tail) == ClientHello(server_name=name)


@SPLIT_SETTINGS
@given(name=NAMES, cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=12), data=st.data())
def test_peek_client_hello_reads_a_hello_fragmented_over_records(hello_context, name, cuts, data):
    hello = client_hello(hello_context, name)
    handshake = hello[5:]  # one record from OpenSSL: strip its header and re-fragment the message
    assert len(handshake) == int.from_bytes(hello[3:5], "big")
    framed = as_records(handshake, cuts)
    assert peek_client_hello(framed) == ClientHello(server_name=name)
    cut = data.draw(st.integers(min_value=0, max_value=len(framed) - 1))
    assert peek_client_hello(framed[:cut]) == NeedMoreBytes()


def test_peek_client_hello_gives_up_at_the_limit(hello_context):
    handshake = client_hello(hello_context, WEB)[5:]
    one_byte_records = as_records(handshake, list(range(1, len(handshake))))  # 6 bytes per handshake byte
    limit = 2048
    assert len(handshake) < limit < len(one_byte_records)
    assert peek_client_hello(one_byte_records[: limit - 1], max_bytes=limit) == NeedMoreBytes()
    verdict = peek_client_hello(one_byte_records, max_bytes=limit)
    assert isinstance(verdict, NotTls) and "2048" in verdict.reason
    assert peek_client_hello(one_byte_records) == ClientHello(server_name=WEB)  # within the default 16 KiB
    huge = bytes([22, 3, 1, 0x40, 0x00, 1, 0x01, 0x00, 0x00])  # announces a 64 KiB ClientHello
    verdict = peek_client_hello(huge)
    assert isinstance(verdict, NotTls) and f"{MAX_PEEK_BYTES}-byte" in verdict.reason


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda body: bytes([22, 3, 1]) + len(body).to_bytes(2, "big") + body),
        st.binary(max_size=300).map(
            lambda body: bytes([22, 3, 3, 0, len(body) + 4, 1, 0, 0, len(body)]) + body if len(body) < 250 else body
        ),
    ),
    cut=st.integers(min_value=0),
)
@example(data=b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", cut=3)
def test_peek_client_hello_never_changes_a_decided_answer(data, cut):
    """Garbage and near-ClientHellos: the peek never raises, and once it decides, more bytes agree."""
    short = data[: cut % (len(data) + 1)]
    first, full = peek_client_hello(short), peek_client_hello(data)
    assert isinstance(first, NeedMoreBytes | NotTls | ClientHello)
    if not isinstance(first, NeedMoreBytes):
        assert full == first


def test_peek_client_hello_names_what_is_not_tls():
    assert "0x47" in peek_client_hello(b"GET / HTTP/1.1\r\n").reason  # type: ignore[union-attr]
    assert "version" in peek_client_hello(b"\x16\x02").reason  # type: ignore[union-attr]
    assert "client_hello" in peek_client_hello(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00").reason  # type: ignore[union-attr]
    truncated_body = bytes([22, 3, 1, 0, 6, 1, 0, 0, 2, 3, 3])  # a 2-byte hello: no room for the random
    assert "malformed" in peek_client_hello(truncated_body).reason  # type: ignore[union-attr]
