"""mTLS between two proxy machines, in memory: an outbound proxy, an inbound proxy and a workload behind it.

Real TLS 1.3 handshakes run over ``ssl.MemoryBIO`` in both machines; a tiny network here moves bytes between
the outbound proxy's upstream connection and the inbound proxy's accepted one, and plays the workload (an
HTTP/1.1 server) behind the inbound proxy.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import h11
import pytest

from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.effects import Close, Connect, Send, ShutdownWrite
from tether.core.identity.tls import TlsContexts
from tether.core.proxy import Proxy
from tether.core.proxy.mtls import CertificateExpired, CertificateUpdate

sys.path.insert(0, str(Path(__file__).parent / "identity"))
from tls_certs import EPOCH_S, Pki  # noqa: E402

WEB = "web.default.serviceaccount.identity.linkerd.cluster.local"
CLIENT = "client.default.serviceaccount.identity.linkerd.cluster.local"
PEER = Address("10.0.0.2", 80)
INBOUND_PORT = 4143
S = 1_000_000_000


def contexts(pki: Pki, identity: str, *, certified_as: str | None = None) -> TlsContexts:
    """A proxy's contexts; ``certified_as`` gives it a certificate for another name (a misissued one)."""
    leaf = pki.leaf(certified_as or identity)
    return TlsContexts.build(
        identity=identity,
        leaf_der=leaf.der,
        intermediates_der=leaf.chain_der,
        key=leaf.key,
        trust_anchors_pem=pki.root.pem,
    )


