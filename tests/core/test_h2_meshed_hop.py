"""The meshed hop frame by frame: HTTP/1.1 -> outbound proxy -> HTTP/2 -> inbound proxy -> HTTP/1.1.

What crosses between the proxies is as small as HTTP/2 allows (a request without a body is one HEADERS
frame with END_STREAM; a response's last bytes carry END_STREAM), and each side restores exactly the
HTTP/1.1 message it was given: no chunked framing for a request that had no body.
"""

from __future__ import annotations

from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import pytest

from tether.core.address import Address
from tether.core.discovery import StaticResolver

WORKLOAD = Address("127.0.0.1", 8080)
MESHED = StaticResolver(by_host={"web": [Address("10.0.0.9", 8080)]}, meshed_hosts={"web": 4143})
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, WINDOW_UPDATE = 0x0, 0x1, 0x4, 0x8
END_STREAM = 0x1


def frames(wire: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of the HTTP/2 frames in ``wire`` (after any preface)."""
    if PREFACE in wire:
        wire = wire[wire.index(PREFACE) + len(PREFACE) :]
    out = []
    while wire:
        length = int.from_bytes(wire[:3], "big")
        out.append((wire[3], wire[4], int.from_bytes(wire[5:9], "big") & 0x7FFF_FFFF, wire[9 : 9 + length]))
        wire = wire[9 + length :]
    return out


def stream_frames(wire: bytes) -> list[tuple[int, int, bytes]]:
    """(type, flags, payload) of the frames on streams (connection-level frames left out)."""
    return [(kind, flags, payload) for kind, flags, stream, payload in frames(wire) if stream]


@dataclass
class Mesh:
    """An outbound and an inbound proxy harness, wired by hand: the test moves every byte."""

    outbound: object
    inbound: object
    client: int
    link_out: int = 0  # the outbound proxy's connection to the inbound port
    link_in: int = 0  # the inbound proxy's side of it
    workload: int = 0  # the inbound proxy's connection to the workload

    def request(self, raw: bytes) -> bytes:
        """The client sends ``raw``; returns what the outbound proxy wrote towards the inbound proxy."""
        self.outbound.recv(self.client, raw)
        if not self.link_out:
            self.link_out = self.outbound.connects[-1].conn_id
            self.outbound.connected(self.link_out)
            self.link_in = self.inbound.accept()
        return self.outbound.take(self.link_out)

    def to_workload(self, wire: bytes) -> bytes:
        """The inbound proxy reads ``wire``; returns what it wrote to the workload."""
        self.inbound.recv(self.link_in, wire)
        if not self.workload:
            self.workload = self.inbound.connects[-1].conn_id
            self.inbound.connected(self.workload)
        return self.inbound.take(self.workload)

    def respond(self, raw: bytes) -> bytes:
        """The workload answers ``raw``; returns what the inbound proxy wrote back to the outbound one."""
        self.inbound.recv(self.workload, raw)
        return self.inbound.take(self.link_in)

    def to_client(self, wire: bytes) -> bytes:
        self.outbound.recv(self.link_out, wire)
        return self.outbound.take(self.client)

    def settle(self) -> None:
        """Deliver what is still in flight between the proxies (SETTINGS acknowledgements, say)."""
        for _ in range(4):
            for side, conn_id, other, other_id in (
                (self.outbound, self.link_out, self.inbound, self.link_in),
                (self.inbound, self.link_in, self.outbound, self.link_out),
            ):
                wire = side.take(conn_id)
                if wire:  # (b"" would be an EOF)
                    other.recv(other_id, wire)


@pytest.fixture
def mesh(make_harness) -> Mesh:
    """Two proxies with their HTTP/2 connection open and settled: a first request set it up, so the requests
    of a test find it ready (a request that waits for the connection is sent whole once it opens)."""
    outbound = make_harness(resolver=MESHED)
    inbound = make_harness(endpoints=[WORKLOAD], protocol="detect", direction="inbound")
    ready = Mesh(outbound, inbound, outbound.accept())
    answer = _round_trip(
        ready, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    )[3]
    assert answer.startswith(b"HTTP/1.1 200 ")
    ready.settle()
    return ready


def _round_trip(mesh: Mesh, request: bytes, response: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(request frames, workload's request, response frames, client's response) of one exchange."""
    request_wire = mesh.request(request)
    at_workload = mesh.to_workload(request_wire)
    response_wire = mesh.respond(response)
    return request_wire, at_workload, response_wire, mesh.to_client(response_wire)


def test_meshed_get_without_body_is_one_headers_frame_and_arrives_without_chunked_framing(mesh: Mesh) -> None:
    wire, at_workload, _, answer = _round_trip(
        mesh, b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    ((kind, flags, _),) = stream_frames(wire)
    assert kind == HEADERS and flags & END_STREAM
    assert at_workload.startswith(b"GET /a HTTP/1.1\r\n") and at_workload.endswith(b"\r\n\r\n")
    assert b"transfer-encoding" not in at_workload.lower() and b"content-length" not in at_workload.lower()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok")


def test_meshed_get_with_content_length_zero_ends_on_its_headers_frame(mesh: Mesh) -> None:
    wire, at_workload, _, _ = _round_trip(
        mesh, b"GET / HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n"
    )
    ((kind, flags, _),) = stream_frames(wire)
    assert kind == HEADERS and flags & END_STREAM
    assert b"transfer-encoding" not in at_workload.lower() and at_workload.endswith(b"\r\n\r\n")


def test_meshed_post_keeps_its_body_and_ends_on_the_data(mesh: Mesh) -> None:
    wire, at_workload, _, answer = _round_trip(
        mesh,
        b"POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    )
    assert [kind for kind, _, _ in stream_frames(wire)][0] == HEADERS
    assert b"".join(payload for kind, _, payload in stream_frames(wire) if kind == DATA) == b"hello"
    assert at_workload.endswith(b"\r\n\r\nhello") and b"content-length: 5" in at_workload.lower()
    assert answer.startswith(b"HTTP/1.1 201 Created\r\n") and answer.endswith(b"\r\n\r\n")


def test_meshed_response_body_ends_the_stream_on_its_last_data_frame(mesh: Mesh) -> None:
    _, _, wire, answer = _round_trip(
        mesh, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    )
    kinds = [(kind, bool(flags & END_STREAM)) for kind, flags, _ in stream_frames(wire)]
    assert kinds == [(HEADERS, False), (DATA, True)]
    assert answer.endswith(b"\r\n\r\nhello")


@pytest.mark.parametrize(
    "response",
    [b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
    ids=["204", "content-length-0"],
)
def test_meshed_response_without_body_is_one_headers_frame_and_reaches_the_client_whole(
    mesh: Mesh, response: bytes
) -> None:
    _, _, wire, answer = _round_trip(mesh, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n", response)
    ((kind, flags, _),) = stream_frames(wire)
    assert kind == HEADERS and flags & END_STREAM
    status_line = response.split(b"\r\n", 1)[0]
    assert answer.startswith(status_line + b"\r\n") and answer.endswith(b"\r\n\r\n")
    assert b"transfer-encoding" not in answer.lower()
    assert mesh.client not in mesh.outbound.closed, "the client keeps its connection for the next request"


def test_meshed_chunked_response_with_trailers_keeps_them(mesh: Mesh) -> None:
    _, _, wire, answer = _round_trip(
        mesh,
        b"GET / HTTP/1.1\r\nHost: web\r\nTE: trailers\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 1\r\n\r\n",
    )
    kinds = [(kind, bool(flags & END_STREAM)) for kind, flags, _ in stream_frames(wire)]
    assert kinds == [(HEADERS, False), (DATA, False), (HEADERS, True)]
    assert answer.endswith(b"5\r\nhello\r\n0\r\nx-sum: 1\r\n\r\n")


def test_meshed_keepalive_requests_share_one_connection(mesh: Mesh) -> None:
    for path in (b"/1", b"/2", b"/3"):
        _, at_workload, _, answer = _round_trip(
            mesh, b"GET " + path + b" HTTP/1.1\r\nHost: web\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
        )
        assert at_workload.startswith(b"GET " + path + b" ") and answer.endswith(b"\r\n\r\nx")
    assert len(mesh.outbound.connects) == 1 and len(mesh.inbound.connects) == 1


def test_http1_client_gets_a_whole_message_when_the_meshed_peer_ends_its_response_on_headers(make_harness) -> None:
    """A response that is one HEADERS frame with END_STREAM (from any HTTP/2 peer) ends the HTTP/1.1 message:
    the client used to get a chunked head with no last chunk, and then a closed connection."""
    outbound = make_harness(resolver=MESHED)
    client = outbound.accept()
    outbound.recv(client, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
    link = outbound.connects[-1].conn_id
    outbound.connected(link)
    wire = outbound.take(link)
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    peer.initiate_connection()
    (request,) = [e for e in peer.receive_data(wire[wire.index(PREFACE) :]) if isinstance(e, h2.events.RequestReceived)]
    peer.send_headers(request.stream_id, [(b":status", b"200")], end_stream=True)
    outbound.recv(link, peer.data_to_send())
    assert outbound.take(client) == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert client not in outbound.closed


def test_meshed_head_request_gets_its_head_with_the_length_and_no_body(mesh: Mesh) -> None:
    wire, at_workload, response_wire, answer = _round_trip(
        mesh, b"HEAD /a HTTP/1.1\r\nHost: web\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    )
    assert at_workload.startswith(b"HEAD /a HTTP/1.1\r\n") and b"transfer-encoding" not in at_workload.lower()
    ((kind, flags, _),) = stream_frames(response_wire)
    assert kind == HEADERS and flags & END_STREAM
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 5" in answer.lower()
    assert answer.endswith(b"\r\n\r\n") and mesh.client not in mesh.outbound.closed
    _, _, _, again = _round_trip(
        mesh, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
    )
    assert again.startswith(b"HTTP/1.1 200 OK\r\n") and again.endswith(b"\r\n\r\nx"), "the connection carries on"
