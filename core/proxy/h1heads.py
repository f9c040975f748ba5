"""HTTP/1.1 heads for the fast path (h1fast.py) and the lane (h1lane.py): parsing them, writing them out.

Parsing accepts only the common case (see ``parse_fields``): anything else returns None and goes to h11,
which is the judge of everything uncommon. Writing follows h11's own layout byte for byte (Host first, then
the other fields in order), so that a head written here and one written by h11 cannot be told apart.
tests/core/test_h1fast.py holds both to h11.
"""

from __future__ import annotations

import re
from typing import Any

import h11

# RFC 9110 section 5.6.2 (token) and 5.5 (field-value, here without obs-text: such a head takes the slow path).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = rb"(?:[\x21-\x7e](?:[ \t]*[\x21-\x7e])*)?"
HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*")
# A head's field lines are checked as HEADER_LINE would check them, with bytes methods instead (see
# ``parse_fields``): Python's regex engine walks HEADER_LINE's nested repetition at tens of ns a byte, about
# 15 µs for an ordinary response head.
_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LINE_BYTES = bytes(range(0x21, 0x7F)) + b" \t"  # visible characters, and blanks
# Names most heads carry, as sent -> lower case: checking one is a dictionary lookup.
_COMMON_NAMES = {
    spelling: name.lower()
    for name in (
        b"Host", b"User-Agent", b"Accept", b"Accept-Encoding", b"Accept-Language", b"Connection", b"Keep-Alive",
        b"Content-Length", b"Content-Type", b"Content-Encoding", b"Transfer-Encoding", b"Date", b"Server",
        b"Cache-Control", b"Cookie", b"Set-Cookie", b"Authorization", b"Referer", b"Origin", b"ETag",
        b"Last-Modified", b"Location", b"Vary", b"Expires", b"Pragma", b"Accept-Ranges", b"Age", b"Upgrade",
        b"If-None-Match", b"If-Modified-Since", b"X-Forwarded-For", b"X-Request-Id", b"TE", b"Expect",
    )
    for spelling in (name, name.lower())
}  # fmt: skip
REQUEST_LINE = re.compile(rb"([A-Z]+) ([\x21-\x7e]+) HTTP/1\.1")
STATUS_LINE = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9])(?: ([\t\x20-\x7e]*))?")
_DIGITS = re.compile(rb"[0-9]{1,18}")
CHUNKED = -1  # body framing: chunked, else the bytes a Content-Length body still has to go

FullItems = list[tuple[bytes, bytes, bytes]]  # (name as sent, lower-case name, value): h11's own header rows
_set = object.__setattr__


def request_event(method: bytes, target: bytes, items: FullItems) -> h11.Request:
    """An ``h11.Request`` from parts already checked (by this module's parser or by h11 upstream of us).

    h11's constructor validates again and walks the headers through the ``Sequence`` protocol even for parsed
    events, several µs per head; the differential test holds these events equal to h11's."""
    event = object.__new__(h11.Request)
    _set(event, "method", method)
    _set(event, "target", target)
    _set(event, "headers", h11._headers.Headers(items))
    _set(event, "http_version", b"1.1")
    return event


def response_event(status: int, reason: bytes, items: FullItems) -> h11.Response:
    """An ``h11.Response`` from checked parts; see ``request_event``."""
    event = object.__new__(h11.Response)
    _set(event, "status_code", status)
    _set(event, "reason", reason)
    _set(event, "headers", h11._headers.Headers(items))
    _set(event, "http_version", b"1.1")
    return event


class Head:
    """A common-case head as this module parses it: what h11's event would carry, its framing, and its size.

    ``fields`` are h11's own header rows (name as sent, lower-case name, value). ``host`` is a request's Host
    value (the fast path takes a request only with exactly one). ``length`` counts the head's bytes on the
    wire, blank line included. ``framing`` is the body's Content-Length, or ``CHUNKED``."""

    __slots__ = (
        "method", "target", "status", "reason", "fields", "framing", "keep_alive", "host", "hosts", "connection",
        "length", "block",
    )  # fmt: skip

    def __init__(
        self, fields: FullItems, framing: int, keep_alive: bool, host: bytes, connection: set[bytes], hosts: int
    ) -> None:
        self.fields = fields
        self.framing = framing
        self.keep_alive = keep_alive
        self.host = host
        self.hosts = hosts  # Host fields (a request the fast path takes has exactly one)
        self.connection = connection  # the Connection header's tokens, lower case (keep-alive, close)
        self.method = self.target = self.reason = b""
        self.status = 0  # a request's; a response's is 200-599
        self.length = 0
        self.block: Block | None = None  # the memo's entry for these fields, when they are remembered

    def event(self) -> h11.Request | h11.Response:
        """The h11 event ``next_event`` returns for this head."""
        if self.status:
            return response_event(self.status, self.reason, self.fields)
        return request_event(self.method, self.target, self.fields)


