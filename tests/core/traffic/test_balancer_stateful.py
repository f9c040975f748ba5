"""Stateful test of ``Balancer`` against a naive model.

Hypothesis drives one balancer (a strategy and a seed drawn at the start, circuit breaking on or off) with
endpoint updates (live adds, removals, weight changes), availability changes, acquisitions, finished requests
with any outcome, and time. The model keeps plain lists and recomputes everything from scratch at every
question:

- the endpoint table is a list in arrival order, each entry with its weight, pending count, availability,
  draining flag and the full list of RTT samples it has seen; its peak-EWMA estimate is refolded from that
  list every time, and every cost is recomputed from it;
- the breaker is a table of (state, consecutive failures, ejections in a row, backoff end, probe in flight)
  for consecutive failures only, with jitter 0 so the backoff is exact (the success-rate detector and the
  jitter are the breaker's own test's business);
- P2C draws come from the model's own ``random.Random`` with the same seed, so the model knows which two
  endpoints were drawn, and requires the cheaper one (either, when the costs are within 1e-9 of each other).
  Least-loaded must return one of the cheapest endpoints; round robin any ready endpoint (its exact split is
  an example test).

Invariants: per-endpoint pending counts, table order, states, counts, readiness and the next breaker
deadline all equal the model's; no pick ever goes to an endpoint that is removed, draining, pending (not
available) or ejected.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tether.core.address import Address
from tether.core.traffic.balancer import Balancer, BalancerConfig, EndpointState, Handle, Strategy
from tether.core.traffic.breaker import BreakerConfig, Outcome

MS = 1_000_000
S = 1_000_000_000
ADDRESSES = [Address(f"10.0.0.{index}", 8080) for index in range(1, 7)]
DEFAULT_RTT_NS = 30 * MS
DECAY_NS = 10 * S
BREAKER = BreakerConfig(consecutive_failures_max=2, backoff_min_ns=1 * S, backoff_max_ns=4 * S, jitter_ratio=0.0)
TIME_STEPS = st.one_of(st.sampled_from([0, 1, MS, 7 * MS, 50 * MS, 400 * MS, 1500 * MS, 5 * S]), st.integers(0, 3 * S))
OUTCOMES = st.sampled_from([Outcome.SUCCESS, Outcome.SUCCESS, Outcome.FAILURE, Outcome.CANCELLED])


@dataclass
class ModelEndpoint:
    weight: int
    added_ns: int
    pending: int = 0
    available: bool = True
    draining: bool = False
    samples: list[tuple[int, int, bool]] = field(default_factory=list)  # (finished at, rtt, cancelled)
    # the breaker's table (consecutive failures only)
    state: str = "closed"
    consecutive: int = 0
    ejections_in_row: int = 0
    ejected_until_ns: int = 0
    probe_in_flight: bool = False

    def rtt_ns(self, now_ns: int) -> float:
        """Peak EWMA refolded from every sample since the endpoint was added."""
        value, stamp = float(DEFAULT_RTT_NS), self.added_ns
        for finished_ns, rtt_ns, cancelled in self.samples:
            if cancelled and rtt_ns <= value:
                continue  # a cancelled request only ever raises the estimate
            if rtt_ns > value:
                value = float(rtt_ns)
            else:
                weight = math.exp(-(finished_ns - stamp) / DECAY_NS)
                value = value * weight + rtt_ns * (1.0 - weight)
            stamp = max(stamp, finished_ns)
        return value * math.exp(-max(0, now_ns - stamp) / DECAY_NS)


class BalancerModel:
    def __init__(self, seed: int, strategy: Strategy, breaker: bool) -> None:
        self.rng = random.Random(seed)
        self.rng.getrandbits(64)  # the balancer seeds its breaker's RNG first
        self.strategy = strategy
        self.breaker = breaker
        self.table: dict[Address, ModelEndpoint] = {}  # insertion order is table order

    def advance(self, now_ns: int) -> None:
        for entry in self.table.values():
            if entry.state == "ejected" and entry.ejected_until_ns <= now_ns:
                entry.state = "probing"

    def ready(self) -> list[Address]:
        return [a for a, e in self.table.items() if e.available and not e.draining and e.state == "closed"]

    def probes(self) -> list[Address]:
        return [
            a
            for a, e in self.table.items()
            if e.available and not e.draining and e.state == "probing" and not e.probe_in_flight
        ]

    def state_of(self, address: Address) -> EndpointState:
        entry = self.table[address]
        if entry.draining:
            return EndpointState.DRAINING
        if entry.state == "ejected":
            return EndpointState.EJECTED
        if not entry.available:
            return EndpointState.PENDING
        return EndpointState.PROBING if entry.state == "probing" else EndpointState.READY

    def cost(self, address: Address, now_ns: int) -> float:
        entry = self.table[address]
        load = (entry.pending + 1) / entry.weight
        if self.strategy is Strategy.P2C_EWMA:
            return max(entry.rtt_ns(now_ns), 1.0) * load
        return load

    def acceptable_picks(self, now_ns: int) -> set[Address]:
        """The endpoints the balancer may choose now (drawing P2C's two candidates from the model's RNG)."""
        probes, ready = self.probes(), self.ready()
        if probes:
            return {probes[0]}
        if not ready:
            return set()
        if self.strategy is Strategy.ROUND_ROBIN:
            return set(ready)
        if self.strategy is Strategy.LEAST_LOADED:
            lowest = min(self.cost(address, now_ns) for address in ready)
            return {address for address in ready if self.cost(address, now_ns) == lowest}
        if len(ready) == 1:
            return {ready[0]}
        first = self.rng.randrange(len(ready))
        second = self.rng.randrange(len(ready) - 1)
        second += second >= first
        a, b = ready[first], ready[second]
        cost_a, cost_b = self.cost(a, now_ns), self.cost(b, now_ns)
        if math.isclose(cost_a, cost_b, rel_tol=1e-9):
            return {a, b}
        return {a} if cost_a < cost_b else {b}

    def update(self, weights: dict[Address, int], now_ns: int) -> None:
        for address in list(self.table):
            entry = self.table[address]
            if address not in weights:
                if entry.pending:
                    entry.draining = True
                else:
                    del self.table[address]
        for address, weight in weights.items():
            if address in self.table:
                self.table[address].weight = weight
                self.table[address].draining = False
            else:
                self.table[address] = ModelEndpoint(weight=weight, added_ns=now_ns)

    def finish(self, handle: Handle, outcome: Outcome, now_ns: int) -> None:
        entry = self.table[handle.endpoint]
        entry.pending -= 1
        entry.samples.append((now_ns, now_ns - handle.started_ns, outcome is Outcome.CANCELLED))
        if self.breaker:
            self._breaker_record(entry, outcome, now_ns, handle.probe)
        if entry.draining and entry.pending == 0:
            del self.table[handle.endpoint]

    def _breaker_record(self, entry: ModelEndpoint, outcome: Outcome, now_ns: int, probe: bool) -> None:
        if probe:
            entry.probe_in_flight = False
            if outcome is Outcome.SUCCESS:
                entry.state, entry.consecutive, entry.ejections_in_row = "closed", 0, 0
            elif outcome is Outcome.FAILURE:
                self._eject(entry, now_ns)
        elif entry.state == "closed" and outcome is not Outcome.CANCELLED:
            entry.consecutive = 0 if outcome is Outcome.SUCCESS else entry.consecutive + 1
            if entry.consecutive >= BREAKER.consecutive_failures_max:
                self._eject(entry, now_ns)

    def _eject(self, entry: ModelEndpoint, now_ns: int) -> None:
        backoff_ns = min(BREAKER.backoff_max_ns, BREAKER.backoff_min_ns * 2**entry.ejections_in_row)
        entry.state, entry.ejected_until_ns, entry.consecutive = "ejected", now_ns + backoff_ns, 0
        entry.ejections_in_row += 1


class BalancerMachine(RuleBasedStateMachine):
    @initialize(
        seed=st.integers(0, 2**32),
        strategy=st.sampled_from(list(Strategy)),
        breaker=st.booleans(),
        weights=st.dictionaries(st.sampled_from(ADDRESSES), st.integers(1, 4), max_size=6),
    )
    def start(self, seed: int, strategy: Strategy, breaker: bool, weights: dict[Address, int]) -> None:
        config = BalancerConfig(strategy=strategy, breaker=BREAKER if breaker else None)
        self.balancer = Balancer("web", config, random.Random(seed))
        self.model = BalancerModel(seed, strategy, breaker)
        self.now_ns = 0
        self.open: list[Handle] = []
        self.balancer.update_endpoints(weights, self.now_ns)
        self.model.update(weights, self.now_ns)

    @rule(weights=st.dictionaries(st.sampled_from(ADDRESSES), st.integers(1, 4), max_size=6))
    def update_endpoints(self, weights: dict[Address, int]) -> None:
        self.model.advance(self.now_ns)
        self.balancer.update_endpoints(weights, self.now_ns)
        self.model.update(weights, self.now_ns)

    @rule(address=st.sampled_from(ADDRESSES), available=st.booleans())
    def set_available(self, address: Address, available: bool) -> None:
        self.model.advance(self.now_ns)
        self.balancer.set_available(address, available, self.now_ns)
        if address in self.model.table:
            self.model.table[address].available = available

    @rule()
    def acquire(self) -> None:
        self.model.advance(self.now_ns)
        acceptable = self.model.acceptable_picks(self.now_ns)
        expect_probe = bool(self.model.probes())
        handle = self.balancer.acquire(self.now_ns)
        if not acceptable:
            assert handle is None
            return
        assert handle is not None
        assert handle.endpoint in acceptable, (handle.endpoint, acceptable)
        assert handle.probe == expect_probe
        entry = self.model.table[handle.endpoint]
        entry.pending += 1
        entry.probe_in_flight = entry.probe_in_flight or handle.probe
        self.open.append(handle)

    @precondition(lambda self: self.open)
    @rule(index=st.integers(0, 10_000), outcome=OUTCOMES)
    def finish(self, index: int, outcome: Outcome) -> None:
        handle = self.open.pop(index % len(self.open))
        self.model.advance(self.now_ns)
        self.balancer.finished(handle, outcome, self.now_ns)
        self.model.finish(handle, outcome, self.now_ns)

    @rule(burst=st.lists(st.tuples(OUTCOMES, st.sampled_from([0, MS, 30 * MS, 700 * MS])), min_size=1, max_size=6))
    def answered_requests(self, burst: list[tuple[Outcome, int]]) -> None:
        """Requests answered one after another: each acquired, answered after its delay, then the next."""
        for outcome, delay_ns in burst:
            open_before = len(self.open)
            self.acquire()
            if len(self.open) > open_before:
                self.now_ns += delay_ns
                self.finish(len(self.open) - 1, outcome)

    @rule(step_ns=TIME_STEPS)
    def advance_time(self, step_ns: int) -> None:
        self.now_ns += step_ns

    @rule()
    def on_timer(self) -> None:
        self.balancer.on_timer(self.now_ns)
        self.model.advance(self.now_ns)

    @invariant()
    def table_and_pending_match(self) -> None:
        assert self.balancer.endpoints() == list(self.model.table)
        for address, entry in self.model.table.items():
            assert self.balancer.pending(address) == entry.pending, address
            assert self.balancer.weight(address) == entry.weight, address
        assert self.balancer.in_flight == len(self.open)
        for address in ADDRESSES:
            if address not in self.model.table:
                assert self.balancer.endpoint_state(address) is None
                assert self.balancer.pending(address) == 0

    @invariant()
    def states_and_readiness_match(self) -> None:
        self.balancer.on_timer(self.now_ns)
        self.model.advance(self.now_ns)
        states = {address: self.model.state_of(address) for address in self.model.table}
        assert {address: self.balancer.endpoint_state(address) for address in self.model.table} == states
        counts = self.balancer.counts()
        for state in EndpointState:
            assert getattr(counts, state.value) == list(states.values()).count(state), state
        expected_ready = bool(self.model.ready() or self.model.probes())
        assert self.balancer.has_ready_endpoint(self.now_ns) == expected_ready

    @invariant()
    def next_deadline_matches(self) -> None:
        ejected = [e.ejected_until_ns for e in self.model.table.values() if e.state == "ejected"]
        assert self.balancer.next_deadline_ns() == (min(ejected) if ejected else None)

    @invariant()
    def rtt_estimates_match(self) -> None:
        for address, entry in self.model.table.items():
            estimate = self.balancer.rtt_estimate_ns(address, self.now_ns)
            assert estimate is not None
            assert math.isclose(estimate, entry.rtt_ns(self.now_ns), rel_tol=1e-9, abs_tol=1e-6), address


BalancerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestBalancerAgainstModel = BalancerMachine.TestCase
