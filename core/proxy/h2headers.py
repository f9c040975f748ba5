"""Received HTTP/2 header blocks: h2's checks and its cookie normalisation, in one pass.

Theory of operation
-------------------
h2 checks every received header block (RFC 9113 section 8.2 and 8.3) in a chain of seven generators, one
per rule, and joins split Cookie fields in an eighth: a few µs per field, more than a tenth of what the
proxy spends on a meshed request. ``H2Session`` turns both off in h2 (``validate_inbound_headers`` and
``normalize_inbound_headers``) and runs ``received_fields`` on each header event instead, before the
proxy sees any event of that read. It accepts exactly the blocks h2 accepts and returns the fields h2
would have put in the event (Cookie crumbs joined into one never-indexed field, last), which
tests/core/test_h2headers.py checks against h2's own functions on arbitrary blocks.

A block h2 would refuse raises ``MalformedHeaders``; the session then ends the connection with GOAWAY
PROTOCOL_ERROR, which is what h2 does for its own ``ProtocolError``.

Which rules apply depends on the block: a request (``RequestReceived``, or a pushed request), a response
(final or informational) or trailers.
"""

from __future__ import annotations

import re
from enum import Enum

from hpack import NeverIndexedHeaderTuple

# RFC 9113 section 8.2.1: a name has no upper case, no byte up to SP or from DEL on, and no colon except
# the first byte of a pseudo-header; a value has no NUL, CR or LF, and no leading or trailing SP or HTAB.
_NAME = re.compile(rb":?[\x21-\x39\x3b-\x40\x5b-\x7e]*")
_VALUE = re.compile(rb"[^\x00\n\r \t](?:[^\x00\n\r]*[^\x00\n\r \t])?")
_EDGE = b"\x00\n\r \t"  # bytes a value may not start or end with
CONNECTION_SPECIFIC = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
# Names already found valid: a memo of a pure check (what it holds never changes a verdict), bounded.
_valid_names: set[bytes] = set()
VALID_NAMES_MAX = 1024
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":status", b":protocol"})
_REQUEST_ONLY = frozenset({b":scheme", b":path", b":authority", b":method", b":protocol"})


class Block(Enum):
    REQUEST = "request"
    RESPONSE = "response"
    TRAILERS = "trailers"


class MalformedHeaders(ValueError):
    """A received header block breaks RFC 9113 (as h2 checks it): a connection error."""


def received_fields(headers: list, block: Block) -> list:
    """The fields of a received ``block`` as h2 would report them; raises ``MalformedHeaders`` where h2
    would raise ``ProtocolError``."""
    out = []
    cookies: list[bytes] = []
    for field in headers:
        if field[0] == b"cookie":
            cookies.append(field[1])  # h2 joins the crumbs and puts them last, before it checks the block
        else:
            out.append(field)
    if cookies:
        out.append(NeverIndexedHeaderTuple(b"cookie", b"; ".join(cookies)))
    _check(out, block)
    return out


def _check(fields: list, block: Block) -> None:
    pseudo: set[bytes] = set()
    regular_seen = False
    method = authority = host = None
    request = block is Block.REQUEST
    for field in fields:
        name, value = field[0], field[1]
        if name not in _valid_names:
            if not name or _NAME.fullmatch(name) is None:
                raise MalformedHeaders(f"illegal header name {name[:100]!r}")
            if len(_valid_names) < VALID_NAMES_MAX:
                _valid_names.add(name)
        # _VALUE's rule in bytes methods (each a C scan; a regex match per field cost more than the rest).
        if value and (value[0] in _EDGE or value[-1] in _EDGE or b"\r" in value or b"\n" in value or b"\x00" in value):
            raise MalformedHeaders(f"illegal value for header {name[:100]!r}")
        if name[0] == 0x3A:  # ':'
            if name in pseudo or regular_seen or name not in _PSEUDO:
                raise MalformedHeaders(f"pseudo-header {name!r} duplicated, out of place or unknown")
            pseudo.add(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and request and not value:
                raise MalformedHeaders("empty :path")
            continue
        regular_seen = True
        if name in CONNECTION_SPECIFIC or (name == b"te" and value.lower() != b"trailers"):
            raise MalformedHeaders(f"connection-specific header {name!r}")
        if name == b"host" and request:
            if host is not None:
                raise MalformedHeaders("more than one Host header")
            host = value
    _check_pseudo(pseudo, method, block)
    if request and (authority is None and host is None or None not in (authority, host) and authority != host):
        raise MalformedHeaders("no :authority or Host, or the two differ")


def _check_pseudo(pseudo: set[bytes], method: bytes | None, block: Block) -> None:
    """The pseudo-headers a block must and must not have (RFC 9113 section 8.3, RFC 8441 section 4)."""
    if block is Block.TRAILERS:
        if pseudo:
            raise MalformedHeaders("pseudo-header in trailers")
        return
    if block is Block.RESPONSE:
        if b":status" not in pseudo or pseudo & _REQUEST_ONLY:
            raise MalformedHeaders("response without :status, or with request pseudo-headers")
        return
    connect = method == b"CONNECT"
    if b":method" not in pseudo or b":status" in pseudo or (b":protocol" in pseudo and not connect):
        raise MalformedHeaders("request without :method, or with :status or a stray :protocol")
    if connect and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:
            raise MalformedHeaders("ordinary CONNECT with :scheme or :path")
    elif b":scheme" not in pseudo or b":path" not in pseudo:
        raise MalformedHeaders("request without :scheme or :path")
