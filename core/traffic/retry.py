"""Retries: the per-route policy, the decision after each attempt, the replay buffer and l5d-retry-* headers.

Theory of operation
-------------------
After an attempt fails the proxy asks ``should_retry(policy, attempt, outcome, body_buffered, timed_out,
rng=...)`` *before* anything of that attempt's response reaches the client. The answer is a
``RetryDecision``: a backoff delay to wait before the next attempt, or ``None`` and the reason not to.
The checks run in this order, so the reason names the first that applies:

1. ``timed_out``: a route timeout (request, response or idle; timeouts.py) fired. Never retried: the
   client's time is spent. (An attempt cut by the policy's own ``attempt_timeout_ns``, Linkerd's
   ``retry.linkerd.io/timeout``, is different: Linkerd documents it as the retryable timeout, so it is
   reported in the outcome, ``AttemptOutcome.attempt_timed_out``, and retried like a failure.)
2. the outcome is not a failure the policy names (``RetryConditions``): an HTTP status or range, ``5xx``,
   ``gateway-error`` (502-504), or the gRPC codes cancelled, deadline-exceeded, internal,
   resource-exhausted and unavailable.
3. the policy's ``limit`` of retries (default 1, at most ``MAX_RETRY_LIMIT``) is used up.
4. the request body is not held whole in its ``ReplayBuffer`` (more than 64 KiB): it cannot be replayed.

A positive decision is then checked against the service's retry budget (budget.py) with
``spend_budget``, which turns it into ``BUDGET_EXHAUSTED`` when the budget is empty. The decision itself is
pure; the budget is the only state, shared by the service's routes.

Backoff: retry n (1 for the first) waits a uniformly drawn time in [c/2, c], c = min(250 ms, 25 ms x 2^n),
and never less than 25 ms: 25-50 ms, 50-100 ms, 100-200 ms, then 125-250 ms. The jitter comes from the
RNG the caller passes in, so the simulator replays it.

Headers: a request may carry ``l5d-retry-limit``, ``l5d-retry-http``, ``l5d-retry-grpc`` and
``l5d-retry-timeout`` (Linkerd's per-request policy, same formats as the annotations). They are honoured
only on routes that allow them (``apply_retry_headers(..., allowed=True)``); otherwise they are ignored,
because any client could raise its own retry limit. A malformed header is ignored and reported.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace

from tether.core.traffic.budget import RetryBudget
from tether.core.traffic.timeouts import MS, DurationError, GrpcCode, parse_duration_ns

# Retries per request a policy (or a header) may ask for. Linkerd's default is 1; past a handful,
# retries stop helping and only add load, and the budget would refuse them anyway.
MAX_RETRY_LIMIT = 10
# Request bodies up to this size are kept for replay; a larger body is streamed and never retried.
# Linkerd's limit: "If a request has a body larger than 64KiB then it will not be retried."
REPLAY_BUFFER_MAX_BYTES = 64 * 1024
BACKOFF_MIN_NS = 25 * MS
BACKOFF_MAX_NS = 250 * MS

RETRY_HEADERS = ("l5d-retry-limit", "l5d-retry-http", "l5d-retry-grpc", "l5d-retry-timeout")
GRPC_RETRYABLE_CODES = {
    "cancelled": GrpcCode.CANCELLED,
    "deadline-exceeded": GrpcCode.DEADLINE_EXCEEDED,
    "internal": GrpcCode.INTERNAL,
    "resource-exhausted": GrpcCode.RESOURCE_EXHAUSTED,
    "unavailable": GrpcCode.UNAVAILABLE,
}


class RetryConfigError(ValueError):
    """A retry condition, limit or header value that cannot be read; the message says what to write."""


@dataclass(frozen=True, slots=True, order=True)
class StatusRange:
    """HTTP statuses ``low`` to ``high``, inclusive."""

    low: int
    high: int

    def __post_init__(self) -> None:
        assert 100 <= self.low <= self.high <= 599, (self.low, self.high)

    def __contains__(self, status: object) -> bool:
        return isinstance(status, int) and self.low <= status <= self.high


SERVER_ERRORS = StatusRange(500, 599)  # "5xx"
GATEWAY_ERRORS = StatusRange(502, 504)  # "gateway-error"


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConditions:
    """Which outcomes count as retryable failures: HTTP status ranges and gRPC codes."""

    http: tuple[StatusRange, ...] = ()
    grpc: frozenset[GrpcCode] = frozenset()

    def matches(self, outcome: AttemptOutcome) -> bool:
        if outcome.attempt_timed_out:
            return True
        if outcome.grpc_status is not None and outcome.grpc_status in self.grpc:
            return True
        return any(outcome.http_status in statuses for statuses in self.http)


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Exponential backoff with jitter between ``min_ns`` and ``max_ns``; see the module docstring."""

    min_ns: int = BACKOFF_MIN_NS
    max_ns: int = BACKOFF_MAX_NS

    def __post_init__(self) -> None:
        assert 0 < self.min_ns <= self.max_ns, (self.min_ns, self.max_ns)

    def ceiling_ns(self, retry_number: int) -> int:
        """The longest wait before retry ``retry_number`` (1 for the first retry)."""
        assert retry_number >= 1, retry_number
        return min(self.max_ns, self.min_ns << min(retry_number, 32))

    def delay_ns(self, retry_number: int, rng: random.Random) -> int:
        ceiling = self.ceiling_ns(retry_number)
        floor = max(self.min_ns, ceiling // 2)
        return rng.randint(floor, ceiling)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """A route's retries: at most ``limit`` retries of failures matching ``conditions``.

    ``attempt_timeout_ns``: an attempt without a response this long is cancelled and, as a failure,
    retried (Linkerd's retry timeout); ``None`` for none.
    """

    limit: int = 1
    conditions: RetryConditions = RetryConditions(http=(SERVER_ERRORS,))
    backoff: Backoff = Backoff()
    attempt_timeout_ns: int | None = None

    def __post_init__(self) -> None:
        assert 0 <= self.limit <= MAX_RETRY_LIMIT, self.limit
        assert self.attempt_timeout_ns is None or self.attempt_timeout_ns > 0, self.attempt_timeout_ns


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptOutcome:
    """How one attempt ended: its HTTP status (the proxy's own error status for a failure it answered,
    such as 502 for a refused connection), the gRPC status if any, and whether the policy's attempt
    timeout cut it."""

    http_status: int
    grpc_status: int | None = None
    attempt_timed_out: bool = False


class RetryReason(enum.Enum):
    """Why a ``RetryDecision`` came out as it did."""

    RETRY = "retry"
    NOT_RETRYABLE = "not_retryable"  # a success, or a failure the policy does not name
    NO_POLICY = "no_policy"  # the route has no retry policy, or its limit is 0
    LIMIT_REACHED = "limit_reached"
    BODY_NOT_BUFFERED = "body_not_buffered"  # larger than REPLAY_BUFFER_MAX_BYTES
    TIMED_OUT = "timed_out"  # a route timeout fired: never retried
    BUDGET_EXHAUSTED = "budget_exhausted"


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Retry after ``delay_ns`` (``reason`` RETRY), or give the client this attempt's outcome."""

    delay_ns: int | None
    reason: RetryReason

    def __post_init__(self) -> None:
        assert (self.delay_ns is not None) == (self.reason is RetryReason.RETRY), self


def should_retry(
    policy: RetryPolicy | None,
    attempt: int,
    outcome: AttemptOutcome,
    body_buffered: bool,
    timed_out: bool,
    *,
    rng: random.Random,
) -> RetryDecision:
    """Whether to retry after attempt number ``attempt`` (1 is the original request) ended in ``outcome``.

    ``body_buffered``: the request body is held whole in its replay buffer. ``timed_out``: a route timeout
    fired. Draws from ``rng`` only when the answer is RETRY (the backoff's jitter).
    """
    assert attempt >= 1, attempt
    if timed_out:
        return RetryDecision(None, RetryReason.TIMED_OUT)
    if policy is None or policy.limit == 0:
        return RetryDecision(None, RetryReason.NO_POLICY)
    if not policy.conditions.matches(outcome):
        return RetryDecision(None, RetryReason.NOT_RETRYABLE)
    if attempt > policy.limit:
        return RetryDecision(None, RetryReason.LIMIT_REACHED)
    if not body_buffered:
        return RetryDecision(None, RetryReason.BODY_NOT_BUFFERED)
    return RetryDecision(policy.backoff.delay_ns(attempt, rng), RetryReason.RETRY)


def spend_budget(decision: RetryDecision, budget: RetryBudget, now_ns: int) -> RetryDecision:
    """Withdraw a retry from ``budget`` for a RETRY decision; BUDGET_EXHAUSTED if it holds none."""
    if decision.reason is not RetryReason.RETRY:
        return decision
    if budget.try_withdraw(now_ns):
        return decision
    return RetryDecision(None, RetryReason.BUDGET_EXHAUSTED)


class ReplayBuffer:
    """A request body kept for replay, up to ``max_bytes``; past that it is dropped and never replayed.

    The proxy appends every chunk it forwards upstream. A request whose ``content-length`` already
    exceeds the limit starts overflowed, so nothing is copied at all.
    """

    def __init__(self, max_bytes: int = REPLAY_BUFFER_MAX_BYTES, *, content_length: int | None = None) -> None:
        assert max_bytes >= 0, max_bytes
        self.max_bytes = max_bytes
        self._chunks: list[bytes] = []
        self.size = 0
        self.overflowed = content_length is not None and content_length > max_bytes

    def append(self, data: bytes) -> None:
        if self.overflowed:
            return
        if self.size + len(data) > self.max_bytes:
            self.overflowed = True
            self._chunks.clear()
            self.size = 0
            return
        if data:
            self._chunks.append(data)
            self.size += len(data)

    @property
    def replayable(self) -> bool:
        return not self.overflowed

    def chunks(self) -> tuple[bytes, ...]:
        """What was forwarded so far, to send again on the next attempt."""
        assert not self.overflowed, "an overflowed body cannot be replayed"
        return tuple(self._chunks)


# ------------------------------------------------------------------ reading conditions and headers


def parse_http_conditions(text: str) -> tuple[StatusRange, ...]:
    """``5xx``, ``gateway-error``, ``504`` or ``500-504``, comma-separated (Linkerd's retry.linkerd.io/http)."""
    ranges: list[StatusRange] = []
    for item in (part.strip().lower() for part in text.split(",")):
        if item == "5xx":
            ranges.append(SERVER_ERRORS)
        elif item == "gateway-error":
            ranges.append(GATEWAY_ERRORS)
        else:
            ranges.append(_status_range(item))
    return tuple(ranges)


def _status_range(item: str) -> StatusRange:
    low_text, dash, high_text = item.partition("-")
    if not dash:
        high_text = low_text
    if not (_is_number(low_text) and _is_number(high_text) and len(low_text) == 3 and len(high_text) == 3):
        raise RetryConfigError(f"{item!r} is not a status; write 5xx, gateway-error, 504 or 500-504")
    low, high = int(low_text), int(high_text)
    if not 100 <= low <= high <= 599:
        raise RetryConfigError(f"{item!r} is not a status range; write LOW-HIGH with 100 <= LOW <= HIGH <= 599")
    return StatusRange(low, high)


def parse_grpc_conditions(text: str) -> frozenset[GrpcCode]:
    """Comma-separated gRPC code names (Linkerd's retry.linkerd.io/grpc)."""
    codes = set()
    for item in (part.strip().lower() for part in text.split(",")):
        code = GRPC_RETRYABLE_CODES.get(item)
        if code is None:
            raise RetryConfigError(f"{item!r} is not a retryable gRPC code; use {', '.join(GRPC_RETRYABLE_CODES)}")
        codes.add(code)
    return frozenset(codes)


def parse_retry_limit(text: str) -> int:
    text = text.strip()
    if not _is_number(text) or int(text) > MAX_RETRY_LIMIT:
        raise RetryConfigError(f"{text!r} is not a retry limit; give a whole number from 0 to {MAX_RETRY_LIMIT}")
    return int(text)


def apply_retry_headers(
    policy: RetryPolicy | None, headers: Iterable[tuple[str, str]], *, allowed: bool
) -> tuple[RetryPolicy | None, tuple[str, ...]]:
    """The policy for one request: the route's, overridden by its ``l5d-retry-*`` headers if ``allowed``.

    Returns the policy and the problems found in malformed headers (each ignored), for the proxy's log.
    A route without a policy gets one from the headers alone (limit 1 unless ``l5d-retry-limit`` says).
    An ``l5d-retry-limit`` above ``MAX_RETRY_LIMIT`` is reported and lowered to it.
    """
    if not allowed:
        return policy, ()
    values = {name.lower(): value for name, value in headers if name.lower() in RETRY_HEADERS}
    if not values:
        return policy, ()
    changes: dict[str, object] = {}
    problems: list[str] = []
    base = policy if policy is not None else RetryPolicy(conditions=RetryConditions())
    conditions = base.conditions
    for name, value in values.items():
        try:
            if name == "l5d-retry-limit":
                changes["limit"] = _header_limit(value, problems)
            elif name == "l5d-retry-http":
                conditions = replace(conditions, http=parse_http_conditions(value))
            elif name == "l5d-retry-grpc":
                conditions = replace(conditions, grpc=parse_grpc_conditions(value))
            else:
                changes["attempt_timeout_ns"] = parse_duration_ns(value) or None
        except (RetryConfigError, DurationError) as error:
            problems.append(f"{name}: {error}")
    if policy is None and not changes and conditions == base.conditions:
        return None, tuple(problems)  # every header was malformed: the route still has no policy
    return replace(base, conditions=conditions, **changes), tuple(problems)  # type: ignore[arg-type]


def _header_limit(value: str, problems: list[str]) -> int:
    text = value.strip()
    if _is_number(text) and int(text) > MAX_RETRY_LIMIT:
        problems.append(f"l5d-retry-limit: {text} is above {MAX_RETRY_LIMIT}; using {MAX_RETRY_LIMIT}")
        return MAX_RETRY_LIMIT
    return parse_retry_limit(text)


def _is_number(text: str) -> bool:
    # str.isdigit alone accepts digits int() refuses (superscripts) and other scripts' digits.
    return text.isascii() and text.isdigit()
