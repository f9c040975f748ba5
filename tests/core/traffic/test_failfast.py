"""Example tests of the failfast queue in front of a real balancer: waiting while no endpoint is ready,
failfast after the timeout and out of it again, load shedding, timers, and the transition table."""

from __future__ import annotations

import random

import pytest

from tether.core.address import Address
from tether.core.traffic.balancer import Balancer, BalancerConfig
from tether.core.traffic.breaker import BreakerConfig, Outcome
from tether.core.traffic.failfast import (
    TRANSITIONS,
    Dispatched,
    FailfastQueue,
    QueueConfig,
    QueueOutput,
    QueueState,
    QueueUsageError,
    Rejected,
    RejectReason,
    _Event,
)

MS = 1_000_000
S = 1_000_000_000
A, B = Address("10.5.0.1", 80), Address("10.5.0.2", 80)


def make(capacity: int = 100, breaker: BreakerConfig | None = None) -> tuple[Balancer, FailfastQueue]:
    balancer = Balancer("web.default.svc", BalancerConfig(breaker=breaker), random.Random(3))
    return balancer, FailfastQueue("web.default.svc", QueueConfig(capacity=capacity), balancer)


def dispatched(outputs: list[QueueOutput]) -> list[tuple[int, Address]]:
    return [(o.request_id, o.handle.endpoint) for o in outputs if isinstance(o, Dispatched)]


def rejected(outputs: list[QueueOutput]) -> list[tuple[int, RejectReason]]:
    return [(o.request_id, o.reason) for o in outputs if isinstance(o, Rejected)]


def test_a_ready_endpoint_takes_a_request_at_once() -> None:
    balancer, queue = make()
    balancer.update_endpoints({A: 1}, 0)
    assert dispatched(queue.submit(1, 0)) == [(1, A)]
    assert balancer.pending(A) == 1 and queue.waiting() == []


def test_requests_wait_while_no_endpoint_is_ready_and_leave_in_order_when_one_is() -> None:
    balancer, queue = make()
    for request_id in (1, 2, 3):
        assert queue.submit(request_id, request_id * MS) == []
    assert queue.waiting() == [1, 2, 3] and queue.next_deadline_ns() == 3 * S + MS
    balancer.update_endpoints({A: 1, B: 1}, 2 * S)
    outputs = queue.poll(2 * S)
    assert [request_id for request_id, _ in dispatched(outputs)] == [1, 2, 3]
    assert balancer.in_flight == 3 and queue.next_deadline_ns() is None


def test_after_the_failfast_timeout_every_waiting_request_gets_503_and_new_ones_fail_at_once() -> None:
    balancer, queue = make()
    queue.submit(1, 0)
    queue.submit(2, 2 * S)
    assert queue.on_timer(3 * S - 1) == []
    outputs = queue.on_timer(3 * S)
    assert rejected(outputs) == [(1, RejectReason.FAILFAST), (2, RejectReason.FAILFAST)]
    first = outputs[0]
    assert isinstance(first, Rejected)
    assert (first.status, first.message) == (503, "web.default.svc: service in fail-fast")
    assert queue.state is QueueState.FAILFAST and queue.waiting() == []
    assert rejected(queue.submit(3, 4 * S)) == [(3, RejectReason.FAILFAST)]
    assert queue.next_deadline_ns() is None
    stats = queue.stats
    assert (stats.in_failfast, stats.failfast_entered, stats.rejected_failfast) == (True, 1, 3)


def test_failfast_ends_as_soon_as_an_endpoint_is_ready_again() -> None:
    balancer, queue = make()
    queue.submit(1, 0)
    queue.on_timer(3 * S)
    balancer.update_endpoints({A: 1}, 10 * S)
    assert queue.poll(10 * S) == [] and queue.state is QueueState.SERVING
    assert dispatched(queue.submit(2, 10 * S)) == [(2, A)]


def test_a_request_arriving_in_failfast_after_an_endpoint_came_back_is_dispatched_without_a_poll() -> None:
    balancer, queue = make()
    queue.submit(1, 0)
    queue.on_timer(3 * S)
    balancer.update_endpoints({A: 1}, 5 * S)  # the driver forgot to poll
    assert dispatched(queue.submit(2, 5 * S)) == [(2, A)]
    assert queue.state is QueueState.SERVING


def test_a_full_queue_sheds_new_requests_with_503() -> None:
    balancer, queue = make(capacity=2)
    assert queue.submit(1, 0) == [] and queue.submit(2, 0) == []
    outputs = queue.submit(3, 0)
    assert rejected(outputs) == [(3, RejectReason.QUEUE_FULL)]
    shed = outputs[0]
    assert isinstance(shed, Rejected) and shed.status == 503
    assert shed.message == "web.default.svc: service unavailable: request queue full (2 waiting)"
    assert queue.state is QueueState.SERVING and queue.waiting() == [1, 2]


