"""Stateful test of ``FailfastQueue`` against a naive model: a list of (request id, deadline) and a flag.

The balancer behind the queue is a stand-in with a number of tokens: each ``acquire`` takes one, and no
tokens means no ready endpoint (one token is an ejected endpoint's single probe; "many" is a healthy
backend). Hypothesis submits requests, cancels waiting ones (and unknown ones), changes the tokens with or
without telling the queue (``poll``), moves time, runs timers, and moves the stand-in's own next deadline.

The model answers every input from its list the way the module docstring says: first dispatch waiting
requests in order while tokens last, then fail everything if the oldest waiting request is overdue, and in
failfast reject at once until a token appears. Every output list must equal the model's, in order.

Invariants: the waiting ids (in order), the state, the counters and the next deadline equal the model's;
nothing waits in failfast; no more than ``capacity`` requests wait; each submitted request is dispatched,
rejected, cancelled or waiting, exactly one of those; the stand-in's tokens are spent exactly as the model
spent them.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tether.core.address import Address
from tether.core.traffic.balancer import Handle
from tether.core.traffic.failfast import (
    Dispatched,
    FailfastQueue,
    QueueConfig,
    QueueOutput,
    QueueState,
    QueueStats,
    Rejected,
    RejectReason,
)

MS = 1_000_000
S = 1_000_000_000
MANY = 10**9
ENDPOINT = Address("10.4.0.1", 80)


class TokenSource:
    """A balancer stand-in: ``tokens`` acquisitions succeed, then none until tokens are given again."""

    def __init__(self) -> None:
        self.tokens = 0
        self.handles = 0
        self.deadline_ns: int | None = None
        self.timer_calls: list[int] = []

    def acquire(self, now_ns: int) -> Handle | None:
        if self.tokens <= 0:
            return None
        self.tokens -= 1
        self.handles += 1
        return Handle(endpoint=ENDPOINT, handle_id=self.handles, started_ns=now_ns)

    def has_ready_endpoint(self, now_ns: int) -> bool:
        return self.tokens > 0

    def on_timer(self, now_ns: int) -> None:
        self.timer_calls.append(now_ns)

    def next_deadline_ns(self) -> int | None:
        return self.deadline_ns


def as_tuples(outputs: list[QueueOutput]) -> list[tuple[str, int]]:
    result = []
    for output in outputs:
        if isinstance(output, Dispatched):
            assert output.handle.endpoint == ENDPOINT
            result.append(("dispatch", output.request_id))
        else:
            assert isinstance(output, Rejected) and output.status == 503
            expected_text = "service in fail-fast" if output.reason is RejectReason.FAILFAST else "queue full"
            assert output.message.startswith("web: ") and expected_text in output.message
            result.append((output.reason.value, output.request_id))
    return result


class FailfastMachine(RuleBasedStateMachine):
    @initialize(capacity=st.sampled_from([0, 1, 3, 100]), timeout_ns=st.sampled_from([MS, 3 * S]))
    def start(self, capacity: int, timeout_ns: int) -> None:
        self.config = QueueConfig(capacity=capacity, failfast_timeout_ns=timeout_ns)
        self.source = TokenSource()
        self.queue = FailfastQueue("web", self.config, self.source)
        self.now_ns = 0
        self.next_id = 0
        # the model
        self.tokens = 0
        self.waiting: list[tuple[int, int]] = []
        self.failfast = False
        self.fate: dict[int, str] = {}
        self.counters = {"failfast_entered": 0, "rejected_failfast": 0, "rejected_queue_full": 0}

    # ------------------------------------------------------------------ the model

    def model_step(self) -> list[tuple[str, int]]:
        expected: list[tuple[str, int]] = []
        if self.failfast:
            if self.tokens > 0:
                self.failfast = False
            return expected
        while self.waiting and self.tokens > 0:
            self.tokens -= 1
            expected.append(("dispatch", self.waiting.pop(0)[0]))
        if self.waiting and self.waiting[0][1] <= self.now_ns:
            self.failfast = True
            self.counters["failfast_entered"] += 1
            expected += [self.reject("failfast", request_id) for request_id, _ in self.waiting]
            self.waiting = []
        return expected

    def reject(self, reason: str, request_id: int) -> tuple[str, int]:
        self.counters[f"rejected_{reason}"] += 1
        return (reason, request_id)

    def check(self, outputs: list[QueueOutput], expected: list[tuple[str, int]]) -> None:
        assert as_tuples(outputs) == expected
        for kind, request_id in expected:
            assert self.fate[request_id] == "waiting", (request_id, self.fate[request_id])
            self.fate[request_id] = kind

    # ------------------------------------------------------------------ rules

    @rule()
    def submit(self) -> None:
        self.next_id += 1
        request_id = self.next_id
        self.fate[request_id] = "waiting"
        outputs = self.queue.submit(request_id, self.now_ns)
        expected = self.model_step()
        if self.failfast:
            expected.append(self.reject("failfast", request_id))
        elif not self.waiting and self.tokens > 0:
            self.tokens -= 1
            expected.append(("dispatch", request_id))
        elif len(self.waiting) >= self.config.capacity:
            expected.append(self.reject("queue_full", request_id))
        else:
            self.waiting.append((request_id, self.now_ns + self.config.failfast_timeout_ns))
        self.check(outputs, expected)

    @precondition(lambda self: self.next_id > 0)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        request_id = data.draw(st.integers(1, self.next_id + 1))
        was_waiting = any(waiting_id == request_id for waiting_id, _ in self.waiting)
        assert self.queue.cancel(request_id) == was_waiting
        if was_waiting:
            self.waiting = [(i, d) for i, d in self.waiting if i != request_id]
            self.fate[request_id] = "cancelled"

    @rule(tokens=st.sampled_from([0, 0, 1, 2, MANY]), tell=st.booleans())
    def endpoints_change(self, tokens: int, tell: bool) -> None:
        self.source.tokens = self.tokens = tokens
        if tell:
            self.poll()

    @rule()
    def poll(self) -> None:
        outputs = self.queue.poll(self.now_ns)
        self.check(outputs, self.model_step())

    @rule(step_ns=st.sampled_from([0, 1, MS // 2, MS, S, 3 * S]) | st.integers(0, 4 * S))
    def advance_time(self, step_ns: int) -> None:
        self.now_ns += step_ns

    @rule()
    def on_timer(self) -> None:
        outputs = self.queue.on_timer(self.now_ns)
        assert self.source.timer_calls[-1] == self.now_ns
        self.check(outputs, self.model_step())

    @rule(offset_ns=st.none() | st.integers(0, 5 * S))
    def source_deadline(self, offset_ns: int | None) -> None:
        self.source.deadline_ns = None if offset_ns is None else self.now_ns + offset_ns

    # ------------------------------------------------------------------ invariants

    @invariant()
    def waiting_and_state_match(self) -> None:
        assert self.queue.waiting() == [request_id for request_id, _ in self.waiting]
        assert self.queue.state is (QueueState.FAILFAST if self.failfast else QueueState.SERVING)
        assert len(self.waiting) <= self.config.capacity
        assert not (self.failfast and self.waiting)
        assert self.source.tokens == self.tokens

    @invariant()
    def counters_match(self) -> None:
        assert self.queue.stats == QueueStats(waiting=len(self.waiting), in_failfast=self.failfast, **self.counters)

    @invariant()
    def next_deadline_matches(self) -> None:
        candidates = [self.source.deadline_ns, self.waiting[0][1] if self.waiting else None]
        deadlines = [deadline for deadline in candidates if deadline is not None]
        assert self.queue.next_deadline_ns() == (min(deadlines) if deadlines else None)

    @invariant()
    def every_request_has_exactly_one_fate(self) -> None:
        waiting = {request_id for request_id, fate in self.fate.items() if fate == "waiting"}
        assert waiting == {request_id for request_id, _ in self.waiting}
        assert set(self.fate) == set(range(1, self.next_id + 1))


FailfastMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestFailfastAgainstModel = FailfastMachine.TestCase
