"""The failfast queue of one backend: requests wait while no endpoint is ready, then fail fast.

Theory of operation
-------------------
One ``FailfastQueue`` stands in front of one backend's balancer (anything with the ``EndpointSource``
methods; ``Balancer`` has them) and is the way in for every request to that backend. It has two states,
written as the table ``TRANSITIONS``:

    SERVING  --a request waited failfast_timeout (3 s)--> FAILFAST   every waiting request fails (503)
    FAILFAST --an endpoint is ready again---------------> SERVING

SERVING: ``submit`` dispatches a request at once when an endpoint is ready and nobody waits ahead of it.
Otherwise the request waits in a FIFO of at most ``capacity`` (100) requests, each with the deadline
``submitted + failfast_timeout``; a request arriving at a full queue fails at once with 503 ("service
unavailable: request queue full", Linkerd's load shedding). Waiting requests are dispatched in order as
soon as an endpoint is ready: the driver calls ``poll`` after anything that can make one ready (an endpoint
update, a finished request, ``set_available``) and ``on_timer`` when ``next_deadline_ns`` has passed (which
also runs the balancer's backoff timers, so a probe-able endpoint takes the head of the queue).

FAILFAST: entered when the oldest waiting request reaches its deadline with no endpoint ready. Every waiting
request fails with 503 and ``l5d-proxy-error: <backend>: service in fail-fast`` (Linkerd's text), and so does
every new request, at once, until an endpoint is ready again; the first request after that is dispatched.
"Ready" includes an ejected endpoint whose backoff has ended (PROBING, its probe not yet sent): the queue
leaves FAILFAST at the backoff's end (the breaker's timer is part of ``next_deadline_ns``), or at the first
input after it, so the next request can be the probe; leaving only once an endpoint is CLOSED again would
never end, since only a probe closes it.
Linkerd's "common errors" page says requests queued when failfast begins get a 504; its proxy answers an
unavailable service with 503, which is what this queue reports (the status is a field, for the proxy to map).

Every input first dispatches what it can, then expires what is overdue: a driver that calls late never
fails a request that a ready endpoint could take. Outputs (``Dispatched``, ``Rejected``) may concern any
request, not only the one just submitted; the driver acts on each in order. A request the proxy abandons
while it waits (its client went away, its own timeout) is taken out with ``cancel``.

Limits: ``capacity`` waiting requests (default 100; Linkerd has used 100 and 10,000), each for at most
``failfast_timeout`` (default 3 s, Linkerd's). In FAILFAST nothing waits.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from tether.core.traffic.balancer import Handle

NS_PER_S = 1_000_000_000
SERVICE_UNAVAILABLE = 503


class QueueUsageError(Exception):
    """The caller broke the queue's contract (a request id submitted twice, time going backwards)."""


class EndpointSource(Protocol):
    """What the queue needs of a balancer."""

    def acquire(self, now_ns: int) -> Handle | None: ...

    def has_ready_endpoint(self, now_ns: int) -> bool: ...

    def on_timer(self, now_ns: int) -> None: ...

    def next_deadline_ns(self) -> int | None: ...


class QueueState(enum.Enum):
    SERVING = "serving"
    FAILFAST = "failfast"

    def __repr__(self) -> str:
        return f"QueueState.{self.name}"


class _Event(enum.Enum):
    TIMED_OUT = "timed_out"
    ENDPOINT_READY = "endpoint_ready"


TRANSITIONS: dict[tuple[QueueState, _Event], QueueState] = {
    (QueueState.SERVING, _Event.TIMED_OUT): QueueState.FAILFAST,
    (QueueState.FAILFAST, _Event.ENDPOINT_READY): QueueState.SERVING,
}


class RejectReason(enum.Enum):
    FAILFAST = "failfast"
    QUEUE_FULL = "queue_full"

    def __repr__(self) -> str:
        return f"RejectReason.{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConfig:
    capacity: int = 100
    failfast_timeout_ns: int = 3 * NS_PER_S

    def __post_init__(self) -> None:
        if self.capacity < 0 or self.failfast_timeout_ns <= 0:
            raise ValueError("capacity must be at least 0 and failfast_timeout_ns positive")


@dataclass(frozen=True, slots=True, kw_only=True)
class Dispatched:
    """Send request ``request_id`` to ``handle.endpoint``; give ``handle`` to the balancer's ``finished``."""

    request_id: int
    handle: Handle


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """Answer request ``request_id`` with ``status`` and ``l5d-proxy-error: message``; it was never sent."""

    request_id: int
    reason: RejectReason
    status: int
    message: str


QueueOutput = Dispatched | Rejected


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueStats:
    """Counters since the queue was made, and the current state (the admin adapter renders them)."""

    waiting: int
    in_failfast: bool
    failfast_entered: int
    rejected_failfast: int
    rejected_queue_full: int


