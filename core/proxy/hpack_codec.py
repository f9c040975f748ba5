"""HPACK for the proxy's HTTP/2 connections: an encoder without a dynamic table, a decoder in one loop.

Theory of operation
-------------------
hpack's ``Encoder`` indexes every field in its dynamic table (RFC 7541 section 2.3.2): each field is a table
search, an insertion and a few debug-log calls, about 3 µs a field, two header blocks per proxied request
and side. ``StaticEncoder`` never uses the dynamic table. A field is either an index into the static table
(``:method: GET``) or a literal "without indexing" (section 6.2.2), its name indexed when the static table
has it; so its bytes depend on the field alone and are memoised, and a header block is a few dict lookups.
Values are written as they are, without Huffman coding: decoding Huffman in pure Python (hpack, on the
other side of a meshed hop) costs more than the bytes it saves.

What it costs: bytes. A request or response whose fields the dynamic table would have held in a byte each
carries them whole, some 100 bytes per proxied exchange on the meshed hop. What it gains besides CPU: the
proxy keeps no compression state shared by the requests of different clients on one connection, so it
offers no HPACK compression oracle (the attack RFC 7541 section 7.1 describes); credentials are also sent
"never indexed" (section 6.2.3), so that no later hop indexes them either, and are not memoised.

``Decoder`` is hpack's decoding in one loop: hpack calls a few functions per field (with debug logging) and
copies the rest of the block for each literal. It accepts everything hpack accepts, with the same results,
table updates and errors (tests/core/test_hpack_codec.py compares the two on arbitrary blocks); a field
comes out as a plain tuple, or a ``NeverIndexedHeaderTuple`` when the peer marked it so.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack import Decoder as HpackDecoder
from hpack import Encoder, NeverIndexedHeaderTuple
from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

# RFC 7541 appendix A: name -> (index of the name's first entry, {value: index of that exact entry}).
_STATIC: dict[bytes, tuple[int, dict[bytes, int]]] = HeaderTable.STATIC_TABLE_MAPPING
# Fields kept out of every compression context (h2 and nghttp2 choose the same, plus short cookies only).
SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
WITHOUT_INDEXING = 0x00
NEVER_INDEXED = 0x10
MEMO_FIELDS_MAX = 4096  # then the memo starts over: hot fields are back within a request or two
MEMO_FIELD_BYTES_MAX = 256  # longer fields are encoded each time (a memo of large values would cost memory)

# A memo of a pure function (field -> its bytes), shared by every connection of the process: what it holds
# never changes an output, only how fast the output comes.
_memo: dict[tuple[bytes, bytes], bytes] = {}


def _integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """RFC 7541 section 5.1: ``value`` in an N-bit prefix (with ``flags`` in the rest of the first byte)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_field(name: bytes, value: bytes, *, sensitive: bool) -> bytes:
    """One field: a static-table index, or a literal without indexing (never indexed if ``sensitive``)."""
    entry = _STATIC.get(name)
    if entry is not None and not sensitive:
        index = entry[1].get(value)
        if index is not None:
            return _integer(index, 7, 0x80)
    kind = NEVER_INDEXED if sensitive else WITHOUT_INDEXING
    head = _integer(entry[0], 4, kind) if entry is not None else bytes((kind,)) + _integer(len(name), 7, 0) + name
    return head + _integer(len(value), 7, 0) + value


class StaticEncoder(Encoder):
    """hpack's ``Encoder`` interface (h2 calls ``encode`` and sets ``header_table_size``), without a dynamic
    table. A change of the peer's SETTINGS_HEADER_TABLE_SIZE is still acknowledged with a dynamic table size
    update at the start of the next block, as section 4.2 requires."""

    def encode(self, headers: Iterable, huffman: bool = True) -> bytes:  # type: ignore[override]
        del huffman  # values go out as they are (see the module docstring)
        block = []
        if self.header_table.resized:
            block.append(self._encode_table_size_change())
            self.header_table.resized = False
        memo = _memo
        for header in headers:
            if type(header) is tuple:
                field = memo.get(header)
                if field is None:
                    field = _encode_plain(header)
            else:  # hpack's HeaderTuple, or NeverIndexedHeaderTuple: a field a peer marked never indexed
                name, value = header[0], header[1]
                sensitive = not getattr(header, "indexable", True) or name in SENSITIVE
                field = encode_field(name, value, sensitive=sensitive)
            block.append(field)
        return b"".join(block)


def _encode_plain(header: tuple) -> bytes:
    name, value = header[0], header[1]
    if name in SENSITIVE or (len(header) > 2 and header[2]):  # hpack's (name, value, sensitive) form
        return encode_field(name, value, sensitive=True)
    field = encode_field(name, value, sensitive=False)
    if len(name) + len(value) <= MEMO_FIELD_BYTES_MAX:
        if len(_memo) >= MEMO_FIELDS_MAX:
            _memo.clear()
        _memo[header] = field
    return field


