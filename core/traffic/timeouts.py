"""Per-route timeouts, durations as configuration writes them, and the answers the proxy gives itself.

Theory of operation
-------------------
A route rule carries three timeouts (``RouteTimeouts``), each optional; ``None`` (or a configured ``0s``,
as the Gateway API asks) disables it:

- **request**: from the request head arriving to the response's last byte reaching the client. It spans
  every attempt and every backoff, so retries never stretch a request past it. Gateway API
  ``timeouts.request``, Linkerd ``timeout.linkerd.io/request`` and a ServiceProfile route's ``timeout``.
- **response**: one attempt, from its first byte written upstream to the end of its response. Gateway API
  ``timeouts.backendRequest``, Linkerd ``timeout.linkerd.io/response``. It is re-armed per attempt and not
  running during a backoff.
- **idle**: no byte in either direction for this long. Linkerd ``timeout.linkerd.io/idle``.

``RequestTimers`` is the per-request machine: the proxy reports ``attempt_started``, ``attempt_ended``
and ``activity`` with ``now_ns`` and asks ``next_deadline_ns()``; ``expired(now_ns)`` names the timeout
that fired. When several are due at once the earliest deadline wins, and on a tie request beats response
beats idle (the widest scope explains the failure best).

Whichever fires, the answer is the same (``timeout_answer``): 504 with ``l5d-proxy-error`` for HTTP, or a
trailers-only gRPC response with DEADLINE_EXCEEDED. A request that timed out is never retried (see
retry.py): its time is spent, and the client may already have given up.

``ProxyAnswer`` is the shape of every response the proxy answers itself from this package (timeouts,
fault aborts, rate limits), so the proxy has one writer for them.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from tether.core.grpc_codes import GrpcStatus

MS = 1_000_000
S = 1_000_000_000
# The longest duration any route setting accepts. A day is far beyond any sane request, and bounding it
# keeps deadline arithmetic away from overflow in drivers that convert to floats.
MAX_DURATION_NS = 24 * 3600 * S


GrpcCode = GrpcStatus  # the name this package's modules use


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyAnswer:
    """A response the proxy sends itself instead of (or after giving up on) the endpoint's.

    HTTP clients get ``http_status`` with ``l5d-proxy-error: reason``; gRPC clients get HTTP 200,
    trailers-only, with ``grpc_status`` and ``grpc-message: proxy error: reason``. ``label`` is a snake_case
    name for logs and metrics.
    """

    http_status: int
    grpc_status: GrpcCode
    label: str
    reason: str


class TimeoutKind(enum.Enum):
    """Which of a route's timeouts fired."""

    REQUEST = "request"
    RESPONSE = "response"
    IDLE = "idle"


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteTimeouts:
    """The timeouts of one route rule, in nanoseconds; ``None`` means no such timeout."""

    request_ns: int | None = None
    response_ns: int | None = None
    idle_ns: int | None = None

    def __post_init__(self) -> None:
        for value in (self.request_ns, self.response_ns, self.idle_ns):
            assert value is None or 0 < value <= MAX_DURATION_NS, value


NO_TIMEOUTS = RouteTimeouts()


def timeout_answer(kind: TimeoutKind, duration_ns: int) -> ProxyAnswer:
    """What the client gets when ``kind`` fired after ``duration_ns``: 504 or DEADLINE_EXCEEDED."""
    assert duration_ns > 0, duration_ns
    return ProxyAnswer(
        http_status=504,
        grpc_status=GrpcCode.DEADLINE_EXCEEDED,
        label=f"{kind.value}_timeout",
        reason=f"{kind.value} timeout after {format_duration(duration_ns)}",
    )


