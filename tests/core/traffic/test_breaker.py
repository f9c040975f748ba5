"""Example tests of the circuit breaker: the defaults, the backoff, probes, the success-rate window and its
ejection limits, and the transition table (the stateful test in test_breaker_stateful.py covers the rest)."""

from __future__ import annotations

import random

import pytest

from tether.core.address import Address
from tether.core.traffic.breaker import (
    TRANSITIONS,
    BreakerConfig,
    BreakerState,
    BreakerUsageError,
    CircuitBreaker,
    Outcome,
    SuccessRateConfig,
    _EndpointBreaker,
    _Event,
)

MS = 1_000_000
S = 1_000_000_000
A, B, C = (Address(f"10.2.0.{index}", 80) for index in range(1, 4))


def make(config: BreakerConfig | None = None, *endpoints: Address, seed: int = 1) -> CircuitBreaker:
    breaker = CircuitBreaker(config or BreakerConfig(), random.Random(seed))
    for endpoint in endpoints or (A,):
        breaker.add(endpoint)
    return breaker


def answer(breaker: CircuitBreaker, endpoint: Address, outcomes: str, now_ns: int = 0) -> None:
    """One request per letter, each answered before the next is sent: S success, F failure, C cancelled."""
    verdicts = {"S": Outcome.SUCCESS, "F": Outcome.FAILURE, "C": Outcome.CANCELLED}
    for letter in outcomes:
        probe = breaker.dispatched(endpoint)
        breaker.record(endpoint, verdicts[letter], now_ns, probe=probe)


def test_seven_consecutive_failures_eject_by_default() -> None:
    breaker = make()
    answer(breaker, A, "FFFFFF")
    assert breaker.state(A) is BreakerState.CLOSED
    answer(breaker, A, "F")
    assert breaker.state(A) is BreakerState.EJECTED and not breaker.admits(A)
    assert breaker.stats.ejections_consecutive_failures == 1


def test_a_success_between_failures_starts_the_count_again_and_cancellations_count_for_nothing() -> None:
    breaker = make()
    answer(breaker, A, "FFFFFFSFFFFFCCF")
    assert breaker.state(A) is BreakerState.CLOSED
    answer(breaker, A, "F")
    assert breaker.state(A) is BreakerState.EJECTED