class FailfastQueue:
    """The waiting requests of one backend; see the module docstring."""

    def __init__(self, name: str, config: QueueConfig, source: EndpointSource) -> None:
        self.name = name
        self.config = config
        self._source = source
        self._state = QueueState.SERVING
        self._waiting: OrderedDict[int, int] = OrderedDict()  # request id -> deadline, oldest first
        self._now_ns: int | None = None
        self._failfast_entered = 0
        self._rejected = dict.fromkeys(RejectReason, 0)
        # SERVING with nobody waiting: ``submit`` would go straight to the balancer. A plain attribute kept
        # up to date by every input, so the proxy's hot path tests it without a call and calls ``acquire``.
        self.idle = True

    # ------------------------------------------------------------------ driver inputs

    def submit(self, request_id: int, now_ns: int) -> list[QueueOutput]:
        """A new request for this backend: dispatched, queued (no output for it yet) or rejected."""
        outputs = self._submit(request_id, now_ns)
        self._refresh_idle()
        return outputs

    def _submit(self, request_id: int, now_ns: int) -> list[QueueOutput]:
        if request_id in self._waiting:
            raise QueueUsageError(f"request {request_id} is already waiting")
        outputs = self._step(now_ns)
        if self._state is QueueState.FAILFAST:
            outputs.append(self._reject(request_id, RejectReason.FAILFAST))
            return outputs
        if not self._waiting:
            handle = self._source.acquire(now_ns)
            if handle is not None:
                outputs.append(Dispatched(request_id=request_id, handle=handle))
                return outputs
        if len(self._waiting) >= self.config.capacity:
            outputs.append(self._reject(request_id, RejectReason.QUEUE_FULL))
        else:
            self._waiting[request_id] = now_ns + self.config.failfast_timeout_ns
        return outputs

    def cancel(self, request_id: int) -> bool:
        """The proxy abandoned a waiting request; returns whether it was waiting (it may be long gone)."""
        was_waiting = self._waiting.pop(request_id, None) is not None
        self._refresh_idle()
        return was_waiting

    def poll(self, now_ns: int) -> list[QueueOutput]:
        """Dispatch waiting requests if an endpoint became ready; call after any change to the balancer."""
        outputs = self._step(now_ns)
        self._refresh_idle()
        return outputs

    def on_timer(self, now_ns: int) -> list[QueueOutput]:
        """``next_deadline_ns`` has passed: the balancer's timers, then dispatches and failfast."""
        self._check_time(now_ns)
        self._source.on_timer(now_ns)
        outputs = self._step(now_ns)
        self._refresh_idle()
        return outputs

    # ------------------------------------------------------------------ queries

    def next_deadline_ns(self) -> int | None:
        """The earliest of the oldest waiting request's deadline and the balancer's next timer."""
        candidates = (self._head_deadline_ns(), self._source.next_deadline_ns())
        deadlines = [deadline for deadline in candidates if deadline is not None]
        return min(deadlines) if deadlines else None

    @property
    def state(self) -> QueueState:
        return self._state

    def _refresh_idle(self) -> None:
        self.idle = self._state is QueueState.SERVING and not self._waiting

    def waiting(self) -> list[int]:
        """The waiting request ids, oldest first."""
        return list(self._waiting)

    @property
    def stats(self) -> QueueStats:
        return QueueStats(
            waiting=len(self._waiting),
            in_failfast=self._state is QueueState.FAILFAST,
            failfast_entered=self._failfast_entered,
            rejected_failfast=self._rejected[RejectReason.FAILFAST],
            rejected_queue_full=self._rejected[RejectReason.QUEUE_FULL],
        )

    # ------------------------------------------------------------------ internals

    def _step(self, now_ns: int) -> list[QueueOutput]:
        self._check_time(now_ns)
        outputs: list[QueueOutput] = []
        if self._state is QueueState.FAILFAST:
            assert not self._waiting, "nothing waits in failfast"
            if self._source.has_ready_endpoint(now_ns):
                self._move(_Event.ENDPOINT_READY)
            return outputs
        while self._waiting:
            handle = self._source.acquire(now_ns)
            if handle is None:
                break
            request_id, _deadline_ns = self._waiting.popitem(last=False)
            outputs.append(Dispatched(request_id=request_id, handle=handle))
        head_deadline_ns = self._head_deadline_ns()
        if head_deadline_ns is not None and head_deadline_ns <= now_ns:
            self._move(_Event.TIMED_OUT)
            self._failfast_entered += 1
            outputs.extend(self._reject(request_id, RejectReason.FAILFAST) for request_id in self._waiting)
            self._waiting.clear()
        return outputs

    def _head_deadline_ns(self) -> int | None:
        # Deadlines are submission time + one constant, and time never goes back: the head's is the earliest.
        return next(iter(self._waiting.values()), None)

    def _reject(self, request_id: int, reason: RejectReason) -> Rejected:
        self._rejected[reason] += 1
        if reason is RejectReason.FAILFAST:
            message = f"{self.name}: service in fail-fast"
        else:
            message = f"{self.name}: service unavailable: request queue full ({self.config.capacity} waiting)"
        return Rejected(request_id=request_id, reason=reason, status=SERVICE_UNAVAILABLE, message=message)

    def _move(self, event: _Event) -> None:
        after = TRANSITIONS.get((self._state, event))
        assert after is not None, f"no transition from {self._state} on {event}"
        self._state = after

    def _check_time(self, now_ns: int) -> None:
        if self._now_ns is not None and now_ns < self._now_ns:
            raise QueueUsageError(f"time went backwards: {now_ns} after {self._now_ns}")
        self._now_ns = now_ns
