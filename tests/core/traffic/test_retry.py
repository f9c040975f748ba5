"""Retry decisions, backoff, the replay buffer, conditions and l5d-retry-* headers, and retries under a budget."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from tether.core.traffic.budget import MILLI, RetryBudget, RetryBudgetConfig
from tether.core.traffic.retry import (
    BACKOFF_MAX_NS,
    BACKOFF_MIN_NS,
    GATEWAY_ERRORS,
    MAX_RETRY_LIMIT,
    REPLAY_BUFFER_MAX_BYTES,
    SERVER_ERRORS,
    AttemptOutcome,
    Backoff,
    ReplayBuffer,
    RetryConditions,
    RetryConfigError,
    RetryDecision,
    RetryPolicy,
    RetryReason,
    StatusRange,
    apply_retry_headers,
    parse_grpc_conditions,
    parse_http_conditions,
    should_retry,
    spend_budget,
)
from tether.core.traffic.timeouts import GrpcCode

MS = 1_000_000
S = 1_000_000_000

status_ranges = st.integers(100, 599).flatmap(lambda low: st.builds(StatusRange, st.just(low), st.integers(low, 599)))
conditions = st.builds(
    RetryConditions,
    http=st.lists(status_ranges, max_size=3).map(tuple),
    grpc=st.frozensets(st.sampled_from(list(GrpcCode)), max_size=3),
)
policies = st.builds(
    RetryPolicy, limit=st.integers(0, MAX_RETRY_LIMIT), conditions=conditions, attempt_timeout_ns=st.none()
)
outcomes = st.builds(
    AttemptOutcome,
    http_status=st.integers(100, 599),
    grpc_status=st.one_of(st.none(), st.integers(0, 16)),
    attempt_timed_out=st.booleans(),
)


def expected_reason(policy: RetryPolicy | None, attempt: int, outcome: AttemptOutcome, buffered: bool, timed_out: bool):
    """The decision's reason written out from the documented order of checks."""
    if timed_out:
        return RetryReason.TIMED_OUT
    if policy is None or policy.limit == 0:
        return RetryReason.NO_POLICY
    failure = (
        outcome.attempt_timed_out
        or (outcome.grpc_status is not None and outcome.grpc_status in policy.conditions.grpc)
        or any(r.low <= outcome.http_status <= r.high for r in policy.conditions.http)
    )
    if not failure:
        return RetryReason.NOT_RETRYABLE
    if attempt > policy.limit:
        return RetryReason.LIMIT_REACHED
    if not buffered:
        return RetryReason.BODY_NOT_BUFFERED
    return RetryReason.RETRY


@given(
    policy=st.one_of(st.none(), policies),
    attempt=st.integers(1, MAX_RETRY_LIMIT + 2),
    outcome=outcomes,
    buffered=st.booleans(),
    timed_out=st.booleans(),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=200, deadline=None)
