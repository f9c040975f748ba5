"""Example tests of the balancer and its peak-EWMA estimate: the behaviours the traffic issue names, each
in a seeded, deterministic setting (the stateful test in test_balancer_stateful.py covers the rest)."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.address import Address
from tether.core.traffic.balancer import (
    Balancer,
    BalancerConfig,
    BalancerUsageError,
    EndpointCounts,
    EndpointState,
    Strategy,
)
from tether.core.traffic.breaker import BreakerConfig, BreakerState, Outcome
from tether.core.traffic.ewma import PeakEwma

MS = 1_000_000
S = 1_000_000_000
A, B, C, D = (Address(f"10.0.0.{index}", 80) for index in range(1, 5))


def make(strategy: Strategy = Strategy.P2C_EWMA, seed: int = 7, **config: object) -> Balancer:
    return Balancer("web", BalancerConfig(strategy=strategy, **config), random.Random(seed))  # type: ignore[arg-type]


def open_loop(balancer: Balancer, rtt_ns: dict[Address, int], *, requests: int, gap_ns: int, seed: int) -> Counter:
    """Requests arrive with exponential gaps (mean ``gap_ns``); each takes its endpoint's fixed RTT."""
    arrivals = random.Random(seed)
    in_flight: list[tuple[int, int, object]] = []
    chosen: Counter = Counter()
    now_ns = 0
    for sequence in range(requests):
        now_ns += int(arrivals.expovariate(1 / gap_ns))
        while in_flight and in_flight[0][0] <= now_ns:
            finished_ns, _, handle = heapq.heappop(in_flight)
            balancer.finished(handle, Outcome.SUCCESS, finished_ns)  # type: ignore[arg-type]
        handle = balancer.acquire(now_ns)
        assert handle is not None
        chosen[handle.endpoint] += 1
        heapq.heappush(in_flight, (now_ns + rtt_ns[handle.endpoint], sequence, handle))
    return chosen


def closed_loop(balancer: Balancer, *, concurrency: int, rounds: int, rtt_ns: int) -> Counter:
    """``concurrency`` requests always in flight, each taking ``rtt_ns``; a finished one is replaced at once."""
    in_flight: list[tuple[int, int, object]] = []
    chosen: Counter = Counter()
    for sequence in range(concurrency):
        handle = balancer.acquire(0)
        assert handle is not None
        heapq.heappush(in_flight, (rtt_ns + sequence, sequence, handle))
    for sequence in range(concurrency, concurrency + rounds):
        now_ns, _, handle = heapq.heappop(in_flight)
        balancer.finished(handle, Outcome.SUCCESS, now_ns)  # type: ignore[arg-type]
        replacement = balancer.acquire(now_ns)
        assert replacement is not None
        chosen[replacement.endpoint] += 1
        heapq.heappush(in_flight, (now_ns + rtt_ns, sequence, replacement))
    return chosen


# ---------------------------------------------------------------------------------------------- peak EWMA


def test_PeakEwma_sample_above_the_estimate_replaces_it_at_once() -> None:
    ewma = PeakEwma(initial_ns=30 * MS, decay_ns=10 * S, now_ns=0)
    ewma.observe(500 * MS, 1 * MS)
    assert ewma.value_ns == 500 * MS
    assert ewma.read_ns(1 * MS) == 500 * MS


def test_PeakEwma_sample_below_moves_towards_it_by_one_minus_exp_of_elapsed_over_decay() -> None:
    ewma = PeakEwma(initial_ns=100 * MS, decay_ns=10 * S, now_ns=0)
    ewma.observe(10 * MS, 5 * S)
    weight = math.exp(-0.5)
    assert ewma.value_ns == pytest.approx(100 * MS * weight + 10 * MS * (1 - weight))


def test_PeakEwma_reads_decay_towards_zero_while_idle_and_reading_changes_nothing() -> None:
    ewma = PeakEwma(initial_ns=30 * MS, decay_ns=10 * S, now_ns=0)
    assert ewma.read_ns(10 * S) == pytest.approx(30 * MS / math.e)
    assert ewma.read_ns(0) == 30 * MS
    assert ewma.value_ns == 30 * MS


