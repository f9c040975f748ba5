"""HTTP/1.1 message helpers for the proxy: which headers cross a hop, and how a request is rewritten."""

from __future__ import annotations

import h11

from tether.core.proxy.h1heads import request_event, response_event

# RFC 9110 section 7.6.1: these describe one connection, never the message, so a proxy drops them.
# Framing headers (content-length, transfer-encoding) stay: h11 re-frames each side from them.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade"})
# A Connection header may name any header as hop-by-hop, but dropping these would change how the message is
# framed or routed (a peer could name content-length and desynchronise the endpoint), so they always stay.
NEVER_HOP_BY_HOP = frozenset({b"content-length", b"transfer-encoding", b"host"})


Message = h11.Request | h11.Response | h11.InformationalResponse | h11.EndOfMessage


def pairs(message: Message) -> list[tuple[bytes, bytes]]:
    """A message's headers as (lower-case name, value) pairs. Iterating h11's ``Headers`` goes through the
    ``Sequence`` protocol item by item, a noticeable share of a proxied request; its item list is direct."""
    return [(name, value) for _, name, value in message.headers._full_items]


def forwarded_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers and any header the Connection header names, keeping framing intact.

    A message with both Transfer-Encoding and Content-Length loses the Content-Length: RFC 9112 section
    6.3 says Transfer-Encoding wins and an intermediary must not forward both (request smuggling).
    """
    named: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    named -= NEVER_HOP_BY_HOP
    chunked = any(name == b"transfer-encoding" for name, _ in headers)
    return [
        (name, value)
        for name, value in headers
        if name not in HOP_BY_HOP and name not in named and not (chunked and name == b"content-length")
    ]


def upstream_request(request: h11.Request, fallback_host: bytes) -> h11.Request:
    """The request as the proxy writes it upstream: HTTP/1.1, hop-by-hop headers removed, Host kept.

    An upgrade request (WebSocket) keeps ``Upgrade`` and ``Connection: upgrade``: the endpoint must see
    the offer to accept it, and the proxy becomes a byte pipe once it does (tunnel.py).
    """
    original = pairs(request)
    headers = forwarded_headers(original) + upgrade_headers(original)
    if not any(name == b"host" for name, _ in headers):
        # An HTTP/1.0 client may omit Host; HTTP/1.1 requires it.
        headers.insert(0, (b"host", fallback_host))
    # The headers came out of a parser (validated there) or are our own constants: no second validation.
    return request_event(request.method, request.target, [(name, name, value) for name, value in headers])


def upgrade_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``Connection: upgrade`` and ``Upgrade: X`` if ``headers`` offer (or accept) an upgrade, else []."""
    offered = [value for name, value in headers if name == b"upgrade"]
    connection_tokens = {
        token.strip().lower() for name, value in headers if name == b"connection" for token in value.split(b",")
    }
    if not offered or b"upgrade" not in connection_tokens:
        return []
    return [(b"connection", b"upgrade"), (b"upgrade", offered[0])]


def wants_tunnel(request: h11.Request) -> bool:
    """Whether a successful answer turns this exchange into a byte pipe (an upgrade, or CONNECT)."""
    return request.method == b"CONNECT" or bool(upgrade_headers(pairs(request)))


def request_authority(request: h11.Request) -> str:
    for name, value in pairs(request):
        if name == b"host":
            return value.decode("ascii", "replace")
    target = request.target
    if target.startswith((b"http://", b"https://")):
        return target.split(b"/", 3)[2].decode("ascii", "replace")
    return ""


def downstream_response(response: h11.Response, *, close: bool) -> h11.Response:
    headers = forwarded_headers(pairs(response))
    if close:
        headers.append((b"connection", b"close"))
    return response_event(response.status_code, response.reason, [(name, name, value) for name, value in headers])


def describe_protocol_error(error: h11.RemoteProtocolError) -> str:
    text = str(error) or type(error).__name__
    return text[:200]


def head_size(message: h11.Request | h11.Response) -> int:
    """Bytes of a parsed head, as it was on the wire give or take whitespace.

    h11 enforces ``max_incomplete_event_size`` only while a head is still incomplete; a whole oversized
    head that arrives in one read passes through, so the proxy measures every head itself.
    """
    start = len(message.target) + len(message.method) if isinstance(message, h11.Request) else len(message.reason) + 13
    return start + 12 + sum(len(name) + len(value) + 4 for _, name, value in message.headers._full_items)