class Mesh:
    """Client -> outbound proxy -> (mTLS) -> inbound proxy -> workload, all in memory."""

    def __init__(
        self, outbound_identity: TlsContexts | None, inbound_identity: TlsContexts | None, expect: str
    ) -> None:
        resolver = StaticResolver(
            by_host={"web": [PEER]}, meshed_hosts={"web": INBOUND_PORT}, identities={"web": expect}
        )
        self.outbound = Proxy(ProxyConfig(), resolver, random.Random(1))
        self.inbound = Proxy(
            ProxyConfig(protocol="detect"),
            StaticResolver(default=[Address("127.0.0.1", 8080)]),
            random.Random(2),
            direction="inbound",
        )
        for proxy, update in ((self.outbound, outbound_identity), (self.inbound, inbound_identity)):
            if update is not None:
                proxy.control(CertificateUpdate(contexts=update, wall_time_s=EPOCH_S), 0)
        self.now_ns = 0
        self.links: dict[tuple[str, int], tuple[str, int]] = {}  # (proxy, conn) -> (proxy, conn)
        self.workload: dict[int, h11.Connection] = {}  # inbound upstream conn id -> workload parser
        self.client_bytes = bytearray()
        self.closed: set[tuple[str, int]] = set()
        self.errors: list[str] = []
        self.client = self.outbound.accepted(0, target="web:80")

    def proxy(self, name: str) -> Proxy:
        return self.outbound if name == "out" else self.inbound

    def run(self) -> None:
        for _ in range(200):
            moved = False
            for name in ("out", "in"):
                for effect in self.proxy(name).effects():
                    moved = True
                    self.apply(name, effect)
            if not moved:
                return

    def apply(self, name: str, effect: object) -> None:
        proxy = self.proxy(name)
        if isinstance(effect, Connect):
            if name == "out":
                assert effect.address == Address(PEER.host, INBOUND_PORT)
                peer_id = self.inbound.accepted(self.now_ns)
                self.links[("out", effect.conn_id)] = ("in", peer_id)
                self.links[("in", peer_id)] = ("out", effect.conn_id)
            else:
                self.workload[effect.conn_id] = h11.Connection(h11.SERVER)
            proxy.connected(effect.conn_id, self.now_ns)
        elif isinstance(effect, Send):
            proxy.sent(effect.conn_id, len(effect.data), self.now_ns)
            if name == "out" and effect.conn_id == self.client:
                self.client_bytes += effect.data
            elif (name, effect.conn_id) in self.links:
                other, conn = self.links[(name, effect.conn_id)]
                self.proxy(other).received(conn, effect.data, self.now_ns)
            elif name == "in" and effect.conn_id in self.workload:
                self.serve(effect.conn_id, effect.data)
        elif isinstance(effect, (Close, ShutdownWrite)):
            self.closed.add((name, effect.conn_id))
            if isinstance(effect, Close) and (name, effect.conn_id) in self.links:
                other, conn = self.links.pop((name, effect.conn_id))
                self.links.pop((other, conn), None)
                self.proxy(other).received(conn, b"", self.now_ns)
        elif type(effect).__name__ == "LogError":
            self.errors.append(effect.message)  # type: ignore[attr-defined]

    def serve(self, conn_id: int, data: bytes) -> None:
        parser = self.workload[conn_id]
        parser.receive_data(data)
        while (event := parser.next_event()) not in (h11.NEED_DATA, h11.PAUSED):  # garbage raises: a failure
            if isinstance(event, h11.EndOfMessage):
                body = b"hello from web"
                out = parser.send(h11.Response(status_code=200, headers=[("content-length", str(len(body)))]))
                out += parser.send(h11.Data(data=body)) + parser.send(h11.EndOfMessage())
                parser.start_next_cycle()
                self.inbound.received(conn_id, out, self.now_ns)

    def request(self) -> bytes:
        self.outbound.received(self.client, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n", self.now_ns)
        self.run()
        return bytes(self.client_bytes)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


def test_meshed_request_rides_mtls_and_both_sides_know_the_peer(pki: Pki) -> None:
    mesh = Mesh(contexts(pki, CLIENT), contexts(pki, WEB), expect=WEB)
    answer = mesh.request()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello from web"), (answer, mesh.errors)
    inbound_labels = {labels for labels in mesh.inbound.telemetry.request_total}
    assert {(lab.tls, lab.peer_id) for lab in inbound_labels} == {("true", CLIENT)}
    outbound_labels = {labels for labels in mesh.outbound.telemetry.request_total}
    assert {(lab.tls, lab.peer_id) for lab in outbound_labels} == {("true", WEB)}
    tcp = {(lab.peer, lab.tls, lab.peer_id) for lab in mesh.inbound.telemetry.tcp_open_total}
    assert ("src", "true", CLIENT) in tcp


def test_a_peer_with_the_wrong_identity_is_refused(pki: Pki) -> None:
    """The inbound proxy answers for web's name but its certificate names another workload."""
    impostor = "other.default.serviceaccount.identity.linkerd.cluster.local"
    mesh = Mesh(contexts(pki, CLIENT), contexts(pki, WEB, certified_as=impostor), expect=WEB)
    answer = mesh.request()
    assert answer.startswith(b"HTTP/1.1 502"), answer
    assert b"mTLS" in answer or any("TLS" in error for error in mesh.errors), (answer, mesh.errors)
    assert not mesh.workload, "the impostor's workload must never be reached"


def test_a_client_from_another_trust_domain_is_refused(pki: Pki) -> None:
    stranger = Pki.create("root.elsewhere.test")
    mesh = Mesh(contexts(stranger, CLIENT), contexts(pki, WEB), expect=WEB)
    answer = mesh.request()
    assert not answer.startswith(b"HTTP/1.1 200"), answer
    assert not mesh.workload


def test_without_a_certificate_the_outbound_proxy_fails_closed(pki: Pki) -> None:
    mesh = Mesh(contexts(pki, CLIENT), contexts(pki, WEB), expect=WEB)
    mesh.outbound.control(CertificateExpired(reason="no renewal for 24 h"), 0)
    answer = mesh.request()
    assert answer.startswith(b"HTTP/1.1 502") and b"expired" in answer, answer
    assert not mesh.links, "no connection may be opened without a certificate"


def test_plaintext_to_an_inbound_proxy_with_identity_passes_through_labelled(pki: Pki) -> None:
    inbound = Proxy(
        ProxyConfig(protocol="detect"),
        StaticResolver(default=[Address("127.0.0.1", 8080)]),
        random.Random(2),
        direction="inbound",
    )
    inbound.control(CertificateUpdate(contexts=contexts(pki, WEB), wall_time_s=EPOCH_S), 0)
    conn = inbound.accepted(0)
    inbound.received(conn, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n", 0)
    assert any(isinstance(e, Connect) for e in inbound.effects())
    labels = {(lab.tls, lab.no_tls_reason) for lab in inbound.telemetry.request_total}
    assert labels == {("no_identity", "not_provided_by_remote")}