def test_should_retry_follows_the_documented_order(policy, attempt, outcome, buffered, timed_out, seed) -> None:
    rng = random.Random(seed)
    decision = should_retry(policy, attempt, outcome, buffered, timed_out, rng=rng)
    assert decision.reason is expected_reason(policy, attempt, outcome, buffered, timed_out)
    if timed_out or not buffered or policy is None or attempt > policy.limit:
        assert decision.delay_ns is None  # never after a timeout, over the limit, or for an unbuffered body
    if decision.delay_ns is None:
        assert rng.getstate() == random.Random(seed).getstate()  # no draw unless retrying
    else:
        ceiling = min(BACKOFF_MAX_NS, BACKOFF_MIN_NS * 2**attempt)
        assert max(BACKOFF_MIN_NS, ceiling // 2) <= decision.delay_ns <= ceiling
        assert BACKOFF_MIN_NS <= decision.delay_ns <= BACKOFF_MAX_NS


@pytest.mark.parametrize(
    ("retry", "low", "high"), [(1, 25, 50), (2, 50, 100), (3, 100, 200), (4, 125, 250), (9, 125, 250)]
)
def test_backoff_doubles_from_25_ms_to_250_ms(retry: int, low: int, high: int) -> None:
    rng = random.Random(retry)
    delays = [Backoff().delay_ns(retry, rng) for _ in range(200)]
    assert low * MS <= min(delays) and max(delays) <= high * MS
    assert len(set(delays)) > 100  # jittered


def test_backoff_is_deterministic_given_the_rng() -> None:
    first = [Backoff().delay_ns(n, random.Random(5)) for n in range(1, 6)]
    assert first == [Backoff().delay_ns(n, random.Random(5)) for n in range(1, 6)]


def test_default_policy_is_one_retry_of_5xx() -> None:
    policy = RetryPolicy()
    rng = random.Random(1)
    assert should_retry(policy, 1, AttemptOutcome(http_status=503), True, False, rng=rng).reason is RetryReason.RETRY
    assert should_retry(policy, 2, AttemptOutcome(http_status=503), True, False, rng=rng).reason is (
        RetryReason.LIMIT_REACHED
    )
    assert should_retry(policy, 1, AttemptOutcome(http_status=404), True, False, rng=rng).reason is (
        RetryReason.NOT_RETRYABLE
    )


@given(chunks=st.lists(st.integers(0, 40_000), max_size=8), declared=st.one_of(st.none(), st.integers(0, 200_000)))
@settings(max_examples=200, deadline=None)
def test_replay_buffer_keeps_bodies_up_to_64_kib_and_never_larger(chunks: list[int], declared: int | None) -> None:
    buffer = ReplayBuffer(content_length=declared)
    data = [bytes([index % 256]) * size for index, size in enumerate(chunks)]
    for chunk in data:
        buffer.append(chunk)
    fits = sum(chunks) <= REPLAY_BUFFER_MAX_BYTES and (declared is None or declared <= REPLAY_BUFFER_MAX_BYTES)
    assert buffer.replayable == fits
    if fits:
        assert b"".join(buffer.chunks()) == b"".join(data)
    else:
        assert buffer.size == 0  # an overflowed buffer holds nothing
        with pytest.raises(AssertionError):
            buffer.chunks()


def test_replay_buffer_limit_is_inclusive() -> None:
    buffer = ReplayBuffer()
    buffer.append(b"x" * REPLAY_BUFFER_MAX_BYTES)
    assert buffer.replayable
    buffer.append(b"y")
    assert not buffer.replayable


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5xx", (SERVER_ERRORS,)),
        ("gateway-error", (GATEWAY_ERRORS,)),
        ("504", (StatusRange(504, 504),)),
        ("500-504, 429", (StatusRange(500, 504), StatusRange(429, 429))),
        ("5XX", (SERVER_ERRORS,)),
    ],
)
def test_parse_http_conditions_reads_linkerds_format(text: str, expected: tuple[StatusRange, ...]) -> None:
    assert parse_http_conditions(text) == expected


@pytest.mark.parametrize("text", ["", "4xx", "50", "600", "504-500", "5o4", "²⁰⁰", "500-", "gateway"])
def test_parse_http_conditions_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(RetryConfigError, match="write"):
        parse_http_conditions(text)


def test_parse_grpc_conditions_reads_the_five_codes() -> None:
    codes = parse_grpc_conditions("cancelled,deadline-exceeded, internal,resource-exhausted,UNAVAILABLE")
    assert codes == {GrpcCode(1), GrpcCode(4), GrpcCode(13), GrpcCode(8), GrpcCode(14)}
    with pytest.raises(RetryConfigError, match="use cancelled"):
        parse_grpc_conditions("unknown")


HEADERS = [("L5d-Retry-Limit", "3"), ("l5d-retry-http", "gateway-error"), ("l5d-retry-timeout", "200ms")]


def test_retry_headers_are_ignored_unless_the_route_allows_them() -> None:
    policy = RetryPolicy()
    assert apply_retry_headers(policy, HEADERS, allowed=False) == (policy, ())
    assert apply_retry_headers(None, HEADERS, allowed=False) == (None, ())


def test_retry_headers_override_the_route_policy_where_allowed() -> None:
    policy, problems = apply_retry_headers(RetryPolicy(), [*HEADERS, ("l5d-retry-grpc", "unavailable")], allowed=True)
    assert problems == ()
    assert policy is not None and policy.limit == 3 and policy.attempt_timeout_ns == 200 * MS
    assert policy.conditions == RetryConditions(http=(GATEWAY_ERRORS,), grpc=frozenset({GrpcCode.UNAVAILABLE}))


