"""Circuit breaking: which endpoints of one backend are ejected, and when each is probed again.

Theory of operation
-------------------
One ``CircuitBreaker`` serves one backend (the endpoints of one service). It keeps one small state machine
per endpoint, written as the table ``TRANSITIONS``:

    CLOSED  --tripped-------------> EJECTED     (consecutive failures, or a low success rate)
    EJECTED --backoff elapsed-----> PROBING     (a timer: ``on_timer``)
    PROBING --probe succeeded-----> CLOSED      (counters and window start afresh)
    PROBING --probe failed--------> EJECTED     (the next backoff is twice as long, up to the maximum)

The balancer asks ``admits(endpoint)`` before choosing an endpoint: a CLOSED endpoint takes any number of
requests, a PROBING one exactly one (the probe), an EJECTED one none. It reports every request it sends
(``dispatched``, which says whether that request is the probe) and every outcome (``record``). Outcomes of
requests sent before an ejection, arriving while the endpoint is EJECTED or PROBING, are ignored: only the
probe decides whether the endpoint comes back.

Two detectors can trip a CLOSED endpoint; either, both or neither may be configured:

- **Consecutive failures** (Linkerd's failure accrual, the only one in its stable release): ``max`` failures
  in a row (default 7) with no success in between. Never limited: every endpoint of a backend may be
  ejected, and the backend then waits in the failfast queue for the first probe.
- **Success rate** (as in Envoy's outlier detection, failure-percentage flavour): successes over all
  verdicts in a sliding window of ``buckets`` buckets of ``bucket_ns`` (10 x 1 s), evaluated at each failure;
  below ``success_rate_min`` with at least ``requests_min`` verdicts the endpoint is ejected, unless that
  would leave fewer than ``ready_endpoints_min`` endpoints un-ejected or eject more than
  ``max_ejected_percent`` of them (at least one ejection is always allowed when the minimum permits).
  A refused ejection is counted (``ejections_suppressed``) and retried at the endpoint's next failure.

Backoff: the n-th ejection in a row (n = 0, 1, ... reset by a successful probe) lasts
``min(backoff_max, backoff_min * 2**n)`` plus a jitter drawn uniformly from ``[0, jitter_ratio x that)``, so
endpoints ejected together are not all probed at the same instant. Defaults 1 s, 60 s and 0.5: the longest
ejection is 90 s. The jitter comes from the injected ``random.Random`` and nothing else.

What a failure is (a 5xx, a gRPC error status, a connect error, a timeout) is the caller's call;
``Outcome.CANCELLED`` (the client went away, the request was never answered) counts for nothing.

Chains of services (client -> A -> B -> C, one breaker per caller's proxy): nothing here can tell a callee's
own failure from one it passes on, so a fault at C ejects C at B's proxy, then the healthy B at A's proxy
(B answers 5xx while its proxy fails fast), then the healthy A at the edge, and a probe of B sent while C
is still ejected fails and doubles B's backoff (Linkerd's failure accrual does the same). Two rules keep
such a chain live once C heals: a backoff always ends by the timer, and a PROBING endpoint stays PROBING,
admitting a request, for as long as no request comes (only a probe's own failure ejects it again). Each
tier therefore admits again within one backoff of the last failure it sees, and the whole chain within the
sum of its tiers' backoffs (at most ``backoff_max x (1 + jitter_ratio)`` each) plus a failfast timeout per
tier (tests/core/traffic/test_chain_recovery.py, sim/scenarios/chain-heal.yaml).
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass

from tether.core.address import Address
from tether.core.timers import Deadlines

NS_PER_S = 1_000_000_000
_BACKOFF_DOUBLINGS_MAX = 62  # 2**62 x 1 ns already exceeds any sane maximum; keeps the integers small


class BreakerUsageError(Exception):
    """The caller broke the breaker's contract (an unknown endpoint, a probe that was never dispatched)."""


class Outcome(enum.Enum):
    """The verdict on one finished request, as the proxy classified it."""

    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"  # no verdict: the client went away, or the proxy dropped the request

    def __repr__(self) -> str:
        return f"Outcome.{self.name}"


class BreakerState(enum.Enum):
    CLOSED = "closed"
    EJECTED = "ejected"
    PROBING = "probing"

    def __repr__(self) -> str:
        return f"BreakerState.{self.name}"


class _Event(enum.Enum):
    TRIPPED = "tripped"
    BACKOFF_ELAPSED = "backoff_elapsed"
    PROBE_SUCCEEDED = "probe_succeeded"
    PROBE_FAILED = "probe_failed"


