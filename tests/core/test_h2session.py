"""H2Session on its own, against a plain h2 peer: frames on closed streams, as the h2-based session had them."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from h2session_reference import H2Session as ReferenceSession
from h2session_reference import H2SessionError as ReferenceSessionError

from tether.core.proxy.h2session import H2Limits, H2Session, H2SessionError

LIMITS = H2Limits(
    max_concurrent_streams=100,
    initial_stream_window=65_535,
    connection_window=1 << 20,
    max_header_bytes=16_384,
    max_control_frames_per_second=1000,
)
REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"/")]


def _pair(session: type = H2Session) -> tuple[H2Session, h2.connection.H2Connection]:
    """A server session and a client peer that exchanged prefaces and settings."""
    server = session(client=False, limits=LIMITS)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    server.receive(client.data_to_send(), 0)
    client.receive_data(server.data_to_send())
    server.receive(client.data_to_send(), 0)
    return server, client


def _frames(data: bytes) -> list[tuple[int, int, int]]:
    """(type, flags, stream id) of each frame in ``data``."""
    out = []
    while data:
        length = int.from_bytes(data[:3], "big")
        out.append((data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFF_FFFF))
        data = data[9 + length :]
    return out


RST_STREAM = 0x3
FORGED_DATA_ON_1 = b"\x00\x00\x04\x00\x00\x00\x00\x00\x01late"  # a client's h2 refuses to write it


def _reset_then_data(server: H2Session, client: h2.connection.H2Connection) -> bytes:
    client.send_headers(1, REQUEST)
    server.receive(client.data_to_send(), 0)
    server.reset(1, ErrorCodes.CANCEL)
    server.data_to_send()  # the RST_STREAM never reaches the client before its DATA
    client.send_data(1, b"late")
    return client.data_to_send()


def _reset_then_headers(server: H2Session, client: h2.connection.H2Connection) -> bytes:
    data = _reset_then_data(server, client)
    server.receive(data, 0)
    server.data_to_send()
    return _headers_frame(1, client)


def _ended_then_data(server: H2Session, client: h2.connection.H2Connection) -> bytes:
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive(client.data_to_send(), 0)
    server.send_headers(1, [(b":status", b"204")], end_stream=True)
    server.data_to_send()
    return FORGED_DATA_ON_1


def _ended_then_headers(server: H2Session, client: h2.connection.H2Connection) -> bytes:
    _ended_then_data(server, client)
    return _headers_frame(1, client)


def _skipped_then_headers(server: H2Session, client: h2.connection.H2Connection) -> bytes:
    client.send_headers(5, REQUEST, end_stream=True)
    server.receive(client.data_to_send(), 0)
    return _headers_frame(3, client)  # lower than 5: implicitly closed on the server


def _headers_frame(stream_id: int, client: h2.connection.H2Connection) -> bytes:
    """A HEADERS frame the client's h2 would refuse to write (a used stream id), encoded by its HPACK."""
    block = client.encoder.encode(REQUEST)
    return len(block).to_bytes(3, "big") + b"\x01\x05" + stream_id.to_bytes(4, "big") + block


SCENARIOS = [_reset_then_data, _reset_then_headers, _ended_then_data, _ended_then_headers, _skipped_then_headers]


def _outcome(scenario, *, reference: bool, cleaned: bool) -> tuple[list[str], list[tuple[int, int, int]], bool]:
    server, client = _pair(ReferenceSession if reference else H2Session)
    wire = scenario(server, client)
    if cleaned:  # h2 moves closed streams out of its table when it counts the open ones
        assert server.open_outbound_streams == 0
    try:
        events = [type(event).__name__ for event in server.receive(wire, 0)]
    except (H2SessionError, ReferenceSessionError):
        return [], _frames(server.data_to_send()), True
    return events, _frames(server.data_to_send()), False


@pytest.mark.parametrize("cleaned", [False, True])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_h2session_frames_on_closed_streams_are_answered_as_h2_answers_them(scenario, cleaned: bool) -> None:
    """The session on h2conn.py keeps the h2-based session's rules for frames on closed streams, whether
    or not h2 had moved the stream out of its table: RST_STREAM for a stream we reset, a connection error
    otherwise."""
    ours = _outcome(scenario, reference=False, cleaned=cleaned)
    assert ours == _outcome(scenario, reference=True, cleaned=cleaned)
    events, frames, failed = ours
    if scenario.__name__.startswith("_reset"):
        assert not failed and (RST_STREAM, 0, 1) in frames and "DataReceived" not in events
    if scenario is _skipped_then_headers:
        assert failed


def test_h2session_connection_lives_on_after_a_frame_on_a_stream_it_reset() -> None:
    server, client = _pair()
    server.receive(_reset_then_data(server, client), 0)
    client.send_headers(3, REQUEST, end_stream=True)
    assert any(isinstance(event, h2.events.RequestReceived) for event in server.receive(client.data_to_send(), 0))
