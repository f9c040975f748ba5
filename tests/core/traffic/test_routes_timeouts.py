"""Route timeouts: durations as written in configuration, the per-request timers, and the 504 answer."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tether.core.traffic.timeouts import (
    MAX_DURATION_NS,
    DurationError,
    GrpcCode,
    RequestTimers,
    RouteTimeouts,
    TimeoutKind,
    format_duration,
    parse_duration_ns,
    timeout_answer,
)

S = 1_000_000_000
MS = 1_000_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10s", 10 * S),
        ("250ms", 250 * MS),
        ("1m30s", 90 * S),
        ("1.5s", 1500 * MS),
        ("1h", 3600 * S),
        ("0s", 0),
        ("0", 0),
        ("40us", 40_000),
        ("40µs", 40_000),
        ("7ns", 7),
        (" 2s ", 2 * S),
    ],
)
def test_parse_duration_reads_go_and_gateway_api_durations(text: str, expected: int) -> None:
    assert parse_duration_ns(text) == expected


@pytest.mark.parametrize("text", ["", "10", "-1s", "1 s", "s", "1.s", "1d", "25h", "١s", "1e3ms", "10S"])
def test_parse_duration_refuses_with_an_example(text: str) -> None:
    with pytest.raises(DurationError, match="for example|longer than|empty"):
        parse_duration_ns(text)


def test_parse_duration_accepts_exactly_up_to_a_day() -> None:
    assert parse_duration_ns("24h") == MAX_DURATION_NS
    with pytest.raises(DurationError):
        parse_duration_ns("24h1ns")


@pytest.mark.parametrize(("ns", "text"), [(2 * S, "2s"), (250 * MS, "250ms"), (1500 * MS, "1.5s"), (40_000, "40us")])
def test_format_duration_is_short(ns: int, text: str) -> None:
    assert format_duration(ns) == text


def test_timeout_answer_is_504_or_deadline_exceeded() -> None:
    answer = timeout_answer(TimeoutKind.RESPONSE, 2 * S)
    assert (answer.http_status, answer.grpc_status) == (504, GrpcCode.DEADLINE_EXCEEDED)
    assert answer.label == "response_timeout" and answer.reason == "response timeout after 2s"


class NaiveTimers:
    """The three deadlines written out from the definitions in timeouts.py."""

    def __init__(self, timeouts: RouteTimeouts, started_ns: int) -> None:
        self.timeouts = timeouts
        self.started_ns = started_ns
        self.attempt_started_ns: int | None = None
        self.last_activity_ns = started_ns

    def due(self) -> list[tuple[int, int, TimeoutKind]]:
        out = []
        if self.timeouts.request_ns is not None:
            out.append((self.started_ns + self.timeouts.request_ns, 0, TimeoutKind.REQUEST))
        if self.timeouts.response_ns is not None and self.attempt_started_ns is not None:
            out.append((self.attempt_started_ns + self.timeouts.response_ns, 1, TimeoutKind.RESPONSE))
        if self.timeouts.idle_ns is not None:
            out.append((self.last_activity_ns + self.timeouts.idle_ns, 2, TimeoutKind.IDLE))
        return out


optional_ns = st.one_of(st.none(), st.integers(1, 5 * S))


class TimersMachine(RuleBasedStateMachine):
    @initialize(request=optional_ns, response=optional_ns, idle=optional_ns, start=st.integers(0, 10**12))
    def start(self, request: int | None, response: int | None, idle: int | None, start: int) -> None:
        timeouts = RouteTimeouts(request_ns=request, response_ns=response, idle_ns=idle)
        self.timers = RequestTimers(timeouts, start)
        self.model = NaiveTimers(timeouts, start)
        self.now_ns = start

    @rule(delta_ns=st.integers(0, 3 * S))
    def advance_time(self, delta_ns: int) -> None:
        self.now_ns += delta_ns

    @rule()
    def attempt_started(self) -> None:
        self.timers.attempt_started(self.now_ns)
        self.model.attempt_started_ns = self.model.last_activity_ns = self.now_ns

    @precondition(lambda self: self.model.attempt_started_ns is not None)
    @rule()
    def attempt_ended(self) -> None:
        self.timers.attempt_ended(self.now_ns)
        self.model.attempt_started_ns = None
        self.model.last_activity_ns = self.now_ns

    @rule()
    def bytes_moved(self) -> None:
        self.timers.activity(self.now_ns)
        self.model.last_activity_ns = self.now_ns

    @invariant()
    def next_deadline_is_the_earliest(self) -> None:
        due = self.model.due()
        assert self.timers.next_deadline_ns() == (min(due)[0] if due else None)

    @invariant()
    def expired_names_the_earliest_due(self) -> None:
        fired = [entry for entry in self.model.due() if entry[0] <= self.now_ns]
        assert self.timers.expired(self.now_ns) == (min(fired)[2] if fired else None)


TestTimersMachine = TimersMachine.TestCase
TestTimersMachine.settings = settings(max_examples=40, stateful_step_count=20, deadline=None)


def test_request_timeout_spans_attempts_and_response_timeout_is_per_attempt() -> None:
    timers = RequestTimers(RouteTimeouts(request_ns=10 * S, response_ns=3 * S), 0)
    timers.attempt_started(0)
    assert timers.expired(3 * S) is TimeoutKind.RESPONSE
    timers.attempt_ended(3 * S)
    assert timers.expired(5 * S) is None  # no response timeout during a backoff
    timers.attempt_started(5 * S)
    assert timers.next_deadline_ns() == 8 * S
    timers.attempt_ended(7 * S)
    assert timers.expired(10 * S) is TimeoutKind.REQUEST
    assert timers.duration_ns(TimeoutKind.REQUEST) == 10 * S


def test_request_beats_response_on_a_tie() -> None:
    timers = RequestTimers(RouteTimeouts(request_ns=2 * S, response_ns=2 * S, idle_ns=2 * S), 0)
    timers.attempt_started(0)
    assert timers.expired(2 * S) is TimeoutKind.REQUEST
