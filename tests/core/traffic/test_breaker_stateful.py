"""Stateful test of ``CircuitBreaker`` against a naive model: a per-endpoint state table.

Hypothesis draws a configuration (consecutive failures on or off, the success-rate detector on or off with
its window, threshold, volume and ejection limits, jitter on or off), then adds and removes endpoints,
dispatches requests to any of them (EJECTED ones too, as a caller choosing by itself would), reports outcomes
of any outstanding request in any order, and moves time and timers.

The model is a dict ``endpoint -> row``; a row holds the state, the consecutive failure count, the ejections
in a row, the backoff end, whether a probe is in flight, and every verdict the endpoint got while CLOSED as a
plain list of (time, succeeded), filtered to the window when the rate is asked for. The backoff's jitter is
the only thing the model does not predict: it checks the drawn backoff lies in ``[base, base x (1 +
jitter))`` and adopts it.

Invariants: every row (state, probe in flight, admits, backoff end) equals the breaker's; the next deadline
is the earliest backoff end; the counters equal the model's; the transitions reported are exactly the
model's, in order; ``version`` changes whenever some endpoint's ``admits`` changed (the balancer caches on it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tether.core.address import Address
from tether.core.traffic.breaker import (
    BreakerConfig,
    BreakerState,
    BreakerStats,
    CircuitBreaker,
    Outcome,
    SuccessRateConfig,
)

MS = 1_000_000
S = 1_000_000_000
ADDRESSES = [Address(f"10.1.0.{index}", 9090) for index in range(1, 5)]
CLOSED, EJECTED, PROBING = BreakerState.CLOSED, BreakerState.EJECTED, BreakerState.PROBING

SUCCESS_RATES = st.none() | st.builds(
    SuccessRateConfig,
    success_rate_min=st.sampled_from([0.5, 0.8, 1.0]),
    requests_min=st.sampled_from([1, 3, 5]),
    bucket_ns=st.sampled_from([S, 300 * MS]),
    buckets=st.sampled_from([1, 3, 10]),
    max_ejected_percent=st.sampled_from([0, 34, 50, 100]),
    ready_endpoints_min=st.sampled_from([0, 1, 2]),
)
CONFIGS = st.builds(
    BreakerConfig,
    consecutive_failures_max=st.sampled_from([0, 1, 3, 7]),
    backoff_min_ns=st.just(S),
    backoff_max_ns=st.sampled_from([S, 8 * S]),
    jitter_ratio=st.sampled_from([0.0, 0.5]),
    success_rate=SUCCESS_RATES,
)
OUTCOMES = st.sampled_from([Outcome.SUCCESS, Outcome.FAILURE, Outcome.FAILURE, Outcome.CANCELLED])
STEPS = st.sampled_from([0, 1, 100 * MS, 299 * MS, S, 3 * S, 9 * S]) | st.integers(0, 5 * S)


@dataclass
class Row:
    state: BreakerState = CLOSED
    consecutive: int = 0
    ejections_in_row: int = 0
    until_ns: int | None = None
    armed: int = 0  # the order its backoff was armed in, for timers due at the same instant
    probe_in_flight: bool = False
    verdicts: list[tuple[int, bool]] = field(default_factory=list)


class _Just:
    """Stands in for ``st.DataObject`` when a rule calls another with a value already drawn."""

    def __init__(self, value: object) -> None:
        self.value = value

    def draw(self, _strategy: object) -> object:
        return self.value


class BreakerMachine(RuleBasedStateMachine):
    @initialize(config=CONFIGS, seed=st.integers(0, 2**32))
    def start(self, config: BreakerConfig, seed: int) -> None:
        self.config = config
        self.breaker = CircuitBreaker(config, random.Random(seed))
        self.rows: dict[Address, Row] = {}
        self.outstanding: list[tuple[Address, bool]] = []  # (endpoint, probe) of dispatched requests
        self.now_ns = 0
        self.armed = 0
        self.stats = dict.fromkeys(BreakerStats.__dataclass_fields__, 0)
        self.expected_transitions: list[tuple[Address, BreakerState, BreakerState]] = []
        self.last_admits: dict[Address, bool] = {}
        self.last_version = self.breaker.version

    # ------------------------------------------------------------------ rules

    @precondition(lambda self: len(self.rows) < len(ADDRESSES))
    @rule(data=st.data())
    def add(self, data: st.DataObject) -> None:
        address = data.draw(st.sampled_from([a for a in ADDRESSES if a not in self.rows]))
        self.breaker.add(address)
        self.rows[address] = Row()

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        address = data.draw(st.sampled_from(list(self.rows)))
        self.breaker.remove(address)
        del self.rows[address]
        self.outstanding = [(endpoint, probe) for endpoint, probe in self.outstanding if endpoint != address]

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def dispatch(self, data: st.DataObject) -> None:
        address = data.draw(st.sampled_from(list(self.rows)))
        row = self.rows[address]
        expect_probe = row.state is PROBING and not row.probe_in_flight
        assert self.breaker.dispatched(address) == expect_probe
        if expect_probe:
            row.probe_in_flight = True
            self.stats["probes"] += 1
        self.outstanding.append((address, expect_probe))

    @precondition(lambda self: self.outstanding)
    @rule(index=st.integers(0, 1000), outcome=OUTCOMES)
    def record(self, index: int, outcome: Outcome) -> None:
        address, probe = self.outstanding.pop(index % len(self.outstanding))
        self.breaker.record(address, outcome, self.now_ns, probe=probe)
        row = self.rows[address]
        if probe:
            row.probe_in_flight = False
            if outcome is Outcome.SUCCESS:
                row.consecutive, row.ejections_in_row, row.verdicts = 0, 0, []
                self.stats["readmissions"] += 1
                self._move(address, row, CLOSED)
            elif outcome is Outcome.FAILURE:
                self._eject(address, row, "ejections_probe_failed")
        elif row.state is CLOSED and outcome is not Outcome.CANCELLED:
            self._closed_verdict(address, row, outcome is Outcome.SUCCESS)

    @precondition(lambda self: self.rows)
    @rule(data=st.data(), outcome=OUTCOMES)
    def request(self, data: st.DataObject, outcome: Outcome) -> None:
        """The common case, a request answered before the next one is sent: dispatch and record at once."""
        self.dispatch(data)
        self.outstanding.insert(0, self.outstanding.pop())
        self.record(0, outcome)

    @precondition(lambda self: self.rows)
    @rule(data=st.data(), burst=st.lists(st.tuples(OUTCOMES, st.sampled_from([0, 0, 100 * MS, 299 * MS])), max_size=8))
    def request_burst(self, data: st.DataObject, burst: list[tuple[Outcome, int]]) -> None:
        """Several answered requests to one endpoint, a little time apart: runs of failures and successes."""
        address = data.draw(st.sampled_from(list(self.rows)))
        for outcome, step_ns in burst:
            self.now_ns += step_ns
            self.request(_Just(address), outcome)

    @rule(step_ns=STEPS)
    def advance_time(self, step_ns: int) -> None:
        self.now_ns += step_ns

    @rule(step_ns=STEPS)
    def advance_time_and_run_timers(self, step_ns: int) -> None:
        self.now_ns += step_ns
        self.on_timer()

    @rule()
    def on_timer(self) -> None:
        self.breaker.on_timer(self.now_ns)
        due = [(row.until_ns, row.armed, a) for a, row in self.rows.items() if row.state is EJECTED]
        for until_ns, _armed, address in sorted(due, key=lambda item: (item[0], item[1])):
            if until_ns is not None and until_ns <= self.now_ns:
                self._move(address, self.rows[address], PROBING)

    # ------------------------------------------------------------------ the model's transitions

    def _closed_verdict(self, address: Address, row: Row, succeeded: bool) -> None:
        row.consecutive = 0 if succeeded else row.consecutive + 1
        row.verdicts.append((self.now_ns, succeeded))
        if succeeded:
            return
        if self.config.consecutive_failures_max and row.consecutive >= self.config.consecutive_failures_max:
            self._eject(address, row, "ejections_consecutive_failures")
            return
        rate = self.config.success_rate
        if rate is None:
            return
        current_bucket = self.now_ns // rate.bucket_ns
        window = [ok for at_ns, ok in row.verdicts if at_ns // rate.bucket_ns > current_bucket - rate.buckets]
        if len(window) < rate.requests_min or sum(window) / len(window) >= rate.success_rate_min:
            return
        total = len(self.rows)
        ejected = sum(1 for other in self.rows.values() if other.state is not CLOSED)
        cap = max(1, total * rate.max_ejected_percent // 100)
        if ejected + 1 <= cap and total - ejected - 1 >= rate.ready_endpoints_min:
            self._eject(address, row, "ejections_success_rate")
        else:
            self.stats["ejections_suppressed"] += 1

    def _eject(self, address: Address, row: Row, counter: str) -> None:
        base_ns = min(self.config.backoff_max_ns, self.config.backoff_min_ns * 2**row.ejections_in_row)
        until_ns = self.breaker.ejected_until_ns(address)
        assert until_ns is not None
        backoff_ns = until_ns - self.now_ns
        assert base_ns <= backoff_ns <= base_ns * (1 + self.config.jitter_ratio), (base_ns, backoff_ns)
        row.until_ns, row.armed = until_ns, self.armed
        self.armed += 1
        row.ejections_in_row += 1
        row.consecutive, row.verdicts = 0, []
        self.stats[counter] += 1
        self._move(address, row, EJECTED)

    def _move(self, address: Address, row: Row, after: BreakerState) -> None:
        self.expected_transitions.append((address, row.state, after))
        row.state = after

    # ------------------------------------------------------------------ invariants

    @invariant()
    def rows_match(self) -> None:
        for address, row in self.rows.items():
            assert self.breaker.state(address) is row.state, address
            assert self.breaker.probe_in_flight(address) == row.probe_in_flight, address
            expected_until = row.until_ns if row.state is EJECTED else None
            assert self.breaker.ejected_until_ns(address) == expected_until, address
        for address in ADDRESSES:
            assert (address in self.breaker) == (address in self.rows)

    @invariant()
    def deadline_and_counters_match(self) -> None:
        ends = [row.until_ns for row in self.rows.values() if row.state is EJECTED and row.until_ns is not None]
        assert self.breaker.next_deadline_ns() == (min(ends) if ends else None)
        assert self.breaker.stats == BreakerStats(**self.stats)

    @invariant()
    def transitions_match(self) -> None:
        taken = [(t.endpoint, t.before, t.after) for t in self.breaker.take_transitions()]
        assert taken == self.expected_transitions
        self.expected_transitions = []

    @invariant()
    def version_changes_whenever_admits_does(self) -> None:
        admits = {address: self.breaker.admits(address) for address in self.rows}
        for address, admitted in admits.items():
            row = self.rows[address]
            assert admitted == (row.state is CLOSED or (row.state is PROBING and not row.probe_in_flight))
        if admits != self.last_admits:
            assert self.breaker.version != self.last_version
        self.last_admits, self.last_version = admits, self.breaker.version


BreakerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
TestBreakerAgainstModel = BreakerMachine.TestCase
