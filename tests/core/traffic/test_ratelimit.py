"""Token buckets and the per-server limiter against naive models that replay every request exactly."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tether.core.traffic.ratelimit import (
    LocalRateLimitConfig,
    LocalRateLimiter,
    RateLimit,
    RateLimitDecision,
    TokenBucket,
    rate_limited_answer,
)
from tether.core.traffic.timeouts import GrpcCode

S = 1_000_000_000
MS = 1_000_000


class NaiveBucket:
    """Keeps every admitted request; the tokens at any time are replayed from the start in exact fractions."""

    def __init__(self, limit: RateLimit, start_ns: int) -> None:
        self.limit = limit
        self.start_ns = start_ns
        self.taken: list[int] = []  # effective times of the admitted requests
        self.latest_ns = start_ns

    def tokens(self, now_ns: int) -> Fraction:
        self.latest_ns = max(self.latest_ns, now_ns)  # a late report refills nothing
        capacity, rate = Fraction(self.limit.capacity), self.limit.requests_per_s
        tokens, last = capacity, self.start_ns
        for time in self.taken:  # each admitted request took one token at its time
            tokens = min(capacity, tokens + Fraction((time - last) * rate, S)) - 1
            last = time
        return min(capacity, tokens + Fraction((self.latest_ns - last) * rate, S))

    def take(self, now_ns: int) -> None:
        assert self.tokens(now_ns) >= 1
        self.taken.append(self.latest_ns)


def window_bound_holds(limit: RateLimit, admitted: list[int]) -> bool:
    """A token bucket never admits more than capacity + rate x (b - a) requests in any [a, b]."""
    for i, first in enumerate(admitted):
        for j in range(i, len(admitted)):
            count = j - i + 1
            if count > limit.capacity + Fraction((admitted[j] - first) * limit.requests_per_s, S):
                return False
    return True


limits = st.builds(RateLimit, requests_per_s=st.integers(1, 50), burst=st.one_of(st.none(), st.integers(1, 8)))


class BucketMachine(RuleBasedStateMachine):
    @initialize(limit=limits, start_ns=st.integers(0, 10**12))
    def start(self, limit: RateLimit, start_ns: int) -> None:
        self.bucket = TokenBucket(limit, start_ns)
        self.model = NaiveBucket(limit, start_ns)
        self.now_ns = start_ns

    @rule(delta_ns=st.one_of(st.integers(0, 50 * MS), st.integers(0, 3 * S)))
    def advance_time(self, delta_ns: int) -> None:
        self.now_ns += delta_ns

    @rule(count=st.integers(1, 6), behind_ns=st.sampled_from([0, 0, 0, 1, 5 * MS]))
    def requests(self, count: int, behind_ns: int) -> None:
        for _ in range(count):
            now_ns = self.now_ns - behind_ns  # a late report refills nothing
            expected = self.model.tokens(now_ns) >= 1
            assert self.bucket.try_take(now_ns) == expected
            if expected:
                self.model.take(now_ns)

    @invariant()
    def tokens_match_the_model_exactly(self) -> None:
        assert Fraction(self.bucket.tokens_nano(self.now_ns), S) == self.model.tokens(self.now_ns)

    def teardown(self) -> None:
        # Checked once per run rather than per step: it looks at every pair of admitted requests.
        assert window_bound_holds(self.model.limit, self.model.taken)


TestBucketMachine = BucketMachine.TestCase
TestBucketMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


IDENTITIES = (None, "a", "b", "c", "d")


class NaiveLimiter:
    """A dict of naive buckets plus an explicit recency list for the bounded identity table."""

    def __init__(self, config: LocalRateLimitConfig, start_ns: int) -> None:
        self.config = config
        self.total = NaiveBucket(config.total, start_ns) if config.total else None
        self.clients: dict[str | None, NaiveBucket] = {}
        self.recency: list[str | None] = []

    def check(self, identity: str | None, now_ns: int) -> RateLimitDecision:
        limit = self.config.limit_for(identity)
        client = None
        if limit is not None:
            client = self.clients.get(identity)
            if client is None or client.limit != limit:
                client = self.clients[identity] = NaiveBucket(limit, now_ns)
            if identity in self.recency:
                self.recency.remove(identity)
            self.recency.append(identity)
            while len(self.recency) > self.config.max_identities:
                del self.clients[self.recency.pop(0)]
        if client is not None and client.tokens(now_ns) < 1:
            return RateLimitDecision(False, "identity")
        if self.total is not None and self.total.tokens(now_ns) < 1:
            return RateLimitDecision(False, "total")
        for bucket in (client, self.total):
            if bucket is not None:
                bucket.take(now_ns)
        return RateLimitDecision(True)


configs = st.builds(
    LocalRateLimitConfig,
    total=st.one_of(st.none(), limits),
    identity=st.one_of(st.none(), limits),
    overrides=st.one_of(st.just(()), limits.map(lambda limit: ((("a", "b"), limit),))),
    max_identities=st.integers(1, 4),
)


class LimiterMachine(RuleBasedStateMachine):
    @initialize(config=configs)
    def start(self, config: LocalRateLimitConfig) -> None:
        self.limiter = LocalRateLimiter(config, 0)
        self.model = NaiveLimiter(config, 0)
        self.now_ns = 0
        self.refused = {"total": 0, "identity": 0}

    @rule(delta_ns=st.integers(0, 500 * MS))
    def advance_time(self, delta_ns: int) -> None:
        self.now_ns += delta_ns

    @rule(identity=st.sampled_from(IDENTITIES), count=st.integers(1, 5))
    def requests(self, identity: str | None, count: int) -> None:
        for _ in range(count):
            decision = self.limiter.check(identity, self.now_ns)
            assert decision == self.model.check(identity, self.now_ns)
            if not decision.allowed:
                self.refused[decision.limited_by] += 1

    @invariant()
    def identity_table_is_bounded(self) -> None:
        assert self.limiter.identities_tracked <= self.model.config.max_identities
        assert self.limiter.identities_tracked == len(self.model.clients)

    @invariant()
    def refusals_are_counted(self) -> None:
        assert self.limiter.limited == self.refused


TestLimiterMachine = LimiterMachine.TestCase
TestLimiterMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(RateLimit(requests_per_s=10, burst=2), 0)
    assert bucket.try_take(0) and bucket.try_take(0)
    assert not bucket.try_take(0)
    assert not bucket.try_take(99 * MS)
    assert bucket.try_take(100 * MS)
    assert bucket.tokens_nano(10 * S) == 2 * S  # capped at the burst


@given(st.integers(1, 1000), st.integers(0, 10 * S))
@settings(max_examples=50, deadline=None)
def test_token_bucket_time_going_backwards_refills_nothing(rate: int, later_ns: int) -> None:
    bucket = TokenBucket(RateLimit(requests_per_s=rate, burst=1), 0)
    assert bucket.try_take(later_ns)
    before = bucket.tokens_nano(later_ns)
    assert bucket.tokens_nano(0) == before


def test_rate_limited_answer_is_429_or_resource_exhausted() -> None:
    limiter = LocalRateLimiter(LocalRateLimitConfig(total=RateLimit(requests_per_s=1)), 0)
    assert limiter.check("web", 0).allowed
    decision = limiter.check("web", 0)
    answer = rate_limited_answer(decision)
    assert (answer.http_status, answer.grpc_status, decision.limited_by) == (429, GrpcCode.RESOURCE_EXHAUSTED, "total")


def test_identity_limit_refuses_one_client_without_spending_the_total() -> None:
    config = LocalRateLimitConfig(total=RateLimit(requests_per_s=2), identity=RateLimit(requests_per_s=1))
    limiter = LocalRateLimiter(config, 0)
    assert limiter.check("noisy", 0).allowed
    assert limiter.check("noisy", 0) == RateLimitDecision(False, "identity")
    assert limiter.check("quiet", 0).allowed  # the refused request took nothing from the total
    assert limiter.check("other", 0) == RateLimitDecision(False, "total")
