"""How a virtual server behaves over time: latency distributions, failure rates, and windows that change them.

A server draws each response's latency from a ``Latency`` model and fails a share of its requests with a
status code. ``Window``s override either for a stretch of virtual time (an endpoint held at 2 s from
t = 15 s to t = 45 s; an endpoint answering 503 from 10 s to 30 s, then healed): the first window that
covers the moment a request arrives decides, the server's own settings otherwise.

Draw order matters for replay: a response draws its latency first (nothing for ``fixed``, one
``expovariate`` for an exponential tail, one ``lognormvariate`` for log-normal), then one ``random()`` for
failure, always from the server's own RNG. The exponential model draws exactly as the simulator always
did, so scenarios written before the other models keep their trace hashes.

``Tally`` counts what each server saw, by virtual second, for the experiment tables and plots: requests
received and requests failed on purpose.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

MS = 1_000_000
S = 1_000_000_000
# A log-normal draw is capped, so one absurd sample (sigma is the caller's) cannot park a request for days
# of virtual time; ten minutes is far past any timeout a scenario uses.
LATENCY_CAP_NS = 600 * S


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    """One latency distribution. ``kind`` is ``exponential`` (``min_ns`` + Exp(``tail_mean_ns``)),
    ``lognormal`` (median ``median_ns``, shape ``sigma``; plus ``min_ns``) or ``fixed`` (``min_ns``)."""

    kind: str = "exponential"
    min_ns: int = 1 * MS
    tail_mean_ns: int = 2 * MS
    median_ns: int = 0
    sigma: float = 0.0

    def __post_init__(self) -> None:
        assert self.kind in ("exponential", "lognormal", "fixed"), self.kind
        assert self.min_ns >= 0 and self.tail_mean_ns >= 0 and self.median_ns >= 0 and self.sigma >= 0
        assert self.kind != "lognormal" or self.median_ns > 0, "a log-normal latency needs a median"

    def draw(self, rng: random.Random) -> int:
        if self.kind == "exponential":
            if not self.tail_mean_ns:
                return self.min_ns
            return self.min_ns + int(rng.expovariate(1.0 / self.tail_mean_ns))
        if self.kind == "lognormal":
            sample = rng.lognormvariate(math.log(self.median_ns), self.sigma)
            return self.min_ns + min(int(sample), LATENCY_CAP_NS)
        return self.min_ns

    def describe(self) -> str:
        if self.kind == "exponential":
            return f"{self.min_ns / MS:g} ms + Exp({self.tail_mean_ns / MS:g} ms)"
        if self.kind == "lognormal":
            extra = f"{self.min_ns / MS:g} ms + " if self.min_ns else ""
            return f"{extra}LogNormal(median {self.median_ns / MS:g} ms, sigma {self.sigma:g})"
        return f"{self.min_ns / MS:g} ms"


@dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    """From ``from_ns`` (inclusive) to ``until_ns`` (exclusive): another latency, failure rate or status."""

    from_ns: int
    until_ns: int
    latency: Latency | None = None
    failure_rate: float | None = None
    failure_status: int | None = None

    def __post_init__(self) -> None:
        assert 0 <= self.from_ns < self.until_ns, (self.from_ns, self.until_ns)
        assert self.failure_rate is None or 0.0 <= self.failure_rate <= 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Behaviour:
    """A server's own latency and failures, and the windows that override them."""

    latency: Latency = field(default_factory=Latency)
    failure_rate: float = 0.0
    failure_status: int = 500
    windows: tuple[Window, ...] = ()

    def __post_init__(self) -> None:
        assert 0.0 <= self.failure_rate <= 1.0
        assert 500 <= self.failure_status <= 599, "a failure is a 5xx"

    def at(self, now_ns: int) -> tuple[Latency, float, int]:
        """(latency model, failure rate, failure status) for a request arriving at ``now_ns``."""
        for window in self.windows:
            if window.from_ns <= now_ns < window.until_ns:
                return (
                    window.latency or self.latency,
                    self.failure_rate if window.failure_rate is None else window.failure_rate,
                    window.failure_status or self.failure_status,
                )
        return self.latency, self.failure_rate, self.failure_status

    def draw(self, rng: random.Random, now_ns: int) -> tuple[int, int | None]:
        """(delay, failure status or None) of one response; see the module docstring for the draw order."""
        latency, failure_rate, failure_status = self.at(now_ns) if self.windows else self._own
        delay = latency.draw(rng)
        return delay, failure_status if rng.random() < failure_rate else None

    @property
    def _own(self) -> tuple[Latency, float, int]:
        return self.latency, self.failure_rate, self.failure_status


@dataclass(slots=True)
class Tally:
    """What one server host saw, kept across its restarts: requests and deliberate failures per second."""

    requests: int = 0
    failures: int = 0
    by_second: dict[int, list[int]] = field(default_factory=dict)  # second -> [requests, failures]

    def record(self, now_ns: int, failed: bool) -> None:
        self.requests += 1
        row = self.by_second.get(now_ns // S)
        if row is None:
            row = self.by_second[now_ns // S] = [0, 0]
        row[0] += 1
        if failed:
            self.failures += 1
            row[1] += 1