class RequestTimers:
    """The deadlines of one request under its route's ``RouteTimeouts``; see the module docstring."""

    def __init__(self, timeouts: RouteTimeouts, started_ns: int) -> None:
        self.timeouts = timeouts
        self._request_deadline_ns = None if timeouts.request_ns is None else started_ns + timeouts.request_ns
        self._response_deadline_ns: int | None = None
        self._last_activity_ns = started_ns

    def attempt_started(self, now_ns: int) -> None:
        """An attempt began writing upstream: arm the response timeout (re-armed on every attempt)."""
        if self.timeouts.response_ns is not None:
            self._response_deadline_ns = now_ns + self.timeouts.response_ns
        self.activity(now_ns)

    def attempt_ended(self, now_ns: int) -> None:
        """The attempt's response ended (or it failed): no response timeout until the next attempt."""
        self._response_deadline_ns = None
        self.activity(now_ns)

    def activity(self, now_ns: int) -> None:
        """Bytes moved in either direction: the idle timeout starts over."""
        assert now_ns >= self._last_activity_ns, (now_ns, self._last_activity_ns)
        self._last_activity_ns = now_ns

    def next_deadline_ns(self) -> int | None:
        due = [deadline for _kind, deadline in self._deadlines()]
        return min(due) if due else None

    def expired(self, now_ns: int) -> TimeoutKind | None:
        """The timeout that has fired by ``now_ns`` (earliest deadline; request > response > idle on ties)."""
        fired = [(deadline, order, kind) for order, (kind, deadline) in enumerate(self._deadlines())]
        fired = [entry for entry in fired if entry[0] <= now_ns]
        return min(fired)[2] if fired else None

    def _deadlines(self) -> list[tuple[TimeoutKind, int]]:
        deadlines = []
        if self._request_deadline_ns is not None:
            deadlines.append((TimeoutKind.REQUEST, self._request_deadline_ns))
        if self._response_deadline_ns is not None:
            deadlines.append((TimeoutKind.RESPONSE, self._response_deadline_ns))
        if self.timeouts.idle_ns is not None:
            deadlines.append((TimeoutKind.IDLE, self._last_activity_ns + self.timeouts.idle_ns))
        return deadlines

    def duration_ns(self, kind: TimeoutKind) -> int:
        """The configured length of ``kind`` (for the answer's reason)."""
        value = {
            TimeoutKind.REQUEST: self.timeouts.request_ns,
            TimeoutKind.RESPONSE: self.timeouts.response_ns,
            TimeoutKind.IDLE: self.timeouts.idle_ns,
        }[kind]
        assert value is not None, kind
        return value


# ------------------------------------------------------------------ durations

_DURATION_PART = re.compile(r"([0-9]{1,9})(?:\.([0-9]{1,9}))?(h|ms|m|s|us|µs|ns)")
_UNIT_NS = {"h": 3600 * S, "m": 60 * S, "s": S, "ms": MS, "us": 1000, "µs": 1000, "ns": 1}


class DurationError(ValueError):
    """A duration string that cannot be read; the message says what to write instead."""


def parse_duration_ns(text: str) -> int:
    """Nanoseconds in a Go / Gateway API duration: ``10s``, ``250ms``, ``1m30s``, ``1.5s``, ``0s``.

    Accepts the units h, m, s, ms, us (or µs) and ns, one or more parts, and a bare ``0``. Refuses
    negative values, unit-less numbers other than 0, and anything above ``MAX_DURATION_NS``.
    """
    text = text.strip()
    if text == "0":
        return 0
    if not text:
        raise DurationError("empty duration; write a number and a unit, for example 500ms or 10s")
    position = 0
    total = 0
    while position < len(text):
        part = _DURATION_PART.match(text, position)
        if part is None:
            raise DurationError(f"{text!r} is not a duration; write a number and a unit, for example 500ms or 10s")
        whole, fraction, unit = part.groups()
        unit_ns = _UNIT_NS[unit]
        total += int(whole) * unit_ns
        if fraction:
            total += int(fraction) * unit_ns // 10 ** len(fraction)
        position = part.end()
    if total > MAX_DURATION_NS:
        raise DurationError(f"{text!r} is longer than 24h; give a shorter duration")
    return total


def format_duration(duration_ns: int) -> str:
    """A short human form: ``2s``, ``250ms``, ``1.5s``, ``40us``."""
    assert duration_ns >= 0, duration_ns
    for unit, size in (("s", S), ("ms", MS), ("us", 1000)):
        if duration_ns >= size:
            whole, rest = divmod(duration_ns, size)
            if rest == 0:
                return f"{whole}{unit}"
            return f"{duration_ns / size:.3g}{unit}"
    return f"{duration_ns}ns"
