"""Endpoint choice inside the proxy: one balancer and one failfast queue per backend, fed by discovery.

Theory of operation
-------------------
A *backend* is one service's endpoint set as one kind of traffic sees it: ``(service name, kind)`` with
kind ``http`` (HTTP/1.1 exchanges and HTTP/2 streams to the service's endpoints), ``h2c`` (HTTP/2 clients'
streams when the service names separate h2c endpoints) or ``opaque`` (TCP tunnels). Each ``Backend`` holds
a ``Balancer`` (core/traffic/balancer.py) and the ``FailfastQueue`` in front of it (failfast.py), and the
endpoint list discovery last gave. Backends appear as requests name them (the static resolver hands the
endpoint set over with each request; a changed list is an endpoint update, with draining); the control
plane's updates will arrive through ``Proxy.control`` and land in the same place.

A request asks its backend for an endpoint once per attempt (``_admit``), with its own id:

- a ``Handle`` now: the request goes to ``handle.endpoint``;
- ``None``: no endpoint is ready; the request waits in the failfast queue and the queue's answer comes
  later through ``_endpoint_ready`` (dispatch it now) or ``_endpoint_refused`` (answer 503 with
  ``l5d-proxy-error``; gRPC UNAVAILABLE);
- a ``Rejected``: the service is in failfast, or the queue is full (load shedding): answer it at once.

Every handle is given back exactly once (``_drop_lease``) with the outcome the breaker and the peak-EWMA
estimate need: HTTP at the response head (its RTT is the time to the head; a 5xx is a failure), gRPC at
the response end with the RTT of its head (the outcome lives in the trailers: UNKNOWN, DEADLINE_EXCEEDED,
INTERNAL, UNAVAILABLE, DATA_LOSS or a missing grpc-status are failures, the rest are the application's
answers), opaque TCP when
the tunnel ends (the handle is held for the connection's life, so "pending" is the open connection count;
only a failed or timed-out connect is a failure). A failed connect, a connect or response timeout, a reset
or an invalid response before the head are failures; a request abandoned by its client, or answered by the
proxy itself for reasons that say nothing about the endpoint, is CANCELLED (no verdict).

Timers: a backend's queue deadline (the oldest waiting request's failfast timeout, or an ejected
endpoint's backoff) is armed in the proxy's deadline heap as ``("backend", key)`` whenever it changes.

Limits: at most ``MAX_BACKENDS`` backends; past that the oldest idle one (nothing in flight, nothing
waiting) is forgotten and starts afresh if named again (oldest by creation: keeping a recency order would
cost every request a dictionary move). Each balancer keeps at most 10,000
endpoints and each queue ``failfast_queue_capacity`` waiting requests.

Passing ``picker=`` to ``Proxy`` bypasses all of this (the older seam, round robin without state): no
balancer, no breaker, no failfast queue. Tests that count requests per endpoint use it.

This class holds only methods; the state lives in the ``Proxy`` that inherits it (machine.py).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import TYPE_CHECKING, Protocol

from tether.core.address import Address
from tether.core.grpc_codes import GrpcStatus
from tether.core.proxy.connections import Downstream
from tether.core.proxy.errors import ATTEMPT_FAILURES, ProxyError, ProxyErrorKind
from tether.core.proxy.exchange import Exchange
from tether.core.proxy.parts import ProxyParts
from tether.core.proxy.streams import StreamExchange
from tether.core.traffic.balancer import Balancer, BalancerConfig, Handle, Strategy
from tether.core.traffic.breaker import BreakerConfig, Outcome
from tether.core.traffic.failfast import FailfastQueue, QueueConfig, QueueOutput, Rejected, RejectReason

MAX_BACKENDS = 1024
HTTP, H2C, OPAQUE = "http", "h2c", "opaque"
# gRPC statuses that say the server failed (as Envoy's outlier detection and gRPC's own retry guidance
# read them); the others (NOT_FOUND, INVALID_ARGUMENT...) are the application's answers.
GRPC_FAILURE_CODES = frozenset(
    {
        GrpcStatus.UNKNOWN,
        GrpcStatus.DEADLINE_EXCEEDED,
        GrpcStatus.INTERNAL,
        GrpcStatus.UNAVAILABLE,
        GrpcStatus.DATA_LOSS,
    }
)


class Leaseholder(Protocol):
    """A request (or tunnel) that may hold a handle of a backend or wait in its queue."""

    backend: Backend | None
    handle: Handle | None
    awaiting_endpoint: bool


class Backend:
    """One backend: its balancer, its failfast queue and the endpoints discovery last gave."""

    __slots__ = ("armed_ns", "balancer", "endpoints", "key", "queue")

    def __init__(self, key: tuple[str, str], balancer: Balancer, queue: FailfastQueue) -> None:
        self.key = key
        self.balancer = balancer
        self.queue = queue
        self.endpoints: tuple[Address, ...] = ()
        self.armed_ns: int | None = None  # the deadline armed for it in the proxy's heap

    @property
    def name(self) -> str:
        return self.key[0]


def http_outcome(status: int) -> Outcome:
    """An HTTP response's verdict on its endpoint: a 5xx is a failure (Linkerd's classification)."""
    return Outcome.FAILURE if status >= 500 else Outcome.SUCCESS


def grpc_outcome(status: int, grpc_status: int | None) -> Outcome:
    """A gRPC response's verdict: a server-fault code, no code at all, or a 5xx head is a failure."""
    if status >= 500 or grpc_status is None or grpc_status in GRPC_FAILURE_CODES:
        return Outcome.FAILURE
    return Outcome.SUCCESS


