"""StaticEncoder: what it writes, any HPACK decoder (here hpack's) reads back exactly, with no table state."""

from __future__ import annotations

from hpack import Decoder, HeaderTuple, NeverIndexedHeaderTuple
from hypothesis import given
from hypothesis import strategies as st

from tether.core.proxy import hpack_codec
from tether.core.proxy.hpack_codec import SENSITIVE, StaticEncoder

# Names from the static table (with and without a matching value there), sensitive ones, and others.
_NAMES = [b":method", b":path", b":status", b"accept-encoding", b"content-length", b"x-trace", b"l5d-orig-proto"]
names = st.sampled_from([*_NAMES, *SENSITIVE]) | st.binary(min_size=1, max_size=200)
values = st.sampled_from([b"GET", b"/", b"200", b"gzip, deflate", b""]) | st.binary(max_size=300)
fields = st.lists(st.tuples(names, values), max_size=12)


def _plain(headers) -> list[tuple[bytes, bytes]]:
    return [(bytes(name), bytes(value)) for name, value in headers]


@given(blocks=st.lists(fields, min_size=1, max_size=4))
def test_static_encoder_blocks_decode_to_their_fields_and_leave_the_decoders_table_empty(blocks) -> None:
    encoder, decoder = StaticEncoder(), Decoder()
    for headers in blocks:
        decoded = decoder.decode(encoder.encode(headers), raw=True)
        assert _plain(decoded) == headers
        assert not decoder.header_table.dynamic_entries
        for (name, _value), field in zip(headers, decoded, strict=True):
            assert isinstance(field, NeverIndexedHeaderTuple) == (name in SENSITIVE), name


@given(headers=fields)
def test_static_encoder_output_does_not_depend_on_what_it_encoded_before(headers) -> None:
    warm = StaticEncoder()
    warm.encode([(b"x-a", b"1"), (b":path", b"/a"), *headers])
    assert warm.encode(headers) == StaticEncoder().encode(headers)


def test_static_encoder_keeps_a_field_marked_never_indexed_that_way() -> None:
    block = StaticEncoder().encode([NeverIndexedHeaderTuple(b"x-secret", b"1"), HeaderTuple(b"x-open", b"2")])
    decoded = Decoder().decode(block, raw=True)
    assert [type(field) for field in decoded] == [NeverIndexedHeaderTuple, HeaderTuple]


def test_static_encoder_signals_a_table_size_change_from_the_peers_settings() -> None:
    encoder, decoder = StaticEncoder(), Decoder()
    encoder.header_table_size = 0  # what h2 does on SETTINGS_HEADER_TABLE_SIZE = 0
    decoder.max_allowed_table_size = 0
    block = encoder.encode([(b":status", b"200")])
    assert block[0] & 0xE0 == 0x20, "a dynamic table size update opens the block"
    assert _plain(decoder.decode(block, raw=True)) == [(b":status", b"200")]
    assert decoder.header_table_size == 0
    assert encoder.encode([(b":status", b"200")]) == b"\x88", "signalled once"


def test_static_encoder_memo_stays_bounded() -> None:
    encoder = StaticEncoder()
    for i in range(hpack_codec.MEMO_FIELDS_MAX + 10):
        encoder.encode([(b"x-request-id", str(i).encode())])
    encoder.encode([(b"x-large", b"v" * (hpack_codec.MEMO_FIELD_BYTES_MAX + 1))])
    assert len(hpack_codec._memo) <= hpack_codec.MEMO_FIELDS_MAX
    assert all(len(name) + len(value) <= hpack_codec.MEMO_FIELD_BYTES_MAX for name, value in hpack_codec._memo)
    assert not any(name in SENSITIVE for name, _ in hpack_codec._memo)
