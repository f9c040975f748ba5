"""One request and its response, from the request head to the last response byte.

An exchange belongs to exactly one downstream connection and, once dispatched, to at most one upstream
connection; the pair of ids is all it knows of them. Its life is a small table (``TRANSITIONS``): any
(state, step) pair not in the table is a bug in the proxy, and ``advance`` raises rather than guessing.

    QUEUED --bound--> SENDING --request_done--> AWAITING --response_head--> RESPONDING --response_done--> DONE
    SENDING --response_head--> RESPONDING          (an endpoint may answer before the upload ends)
    QUEUED | SENDING | AWAITING --retry--> BACKOFF --redispatch--> QUEUED   (a route's retry, h1traffic.py)
    any live state --failed--> FAILED
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h11

from tether.core.address import Address
from tether.core.proxy.errors import ProxyError
from tether.core.proxy.telemetry import HttpLabels

if TYPE_CHECKING:
    from tether.core.proxy.balancing import Backend
    from tether.core.proxy.routing import RouteState
    from tether.core.traffic.balancer import Handle


class ExchangeState(enum.Enum):
    # Members are singletons: identity hashing, in C, instead of Enum's hash of the name in Python (the
    # transition table and LIVE_STATES are looked up several times per request).
    __hash__ = object.__hash__

    QUEUED = "queued"  # waiting for an upstream connection (opening, or a pool slot)
    SENDING = "sending"  # the request head went upstream; body bytes still arriving
    AWAITING = "awaiting"  # the whole request went upstream; the response timeout runs
    RESPONDING = "responding"  # the response head went to the client; body streaming
    BACKOFF = "backoff"  # an attempt failed and is retried after the backoff (no upstream connection)
    DONE = "done"
    FAILED = "failed"


class Step(enum.Enum):
    __hash__ = object.__hash__  # see ExchangeState

    BOUND = "bound"
    REQUEST_DONE = "request_done"
    RESPONSE_HEAD = "response_head"
    RESPONSE_DONE = "response_done"
    RETRY = "retry"
    REDISPATCH = "redispatch"
    FAILED = "failed"


_S = ExchangeState
TRANSITIONS: dict[tuple[ExchangeState, Step], ExchangeState] = {
    (_S.QUEUED, Step.BOUND): _S.SENDING,
    (_S.SENDING, Step.REQUEST_DONE): _S.AWAITING,
    (_S.SENDING, Step.RESPONSE_HEAD): _S.RESPONDING,
    (_S.AWAITING, Step.RESPONSE_HEAD): _S.RESPONDING,
    (_S.RESPONDING, Step.REQUEST_DONE): _S.RESPONDING,
    (_S.RESPONDING, Step.RESPONSE_DONE): _S.DONE,
    (_S.QUEUED, Step.RETRY): _S.BACKOFF,
    (_S.SENDING, Step.RETRY): _S.BACKOFF,
    (_S.AWAITING, Step.RETRY): _S.BACKOFF,
    (_S.BACKOFF, Step.REDISPATCH): _S.QUEUED,
    (_S.BACKOFF, Step.FAILED): _S.FAILED,
    (_S.QUEUED, Step.FAILED): _S.FAILED,
    (_S.SENDING, Step.FAILED): _S.FAILED,
    (_S.AWAITING, Step.FAILED): _S.FAILED,
    (_S.RESPONDING, Step.FAILED): _S.FAILED,
}
LIVE_STATES = frozenset({_S.QUEUED, _S.SENDING, _S.AWAITING, _S.RESPONDING, _S.BACKOFF})


class ExchangeStateError(AssertionError):
    """The proxy tried a step the exchange table does not allow: a bug, never peer input."""


@dataclass(slots=True)
class Exchange:
    exchange_id: int
    downstream_id: int
    request: h11.Request  # as it will be written upstream (hop-by-hop headers removed)
    service: str
    started_ns: int
    endpoint: Address | None = None
    upstream_id: int | None = None
    state: ExchangeState = ExchangeState.QUEUED
    # Set when the client's whole request body has arrived (whatever the exchange state).
    request_received: bool = False
    # Body bytes that arrived before an upstream connection was bound, bounded by max_buffered_bytes.
    pending_body: deque[bytes] = field(default_factory=deque)
    pending_body_bytes: int = 0
    response_status: int | None = None
    # An answer decided before the request body was read (no endpoints, pool full): it is sent once the
    # body has been read and discarded, so the connection survives.
    deferred_error: ProxyError | None = None
    discarded_bytes: int = 0
    labels: HttpLabels = HttpLabels("outbound", "", "")  # metric labels, set when the endpoint is known
    # Endpoint choice (balancing.py): the backend asked, the handle held until the response head, or the
    # request waiting in the backend's failfast queue.
    backend: Backend | None = None
    handle: Handle | None = None
    awaiting_endpoint: bool = False
    route: RouteState | None = None  # set when a route rule matched (routing.py, h1traffic.py)
    # The lane (h1lane.py) writes the upstream head out once: (the request it belongs to, its bytes, its
    # Content-Length). Used while ``request`` is still that request.
    prepared: tuple[h11.Request, bytes, int] | None = None

    def advance(self, step: Step) -> ExchangeState:
        try:
            self.state = TRANSITIONS[(self.state, step)]
        except KeyError:
            raise ExchangeStateError(f"exchange {self.exchange_id}: {step.value} in {self.state.value}") from None
        return self.state

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def response_started(self) -> bool:
        return self.response_status is not None