_SPECIAL_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect", b"host"})
Row = tuple[bytes, bytes, bytes]  # one of FullItems
# What ``parse_fields`` remembers (see FieldMemo), each table bounded by these: a full table empties itself.
ROWS_MAX = 1024
ROW_LINE_BYTES_MAX = 256
BLOCKS_MAX = 256
BLOCK_BYTES_MAX = 1024


class Block:
    """A field block as FieldMemo remembers it: its parse, and what the lane (h1lane.py) derives from it on
    first use, ``forwarded``: the rows it forwards and their lines as written (a pure function of the block)."""

    __slots__ = ("fields", "framing", "keep_alive", "host", "connection", "hosts", "forwarded")

    def __init__(self, head: Head) -> None:
        self.fields = tuple(head.fields)
        self.framing = head.framing
        self.keep_alive = head.keep_alive
        self.host = head.host
        self.connection = frozenset(head.connection)
        self.hosts = head.hosts
        self.forwarded: tuple[tuple[Row, ...], bytes] | None = None


class FieldMemo:
    """Field blocks and field lines ``parse_fields`` has seen, with what it made of them.

    Most heads repeat from one request or response to the next: a load generator's requests are the same
    bytes each time, a server's responses differ in their Date line once a second. A lookup is cheaper than
    splitting, checking and stripping again. One memo serves every HTTP/1.1 parser of one proxy machine (it
    is the machine's state, passed in); the result of a parse is the same with or without it."""

    __slots__ = ("blocks", "h1_names", "h1_values", "heads", "rows")

    def __init__(self) -> None:
        # (whole head, request) -> its field block's entry and its start line's parts (h1fast._take_head)
        self.heads: dict[tuple[bytes, bool], tuple[Block, bytes, bytes, int, bytes, int]] = {}
        self.blocks: dict[tuple[bytes, bool], Block] = {}  # (whole field block, request) -> its parse
        self.rows: dict[bytes, Row] = {}  # one field line -> its row
        # HTTP/2 field names and values found fit for HTTP/1.1 (h2translate.check_h1_fields): most repeat on
        # every request of a workload (content types, servers, user agents).
        self.h1_names: set[bytes] = set()
        self.h1_values: set[bytes] = set()

    def fit_name(self, name: bytes) -> None:
        _remember(self.h1_names, name)

    def fit_value(self, value: bytes) -> None:
        _remember(self.h1_values, value)

    def remember_head(self, raw: bytes, request: bool, head: Head) -> None:
        """``raw`` (a whole head, blank line included) parses to ``head``, whose fields are remembered."""
        assert head.block is not None
        if len(raw) <= BLOCK_BYTES_MAX:
            if len(self.heads) >= BLOCKS_MAX:
                self.heads.clear()
            entry = (head.block, head.method, head.target, head.status, head.reason, head.framing)
            self.heads[(raw, request)] = entry

    def known_head(self, raw: bytes, request: bool) -> Head | None:
        """A new Head for ``raw`` if it was remembered (as ``parse_fields`` and the start line made it)."""
        known = self.heads.get((raw, request))
        if known is None:
            return None
        block, method, target, status, reason, framing = known  # framing: 0 for a 204 or 304 answer
        head = Head(list(block.fields), framing, block.keep_alive, block.host, set(block.connection), block.hosts)
        head.block = block
        head.method, head.target, head.status, head.reason = method, target, status, reason
        return head


def _remember(seen: set[bytes], item: bytes) -> None:
    """Add ``item`` to ``seen`` if it is short, emptying ``seen`` once it holds ROWS_MAX items (under 256 KiB)."""
    if len(item) <= ROW_LINE_BYTES_MAX:
        if len(seen) >= ROWS_MAX:
            seen.clear()
        seen.add(item)


def parse_fields(
    data: bytes | bytearray, start: int, end: int, *, request: bool, memo: FieldMemo | None = None
) -> Head | None:
    """The field lines ``data[start:end]`` (each ending in CRLF) -> a Head, or None when anything is out of
    the common case (the slow path decides). ``memo``: see FieldMemo."""
    block = bytes(data[start:end])
    if memo is None:
        memo = FieldMemo()
    known = memo.blocks.get((block, request))
    if known is not None:
        head = Head(list(known.fields), known.framing, known.keep_alive, known.host, set(known.connection), known.hosts)
        head.block = known
        return head
    head = _parse_block(block, request, memo.rows)
    if head is not None and len(block) <= BLOCK_BYTES_MAX:
        if len(memo.blocks) >= BLOCKS_MAX:
            memo.blocks.clear()
        head.block = memo.blocks[(block, request)] = Block(head)
    return head