def test_with_capacity_zero_nothing_waits() -> None:
    balancer, queue = make(capacity=0)
    assert rejected(queue.submit(1, 0)) == [(1, RejectReason.QUEUE_FULL)]
    balancer.update_endpoints({A: 1}, 0)
    assert dispatched(queue.submit(2, 0)) == [(2, A)]


def test_a_driver_calling_late_dispatches_rather_than_failing_what_an_endpoint_can_take() -> None:
    balancer, queue = make()
    queue.submit(1, 0)
    balancer.update_endpoints({A: 1}, 5 * S)
    assert dispatched(queue.on_timer(5 * S)) == [(1, A)]
    assert queue.state is QueueState.SERVING


def test_when_every_endpoint_is_ejected_the_probe_takes_the_head_of_the_queue_at_the_backoff_end() -> None:
    balancer, queue = make(breaker=BreakerConfig(consecutive_failures_max=1, jitter_ratio=0))
    balancer.update_endpoints({A: 1}, 0)
    (first,) = queue.submit(1, 0)
    assert isinstance(first, Dispatched)
    balancer.finished(first.handle, Outcome.FAILURE, MS)  # A is ejected for 1 s
    assert queue.poll(MS) == []
    assert queue.submit(2, MS) == [] and queue.submit(3, MS) == []
    assert queue.next_deadline_ns() == S + MS  # the breaker's timer, before the queue's own (3 s)
    outputs = queue.on_timer(S + MS)
    assert dispatched(outputs) == [(2, A)]  # the probe: one request only
    probe = outputs[0]
    assert isinstance(probe, Dispatched) and probe.handle.probe
    balancer.finished(probe.handle, Outcome.SUCCESS, S + 2 * MS)
    assert dispatched(queue.poll(S + 2 * MS)) == [(3, A)]


def test_failfast_ends_at_the_backoff_end_with_no_request_and_a_failed_probe_brings_it_back() -> None:
    """An ejected endpoint's backoff end is a timer of the queue's: it leaves failfast then, before any
    request comes (the probe need not be sent for the service to be serving again)."""
    balancer, queue = make(breaker=BreakerConfig(consecutive_failures_max=1, jitter_ratio=0))
    balancer.update_endpoints({A: 1}, 0)
    (first,) = queue.submit(1, 0)
    assert isinstance(first, Dispatched)
    balancer.finished(first.handle, Outcome.FAILURE, 0)  # ejected until 1 s
    queue.submit(2, 0)
    assert queue.next_deadline_ns() == S  # the backoff end, before request 2's failfast deadline
    outputs = queue.on_timer(S)
    assert dispatched(outputs) == [(2, A)]
    probe = outputs[0]
    assert isinstance(probe, Dispatched) and probe.handle.probe
    assert queue.submit(3, S) == []  # one probe at a time: request 3 waits
    assert rejected(queue.on_timer(4 * S)) == [(3, RejectReason.FAILFAST)]
    assert queue.state is QueueState.FAILFAST and queue.next_deadline_ns() is None  # the probe is out
    balancer.finished(probe.handle, Outcome.FAILURE, 5 * S)  # the probe fails: ejected 2 s more
    assert queue.poll(5 * S) == [] and queue.state is QueueState.FAILFAST
    assert queue.next_deadline_ns() == 7 * S
    assert queue.on_timer(7 * S) == [] and queue.state is QueueState.SERVING  # PROBING again, nothing sent
    assert balancer.in_flight == 0
    (second_probe,) = queue.submit(4, 30 * S)  # however long after, the next request is the probe
    assert isinstance(second_probe, Dispatched) and second_probe.handle.probe


def test_cancel_takes_a_waiting_request_out_and_says_whether_it_was_there() -> None:
    balancer, queue = make()
    queue.submit(1, 0)
    queue.submit(2, S)
    assert queue.cancel(1) is True and queue.cancel(1) is False and queue.cancel(99) is False
    assert queue.next_deadline_ns() == 4 * S  # request 2's deadline now heads the queue
    assert rejected(queue.on_timer(4 * S)) == [(2, RejectReason.FAILFAST)]


def test_usage_errors() -> None:
    balancer, queue = make()
    queue.submit(1, 5)
    with pytest.raises(QueueUsageError):
        queue.submit(1, 6)
    with pytest.raises(QueueUsageError):
        queue.poll(4)
    with pytest.raises(ValueError):
        QueueConfig(failfast_timeout_ns=0)


def test_transition_table_covers_exactly_the_two_legal_moves() -> None:
    balancer, queue = make()
    for state in QueueState:
        for event in _Event:
            queue._state = state
            if (state, event) in TRANSITIONS:
                queue._move(event)
                assert queue.state is TRANSITIONS[state, event]
            else:
                with pytest.raises(AssertionError):
                    queue._move(event)
    assert len(TRANSITIONS) == 2
