"""received_fields against h2's own checks and cookie normalisation, on arbitrary header blocks."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.exceptions import ProtocolError
from h2.utilities import HeaderValidationFlags, normalize_inbound_headers, validate_headers
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tether.core.proxy.h2headers import Block, MalformedHeaders, received_fields
from tether.core.proxy.h2session import H2Limits, H2Session, H2SessionError

_FLAGS = {
    Block.REQUEST: HeaderValidationFlags(
        is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
    ),
    Block.RESPONSE: HeaderValidationFlags(
        is_client=True, is_trailer=False, is_response_header=True, is_push_promise=False
    ),
    Block.TRAILERS: HeaderValidationFlags(
        is_client=True, is_trailer=True, is_response_header=False, is_push_promise=False
    ),
}
_PSEUDO = [b":method", b":scheme", b":authority", b":path", b":status", b":protocol", b":other", b":"]
_NAMES = [*_PSEUDO, b"host", b"cookie", b"te", b"connection", b"x-a", b"X-Up", b"a:b", b"a b", b"", b"\x7f"]
_VALUES = [b"GET", b"CONNECT", b"http", b"web", b"/", b"", b"200", b"trailers", b"TRAILERS", b"gzip"]
names = st.sampled_from(_NAMES) | st.binary(min_size=0, max_size=4)
values = (
    st.sampled_from(_VALUES)
    | st.sampled_from([b" a", b"a\t", b"a\x00", b"a\rb", b"a b", b"\x01"])
    | st.binary(max_size=4)
)
field = st.tuples(names, values).flatmap(
    lambda pair: st.sampled_from([pair, HeaderTuple(*pair), NeverIndexedHeaderTuple(*pair)])
)
REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"web"), (b":path", b"/")]


_PLAUSIBLE_NAMES = [b"x-a", b"host", b"cookie", b"accept", b"te", b"content-length", b":path", b":status"]
_PLAUSIBLE_VALUES = [b"web", b"trailers", b"a=1", b"", b"1", b"a b", b"/", b"200"]
plausible = st.tuples(st.sampled_from(_PLAUSIBLE_NAMES), st.sampled_from(_PLAUSIBLE_VALUES))
START = {Block.REQUEST: REQUEST, Block.RESPONSE: [(b":status", b"200")], Block.TRAILERS: []}


@st.composite
def blocks(draw) -> tuple[list, Block]:
    """A block type and fields for it: mostly what it needs and plausible fields, sometimes the pseudo-headers
    of another type, shuffled, and arbitrary fields, so that both accepted and refused blocks come up often."""
    block = draw(st.sampled_from(list(Block)))
    start = list(START[draw(st.sampled_from(list(Block)))] if draw(st.integers(0, 4)) == 0 else START[block])
    if start and draw(st.integers(0, 3)) == 0:
        start = draw(st.permutations(start))[: draw(st.integers(0, len(start)))]
    rest = draw(st.lists(plausible | field if draw(st.integers(0, 3)) == 0 else plausible, max_size=5))
    position = draw(st.integers(0, len(rest))) if draw(st.integers(0, 3)) == 0 else 0
    return [*rest[:position], *start, *rest[position:]], block


def _h2s(headers: list, block: Block) -> list | None:
    flags = _FLAGS[block]
    try:
        return list(validate_headers(normalize_inbound_headers(headers, flags), flags))
    except ProtocolError:
        return None


@settings(max_examples=1500)
@given(drawn=blocks())
@example(drawn=([*REQUEST, (b"cookie", b"a "), (b"cookie", b"b")], Block.REQUEST))  # joined: "a ; b"
@example(drawn=([(b"cookie", b"a"), *REQUEST], Block.REQUEST))  # cookies move last, after the check
@example(drawn=([(b":method", b"CONNECT"), (b":authority", b"web")], Block.REQUEST))
@example(drawn=([(b":method", b"CONNECT"), (b":protocol", b"ws"), (b":authority", b"w")], Block.REQUEST))
@example(drawn=([*REQUEST, (b"host", b"web"), (b"host", b"web")], Block.REQUEST))
@example(drawn=([*REQUEST, (b"te", b"TRAILERS")], Block.REQUEST))
def test_received_fields_accepts_and_reports_exactly_what_h2_does(drawn: tuple[list, Block]) -> None:
    headers, block = drawn
    expected = _h2s(headers, block)
    try:
        got = received_fields(headers, block)
    except MalformedHeaders:
        assert expected is None, headers
        return
    assert expected is not None, headers
    assert [(type(field), tuple(field)) for field in got] == [(type(field), tuple(field)) for field in expected]


def _session_pair() -> tuple[H2Session, h2.connection.H2Connection]:
    limits = H2Limits(100, 65_535, 1 << 20, 16_384, 1000)
    server = H2Session(client=False, limits=limits)
    config = h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    client = h2.connection.H2Connection(config)
    client.initiate_connection()
    server.receive(client.data_to_send(), 0)
    client.receive_data(server.data_to_send())
    server.receive(client.data_to_send(), 0)
    server.data_to_send()
    return server, client


def test_h2session_refuses_a_malformed_request_block_with_goaway_protocol_error() -> None:
    server, client = _session_pair()
    client.send_headers(1, [*REQUEST, (b"connection", b"close")], end_stream=True)
    with pytest.raises(H2SessionError, match="connection-specific"):
        server.receive(client.data_to_send(), 0)
    (goaway,) = [e for e in client.receive_data(server.data_to_send()) if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_h2session_joins_split_cookies_as_h2_did() -> None:
    server, client = _session_pair()
    client.send_headers(1, [*REQUEST, (b"cookie", b"a=1"), (b"x-b", b"2"), (b"cookie", b"c=3")], end_stream=True)
    (request,) = [e for e in server.receive(client.data_to_send(), 0) if isinstance(e, h2.events.RequestReceived)]
    assert [tuple(field) for field in request.headers] == [*REQUEST, (b"x-b", b"2"), (b"cookie", b"a=1; c=3")]
