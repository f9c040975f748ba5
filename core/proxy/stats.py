"""Per-service counters and latency histograms, kept in core as plain data.

Rendering them (a table in ``tether demo``, Prometheus text in the admin server of the data-plane issue)
is a driver's job. Latency is time to the response head, as Linkerd's ``response_latency_ms``; a request
the proxy fails counts at the moment it failed. Buckets are Linkerd's, in milliseconds.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

LATENCY_BUCKETS_MS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
    1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000,
)  # fmt: skip


@dataclass(slots=True)
class LatencyHistogram:
    """Counts per Linkerd bucket (last slot: above the largest bound), plus count and sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    count: int = 0
    sum_ms: float = 0.0

    def record(self, latency_ms: float) -> None:
        assert latency_ms >= 0, latency_ms
        self.count += 1
        self.sum_ms += latency_ms
        # The first bucket whose bound is >= the latency; past the largest bound, the last slot.
        self.counts[bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1

    def quantile_ms(self, q: float) -> float | None:
        """The q-quantile, linearly interpolated inside its bucket as Prometheus's histogram_quantile."""
        assert 0.0 <= q <= 1.0, q
        if self.count == 0:
            return None
        rank = q * self.count
        seen = 0
        for index, in_bucket in enumerate(self.counts):
            if in_bucket and seen + in_bucket >= rank:
                lower = LATENCY_BUCKETS_MS[index - 1] if index > 0 else 0
                if index == len(LATENCY_BUCKETS_MS):
                    return float(LATENCY_BUCKETS_MS[-1])
                upper = LATENCY_BUCKETS_MS[index]
                return lower + (upper - lower) * (rank - seen) / in_bucket
            seen += in_bucket
        return float(LATENCY_BUCKETS_MS[-1])

    def minus(self, earlier: LatencyHistogram) -> LatencyHistogram:
        """What was recorded since ``earlier`` (a copy taken from this histogram)."""
        return LatencyHistogram(
            counts=[a - b for a, b in zip(self.counts, earlier.counts, strict=True)],
            count=self.count - earlier.count,
            sum_ms=self.sum_ms - earlier.sum_ms,
        )

    def copy(self) -> LatencyHistogram:
        return LatencyHistogram(counts=list(self.counts), count=self.count, sum_ms=self.sum_ms)


@dataclass(slots=True)
class ServiceStats:
    """What one proxy saw for one destination service."""

    requests: int = 0
    responses_by_status: dict[int, int] = field(default_factory=dict)
    proxy_errors_by_kind: dict[str, int] = field(default_factory=dict)
    # Requests that ended without a response: the client left, or the endpoint died mid-response.
    aborted: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    @property
    def responses(self) -> int:
        return sum(self.responses_by_status.values())

    @property
    def successes(self) -> int:
        # Linkerd classifies a response as a failure when its status is 5xx.
        return sum(n for status, n in self.responses_by_status.items() if status < 500)

    def copy(self) -> ServiceStats:
        return ServiceStats(
            requests=self.requests,
            responses_by_status=dict(self.responses_by_status),
            proxy_errors_by_kind=dict(self.proxy_errors_by_kind),
            aborted=self.aborted,
            latency=self.latency.copy(),
        )


@dataclass(slots=True)
class ProxyStats:
    """Counters of one proxy, per service name (connection counts are in telemetry.py)."""

    services: dict[str, ServiceStats] = field(default_factory=dict)

    def service(self, name: str) -> ServiceStats:
        found = self.services.get(name)
        if found is None:
            found = self.services[name] = ServiceStats()
        return found