@settings(max_examples=60, deadline=None)
@given(
    samples=st.lists(st.tuples(st.integers(0, 5 * S), st.integers(0, 2 * S)), max_size=20),
    later_ns=st.integers(0, 60 * S),
)
def test_PeakEwma_estimate_stays_between_zero_and_the_highest_value_seen(samples, later_ns) -> None:
    ewma = PeakEwma(initial_ns=30 * MS, decay_ns=10 * S, now_ns=0)
    now_ns, highest = 0, 30 * MS
    for step_ns, rtt_ns in samples:
        now_ns += step_ns
        ewma.observe(rtt_ns, now_ns)
        highest = max(highest, rtt_ns)
        assert 0 <= ewma.value_ns <= highest
    assert 0 <= ewma.read_ns(now_ns + later_ns) <= ewma.read_ns(now_ns) <= highest


# ---------------------------------------------------------------------------------------------- choice


def test_p2c_never_picks_an_ejected_removed_or_pending_endpoint() -> None:
    breaker = BreakerConfig(consecutive_failures_max=3, backoff_min_ns=60 * S, backoff_max_ns=60 * S, jitter_ratio=0)
    balancer = make(breaker=breaker)
    endpoints = [Address(f"10.0.1.{index}", 80) for index in range(1, 9)]
    balancer.update_endpoints(dict.fromkeys(endpoints, 1), 0)
    ejected, removed, pending = endpoints[0], endpoints[1], endpoints[2]
    for _ in range(3):
        balancer.finished(balancer.started(ejected, 0), Outcome.FAILURE, 0)
    balancer.update_endpoints(dict.fromkeys(endpoints[:1] + endpoints[2:], 1), MS)
    balancer.set_available(pending, False, MS)
    assert balancer.endpoint_state(ejected) is EndpointState.EJECTED
    assert balancer.endpoint_state(removed) is None
    assert balancer.endpoint_state(pending) is EndpointState.PENDING
    chosen = Counter()
    for step in range(3000):
        now_ns = MS + step * 6 * MS  # well inside the 60 s ejection
        handle = balancer.acquire(now_ns)
        assert handle is not None
        chosen[handle.endpoint] += 1
        balancer.finished(handle, Outcome.SUCCESS, now_ns + 5 * MS)
    assert not {ejected, removed, pending} & set(chosen)
    assert set(chosen) == set(endpoints[3:])


def test_p2c_ewma_routes_markedly_less_to_a_slow_endpoint_than_round_robin() -> None:
    rtt_ns = {A: 250 * MS, B: 10 * MS, C: 10 * MS, D: 10 * MS}
    endpoints = dict.fromkeys(rtt_ns, 1)
    shares = {}
    for strategy in (Strategy.P2C_EWMA, Strategy.ROUND_ROBIN):
        balancer = make(strategy, seed=3)
        balancer.update_endpoints(endpoints, 0)
        chosen = open_loop(balancer, rtt_ns, requests=4000, gap_ns=5 * MS, seed=11)
        shares[strategy] = chosen[A] / 4000
    assert shares[Strategy.ROUND_ROBIN] == pytest.approx(0.25, abs=0.01)
    assert shares[Strategy.P2C_EWMA] < 0.02  # in fact 0.1 %: a handful of re-measurements in 20 s


@pytest.mark.parametrize("strategy", list(Strategy))
def test_weights_skew_choices_in_proportion_under_load(strategy: Strategy) -> None:
    weights = {A: 1, B: 2, C: 3, D: 4}
    balancer = make(strategy, seed=5)
    balancer.update_endpoints(weights, 0)
    chosen = closed_loop(balancer, concurrency=400, rounds=20_000, rtt_ns=20 * MS)
    for endpoint, weight in weights.items():
        assert chosen[endpoint] / 20_000 == pytest.approx(weight / 10, rel=0.05), (endpoint, chosen)


def test_round_robin_splits_in_exact_proportion_to_weight_even_when_idle() -> None:
    balancer = make(Strategy.ROUND_ROBIN)
    balancer.update_endpoints({A: 1, B: 2, C: 5}, 0)
    chosen = Counter()
    for step in range(800):
        handle = balancer.acquire(step * MS)
        assert handle is not None
        chosen[handle.endpoint] += 1
        balancer.finished(handle, Outcome.SUCCESS, step * MS + 1)
    assert chosen == {A: 100, B: 200, C: 500}


