"""Requests and responses between HTTP/1.1 and HTTP/2 heads, and what gRPC adds on top.

A request is held as a ``RequestHead`` whatever it arrived as: method, scheme, authority, path and the
regular headers (lower-case names, no pseudo-headers, no connection-specific headers). Each side renders
it in its own protocol. Between two Tether proxies an HTTP/1.1 request rides HTTP/2 with
``l5d-orig-proto: HTTP/1.1`` (Linkerd's header), and the inbound proxy turns it back into HTTP/1.1.

gRPC: a request is gRPC when its content-type is ``application/grpc`` (or ``application/grpc+...``). Its
outcome is the ``grpc-status`` of the trailers, or of the headers of a trailers-only response. An error
the proxy answers itself is a trailers-only response: HTTP 200 with a grpc-status and a percent-encoded
grpc-message (the gRPC over HTTP/2 spec), plus ``l5d-proxy-error``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

import h11

from tether.core.proxy.errors import ProxyError, ProxyErrorKind, error_body, error_response_headers, header_safe
from tether.core.proxy.h1fast import request_event, response_event
from tether.core.proxy.http1 import forwarded_headers, pairs

if TYPE_CHECKING:
    from tether.core.proxy.h1heads import FieldMemo

ORIG_PROTO = b"l5d-orig-proto"
HTTP11 = b"HTTP/1.1"
# What HTTP/1.1 can carry, in h11's grammar (h11/_abnf.py). HTTP/2 (as h2 checks it) allows more: names with
# any of "(),/;<=>?@[\]{}, values with \x0b or \x0c, any :method or :path. A message restored to HTTP/1.1 is
# checked against these once, where it is translated; h11 would refuse it only as the proxy writes it.
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,20}")
_NOTHING: frozenset[bytes] = frozenset()
# RFC 9113 section 8.2.2: connection-specific headers are malformed in HTTP/2.
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host"}
)

# gRPC status codes (grpc/doc/statuscodes.md).
GRPC_OK = 0
GRPC_CANCELLED = 1
GRPC_UNKNOWN = 2
GRPC_DEADLINE_EXCEEDED = 4
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14

# What each proxy failure means to a gRPC client (the HTTP status it would have had is in the comment).
GRPC_STATUS_FOR = {
    ProxyErrorKind.MALFORMED_REQUEST: GRPC_INTERNAL,  # 400
    ProxyErrorKind.HEADERS_TOO_LARGE: GRPC_RESOURCE_EXHAUSTED,  # 431
    ProxyErrorKind.NO_ENDPOINTS: GRPC_UNAVAILABLE,  # 503
    ProxyErrorKind.POOL_EXHAUSTED: GRPC_UNAVAILABLE,  # 503
    ProxyErrorKind.CONNECT_FAILED: GRPC_UNAVAILABLE,  # 502
    ProxyErrorKind.UPSTREAM_CLOSED: GRPC_UNAVAILABLE,  # 502
    ProxyErrorKind.INVALID_RESPONSE: GRPC_INTERNAL,  # 502
    ProxyErrorKind.CONNECT_TIMEOUT: GRPC_UNAVAILABLE,  # 504
    ProxyErrorKind.RESPONSE_TIMEOUT: GRPC_DEADLINE_EXCEEDED,  # 504
    ProxyErrorKind.FAILFAST: GRPC_UNAVAILABLE,  # 503
    ProxyErrorKind.LOAD_SHED: GRPC_UNAVAILABLE,  # 503
    ProxyErrorKind.NO_ROUTE: GRPC_UNIMPLEMENTED,  # 404
    ProxyErrorKind.NO_BACKEND: GRPC_UNKNOWN,  # 500
    ProxyErrorKind.REQUEST_TIMEOUT: GRPC_DEADLINE_EXCEEDED,  # 504
    ProxyErrorKind.IDLE_TIMEOUT: GRPC_DEADLINE_EXCEEDED,  # 504
    ProxyErrorKind.RATE_LIMITED: GRPC_RESOURCE_EXHAUSTED,  # 429
}


def grpc_code_for(error: ProxyError) -> int:
    """The grpc-status a gRPC client gets for ``error``: the configured one, else the kind's."""
    if error.grpc_override is not None:
        return error.grpc_override
    return GRPC_STATUS_FOR.get(error.kind, GRPC_UNAVAILABLE)


