"""h2frames.py: the frame reader's limits and header-block assembly, on hand-made bytes."""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, HeadersFrame

from tether.core.proxy import h2frames as wire
from tether.core.proxy.h2frames import FrameError, FrameReader, FrameTooLong


def _reader() -> FrameReader:
    reader = FrameReader(server=True)
    reader.feed(wire.PREFACE)
    return reader


def test_h2frames_preface_is_checked_byte_by_byte() -> None:
    reader = FrameReader(server=True)
    for byte in wire.PREFACE[:10]:
        reader.feed(bytes((byte,)))
    with pytest.raises(FrameError):
        reader.feed(b"GET / HTTP/1.1\r\n")


def test_h2frames_an_overlong_frame_is_refused_from_its_header() -> None:
    """The 9-byte header is enough: the payload is never waited for (or buffered)."""
    reader = _reader()
    reader.feed((1 << 20).to_bytes(3, "big") + b"\0\0\0\0\0\1")
    with pytest.raises(FrameTooLong) as error:
        reader.next_frame()
    assert error.value.code == ErrorCodes.FRAME_SIZE_ERROR


def test_h2frames_data_frames_match_hyperframe() -> None:
    frame = DataFrame(3, b"hello", flags=["PADDED", "END_STREAM"], pad_length=4)
    reader = _reader()
    serialized = frame.serialize()
    reader.feed(serialized[:5])
    assert reader.next_frame() is None  # incomplete
    reader.feed(serialized[5:])
    parsed = reader.next_frame()
    assert parsed is not None
    assert (parsed.kind, parsed.stream_id, parsed.payload) == (wire.DATA, 3, b"hello")
    assert parsed.flags & wire.FLAG_END_STREAM and parsed.padded_length == frame.flow_controlled_length


def test_h2frames_header_block_is_joined_across_continuation_frames() -> None:
    head = HeadersFrame(5, b"abc", flags=["PRIORITY"], depends_on=3, stream_weight=15)
    reader = _reader()
    reader.feed(head.serialize() + wire.frame_bytes(wire.CONTINUATION, wire.FLAG_END_HEADERS, 5, b"def"))
    frame = reader.next_frame()
    assert frame is not None and frame.payload == b"abcdef" and frame.flags & wire.FLAG_END_HEADERS
    assert frame.priority == wire.Priority(3, False, 15)


def test_h2frames_a_frame_inside_a_header_block_is_a_protocol_error() -> None:
    reader = _reader()
    reader.feed(wire.frame_bytes(wire.HEADERS, 0, 1, b"a") + wire.frame_bytes(wire.PING, 0, 0, b"\0" * 8))
    with pytest.raises(FrameError) as error:
        reader.next_frame()
    assert error.value.code == ErrorCodes.PROTOCOL_ERROR


def test_h2frames_continuation_flood_is_refused() -> None:
    reader = _reader()
    data = wire.frame_bytes(wire.HEADERS, 0, 1, b"a")
    data += wire.frame_bytes(wire.CONTINUATION, 0, 1, b"b") * wire.CONTINUATION_FRAMES_MAX
    reader.feed(data)
    with pytest.raises(FrameError):
        reader.next_frame()


@pytest.mark.parametrize(
    ("kind", "stream_id"), [(wire.DATA, 0), (wire.HEADERS, 0), (wire.SETTINGS, 1), (wire.PING, 3), (wire.GOAWAY, 1)]
)
def test_h2frames_frames_on_the_wrong_kind_of_stream_are_refused(kind: int, stream_id: int) -> None:
    reader = _reader()
    reader.feed(wire.frame_bytes(kind, 0, stream_id, b"\0" * 8))
    with pytest.raises(FrameError) as error:
        reader.next_frame()
    assert error.value.code == ErrorCodes.PROTOCOL_ERROR


def test_h2frames_padding_longer_than_the_frame_is_refused() -> None:
    reader = _reader()
    reader.feed(wire.frame_bytes(wire.DATA, wire.FLAG_PADDED, 1, b"\x09abc"))
    with pytest.raises(FrameError):
        reader.next_frame()


def test_h2frames_headers_are_split_into_continuation_frames() -> None:
    block = bytes(range(256)) * 100
    data = wire.headers_bytes(7, block, end_stream=True, max_frame_size=16_384)
    reader = _reader()
    reader.feed(data)
    frame = reader.next_frame()
    assert frame is not None and frame.payload == block and frame.flags & wire.FLAG_END_STREAM
    assert data[3] == wire.HEADERS and data[9 + 16_384 + 3] == wire.CONTINUATION
