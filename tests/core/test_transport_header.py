"""The transport.l5d.io/v1 header: round trips, known bytes, arbitrary splits, hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.core.proxy.transport_header import PREFACE, TransportHeader, TransportHeaderError, parse

headers = st.builds(
    TransportHeader,
    port=st.integers(1, 65535),
    name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz.-0123456789", max_size=60),
    session_protocol=st.sampled_from([None, "http1", "http2"]),
)


def test_transport_header_known_encoding() -> None:
    # port 5432 as a varint is 0xb8 0x2a; field 1 varint key 0x08; http2 kind: field 2, empty message.
    encoded = TransportHeader(5432, session_protocol="http2").encode()
    assert encoded == PREFACE + b"\x00\x00\x00\x07" + b"\x08\xb8\x2a" + b"\x1a\x02\x12\x00"


@given(headers, st.binary(max_size=20))
def test_transport_header_round_trips_and_leaves_the_rest(header: TransportHeader, rest: bytes) -> None:
    data = header.encode() + rest
    parsed = parse(data)
    assert parsed is not None
    decoded, used = parsed
    assert decoded == header and data[used:] == rest


@given(headers)
def test_transport_header_waits_for_every_prefix(header: TransportHeader) -> None:
    data = header.encode()
    for cut in range(len(data)):
        assert parse(data[:cut]) is None


@pytest.mark.parametrize(
    "message",
    [b"\x08\x00", b"\x08\x80\x80\x04", b"\x12\x05ab", b"\x0b", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"],
)
def test_transport_header_hostile_messages_are_errors(message: bytes) -> None:
    with pytest.raises(TransportHeaderError):
        parse(PREFACE + len(message).to_bytes(4, "big") + message)


def test_transport_header_too_long_is_an_error() -> None:
    with pytest.raises(TransportHeaderError, match="larger than"):
        parse(PREFACE + (10_000).to_bytes(4, "big"))