_STATIC_ENTRIES: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE
_STATIC_COUNT = len(_STATIC_ENTRIES)
_VARINT_BYTES_MAX = 5  # hpack's VARINT_MAX_LENGTH: longer integers are a decoding error


class Decoder(HpackDecoder):
    """hpack's ``Decoder`` (h2 calls ``decode(block, raw=True)`` and sets the size limits), in one loop."""

    def decode(self, data: bytes, raw: bool = False) -> list:  # type: ignore[override]
        if not raw:
            return list(super().decode(data, raw))
        if type(data) is not bytes:
            data = bytes(data)
        headers: list = []
        inflated = 0
        limit = self.max_header_list_size
        dynamic = self.header_table.dynamic_entries
        position, end = 0, len(data)
        while position < end:
            first = data[position]
            if first & 0x80:  # indexed field (RFC 7541 section 6.1)
                if 0x80 < first <= 0x80 + _STATIC_COUNT:  # the static table, in one byte
                    header = _STATIC_ENTRIES[first - 0x81]
                    position += 1
                elif 0x80 + _STATIC_COUNT < first < 0xFF and first - 0x80 - _STATIC_COUNT <= len(dynamic):  # dynamic
                    header = dynamic[first - 0x81 - _STATIC_COUNT]
                    position += 1
                else:
                    index, position = _read_integer(data, position, 0x7F)
                    header = self._entry(index)
            elif first & 0x40:  # literal with incremental indexing (6.2.1)
                header, position = self._literal(data, position, 0x3F)
                self.header_table.add(header[0], header[1])
            elif first & 0x20:  # dynamic table size update (6.3), only before the first field
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                size, position = _read_integer(data, position, 0x1F)
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self.header_table_size = size
                continue
            else:  # literal without indexing (6.2.2) or never indexed (6.2.3)
                index = first & 0x0F
                if 0 < index < 0x0F and position + 1 < end and data[position + 1] < 0x7F:
                    # A static name and a short value without Huffman coding: StaticEncoder's fields, inline.
                    value_end = position + 2 + data[position + 1]
                    if value_end > end:
                        raise HPACKDecodingError("Truncated header block")
                    header = (_STATIC_ENTRIES[index - 1][0], data[position + 2 : value_end])
                    position = value_end
                else:
                    header, position = self._literal(data, position, 0x0F)
                if first & 0x10:
                    header = NeverIndexedHeaderTuple(header[0], header[1])
            headers.append(header)
            inflated += 32 + len(header[0]) + len(header[1])  # RFC 7541 section 4.1's entry size
            if inflated > limit:
                raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
        self._assert_valid_table_size()
        return headers

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= len(_STATIC_ENTRIES):
            return _STATIC_ENTRIES[index - 1]
        dynamic = self.header_table.dynamic_entries
        if len(_STATIC_ENTRIES) < index <= len(_STATIC_ENTRIES) + len(dynamic):
            return dynamic[index - len(_STATIC_ENTRIES) - 1]
        raise InvalidTableIndex(f"Invalid table index {index}")

    def _literal(self, data: bytes, position: int, name_mask: int) -> tuple[tuple[bytes, bytes], int]:
        """A literal field at ``position``: its (name, value) and the position after it."""
        index = data[position] & name_mask
        if 0 < index <= len(_STATIC_ENTRIES) and index != name_mask:  # a static name, in one byte
            name = _STATIC_ENTRIES[index - 1][0]
            position += 1
        elif index:
            index, position = _read_integer(data, position, name_mask)
            name = self._entry(index)[0]
        else:
            name, position = _string(data, position + 1)
        value, position = _string(data, position)
        return (name, value), position


def _read_integer(data: bytes, position: int, mask: int) -> tuple[int, int]:
    """RFC 7541 section 5.1: the integer whose prefix is ``mask`` in the byte at ``position``, and the
    position after it. hpack's limits: at most 5 bytes of continuation; running out is an error."""
    try:
        number = data[position] & mask
        position += 1
        if number != mask:
            return number, position
        shift = 0
        for count in range(2, _VARINT_BYTES_MAX + 2):
            byte = data[position]
            position += 1
            if byte < 128:
                return number + (byte << shift), position
            number += (byte - 128) << shift
            shift += 7
            if count > _VARINT_BYTES_MAX:
                break
    except IndexError:
        raise HPACKDecodingError("Unable to decode HPACK integer representation") from None
    raise HPACKDecodingError("Variable integer representation is too long")


def _string(data: bytes, position: int) -> tuple[bytes, int]:
    """RFC 7541 section 5.2: a string literal (Huffman coded or not) at ``position``."""
    if position < len(data) and data[position] < 0x7F:  # not Huffman coded, shorter than 127 bytes
        end = position + 1 + data[position]
        if end > len(data):
            raise HPACKDecodingError("Truncated header block")
        return data[position + 1 : end], end
    huffman = position < len(data) and data[position] & 0x80
    length, position = _read_integer(data, position, 0x7F)
    text = data[position : position + length]
    if len(text) != length:
        raise HPACKDecodingError("Truncated header block")
    return (decode_huffman(text) if huffman else text), position + length