def test_p2c_ewma_on_an_idle_backend_prefers_the_lowest_rtt_over_weight() -> None:
    balancer = make()
    balancer.update_endpoints({A: 1, B: 3}, 0)
    assert Counter(balancer.pick(step * MS) for step in range(200)) == {B: 200}


def test_least_loaded_breaks_ties_at_random_not_by_table_order() -> None:
    balancer = make(Strategy.LEAST_LOADED)
    balancer.update_endpoints(dict.fromkeys([A, B, C, D], 1), 0)
    chosen = Counter(balancer.pick(0) for _ in range(400))
    assert set(chosen) == {A, B, C, D}
    assert min(chosen.values()) > 60


def test_p2c_pending_counts_open_connections_for_opaque_tcp() -> None:
    balancer = make(Strategy.P2C_PENDING)
    balancer.update_endpoints({A: 1, B: 1}, 0)
    long_lived = [balancer.started(A, 0) for _ in range(3)]
    assert {balancer.pick(MS) for _ in range(50)} == {B}
    for handle in long_lived:
        balancer.finished(handle, Outcome.SUCCESS, 10 * S)
    assert {balancer.pick(10 * S) for _ in range(50)} == {A, B}


# ---------------------------------------------------------------------------------------------- live updates


def test_live_removal_keeps_in_flight_accounting_and_forgets_the_endpoint_after_its_last_request() -> None:
    balancer = make()
    balancer.update_endpoints({A: 1, B: 1}, 0)
    on_a = [balancer.started(A, 0) for _ in range(2)]
    on_b = balancer.started(B, 0)
    balancer.update_endpoints({B: 1, C: 1}, MS)
    assert balancer.endpoint_state(A) is EndpointState.DRAINING
    assert balancer.pending(A) == 2 and balancer.in_flight == 3
    assert balancer.counts() == EndpointCounts(ready=2, draining=1)
    assert A not in {balancer.pick(MS) for _ in range(100)}
    balancer.finished(on_a[0], Outcome.SUCCESS, 2 * MS)
    assert balancer.endpoint_state(A) is EndpointState.DRAINING and balancer.pending(A) == 1
    balancer.finished(on_a[1], Outcome.FAILURE, 3 * MS)
    assert balancer.endpoint_state(A) is None and balancer.endpoints() == [B, C]
    balancer.finished(on_b, Outcome.SUCCESS, 3 * MS)
    assert balancer.in_flight == 0


def test_re_adding_a_draining_endpoint_revives_it_with_its_requests_in_flight() -> None:
    balancer = make()
    balancer.update_endpoints({A: 1, B: 1}, 0)
    handle = balancer.started(A, 0)
    balancer.update_endpoints({B: 1}, MS)
    balancer.update_endpoints({B: 1, A: 4}, 2 * MS)
    assert balancer.endpoint_state(A) is EndpointState.READY
    assert balancer.endpoints() == [A, B] and balancer.weight(A) == 4 and balancer.pending(A) == 1
    balancer.finished(handle, Outcome.SUCCESS, 3 * MS)
    assert balancer.endpoint_state(A) is EndpointState.READY


def test_a_cancelled_request_only_ever_raises_the_estimate() -> None:
    balancer = make()
    balancer.update_endpoints({A: 1}, 0)
    balancer.finished(balancer.started(A, 0), Outcome.CANCELLED, MS)
    assert balancer.rtt_estimate_ns(A, MS) == pytest.approx(30 * MS * math.exp(-MS / (10 * S)))
    balancer.finished(balancer.started(A, MS), Outcome.CANCELLED, 2 * S)
    assert balancer.rtt_estimate_ns(A, 2 * S) == 2 * S - MS


# ---------------------------------------------------------------------------------------------- breaker