@dataclass(slots=True)
class RequestHead:
    method: bytes
    scheme: bytes
    authority: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    orig_proto: bytes | None = None  # the l5d-orig-proto the request arrived with, removed from headers

    @property
    def is_grpc(self) -> bool:
        return any(name == b"content-type" and value.startswith(b"application/grpc") for name, value in self.headers)

    def size(self) -> int:
        return len(self.method) + len(self.authority) + len(self.path) + sum(len(n) + len(v) for n, v in self.headers)


class TranslationError(ValueError):
    """A message that cannot be expressed on the other side (a missing pseudo-header, say)."""


def head_from_h2(headers: list[tuple[bytes, bytes]], memo: FieldMemo | None = None) -> RequestHead:
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[bytes, bytes]] = []
    orig_proto = None
    for name, value in headers:
        if name.startswith(b":"):
            pseudo[name] = value
        elif name == ORIG_PROTO:
            orig_proto = value
        elif name not in CONNECTION_SPECIFIC:
            regular.append((name, value))
    method = pseudo.get(b":method")
    if method is None:
        raise TranslationError("request without :method")
    if method == b"CONNECT":
        raise TranslationError("CONNECT over HTTP/2 is not supported")
    authority = pseudo.get(b":authority", b"")
    path = pseudo.get(b":path")
    if not path:
        raise TranslationError("request without :path")
    if orig_proto == HTTP11:  # restored to HTTP/1.1 (h1_request): it must fit
        if _TOKEN.fullmatch(method) is None or _TARGET.fullmatch(path) is None:
            raise TranslationError("the method or path cannot be carried by HTTP/1.1")
        if _FIELD_VALUE.fullmatch(authority) is None:
            raise TranslationError("the authority cannot be carried by HTTP/1.1")
        check_h1_fields(regular, memo)
    return RequestHead(method, pseudo.get(b":scheme", b"http"), authority, path, regular, orig_proto)


def check_h1_fields(headers: list[tuple[bytes, bytes]], memo: FieldMemo | None = None) -> None:
    """Raise TranslationError unless HTTP/1.1 can carry ``headers`` (lower-case names) as they are; several
    Content-Length fields must agree (``h1_rows`` keeps one). ``memo`` (the proxy's) skips the checks of names
    and values it has seen pass; the verdict is the same without it."""
    names, values = (memo.h1_names, memo.h1_values) if memo is not None else (_NOTHING, _NOTHING)
    length = None
    for name, value in headers:
        if name not in names:
            if _TOKEN.fullmatch(name) is None:
                raise TranslationError(f"header name {name[:100]!r} cannot be carried by HTTP/1.1")
            if memo is not None:
                memo.fit_name(name)
        if value not in values:
            if _FIELD_VALUE.fullmatch(value) is None:
                raise TranslationError(f"the value of {name[:100]!r} cannot be carried by HTTP/1.1")
            if memo is not None:
                memo.fit_value(value)
        if name == b"content-length":
            if _CONTENT_LENGTH.fullmatch(value) is None or (length is not None and value != length):
                raise TranslationError("invalid or conflicting content-length")
            length = value


def head_from_h1(request: h11.Request, authority: str) -> RequestHead:
    headers = [(name, value) for name, value in forwarded_headers(pairs(request)) if name != b"host"]
    if any(name == b"transfer-encoding" for name, _ in headers):
        headers = [(name, value) for name, value in headers if name != b"transfer-encoding"]
    return RequestHead(request.method, b"http", authority.encode(), h2_path(request.target), headers, HTTP11)


def h2_path(target: bytes) -> bytes:
    """The ``:path`` of an HTTP/1.1 request target."""
    if target.startswith((b"http://", b"https://")):  # absolute form: HTTP/2 carries the parts separately
        rest = target.split(b"/", 3)
        return b"/" + (rest[3] if len(rest) > 3 else b"")
    return target


def h1_has_body(request: h11.Request) -> bool:
    """Whether an HTTP/1.1 request head announces a body (RFC 9112 section 6.3: a request without
    Transfer-Encoding or Content-Length has none; h11 has already checked the Content-Length value)."""
    for _raw, name, value in request.headers._full_items:  # noqa: SLF001 - as http1.pairs does
        if name == b"transfer-encoding" or (name == b"content-length" and int(value) != 0):
            return True
    return False


def h2_request_headers(head: RequestHead, *, orig_proto: bool) -> list[tuple[bytes, bytes]]:
    headers = [
        (b":method", head.method),
        (b":scheme", head.scheme),
        (b":authority", head.authority),
        (b":path", head.path),
    ]
    headers.extend(head.headers)
    if orig_proto:
        headers.append((ORIG_PROTO, HTTP11))
    return headers


