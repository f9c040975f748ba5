"""Failures the proxy answers for itself, and the response each becomes.

Every proxy-generated response carries ``l5d-proxy-error`` with a sentence a person can act on, as
Linkerd's proxy does, so a client can tell "the proxy could not reach the endpoint" (502/503/504 with the
header) from "the application answered 5xx" (no header).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ProxyErrorKind(enum.Enum):
    """Why the proxy answered instead of the endpoint: an HTTP status and a snake_case label."""

    MALFORMED_REQUEST = (400, "malformed_request")
    HEADERS_TOO_LARGE = (431, "headers_too_large")
    NO_ENDPOINTS = (503, "no_endpoints")
    POOL_EXHAUSTED = (503, "pool_exhausted")
    CONNECT_FAILED = (502, "connect_failed")
    UPSTREAM_CLOSED = (502, "upstream_closed")
    INVALID_RESPONSE = (502, "invalid_response")
    CONNECT_TIMEOUT = (504, "connect_timeout")
    RESPONSE_TIMEOUT = (504, "response_timeout")
    # Traffic management (core/traffic/): the balancer's failfast queue, routes, route timeouts, faults and
    # local rate limits. A fault's status is the configured one (``ProxyError.status_override``).
    FAILFAST = (503, "failfast")
    LOAD_SHED = (503, "load_shed")
    NO_ROUTE = (404, "no_route")
    NO_BACKEND = (500, "no_backend")
    REQUEST_TIMEOUT = (504, "request_timeout")
    IDLE_TIMEOUT = (504, "idle_timeout")
    FAULT_INJECTED = (503, "fault_injected")
    RATE_LIMITED = (429, "rate_limited")

    def __init__(self, status: int, label: str) -> None:
        self.status = status
        self.label = label


# Failures of one attempt at an endpoint: they count against the endpoint (circuit breaking) and a route's
# retry policy may retry them. The rest (a malformed request, a full pool, a route's own answers) say
# nothing about the endpoint.
ATTEMPT_FAILURES = frozenset(
    {
        ProxyErrorKind.CONNECT_FAILED,
        ProxyErrorKind.UPSTREAM_CLOSED,
        ProxyErrorKind.INVALID_RESPONSE,
        ProxyErrorKind.CONNECT_TIMEOUT,
        ProxyErrorKind.RESPONSE_TIMEOUT,
    }
)


@dataclass(frozen=True, slots=True)
class ProxyError:
    """One failure: its kind and a readable reason, sent as the ``l5d-proxy-error`` header value.

    ``status_override`` and ``grpc_override`` replace the kind's HTTP status and gRPC code where the
    configuration chose them (an injected fault's status).
    """

    kind: ProxyErrorKind
    reason: str
    status_override: int | None = None
    grpc_override: int | None = None

    @property
    def status(self) -> int:
        return self.status_override if self.status_override is not None else self.kind.status


def error_response_headers(error: ProxyError, *, close: bool) -> list[tuple[bytes, bytes]]:
    """Headers of the response the proxy sends for ``error``; the body is the reason and a newline."""
    body_length = len(error_body(error))
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(body_length).encode()),
        (b"l5d-proxy-error", header_safe(error.reason)),
    ]
    if close:
        headers.append((b"connection", b"close"))
    return headers


def error_body(error: ProxyError) -> bytes:
    return error.reason.encode("utf-8", "replace") + b"\n"


def header_safe(text: str) -> bytes:
    # A reason can quote peer input (a reset message, a bad header); keep the header value legal.
    cleaned = "".join(ch if 0x20 <= ord(ch) < 0x7F else "?" for ch in text)
    return cleaned[:512].encode("ascii")