def test_an_ejected_endpoint_takes_the_next_request_as_its_probe_after_the_backoff() -> None:
    breaker = BreakerConfig(consecutive_failures_max=2, backoff_min_ns=S, backoff_max_ns=8 * S, jitter_ratio=0)
    balancer = make(breaker=breaker)
    balancer.update_endpoints({A: 1, B: 1, C: 1}, 0)
    for _ in range(2):
        balancer.finished(balancer.started(A, 0), Outcome.FAILURE, 0)
    assert balancer.next_deadline_ns() == S
    balancer.on_timer(S)
    assert balancer.endpoint_state(A) is EndpointState.PROBING
    probe = balancer.acquire(S)
    assert probe is not None and probe.endpoint == A and probe.probe
    assert A not in {balancer.pick(S) for _ in range(50)}  # one probe at a time
    balancer.finished(probe, Outcome.FAILURE, S + MS)
    assert balancer.endpoint_state(A) is EndpointState.EJECTED
    assert balancer.next_deadline_ns() == S + MS + 2 * S  # the second backoff is twice the first
    balancer.on_timer(3 * S + MS)
    probe = balancer.acquire(3 * S + MS)
    assert probe is not None and probe.probe
    balancer.finished(probe, Outcome.SUCCESS, 3 * S + 2 * MS)
    assert balancer.endpoint_state(A) is EndpointState.READY
    stats = balancer.stats
    assert stats.breaker is not None
    assert (stats.breaker.ejections_consecutive_failures, stats.breaker.ejections_probe_failed) == (1, 1)
    assert (stats.breaker.probes, stats.breaker.readmissions) == (2, 1)
    transitions = [(t.before, t.after) for t in balancer.take_transitions()]
    assert transitions == [
        (BreakerState.CLOSED, BreakerState.EJECTED),
        (BreakerState.EJECTED, BreakerState.PROBING),
        (BreakerState.PROBING, BreakerState.EJECTED),
        (BreakerState.EJECTED, BreakerState.PROBING),
        (BreakerState.PROBING, BreakerState.CLOSED),
    ]


def test_with_every_endpoint_ejected_the_balancer_has_no_ready_endpoint() -> None:
    breaker = BreakerConfig(consecutive_failures_max=1, jitter_ratio=0)
    balancer = make(breaker=breaker)
    balancer.update_endpoints({A: 1, B: 1}, 0)
    for endpoint in (A, B):
        balancer.finished(balancer.started(endpoint, 0), Outcome.FAILURE, 0)
    assert balancer.acquire(MS) is None and not balancer.has_ready_endpoint(MS)
    assert balancer.counts() == EndpointCounts(ejected=2)
    assert balancer.has_ready_endpoint(S)  # the backoff (1 s) ended: a probe may go


# ---------------------------------------------------------------------------------------------- contract


def test_finishing_a_handle_twice_is_a_usage_error() -> None:
    balancer = make()
    balancer.update_endpoints({A: 1}, 0)
    handle = balancer.started(A, 0)
    balancer.finished(handle, Outcome.SUCCESS, 1)
    with pytest.raises(BalancerUsageError):
        balancer.finished(handle, Outcome.SUCCESS, 2)


def test_time_going_backwards_is_a_usage_error() -> None:
    balancer = make()
    balancer.update_endpoints({A: 1}, 5)
    with pytest.raises(BalancerUsageError):
        balancer.pick(4)


@pytest.mark.parametrize("weight", [0, -1, 1.5, True])
def test_weights_must_be_integers_from_one(weight: object) -> None:
    with pytest.raises(BalancerUsageError):
        make().update_endpoints({A: weight}, 0)  # type: ignore[dict-item]


def test_endpoints_beyond_the_limit_are_ignored_and_counted() -> None:
    balancer = make(max_endpoints=2)
    balancer.update_endpoints({A: 1, B: 1, C: 1, D: 1}, 0)
    assert balancer.endpoints() == [A, B]
    assert balancer.stats.endpoints_over_limit == 2


def test_started_on_an_endpoint_outside_the_set_is_a_usage_error() -> None:
    balancer = make()
    balancer.update_endpoints({A: 1}, 0)
    with pytest.raises(BalancerUsageError):
        balancer.started(B, 0)


def test_strategies_are_chosen_by_name_and_an_unknown_name_lists_the_known_ones() -> None:
    assert Strategy.from_name("least-loaded") is Strategy.LEAST_LOADED
    with pytest.raises(ValueError, match="p2c-ewma, p2c-pending, least-loaded, round-robin"):
        Strategy.from_name("random")


def test_an_empty_backend_has_nothing_to_pick() -> None:
    balancer = make()
    assert balancer.pick(0) is None and balancer.acquire(0) is None
    assert balancer.stats.endpoints == EndpointCounts()