def h1_request(head: RequestHead, *, has_body: bool) -> h11.Request:
    """The HTTP/1.1 request for ``head``; a body with no declared length is sent chunked. ``head`` came from
    ``head_from_h2``, which checked that HTTP/1.1 can carry it, so h11 does not validate it again."""
    rows = [(b"host", b"host", head.authority or b"localhost")]
    length = h1_rows(head.headers, rows)
    if has_body and not length:
        rows.append((b"transfer-encoding", b"transfer-encoding", b"chunked"))
    return request_event(head.method, head.path, rows)


def h1_rows(headers: list[tuple[bytes, bytes]], rows: list[tuple[bytes, bytes, bytes]]) -> bool:
    """Append h11's rows (name as sent, lower-case name, value) for ``headers`` to ``rows``, less ``te`` and
    ``l5d-orig-proto`` and with one Content-Length (as h11 keeps one of several equal ones); returns whether
    there was a Content-Length."""
    length = False
    for name, value in headers:
        if name == b"te" or name == ORIG_PROTO or (length and name == b"content-length"):
            continue
        length = length or name == b"content-length"
        rows.append((name, name, value))
    return length


def h2_response_headers(status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """HTTP/2 response headers from an HTTP/1.1 (or HTTP/2) response head."""
    out = [(b":status", _STATUS_FIELDS.get(status) or str(status).encode())]
    for name, _ in headers:
        if name in _REFRAMING_NAMES:
            headers = forwarded_headers(headers)  # what a Connection header names goes too (http1.py)
            break
    for name, value in headers:  # without them, hop-by-hop headers are among those dropped here
        lower = name.lower()
        if lower not in _NOT_IN_H2_RESPONSES and not lower.startswith(b":"):
            out.append((lower, value))
    return out


_NOT_IN_H2_RESPONSES = CONNECTION_SPECIFIC | {b"te"}
_REFRAMING_NAMES = frozenset({b"connection", b"transfer-encoding"})
_STATUS_FIELDS = {status: str(status).encode() for status in range(100, 600)}


def split_response(
    headers: list[tuple[bytes, bytes]], *, for_h1: bool = False, memo: FieldMemo | None = None
) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The status and regular headers of an HTTP/2 response head; ``for_h1``: checked for an HTTP/1.1 client."""
    status = 0
    regular = []
    for name, value in headers:
        if name == b":status":
            status = int(value) if value.isdigit() else 0
        elif not name.startswith(b":") and name not in CONNECTION_SPECIFIC:
            regular.append((name, value))
    if not 100 <= status <= 999:
        raise TranslationError("response without a valid :status")
    if for_h1:
        check_h1_fields(regular, memo)
    return status, regular


def h1_response(status: int, headers: list[tuple[bytes, bytes]], *, close: bool) -> h11.Response:
    """The HTTP/1.1 response for an HTTP/2 one whose fields ``split_response(..., for_h1=True)`` checked."""
    assert 200 <= status <= 999, status
    rows: list[tuple[bytes, bytes, bytes]] = []
    h1_rows(headers, rows)
    if close:
        rows.append((b"connection", b"connection", b"close"))
    # HTTP/2 carries no reason phrase. An empty one is valid HTTP/1.1, but http-parser based clients (h2load,
    # older Node) then never report the status and count the response as failed: write the standard phrase.
    return response_event(status, reason_phrase(status), rows)


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of ``status`` (b"" for one without)."""
    return _REASONS.get(status, b"")


_REASONS = {int(status): status.phrase.encode("ascii") for status in HTTPStatus}


def has_content_length(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"content-length" for name, _ in headers)


def grpc_status(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"grpc-status":
            return int(value) if value.isdigit() else GRPC_UNAVAILABLE
    return None


def grpc_error_headers(error: ProxyError) -> list[tuple[bytes, bytes]]:
    """A trailers-only gRPC response for a failure the proxy answers itself."""
    code = grpc_code_for(error)
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", str(code).encode()),
        (b"grpc-message", _percent_encode(f"proxy error: {error.reason}")),
        (b"l5d-proxy-error", header_safe(error.reason)),
    ]


def h2_error_response(error: ProxyError) -> tuple[list[tuple[bytes, bytes]], bytes]:
    headers = [(b":status", str(error.status).encode())]
    headers.extend((name, value) for name, value in error_response_headers(error, close=False) if name != b"connection")
    return headers, error_body(error)


def _percent_encode(text: str) -> bytes:
    # gRPC's grpc-message: percent-encode anything outside printable ASCII, and '%' itself.
    out = bytearray()
    for byte in text.encode("utf-8", "replace")[:1024]:
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out.extend(b"%%%02X" % byte)
    return bytes(out)
