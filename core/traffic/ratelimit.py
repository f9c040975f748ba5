"""Local rate limits per server: a token bucket for all requests, and one per client identity.

Theory of operation
-------------------
A server (an inbound port) may carry a ``LocalRateLimitConfig``, shaped like Linkerd's
``HTTPLocalRateLimitPolicy``: a ``total`` limit over every request, an ``identity`` limit applied to each
client identity separately (fairness: one noisy client cannot use the whole total), and ``overrides``
giving named identities their own limit. Each limit is a ``TokenBucket`` of ``burst`` tokens refilled at
``requests_per_s``; a request takes one token from every bucket that applies, and only if each of them
holds one, so a request refused by one bucket takes nothing from the others. A refused request is
answered 429, or RESOURCE_EXHAUSTED for gRPC (``rate_limited_answer``), and counted.

Clients without an identity (not meshed, or no mTLS yet) all share one bucket under the identity ``None``.

Buckets hold integer nano-tokens (a token is 10^9 of them), so refilling ``requests_per_s`` per second is
exactly ``requests_per_s`` nano-tokens per nanosecond, with no rounding and no float drift. A new bucket
starts full. Time that goes backwards refills nothing.

The identity table is bounded: at most ``max_identities`` buckets (default 10,000: about 3 MB with
Linkerd-length identity names, measured with tracemalloc), the least recently seen forgotten first. A
forgotten client comes back to a full bucket; that is what its bucket would hold anyway once it has been
idle for ``burst / requests_per_s`` seconds, which LRU order makes the likely case. The total bucket still
bounds everyone together.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tether.core.traffic.timeouts import GrpcCode, ProxyAnswer

S = 1_000_000_000
NANO_TOKENS = S  # nano-tokens per token
MAX_IDENTITIES = 10_000
MAX_REQUESTS_PER_S = 10_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    """``requests_per_s`` sustained, with bursts of up to ``burst`` requests (default: one second's worth)."""

    requests_per_s: int
    burst: int | None = None

    def __post_init__(self) -> None:
        assert 1 <= self.requests_per_s <= MAX_REQUESTS_PER_S, self.requests_per_s
        assert self.burst is None or 1 <= self.burst <= MAX_REQUESTS_PER_S, self.burst

    @property
    def capacity(self) -> int:
        return self.burst if self.burst is not None else self.requests_per_s


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalRateLimitConfig:
    """One server's limits; any may be None (no such limit)."""

    total: RateLimit | None = None
    identity: RateLimit | None = None
    overrides: tuple[tuple[tuple[str, ...], RateLimit], ...] = ()  # (client identities, their limit)
    max_identities: int = MAX_IDENTITIES

    def __post_init__(self) -> None:
        assert self.max_identities >= 1, self.max_identities

    def limit_for(self, identity: str | None) -> RateLimit | None:
        for identities, limit in self.overrides:
            if identity is not None and identity in identities:
                return limit
        return self.identity


class TokenBucket:
    """``capacity`` tokens refilled at ``requests_per_s``; starts full at ``now_ns``."""

    __slots__ = ("limit", "_capacity_nano", "_tokens_nano", "_updated_ns")

    def __init__(self, limit: RateLimit, now_ns: int) -> None:
        self.limit = limit
        self._capacity_nano = limit.capacity * NANO_TOKENS
        self._tokens_nano = self._capacity_nano
        self._updated_ns = now_ns

    def tokens_nano(self, now_ns: int) -> int:
        """Nano-tokens held at ``now_ns`` (refilled up to then)."""
        self._refill(now_ns)
        return self._tokens_nano

    def has_token(self, now_ns: int) -> bool:
        return self.tokens_nano(now_ns) >= NANO_TOKENS

    def take(self, now_ns: int) -> None:
        """Take one token; the caller checked ``has_token`` at this ``now_ns``."""
        self._refill(now_ns)
        assert self._tokens_nano >= NANO_TOKENS, "take() without a token"
        self._tokens_nano -= NANO_TOKENS

    def try_take(self, now_ns: int) -> bool:
        if not self.has_token(now_ns):
            return False
        self.take(now_ns)
        return True

    def _refill(self, now_ns: int) -> None:
        if now_ns <= self._updated_ns:
            return
        refill = (now_ns - self._updated_ns) * self.limit.requests_per_s
        self._tokens_nano = min(self._capacity_nano, self._tokens_nano + refill)
        self._updated_ns = now_ns
        assert 0 <= self._tokens_nano <= self._capacity_nano


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    """``allowed``, or refused by the ``total`` or the ``identity`` bucket (``limited_by``)."""

    allowed: bool
    limited_by: str | None = None  # "total" or "identity"


ALLOWED = RateLimitDecision(True)


def rate_limited_answer(decision: RateLimitDecision) -> ProxyAnswer:
    """429 with ``l5d-proxy-error`` for HTTP, RESOURCE_EXHAUSTED for gRPC."""
    assert not decision.allowed, decision
    return ProxyAnswer(
        http_status=429,
        grpc_status=GrpcCode.RESOURCE_EXHAUSTED,
        label="rate_limited",
        reason=f"rate limited ({decision.limited_by} limit)",
    )


class LocalRateLimiter:
    """The buckets of one server; ``check(identity, now_ns)`` admits or refuses one request."""

    def __init__(self, config: LocalRateLimitConfig, now_ns: int) -> None:
        self.config = config
        self._total = TokenBucket(config.total, now_ns) if config.total is not None else None
        self._clients: OrderedDict[str | None, TokenBucket] = OrderedDict()
        self.allowed = 0
        self.limited = {"total": 0, "identity": 0}

    def check(self, identity: str | None, now_ns: int) -> RateLimitDecision:
        client = self._client_bucket(identity, now_ns)
        if client is not None and not client.has_token(now_ns):
            return self._refuse("identity")
        if self._total is not None and not self._total.has_token(now_ns):
            return self._refuse("total")
        if client is not None:
            client.take(now_ns)
        if self._total is not None:
            self._total.take(now_ns)
        self.allowed += 1
        return ALLOWED

    @property
    def identities_tracked(self) -> int:
        return len(self._clients)

    def _client_bucket(self, identity: str | None, now_ns: int) -> TokenBucket | None:
        limit = self.config.limit_for(identity)
        if limit is None:
            return None
        bucket = self._clients.get(identity)
        if bucket is None or bucket.limit != limit:
            bucket = self._clients[identity] = TokenBucket(limit, now_ns)
        self._clients.move_to_end(identity)
        while len(self._clients) > self.config.max_identities:
            self._clients.popitem(last=False)
        return bucket

    def _refuse(self, scope: str) -> RateLimitDecision:
        self.limited[scope] += 1
        return RateLimitDecision(False, scope)
