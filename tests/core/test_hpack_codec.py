"""StaticEncoder: what it writes, any HPACK decoder (here hpack's) reads back exactly, with no table state."""

from __future__ import annotations

from hpack import Decoder as HpackDecoder
from hpack import Encoder as HpackEncoder
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKError
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tether.core.proxy import hpack_codec
from tether.core.proxy.hpack_codec import SENSITIVE, Decoder, StaticEncoder

# Names from the static table (with and without a matching value there), sensitive ones, and others.
_NAMES = [b":method", b":path", b":status", b"accept-encoding", b"content-length", b"x-trace", b"l5d-orig-proto"]
names = st.sampled_from([*_NAMES, *SENSITIVE]) | st.binary(min_size=1, max_size=200)
values = st.sampled_from([b"GET", b"/", b"200", b"gzip, deflate", b""]) | st.binary(max_size=300)
fields = st.lists(st.tuples(names, values), max_size=12)


def _plain(headers) -> list[tuple[bytes, bytes]]:
    return [(bytes(name), bytes(value)) for name, value in headers]


@given(blocks=st.lists(fields, min_size=1, max_size=4))
def test_static_encoder_blocks_decode_to_their_fields_and_leave_the_decoders_table_empty(blocks) -> None:
    encoder, decoder = StaticEncoder(), HpackDecoder()
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
    decoded = HpackDecoder().decode(block, raw=True)
    assert [type(field) for field in decoded] == [NeverIndexedHeaderTuple, HeaderTuple]


def test_static_encoder_signals_a_table_size_change_from_the_peers_settings() -> None:
    encoder, decoder = StaticEncoder(), HpackDecoder()
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


# ---------------------------------------------------------------------------------------------------------
# Decoder: the same results, table and errors as hpack's on any block.

_BLOCK_FIELDS = st.lists(st.tuples(names, values), max_size=6)


@st.composite
def blocks(draw) -> list[bytes]:
    """Blocks from hpack's own encoder (dynamic table, Huffman, size updates), from StaticEncoder, and
    arbitrary bytes, mixed."""
    encoder = HpackEncoder()
    out = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["hpack", "static", "bytes", "resize", "mutated"]))
        if kind == "hpack":
            fields = draw(_BLOCK_FIELDS)
            sensitive = draw(st.lists(st.booleans(), min_size=len(fields), max_size=len(fields)))
            out.append(encoder.encode([(n, v, s) for (n, v), s in zip(fields, sensitive, strict=True)]))
        elif kind == "static":
            out.append(StaticEncoder().encode(draw(_BLOCK_FIELDS)))
        elif kind == "resize":
            encoder.header_table_size = draw(st.sampled_from([0, 100, 4096, 5000]))
            out.append(encoder.encode(draw(_BLOCK_FIELDS)))
        elif kind == "mutated":
            block = bytearray(encoder.encode(draw(_BLOCK_FIELDS)) or b"\x82")
            block[draw(st.integers(0, len(block) - 1))] = draw(st.integers(0, 255))
            out.append(bytes(block[: draw(st.integers(0, len(block)))]))
        else:
            out.append(draw(st.binary(max_size=40)))
    return out


def _run(decoder, blocks_, limit: int) -> list:
    decoder.max_header_list_size = limit
    outcomes = []
    for block in blocks_:
        try:
            decoded = decoder.decode(block, raw=True)
        except HPACKError as error:
            outcomes.append(type(error))
        else:
            outcomes.append(
                [
                    (bytes(name), bytes(value), isinstance(h, NeverIndexedHeaderTuple))
                    for h in decoded
                    for name, value in [h]
                ]
            )
        outcomes.append((list(decoder.header_table.dynamic_entries), decoder.header_table_size))
    return outcomes


SEVENTY_ENTRIES = HpackEncoder().encode([(b"x-%d" % i, b"v") for i in range(70)])


@settings(max_examples=400)
@given(blocks_=blocks(), limit=st.sampled_from([64, 500, 65536]))
@example(blocks_=[b"\xff\x80\x80\x80\x80\x00", b"\xff\x80\x80\x80\x80\x80\x00"], limit=64)  # integer lengths
@example(blocks_=[SEVENTY_ENTRIES, b"\x80", b"\xc0", b"\xfe"], limit=65536)  # index 0, 64, 126: a full table
@example(blocks_=[StaticEncoder().encode([(b"x" * 16, b"y" * n)]) for n in (16, 17)], limit=64)  # at the limit
def test_decoder_agrees_with_hpacks_on_any_sequence_of_blocks(blocks_, limit: int) -> None:
    assert _run(Decoder(), blocks_, limit) == _run(HpackDecoder(), blocks_, limit)