def test_retry_headers_alone_give_a_route_without_policy_one() -> None:
    policy, _ = apply_retry_headers(None, [("l5d-retry-http", "5xx")], allowed=True)
    assert policy == RetryPolicy(limit=1, conditions=RetryConditions(http=(SERVER_ERRORS,)))


def test_malformed_retry_headers_are_ignored_and_reported() -> None:
    base = RetryPolicy(limit=2)
    policy, problems = apply_retry_headers(
        base, [("l5d-retry-limit", "many"), ("l5d-retry-http", "4xx"), ("l5d-retry-timeout", "soon")], allowed=True
    )
    assert policy == base
    assert [problem.split(":")[0] for problem in problems] == ["l5d-retry-limit", "l5d-retry-http", "l5d-retry-timeout"]
    assert apply_retry_headers(None, [("l5d-retry-http", "4xx")], allowed=True)[0] is None


def test_retry_limit_header_is_clamped_to_the_maximum() -> None:
    policy, problems = apply_retry_headers(RetryPolicy(), [("l5d-retry-limit", "1000")], allowed=True)
    assert policy is not None and policy.limit == MAX_RETRY_LIMIT and "using 10" in problems[0]


def test_spend_budget_turns_a_retry_into_budget_exhausted() -> None:
    budget = RetryBudget(RetryBudgetConfig(retry_ratio=0.0, min_retries_per_s=1, ttl_ns=1 * S))
    retry = RetryDecision(30 * MS, RetryReason.RETRY)
    assert spend_budget(retry, budget, 0) == retry
    assert spend_budget(retry, budget, 0) == RetryDecision(None, RetryReason.BUDGET_EXHAUSTED)
    no = RetryDecision(None, RetryReason.NOT_RETRYABLE)
    assert spend_budget(no, budget, 0) is no and budget.refusals == 1


class RetriesUnderBudget(RuleBasedStateMachine):
    """Many requests of one service, each failing or not, retried through should_retry and the budget.

    Time stays within one budget slot, so nothing expires and the bound is exact: retries never exceed
    ratio x requests + the reserve, and no request is retried more than its limit.
    """

    requests = Bundle("requests")

    @initialize(
        ratio=st.sampled_from([0.0, 0.2, 0.5]),
        reserve_per_s=st.integers(0, 3),
        limit=st.integers(0, 3),
        seed=st.integers(),
    )
    def start(self, ratio: float, reserve_per_s: int, limit: int, seed: int) -> None:
        self.config = RetryBudgetConfig(retry_ratio=ratio, min_retries_per_s=reserve_per_s, ttl_ns=10 * S)
        self.budget = RetryBudget(self.config)
        self.policy = RetryPolicy(limit=limit)
        self.rng = random.Random(seed)
        self.attempts: dict[int, int] = {}
        self.retried: dict[int, int] = {}
        self.now_ns = 0

    @rule(target=requests)
    def new_request(self) -> int:
        request = len(self.attempts)
        self.attempts[request] = 1
        self.retried[request] = 0
        self.budget.deposit(self.now_ns)
        return request

    @rule(request=requests, status=st.sampled_from([200, 404, 500, 503]), buffered=st.booleans())
    def attempt_ended(self, request: int, status: int, buffered: bool) -> None:
        attempt = self.attempts[request]
        decision = should_retry(self.policy, attempt, AttemptOutcome(http_status=status), buffered, False, rng=self.rng)
        decision = spend_budget(decision, self.budget, self.now_ns)
        if decision.reason is RetryReason.RETRY:
            self.attempts[request] += 1
            self.retried[request] += 1
            self.now_ns += decision.delay_ns // 1000  # stay inside one slot

    @invariant()
    def no_request_exceeds_its_limit(self) -> None:
        assert all(count <= self.policy.limit for count in self.retried.values())

    @invariant()
    def retries_stay_within_the_budget(self) -> None:
        total = sum(self.retried.values())
        assert total == self.budget.withdrawals
        assert total * MILLI <= self.config.deposit_milli * len(self.attempts) + self.config.reserve_milli


TestRetriesUnderBudget = RetriesUnderBudget.TestCase
TestRetriesUnderBudget.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