def test_backoff_doubles_from_one_second_up_to_sixty_without_jitter() -> None:
    breaker = make(BreakerConfig(consecutive_failures_max=1, jitter_ratio=0))
    now_ns, backoffs = 0, []
    answer(breaker, A, "F", now_ns)
    for _ in range(8):
        until_ns = breaker.ejected_until_ns(A)
        assert until_ns is not None
        backoffs.append((until_ns - now_ns) // S)
        now_ns = until_ns
        breaker.on_timer(now_ns)
        assert breaker.state(A) is BreakerState.PROBING
        answer(breaker, A, "F", now_ns)
    assert backoffs == [1, 2, 4, 8, 16, 32, 60, 60]
    assert breaker.stats.ejections_probe_failed == 8


def test_jitter_lengthens_each_backoff_by_up_to_half_and_differs_between_seeds() -> None:
    drawn = set()
    for seed in range(40):
        breaker = make(BreakerConfig(consecutive_failures_max=1), seed=seed)
        answer(breaker, A, "F")
        until_ns = breaker.ejected_until_ns(A)
        assert until_ns is not None and S <= until_ns < S + S // 2
        drawn.add(until_ns)
    assert len(drawn) > 30


def test_a_successful_probe_readmits_and_resets_the_backoff() -> None:
    breaker = make(BreakerConfig(consecutive_failures_max=1, jitter_ratio=0))
    answer(breaker, A, "F")
    breaker.on_timer(S)
    answer(breaker, A, "F", S)  # the probe fails: 2 s
    breaker.on_timer(3 * S)
    answer(breaker, A, "S", 3 * S)
    assert breaker.state(A) is BreakerState.CLOSED and breaker.stats.readmissions == 1
    answer(breaker, A, "F", 4 * S)
    assert breaker.ejected_until_ns(A) == 5 * S  # back to 1 s


def test_one_probe_at_a_time_and_a_cancelled_probe_frees_the_slot() -> None:
    breaker = make(BreakerConfig(consecutive_failures_max=1, jitter_ratio=0))
    answer(breaker, A, "F")
    assert breaker.next_deadline_ns() == S
    breaker.on_timer(S - 1)
    assert breaker.state(A) is BreakerState.EJECTED
    breaker.on_timer(S)
    assert breaker.dispatched(A) is True
    assert not breaker.admits(A) and breaker.dispatched(A) is False
    breaker.record(A, Outcome.CANCELLED, S, probe=True)
    assert breaker.state(A) is BreakerState.PROBING and breaker.admits(A)


def test_outcomes_of_requests_sent_before_the_ejection_are_ignored() -> None:
    breaker = make(BreakerConfig(consecutive_failures_max=2, jitter_ratio=0))
    early = [breaker.dispatched(A) for _ in range(3)]
    assert early == [False, False, False]
    for _ in range(2):
        breaker.record(A, Outcome.FAILURE, 0, probe=False)
    breaker.record(A, Outcome.SUCCESS, 0, probe=False)  # late, from before the ejection
    assert breaker.state(A) is BreakerState.EJECTED
    breaker.on_timer(S)
    breaker.record(A, Outcome.SUCCESS, S, probe=False)  # still not the probe
    assert breaker.state(A) is BreakerState.PROBING


SUCCESS_RATE = SuccessRateConfig(success_rate_min=0.5, requests_min=10, bucket_ns=S, buckets=10)


def test_success_rate_ejects_below_the_threshold_once_the_volume_is_reached() -> None:
    breaker = make(BreakerConfig(consecutive_failures_max=0, success_rate=SUCCESS_RATE), A, B)
    answer(breaker, A, "SFSFSFSFF")  # 9 verdicts: under the minimum volume
    assert breaker.state(A) is BreakerState.CLOSED
    answer(breaker, A, "S")  # 10 verdicts, 5 successes: exactly 0.5 is not below
    assert breaker.state(A) is BreakerState.CLOSED
    answer(breaker, A, "F")  # 5 of 11
    assert breaker.state(A) is BreakerState.EJECTED
    assert breaker.stats.ejections_success_rate == 1


def test_success_rate_window_forgets_buckets_older_than_the_window() -> None:
    config = SuccessRateConfig(success_rate_min=0.5, requests_min=4, bucket_ns=S, buckets=2)
    breaker = make(BreakerConfig(consecutive_failures_max=0, success_rate=config), A, B)
    answer(breaker, A, "FFF", now_ns=0)  # bucket 0
    answer(breaker, A, "S", now_ns=2 * S)  # bucket 2: the window is buckets 1 and 2, bucket 0 is gone
    answer(breaker, A, "F", now_ns=2 * S)
    assert breaker.state(A) is BreakerState.CLOSED  # 1 of 2 in the window: too few verdicts
    answer(breaker, A, "FF", now_ns=2 * S + S - 1)  # still bucket 2: 1 of 4
    assert breaker.state(A) is BreakerState.EJECTED


def test_success_rate_keeps_the_minimum_of_ready_endpoints_and_counts_what_it_refused() -> None:
    config = SuccessRateConfig(success_rate_min=0.9, requests_min=2, max_ejected_percent=100, ready_endpoints_min=1)
    breaker = make(BreakerConfig(consecutive_failures_max=0, success_rate=config), A, B)
    answer(breaker, A, "FF")
    answer(breaker, B, "FF")
    assert (breaker.state(A), breaker.state(B)) == (BreakerState.EJECTED, BreakerState.CLOSED)
    assert breaker.stats.ejections_suppressed == 1


def test_success_rate_ejects_at_most_the_allowed_percentage_but_always_one() -> None:
    endpoints = [Address(f"10.3.0.{index}", 80) for index in range(1, 11)]
    config = SuccessRateConfig(success_rate_min=0.9, requests_min=2, max_ejected_percent=20, ready_endpoints_min=0)
    breaker = make(BreakerConfig(consecutive_failures_max=0, success_rate=config), *endpoints)
    for endpoint in endpoints:
        answer(breaker, endpoint, "FF")
    assert [breaker.state(e) for e in endpoints].count(BreakerState.EJECTED) == 2
    small = make(BreakerConfig(consecutive_failures_max=0, success_rate=config), A, B)
    answer(small, A, "FF")
    assert small.state(A) is BreakerState.EJECTED  # 20 % of 2 rounds down to 0, but one is always allowed


def test_consecutive_failures_are_never_limited() -> None:
    breaker = make(BreakerConfig(consecutive_failures_max=1), A, B, C)
    for endpoint in (A, B, C):
        answer(breaker, endpoint, "F")
    assert {breaker.state(endpoint) for endpoint in (A, B, C)} == {BreakerState.EJECTED}


def test_transition_table_covers_exactly_the_four_legal_moves() -> None:
    breaker = make()
    for state in BreakerState:
        for event in _Event:
            entry = _EndpointBreaker()
            entry.state = state
            if (state, event) in TRANSITIONS:
                breaker._move(A, entry, event, "test")
                assert entry.state is TRANSITIONS[state, event]
            else:
                with pytest.raises(AssertionError):
                    breaker._move(A, entry, event, "test")
    assert len(TRANSITIONS) == 4


def test_removing_an_ejected_endpoint_cancels_its_timer() -> None:
    breaker = make(BreakerConfig(consecutive_failures_max=1), A)
    answer(breaker, A, "F")
    breaker.remove(A)
    assert breaker.next_deadline_ns() is None and A not in breaker


def test_usage_errors() -> None:
    breaker = make()
    with pytest.raises(BreakerUsageError):
        breaker.add(A)
    with pytest.raises(BreakerUsageError):
        breaker.state(B)
    with pytest.raises(BreakerUsageError):
        breaker.record(A, Outcome.SUCCESS, 0, probe=True)


@pytest.mark.parametrize(
    "make_config",
    [
        lambda: BreakerConfig(consecutive_failures_max=-1),
        lambda: BreakerConfig(backoff_min_ns=2 * S, backoff_max_ns=S),
        lambda: BreakerConfig(jitter_ratio=1.5),
        lambda: SuccessRateConfig(success_rate_min=0.0),
        lambda: SuccessRateConfig(buckets=0),
        lambda: SuccessRateConfig(max_ejected_percent=101),
    ],
)
def test_configs_refuse_values_that_make_no_sense(make_config) -> None:
    with pytest.raises(ValueError):
        make_config()
