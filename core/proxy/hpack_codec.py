"""HPACK for the proxy's HTTP/2 connections: an encoder without a dynamic table, its fields memoised.

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

The decoder stays hpack's: it must accept any peer's encoder.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack import Encoder
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
