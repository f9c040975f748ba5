"""Fault injection draws, abort answers, and the mirror gate against a naive model."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from tether.core.traffic.faults import (
    NO_FAULT,
    MirrorGate,
    MirrorSkip,
    abort_answer,
    decide_fault,
)
from tether.core.traffic.routes import BackendRef, FaultAbort, FaultDelay, FaultInjection, MirrorPolicy
from tether.core.traffic.timeouts import GrpcCode

MS = 1_000_000
ratios = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
faults = st.builds(
    FaultInjection,
    abort=st.one_of(st.none(), st.builds(FaultAbort, http_status=st.sampled_from([500, 503, 429]), ratio=ratios)),
    delay=st.one_of(st.none(), st.builds(FaultDelay, duration_ns=st.integers(1, 10**9), ratio=ratios)),
)


@given(fault=st.one_of(st.none(), faults), seed=st.integers(0, 2**32))
@settings(max_examples=100, deadline=None)
def test_decide_fault_draws_once_per_configured_fault(fault: FaultInjection | None, seed: int) -> None:
    rng, replay = random.Random(seed), random.Random(seed)
    decision = decide_fault(fault, rng)
    if fault is None:
        assert decision is NO_FAULT and rng.getstate() == replay.getstate()
        return
    if fault.delay is not None:
        drawn = replay.random() < fault.delay.ratio
        assert decision.delay_ns == (fault.delay.duration_ns if drawn else 0)
    else:
        assert decision.delay_ns == 0
    if fault.abort is not None:
        drawn = replay.random() < fault.abort.ratio
        assert (decision.abort is not None) == drawn
    else:
        assert decision.abort is None
    assert rng.getstate() == replay.getstate()  # the same number of draws, whatever came out


def test_fault_ratio_is_honoured_over_many_requests() -> None:
    fault = FaultInjection(abort=FaultAbort(http_status=503, ratio=0.25), delay=FaultDelay(duration_ns=MS, ratio=0.5))
    rng = random.Random(11)
    decisions = [decide_fault(fault, rng) for _ in range(4000)]
    aborted = sum(d.abort is not None for d in decisions) / 4000
    delayed = sum(d.delay_ns > 0 for d in decisions) / 4000
    assert abs(aborted - 0.25) < 0.04 and abs(delayed - 0.5) < 0.04  # fixed seed: deterministic


def test_abort_answer_maps_http_statuses_to_grpc_codes() -> None:
    assert abort_answer(FaultAbort(http_status=503)).grpc_status is GrpcCode.UNAVAILABLE
    assert abort_answer(FaultAbort(http_status=404)).grpc_status is GrpcCode.UNIMPLEMENTED
    assert abort_answer(FaultAbort(http_status=500)).grpc_status is GrpcCode.UNKNOWN
    chosen = abort_answer(FaultAbort(http_status=500, grpc_status=GrpcCode.INTERNAL))
    assert (chosen.http_status, chosen.grpc_status, chosen.label) == (500, GrpcCode.INTERNAL, "fault_injected")


SHADOW = BackendRef(name="shadow", port=8080)


class MirrorModel:
    """The gate's rules written plainly: draw, then body size, then the in-flight count."""

    def __init__(self, max_in_flight: int, max_body: int, max_unsent: int, seed: int) -> None:
        self.max_in_flight, self.max_body, self.max_unsent = max_in_flight, max_body, max_unsent
        self.rng = random.Random(seed)
        self.in_flight: list[int] = []
        self.skipped: list[MirrorSkip] = []

    def admit(self, ratio: float, content_length: int | None) -> MirrorSkip | None:
        if not self.rng.random() < ratio:
            reason = MirrorSkip.NOT_SAMPLED
        elif content_length is not None and content_length > self.max_body:
            reason = MirrorSkip.BODY_TOO_LARGE
        elif len(self.in_flight) >= self.max_in_flight:
            reason = MirrorSkip.AT_CAPACITY
        else:
            return None
        self.skipped.append(reason)
        return reason


class MirrorMachine(RuleBasedStateMachine):
    copies = Bundle("copies")

    @initialize(
        max_in_flight=st.integers(0, 4),
        max_body=st.sampled_from([0, 10, 64 * 1024]),
        max_unsent=st.sampled_from([0, 100, 64 * 1024]),
        seed=st.integers(0, 2**32),
    )
    def start(self, max_in_flight: int, max_body: int, max_unsent: int, seed: int) -> None:
        self.gate = MirrorGate(max_in_flight=max_in_flight, max_body_bytes=max_body, max_unsent_bytes=max_unsent)
        self.model = MirrorModel(max_in_flight, max_body, max_unsent, seed)
        self.rng = random.Random(seed)

    @rule(target=copies, ratio=ratios, content_length=st.one_of(st.none(), st.integers(0, 100_000)))
    def request(self, ratio: float, content_length: int | None) -> int:
        decision = self.gate.admit(MirrorPolicy(backend=SHADOW, ratio=ratio), self.rng, content_length=content_length)
        assert decision.skipped == self.model.admit(ratio, content_length)
        if decision.ticket is None:
            return -1
        assert decision.backend == SHADOW and decision.ticket not in self.model.in_flight
        self.model.in_flight.append(decision.ticket)
        return decision.ticket

    @rule(ticket=consumes(copies), body=st.integers(0, 100_000), unsent=st.integers(0, 100_000))
    def copy_progressed(self, ticket: int, body: int, unsent: int) -> None:
        if ticket < 0:
            return
        kept = self.gate.keep(ticket, body_bytes=body, unsent_bytes=unsent)
        assert kept == (body <= self.model.max_body and unsent <= self.model.max_unsent)
        if not kept:
            assert self.gate.release(ticket, abandoned=True)
            self.model.in_flight.remove(ticket)

    @rule(ticket=consumes(copies))
    def copy_finished(self, ticket: int) -> None:
        released = self.gate.release(ticket)
        assert released == (ticket in self.model.in_flight)
        if released:
            self.model.in_flight.remove(ticket)
        assert not self.gate.release(ticket)  # a second release is a no-op

    @invariant()
    def in_flight_is_bounded_and_matches(self) -> None:
        assert self.gate.in_flight == len(self.model.in_flight) <= self.model.max_in_flight

    @invariant()
    def skips_are_counted(self) -> None:
        assert self.gate.skipped == {reason: self.model.skipped.count(reason) for reason in MirrorSkip}


TestMirrorMachine = MirrorMachine.TestCase
TestMirrorMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