def _parse_block(block: bytes, request: bool, rows: dict[bytes, Row]) -> Head | None:
    lines = block.split(b"\r\n")
    del lines[-1]  # the block ends with its last line's CRLF
    # Every byte visible or blank, and no CR or LF but the line ends (split and replace pair them alike).
    if block.replace(b"\r\n", b"").translate(None, _LINE_BYTES):
        return None
    fields: FullItems = []
    content_length: bytes | None = None
    chunked = False
    keep_alive = True
    hosts = 0
    host = b""
    connection: set[bytes] = set()
    for line in lines:
        row = rows.get(line)
        if row is None:
            row = _row(line, rows)
            if row is None:
                return None
        raw_name, name, value = row
        if name in _SPECIAL_FIELDS:
            if name == b"content-length":
                if content_length is not None or not value.isdigit() or len(value) > 18:
                    return None  # one run of at most 18 ASCII digits (bytes.isdigit is ASCII only)
                content_length = value
            elif name == b"transfer-encoding":
                if chunked or value.lower() != b"chunked":
                    return None
                chunked = True
                row = (raw_name, name, b"chunked")  # h11 keeps this header's value in lower case
            elif name == b"connection":
                lowered = value.lower()
                tokens = {lowered} if lowered == b"keep-alive" else {t.strip() for t in lowered.split(b",")}
                if not tokens <= {b"keep-alive", b"close"} or (request and b"close" in tokens):
                    return None
                keep_alive = keep_alive and b"close" not in tokens
                connection |= tokens
            elif name == b"host":
                hosts += 1
                host = value
            else:
                return None  # Upgrade, Expect
        fields.append(row)
    if request and hosts != 1:
        return None
    if chunked:
        if content_length is not None or request:
            return None  # both framings at once is for h11 to refuse; chunked uploads are rare
        return Head(fields, CHUNKED, keep_alive, host, connection, hosts)
    if content_length is None:
        if not request:
            return None  # a body delimited by the connection's close
        return Head(fields, 0, keep_alive, host, connection, hosts)
    return Head(fields, int(content_length), keep_alive, host, connection, hosts)


def _row(line: bytes, rows: dict[bytes, Row]) -> Row | None:
    """The row of one field line whose bytes are all visible or blank (None: not the common case), kept in
    ``rows`` when short."""
    raw_name, colon, value = line.partition(b":")
    name = _COMMON_NAMES.get(raw_name)
    if name is None:
        if not colon or not raw_name or raw_name.translate(None, _TOKEN_BYTES):
            return None  # not a token (a blank before the colon, an obs-fold line), or no colon at all
        name = raw_name.lower()
    elif not colon:
        return None
    row = (raw_name, name, value.strip(b" \t"))  # blanks around a value are not part of it
    if len(line) <= ROW_LINE_BYTES_MAX:
        if len(rows) >= ROWS_MAX:
            rows.clear()  # a new set of lines (a Date header a second, say) refills it
        rows[line] = row
    return row


def outgoing_framing(headers: Any, *, request: bool) -> tuple[int, bool, bool] | None:
    """(framing, keep-alive, whether h11 would add Transfer-Encoding: chunked) of a head we send, or None
    when it is not a common-case head. Our heads were validated on the way in, so only names matter here."""
    content_length = -2
    chunked = False
    keep_alive = True
    hosts = 0
    for name, value in headers:
        if name == b"content-length":
            if content_length != -2 or _DIGITS.fullmatch(value) is None:
                return None
            content_length = int(value)
        elif name == b"transfer-encoding":
            if chunked or value != b"chunked" or request:
                return None
            chunked = True
        elif name == b"connection":
            tokens = {token.strip() for token in value.split(b",")}
            if not tokens <= {b"keep-alive", b"close"} or (request and b"close" in tokens):
                return None
            keep_alive = keep_alive and b"close" not in tokens
        elif name == b"upgrade" or name == b"expect":
            return None
        elif name == b"host":
            hosts += 1
    if request:
        return (max(content_length, 0), True, False) if hosts == 1 else None
    if chunked:
        return None if content_length != -2 else (CHUNKED, keep_alive, True)
    if content_length == -2:
        return CHUNKED, keep_alive, True  # h11 frames a body of unknown length with chunked encoding
    return content_length, keep_alive, False


def send_headers(out: list[bytes], headers: Any) -> None:
    """Header lines as h11 writes them: Host first, then the rest in order, then the blank line."""
    raw = headers._full_items if hasattr(headers, "_full_items") else [(n, n.lower(), v) for n, v in headers]
    _write_rows(out, raw)


def _write_rows(out: list[bytes], rows: FullItems) -> None:
    for raw_name, name, value in rows:
        if name == b"host":
            out.append(b"%s: %s\r\n" % (raw_name, value))
    for raw_name, name, value in rows:
        if name != b"host":
            out.append(b"%s: %s\r\n" % (raw_name, value))
    out.append(b"\r\n")


def write_head(start_line: bytes, rows: FullItems, *, in_order: bool = False) -> bytes:
    """A head as ``send`` writes it from h11-style header rows (name as written, lower-case name, value): the
    start line (with its CRLF), Host first, the rest in order, the blank line. ``in_order``: the caller knows
    no row but the first is a Host (the common case), so one pass writes them."""
    if in_order:
        return b"".join([start_line, *[b"%s: %s\r\n" % (raw_name, value) for raw_name, _, value in rows], b"\r\n"])
    out = [start_line]
    _write_rows(out, rows)
    return b"".join(out)