# Every legal (state, event) pair; anything else is a bug in this module (tests run every pair).
TRANSITIONS: dict[tuple[BreakerState, _Event], BreakerState] = {
    (BreakerState.CLOSED, _Event.TRIPPED): BreakerState.EJECTED,
    (BreakerState.EJECTED, _Event.BACKOFF_ELAPSED): BreakerState.PROBING,
    (BreakerState.PROBING, _Event.PROBE_SUCCEEDED): BreakerState.CLOSED,
    (BreakerState.PROBING, _Event.PROBE_FAILED): BreakerState.EJECTED,
}


class EjectionReason(enum.Enum):
    CONSECUTIVE_FAILURES = "consecutive_failures"
    SUCCESS_RATE = "success_rate"
    PROBE_FAILED = "probe_failed"

    def __repr__(self) -> str:
        return f"EjectionReason.{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SuccessRateConfig:
    """The success-rate detector. The window is ``buckets`` x ``bucket_ns`` (10 x 1 s by default)."""

    success_rate_min: float = 0.5
    requests_min: int = 20
    bucket_ns: int = NS_PER_S
    buckets: int = 10
    max_ejected_percent: int = 50
    ready_endpoints_min: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.success_rate_min <= 1.0:
            raise ValueError(f"success_rate_min must be in (0, 1], not {self.success_rate_min}")
        if self.requests_min < 1 or self.bucket_ns < 1 or self.buckets < 1:
            raise ValueError("requests_min, bucket_ns and buckets must be at least 1")
        if not 0 <= self.max_ejected_percent <= 100 or self.ready_endpoints_min < 0:
            raise ValueError("max_ejected_percent must be in [0, 100] and ready_endpoints_min at least 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerConfig:
    """Both detectors and the backoff. ``consecutive_failures_max=0`` turns the consecutive detector off."""

    consecutive_failures_max: int = 7
    backoff_min_ns: int = NS_PER_S
    backoff_max_ns: int = 60 * NS_PER_S
    jitter_ratio: float = 0.5
    success_rate: SuccessRateConfig | None = None

    def __post_init__(self) -> None:
        if self.consecutive_failures_max < 0:
            raise ValueError("consecutive_failures_max must be at least 0 (0 turns it off)")
        if not 0 < self.backoff_min_ns <= self.backoff_max_ns:
            raise ValueError("backoff_min_ns must be positive and at most backoff_max_ns")
        if not 0.0 <= self.jitter_ratio <= 1.0:
            raise ValueError(f"jitter_ratio must be in [0, 1], not {self.jitter_ratio}")


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerTransition:
    """One endpoint changed state; the balancer collects these for the operator's log."""

    endpoint: Address
    before: BreakerState
    after: BreakerState
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerStats:
    """Counters since the breaker was made (the admin adapter renders them per backend)."""

    ejections_consecutive_failures: int = 0
    ejections_success_rate: int = 0
    ejections_probe_failed: int = 0
    ejections_suppressed: int = 0
    probes: int = 0
    readmissions: int = 0


class _EndpointBreaker:
    """The mutable per-endpoint record; only ``CircuitBreaker`` touches it."""

    __slots__ = ("consecutive_failures", "ejected_until_ns", "ejections_in_row", "probe_in_flight", "state", "window")

    def __init__(self) -> None:
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.ejections_in_row = 0
        self.ejected_until_ns: int | None = None
        self.probe_in_flight = False
        # [bucket index, successes, failures], oldest first; at most ``buckets`` entries
        self.window: deque[list[int]] = deque()


class CircuitBreaker:
    """The breakers of one backend's endpoints; see the module docstring."""

    def __init__(self, config: BreakerConfig, rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        self._entries: dict[Address, _EndpointBreaker] = {}
        self._deadlines = Deadlines()
        self._transitions: list[BreakerTransition] = []
        self._counts = {reason: 0 for reason in EjectionReason}
        self._suppressed = 0
        self._probes = 0
        self._readmissions = 0
        # Bumped whenever ``admits`` may have changed for some endpoint, so a caller can cache eligibility.
        self.version = 0
        # Whether a backoff timer is armed (some endpoint is EJECTED): a plain attribute, so the balancer's
        # hot path tests it without a call before asking ``next_deadline_ns``.
        self.has_deadlines = False

    # ------------------------------------------------------------------ membership

    def add(self, endpoint: Address) -> None:
        if endpoint in self._entries:
            raise BreakerUsageError(f"endpoint {endpoint} is already tracked")
        self._entries[endpoint] = _EndpointBreaker()
        self.version += 1

    def remove(self, endpoint: Address) -> None:
        self._require(endpoint)
        del self._entries[endpoint]
        self._deadlines.cancel(endpoint)
        self.has_deadlines = len(self._deadlines) > 0
        self.version += 1

    def __contains__(self, endpoint: object) -> bool:
        return endpoint in self._entries

    # ------------------------------------------------------------------ queries

    def state(self, endpoint: Address) -> BreakerState:
        return self._require(endpoint).state

    def admits(self, endpoint: Address) -> bool:
        """Whether a new request may go to ``endpoint`` now (CLOSED, or PROBING with the probe unsent)."""
        entry = self._require(endpoint)
        return entry.state is BreakerState.CLOSED or (entry.state is BreakerState.PROBING and not entry.probe_in_flight)

    def probe_in_flight(self, endpoint: Address) -> bool:
        return self._require(endpoint).probe_in_flight

    def ejected_until_ns(self, endpoint: Address) -> int | None:
        """When an EJECTED endpoint's backoff ends; None in the other states."""
        entry = self._require(endpoint)
        return entry.ejected_until_ns if entry.state is BreakerState.EJECTED else None

    def next_deadline_ns(self) -> int | None:
        """When the earliest ejected endpoint becomes PROBING; call ``on_timer`` once it has passed."""
        return self._deadlines.next_ns()

    @property
    def stats(self) -> BreakerStats:
        return BreakerStats(
            ejections_consecutive_failures=self._counts[EjectionReason.CONSECUTIVE_FAILURES],
            ejections_success_rate=self._counts[EjectionReason.SUCCESS_RATE],
            ejections_probe_failed=self._counts[EjectionReason.PROBE_FAILED],
            ejections_suppressed=self._suppressed,
            probes=self._probes,
            readmissions=self._readmissions,
        )

    def take_transitions(self) -> list[BreakerTransition]:
        """The state changes since the last call, oldest first."""
        taken, self._transitions = self._transitions, []
        return taken

    # ------------------------------------------------------------------ inputs

    def dispatched(self, endpoint: Address) -> bool:
        """A request was sent to ``endpoint``; returns whether it is that endpoint's probe.

        The caller passes the answer back to ``record`` as ``probe``. A request sent to an EJECTED endpoint
        (the caller chose it itself) is not a probe and its outcome will be ignored.
        """
        entry = self._require(endpoint)
        if entry.state is BreakerState.PROBING and not entry.probe_in_flight:
            entry.probe_in_flight = True
            self._probes += 1
            self.version += 1
            return True
        return False

    def record(self, endpoint: Address, outcome: Outcome, now_ns: int, *, probe: bool) -> None:
        """The verdict on a request sent to ``endpoint`` at a time ``dispatched`` answered ``probe``."""
        entry = self._entries.get(endpoint)
        if entry is None:
            raise BreakerUsageError(f"endpoint {endpoint} is not tracked by this breaker")
        if probe:
            self._record_probe(endpoint, entry, outcome, now_ns)
        elif entry.state is BreakerState.CLOSED and outcome is not Outcome.CANCELLED:
            if outcome is Outcome.SUCCESS and self.config.success_rate is None:
                entry.consecutive_failures = 0  # the common case, without a call (see _record_closed)
                return
            self._record_closed(endpoint, entry, outcome is Outcome.SUCCESS, now_ns)

    def on_timer(self, now_ns: int) -> None:
        """Move every endpoint whose backoff has elapsed by ``now_ns`` to PROBING."""
        for endpoint in self._deadlines.pop_expired(now_ns):
            assert isinstance(endpoint, Address)
            entry = self._entries[endpoint]
            self._move(endpoint, entry, _Event.BACKOFF_ELAPSED, "backoff elapsed: the next request probes it")
        self.has_deadlines = len(self._deadlines) > 0

    # ------------------------------------------------------------------ transitions

    def _record_probe(self, endpoint: Address, entry: _EndpointBreaker, outcome: Outcome, now_ns: int) -> None:
        if entry.state is not BreakerState.PROBING or not entry.probe_in_flight:
            raise BreakerUsageError(f"a probe outcome for {endpoint}, which has no probe in flight")
        entry.probe_in_flight = False
        self.version += 1
        if outcome is Outcome.SUCCESS:
            entry.consecutive_failures = 0
            entry.ejections_in_row = 0
            entry.window.clear()
            self._readmissions += 1
            self._move(endpoint, entry, _Event.PROBE_SUCCEEDED, "probe succeeded")
        elif outcome is Outcome.FAILURE:
            self._eject(endpoint, entry, _Event.PROBE_FAILED, EjectionReason.PROBE_FAILED, now_ns)
        # CANCELLED: no verdict; the endpoint stays PROBING and the next request probes it instead.

    def _record_closed(self, endpoint: Address, entry: _EndpointBreaker, succeeded: bool, now_ns: int) -> None:
        entry.consecutive_failures = 0 if succeeded else entry.consecutive_failures + 1
        success_rate = self.config.success_rate
        if success_rate is not None:
            _count_in_window(entry.window, success_rate, now_ns, succeeded)
        if succeeded:
            return
        consecutive_max = self.config.consecutive_failures_max
        if consecutive_max and entry.consecutive_failures >= consecutive_max:
            self._eject(endpoint, entry, _Event.TRIPPED, EjectionReason.CONSECUTIVE_FAILURES, now_ns)
        elif success_rate is not None and _rate_too_low(entry.window, success_rate):
            if self._success_rate_ejection_allowed(success_rate):
                self._eject(endpoint, entry, _Event.TRIPPED, EjectionReason.SUCCESS_RATE, now_ns)
            else:
                self._suppressed += 1

    def _success_rate_ejection_allowed(self, config: SuccessRateConfig) -> bool:
        total = len(self._entries)
        ejected = sum(1 for entry in self._entries.values() if entry.state is not BreakerState.CLOSED)
        cap = max(1, total * config.max_ejected_percent // 100)
        return ejected + 1 <= cap and total - ejected - 1 >= config.ready_endpoints_min

    def _eject(
        self, endpoint: Address, entry: _EndpointBreaker, event: _Event, reason: EjectionReason, now_ns: int
    ) -> None:
        backoff_ns = self._backoff_ns(entry.ejections_in_row)
        entry.ejections_in_row += 1
        entry.consecutive_failures = 0
        entry.window.clear()
        self._counts[reason] += 1
        entry.ejected_until_ns = now_ns + backoff_ns
        self._deadlines.set(endpoint, entry.ejected_until_ns)
        self.has_deadlines = True
        self._move(endpoint, entry, event, f"{reason.value}: ejected for {backoff_ns / NS_PER_S:.3f} s")

    def _backoff_ns(self, ejections_in_row: int) -> int:
        config = self.config
        doublings = min(ejections_in_row, _BACKOFF_DOUBLINGS_MAX)
        base_ns = min(config.backoff_max_ns, config.backoff_min_ns << doublings)
        jitter_ns = int(base_ns * config.jitter_ratio * self._rng.random())
        return base_ns + jitter_ns

    def _move(self, endpoint: Address, entry: _EndpointBreaker, event: _Event, reason: str) -> None:
        before = entry.state
        after = TRANSITIONS.get((before, event))
        assert after is not None, f"no transition from {before} on {event}"
        entry.state = after
        self.version += 1
        self._transitions.append(BreakerTransition(endpoint=endpoint, before=before, after=after, reason=reason))

    def _require(self, endpoint: Address) -> _EndpointBreaker:
        entry = self._entries.get(endpoint)
        if entry is None:
            raise BreakerUsageError(f"endpoint {endpoint} is not tracked by this breaker")
        return entry


def _count_in_window(window: deque[list[int]], config: SuccessRateConfig, now_ns: int, succeeded: bool) -> None:
    index = now_ns // config.bucket_ns
    while window and window[0][0] <= index - config.buckets:
        window.popleft()
    if not window or window[-1][0] != index:
        window.append([index, 0, 0])
    window[-1][1 if succeeded else 2] += 1
    assert len(window) <= config.buckets, window


def _rate_too_low(window: deque[list[int]], config: SuccessRateConfig) -> bool:
    # Only called right after _count_in_window, so every bucket left is inside the window.
    successes = sum(bucket[1] for bucket in window)
    verdicts = successes + sum(bucket[2] for bucket in window)
    # A division, not successes < rate x verdicts: 3 / 10 < 0.3 is False, as a reader expects; 3 < 0.3 x 10 is not.
    return verdicts >= config.requests_min and successes / verdicts < config.success_rate_min
