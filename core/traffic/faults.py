"""Fault injection and traffic mirroring: which requests are delayed, aborted or copied, drawn from the RNG.

Theory of operation
-------------------
Fault injection (a Tether extension; route_config.py reads it from a ``Fault`` filter): a rule may delay
``ratio`` of its requests by a fixed duration and abort ``ratio`` of them with a status.
``decide_fault(fault, rng)`` draws once per configured fault, always in the same order (delay, then abort),
so the number of draws, and with it every later draw of a replayed run, does not depend on the outcome.
A request drawn for both is delayed first and then aborted, as Envoy does. An abort is a ``ProxyAnswer``:
the HTTP status for HTTP, and for gRPC the configured code or the one gRPC's HTTP mapping gives
(grpc/doc/http-grpc-status-mapping.md: 400 INTERNAL, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED,
404 UNIMPLEMENTED, 429/502/503/504 UNAVAILABLE, anything else UNKNOWN). Injected faults are never retried
by the proxy: they model a failure of the caller's own path, and retrying would hide them.

Mirroring (Gateway API ``RequestMirror``): ``MirrorGate.admit`` draws whether a request is copied to the
shadow backend. The copy must never slow the primary, so the gate bounds it three ways:

- at most ``max_in_flight`` mirrored requests per proxy (default 100): past it, requests are not copied;
- only bodies up to ``max_body_bytes`` (default 64 KiB): a request with a larger ``content-length`` is
  not copied, and a copy whose streamed body outgrows the limit is abandoned (``keep`` says False);
- a copy whose connection holds more than ``max_unsent_bytes`` (default 64 KiB) not yet taken by the
  shadow is abandoned too. The primary's bytes are never held back for the shadow: the proxy writes
  them to the primary as usual and only copies them to the shadow while the copy is kept.

The shadow's response is read and discarded; its status never reaches the client, and its failure never
fails the primary. The proxy calls ``release(ticket)`` when a copy ends for any reason.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from tether.core.traffic.routes import BackendRef, FaultAbort, FaultInjection, MirrorPolicy
from tether.core.traffic.timeouts import GrpcCode, ProxyAnswer, format_duration

MIRROR_MAX_IN_FLIGHT = 100
MIRROR_MAX_BODY_BYTES = 64 * 1024
MIRROR_MAX_UNSENT_BYTES = 64 * 1024

GRPC_FOR_HTTP_STATUS = {
    400: GrpcCode.INTERNAL,
    401: GrpcCode.UNAUTHENTICATED,
    403: GrpcCode.PERMISSION_DENIED,
    404: GrpcCode.UNIMPLEMENTED,
    429: GrpcCode.UNAVAILABLE,
    502: GrpcCode.UNAVAILABLE,
    503: GrpcCode.UNAVAILABLE,
    504: GrpcCode.UNAVAILABLE,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultDecision:
    """For one request: wait ``delay_ns`` (0: none), then answer ``abort`` instead of forwarding, if set."""

    delay_ns: int = 0
    abort: ProxyAnswer | None = None


NO_FAULT = FaultDecision()


def decide_fault(fault: FaultInjection | None, rng: random.Random) -> FaultDecision:
    """Draw this request's faults: one draw for the delay, then one for the abort, when configured."""
    if fault is None:
        return NO_FAULT
    delay_ns = 0
    if fault.delay is not None and _drawn(fault.delay.ratio, rng):
        delay_ns = fault.delay.duration_ns
    abort = None
    if fault.abort is not None and _drawn(fault.abort.ratio, rng):
        abort = abort_answer(fault.abort)
    return FaultDecision(delay_ns=delay_ns, abort=abort)


def abort_answer(abort: FaultAbort) -> ProxyAnswer:
    grpc = abort.grpc_status if abort.grpc_status is not None else GRPC_FOR_HTTP_STATUS.get(abort.http_status)
    return ProxyAnswer(
        http_status=abort.http_status,
        grpc_status=grpc if grpc is not None else GrpcCode.UNKNOWN,
        label="fault_injected",
        reason=f"fault injected: {abort.http_status}",
    )


def delay_reason(delay_ns: int) -> str:
    return f"fault injected: delayed {format_duration(delay_ns)}"


def _drawn(ratio: float, rng: random.Random) -> bool:
    # Always exactly one draw, whatever the ratio, so replays stay aligned. random() < 1.0 always holds
    # and random() < 0.0 never does, so the ends of the range are exact.
    return rng.random() < ratio


class MirrorSkip(enum.Enum):
    """Why a request was not copied."""

    NOT_SAMPLED = "not_sampled"
    BODY_TOO_LARGE = "body_too_large"
    AT_CAPACITY = "at_capacity"


@dataclass(frozen=True, slots=True, kw_only=True)
class MirrorDecision:
    """Copy the request to ``backend`` under ``ticket``, or not, because of ``skipped``."""

    ticket: int | None
    backend: BackendRef | None = None
    skipped: MirrorSkip | None = None

    def __post_init__(self) -> None:
        assert (self.ticket is None) == (self.backend is None) == (self.skipped is not None), self


class MirrorGate:
    """Admission of mirrored copies for one proxy; see the module docstring for the limits."""

    def __init__(
        self,
        *,
        max_in_flight: int = MIRROR_MAX_IN_FLIGHT,
        max_body_bytes: int = MIRROR_MAX_BODY_BYTES,
        max_unsent_bytes: int = MIRROR_MAX_UNSENT_BYTES,
    ) -> None:
        assert max_in_flight >= 0 and max_body_bytes >= 0 and max_unsent_bytes >= 0
        self.max_in_flight = max_in_flight
        self.max_body_bytes = max_body_bytes
        self.max_unsent_bytes = max_unsent_bytes
        self._in_flight: set[int] = set()
        self._last_ticket = 0
        self.admitted = 0
        self.abandoned = 0
        self.skipped = {reason: 0 for reason in MirrorSkip}

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def admit(self, policy: MirrorPolicy, rng: random.Random, *, content_length: int | None) -> MirrorDecision:
        """Whether to copy this request (one draw from ``rng``, always). ``content_length`` None: unknown."""
        sampled = _drawn(policy.ratio, rng)
        if not sampled:
            return self._skip(MirrorSkip.NOT_SAMPLED)
        if content_length is not None and content_length > self.max_body_bytes:
            return self._skip(MirrorSkip.BODY_TOO_LARGE)
        if len(self._in_flight) >= self.max_in_flight:
            return self._skip(MirrorSkip.AT_CAPACITY)
        self._last_ticket += 1
        self._in_flight.add(self._last_ticket)
        self.admitted += 1
        return MirrorDecision(ticket=self._last_ticket, backend=policy.backend)

    def keep(self, ticket: int, *, body_bytes: int, unsent_bytes: int) -> bool:
        """Whether the copy may go on, given its body so far and its bytes the shadow has not taken.

        False means abandon it now (reset the shadow's stream) and ``release`` the ticket.
        """
        assert ticket in self._in_flight, ticket
        return body_bytes <= self.max_body_bytes and unsent_bytes <= self.max_unsent_bytes

    def release(self, ticket: int, *, abandoned: bool = False) -> bool:
        """The copy ``ticket`` ended; True if it was in flight (a second release is a no-op)."""
        if ticket not in self._in_flight:
            return False
        self._in_flight.discard(ticket)
        self.abandoned += abandoned
        return True

    def _skip(self, reason: MirrorSkip) -> MirrorDecision:
        self.skipped[reason] += 1
        return MirrorDecision(ticket=None, skipped=reason)