def error_outcome(error: ProxyError) -> Outcome:
    """A proxy error's verdict: only failures of an attempt at the endpoint count against it."""
    return Outcome.FAILURE if error.kind in ATTEMPT_FAILURES else Outcome.CANCELLED


def refusal_error(rejected: Rejected) -> ProxyError:
    kind = ProxyErrorKind.FAILFAST if rejected.reason is RejectReason.FAILFAST else ProxyErrorKind.LOAD_SHED
    return ProxyError(kind, rejected.message)


class Balancing(ProxyParts):
    _backends: dict[tuple[str, str], Backend]
    _balancer_configs: dict[str, BalancerConfig]
    _queue_config: QueueConfig

    if TYPE_CHECKING:  # defined by the flows

        def _h1_endpoint_ready(self, exchange: Exchange, handle: Handle) -> None: ...
        def _h1_endpoint_refused(self, exchange: Exchange, error: ProxyError) -> None: ...
        def _stream_endpoint_ready(self, exchange: StreamExchange, handle: Handle) -> None: ...
        def _stream_endpoint_refused(self, exchange: StreamExchange, error: ProxyError) -> None: ...
        def _tunnel_endpoint_ready(self, downstream: Downstream, handle: Handle) -> None: ...
        def _tunnel_endpoint_refused(self, downstream: Downstream, error: ProxyError) -> None: ...

    def _init_balancing(self, config_balancer: str, breaker: BreakerConfig | None, inbound: bool) -> None:
        strategy = Strategy.from_name(config_balancer)
        # An inbound proxy has one endpoint, its workload: ejecting it would turn the workload's own 5xx
        # into the proxy's 503s, so inbound balancers never break circuits (Linkerd's inbound has none).
        if inbound:
            breaker = None
        opaque = Strategy.P2C_PENDING if strategy is Strategy.P2C_EWMA else strategy
        self._balancer_configs = {
            HTTP: BalancerConfig(strategy=strategy, breaker=breaker),
            H2C: BalancerConfig(strategy=strategy, breaker=breaker),
            OPAQUE: BalancerConfig(strategy=opaque, breaker=breaker),
        }
        self._queue_config = QueueConfig(
            capacity=self.config.failfast_queue_capacity, failfast_timeout_ns=self.config.failfast_timeout_ns
        )
        self._backends = {}

    # ---------------------------------------------------------------- backends

    def _backend(self, name: str, endpoints: tuple[Address, ...], kind: str) -> Backend:
        """The backend ``(name, kind)``, brought up to date with ``endpoints`` (discovery's latest)."""
        key = (name, kind)
        backend = self._backends.get(key)
        if backend is None:
            backend = self._new_backend(key)
        if backend.endpoints is not endpoints and backend.endpoints != endpoints:
            backend.endpoints = endpoints
            # Weights: an endpoint listed twice takes twice the share (the static resolver has no weights).
            backend.balancer.update_endpoints(Counter(endpoints), self._now_ns)
            if not backend.queue.idle:
                self._deliver(backend, backend.queue.poll(self._now_ns))
        return backend

    def _new_backend(self, key: tuple[str, str]) -> Backend:
        # Each backend draws from its own child RNG, so one service's traffic never shifts another's picks.
        rng = random.Random(self._rng.getrandbits(64))
        balancer = Balancer(key[0], self._balancer_configs[key[1]], rng)
        backend = self._backends[key] = Backend(key, balancer, FailfastQueue(key[0], self._queue_config, balancer))
        if len(self._backends) > MAX_BACKENDS:
            self._forget_idle_backend()
        self.telemetry.traffic.balancers[key] = balancer
        return backend

    def _forget_idle_backend(self) -> None:
        for key, backend in self._backends.items():
            if backend.balancer.in_flight == 0 and backend.queue.idle:
                del self._backends[key]
                self.telemetry.traffic.balancers.pop(key, None)
                self._deadlines.cancel(("backend", key))
                return

    # ---------------------------------------------------------------- leases

    def _admit(self, request_id: int, backend: Backend) -> Handle | Rejected | None:
        """An endpoint for ``request_id``: a Handle now, None (it waits in the queue), or Rejected."""
        mine: QueueOutput | None = None
        others: list[QueueOutput] = []
        for output in backend.queue.submit(request_id, self._now_ns):
            if output.request_id == request_id:
                mine = output
            else:
                others.append(output)
        self._deliver(backend, others)
        if mine is None:
            return None
        return mine if isinstance(mine, Rejected) else mine.handle

    def _take_lease(self, holder: Leaseholder, request_id: int, backend: Backend) -> ProxyError | None:
        """Ask ``backend`` for an endpoint for ``holder``: sets its handle (and returns None), leaves it
        waiting (``awaiting_endpoint``, None), or returns the error to answer it with."""
        holder.backend = backend
        if backend.queue.idle:  # the common case, without the queue's bookkeeping
            handle = backend.balancer.acquire(self._now_ns)
            if handle is not None:
                holder.handle = handle
                return None
        admitted = self._admit(request_id, backend)
        if admitted is None:
            holder.awaiting_endpoint = True
            return None
        if isinstance(admitted, Rejected):
            return refusal_error(admitted)
        holder.handle = admitted
        return None

    def _drop_lease(self, holder: Leaseholder, request_id: int, outcome: Outcome, *, rtt_ns: int | None = None) -> None:
        """``holder`` is done with its endpoint (or stops waiting for one): idempotent. ``rtt_ns``: see
        ``Balancer.finished``."""
        backend = holder.backend
        if backend is None:
            return
        handle = holder.handle
        if handle is not None:
            holder.handle = None
            backend.balancer.finished(handle, outcome, self._now_ns, rtt_ns=rtt_ns)
            if outcome is not Outcome.SUCCESS or handle.probe:
                self._rearm_backend(backend)  # an ejection arms a backoff; a readmission may end one
            if not backend.queue.idle:
                self._deliver(backend, backend.queue.poll(self._now_ns))
        elif holder.awaiting_endpoint:
            holder.awaiting_endpoint = False
            backend.queue.cancel(request_id)
            self._rearm_backend(backend)

    # ---------------------------------------------------------------- queue outputs and timers

    def _deliver(self, backend: Backend, outputs: list[QueueOutput]) -> None:
        """Act on the queue's answers for waiting requests, in order."""
        for output in outputs:
            request_id = output.request_id
            if isinstance(output, Rejected):
                self._refuse_waiting(request_id, refusal_error(output))
            elif not self._resume_waiting(request_id, output.handle):
                backend.balancer.finished(output.handle, Outcome.CANCELLED, self._now_ns)
        self._rearm_backend(backend)

    def _take_waiting(self, request_id: int) -> Exchange | StreamExchange | Downstream | None:
        """The request ``request_id`` names if it still waits for an endpoint (no longer, from now on)."""
        for table in (self._exchanges, self._streams, self._downstream):
            holder = table.get(request_id)
            if holder is not None and holder.awaiting_endpoint:
                holder.awaiting_endpoint = False
                return holder
        return None

    def _resume_waiting(self, request_id: int, handle: Handle) -> bool:
        """A waiting request got an endpoint: dispatch it; False if it is gone (the handle is unused)."""
        holder = self._take_waiting(request_id)
        if holder is None:
            return False
        holder.handle = handle
        if isinstance(holder, Exchange):
            self._h1_endpoint_ready(holder, handle)
        elif isinstance(holder, StreamExchange):
            self._stream_endpoint_ready(holder, handle)
        else:
            self._tunnel_endpoint_ready(holder, handle)
        return True

    def _refuse_waiting(self, request_id: int, error: ProxyError) -> None:
        holder = self._take_waiting(request_id)
        if isinstance(holder, Exchange):
            self._h1_endpoint_refused(holder, error)
        elif isinstance(holder, StreamExchange):
            self._stream_endpoint_refused(holder, error)
        elif holder is not None:
            self._tunnel_endpoint_refused(holder, error)

    def _rearm_backend(self, backend: Backend) -> None:
        deadline_ns = backend.queue.next_deadline_ns()
        if deadline_ns != backend.armed_ns:
            backend.armed_ns = deadline_ns
            if deadline_ns is None:
                self._deadlines.cancel(("backend", backend.key))
            else:
                self._deadlines.set(("backend", backend.key), deadline_ns)

    def _backend_timer(self, key: tuple[str, str], now_ns: int) -> None:
        backend = self._backends.get(key)
        if backend is None:
            return
        backend.armed_ns = None  # the heap just dropped it
        self._deliver(backend, backend.queue.on_timer(now_ns))
