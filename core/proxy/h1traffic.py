"""Traffic management for HTTP/1.1 exchanges: routes, retries, route timeouts, faults and mirrors.

Theory of operation
-------------------
h1flows.py calls in here at a handful of points, each behind ``exchange.route is not None`` (or the proxy's
``_traffic_on``), so an exchange no route matched pays one attribute test per point:

- request head (``_h1_traffic_start``): the inbound rate limit; the route match (routing.py); the forwarded
  request loses its ``l5d-retry-*`` headers and gains the rule's header modifications; mirrors start.
- endpoint chosen (``_h1_choose``): the attempt is counted against its backend.
- attempt written (``_h1_attempt_started``): the response timeout and the retry's attempt timeout start.
- body bytes either way: kept for replay (up to 64 KiB), copied to mirrors, and the idle timeout restarts.
- response head (``_h1_routed_response``): a head the retry policy names is discarded (its connection is
  reset, the body never read) and the request is replayed after the backoff on a new balancer pick, if the
  policy's limit, the replay buffer and the service's budget all allow; otherwise the rule's response
  header modifications apply and the head goes to the client.
- an attempt failing before its head (``_h1_failed_attempt``, from ``_fail``): a refused or timed-out connect,
  a reset, an invalid response, the proxy's response timeout, the retry's attempt timeout: retried the same
  way when the policy names the status the proxy would answer (502, 504).
- the route timer (``_h1_route_timer``): a route timeout (504, never retried; after the head: the client's
  connection is reset), the attempt timeout, or the end of a fault delay or a backoff.

A retried exchange goes back to QUEUED through BACKOFF (exchange.py): no upstream connection, the body
waits in ``pending_body`` (refilled from the replay buffer) as it does before a first dispatch.

Mirrors are exchanges of their own whose client connection does not exist: every write towards the client
is skipped, so their responses vanish. The primary's body bytes are copied to them while the gate keeps
them (at most 64 KiB of body, 64 KiB unsent); a copy that outgrows either is abandoned (reset). Nothing of
a mirror ever holds the primary back. Admission, body accounting and tickets are shared with the stream
copies (mirrors.py).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import h11

from tether.core.address import Address
from tether.core.discovery import EndpointSet
from tether.core.effects import LogError
from tether.core.proxy import http1
from tether.core.proxy.balancing import HTTP, Balancing, error_outcome, http_outcome
from tether.core.proxy.connections import Downstream, Upstream, UpstreamState
from tether.core.proxy.errors import ProxyError, ProxyErrorKind
from tether.core.proxy.exchange import Exchange, ExchangeState, Step
from tether.core.proxy.mirrors import Mirrors, MirrorStart
from tether.core.proxy.pool import EndpointPool
from tether.core.proxy.routing import RouteState, Waiting, answer_error, attempt_started_ns, timeout_error
from tether.core.traffic.balancer import Handle
from tether.core.traffic.breaker import Outcome
from tether.core.traffic.retry import RETRY_HEADERS, AttemptOutcome
from tether.core.traffic.routes import apply_header_modifier
from tether.core.traffic.timeouts import TimeoutKind, format_duration

_RETRY_HEADER_PREFIX = b"l5d-retry-"


def _text_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


def _byte_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class H1Traffic(Mirrors, Balancing):
    _traffic_on: bool

    if TYPE_CHECKING:  # defined by the other flows

        def _dispatch(self, exchange: Exchange, now_ns: int) -> None: ...
        def _fail(self, exchange: Exchange, error: ProxyError, now_ns: int) -> None: ...
        def _fail_after_request(self, exchange: Exchange, error: ProxyError, now_ns: int) -> None: ...
        def _abandon(self, exchange: Exchange, now_ns: int) -> None: ...
        def _detach_upstream(self, exchange: Exchange) -> None: ...
        def _finish_request_upstream(self, exchange: Exchange, upstream: Upstream, now_ns: int) -> None: ...
        def _sync_reading_downstream(self, downstream: Downstream) -> None: ...
        def _pool(self, endpoint: Address) -> EndpointPool: ...

    # ---------------------------------------------------------------- request head

    def _h1_traffic_start(
        self,
        downstream: Downstream,
        exchange: Exchange,
        request: h11.Request,
        authority: str,
        endpoint_set: EndpointSet,
    ) -> ProxyError | None:
        """Rate limit, route, header rewrites and mirrors for a new request; returns the error to answer
        it with instead of sending it on, if any."""
        refused = self._rate_limited(downstream.identity)
        if refused is not None:
            return refused
        forwarded = http1.pairs(exchange.request)
        target = request.target.decode("latin-1")
        if target.startswith(("http://", "https://")):  # absolute form: routes match on the path
            parts = target.split("/", 3)
            target = "/" + (parts[3] if len(parts) > 3 else "")
        routed = self._route(
            endpoint_set,
            authority,
            request.method.decode("ascii", "replace"),
            target,
            _text_headers(http1.pairs(request)),
            _content_length(forwarded),
        )
        if routed is None:
            if any(name.startswith(_RETRY_HEADER_PREFIX) for name, _ in forwarded):
                exchange.request = self._rewritten(exchange.request, None)
            return None
        if isinstance(routed, ProxyError):
            return routed
        exchange.route = routed
        exchange.request = self._rewritten(exchange.request, routed)
        if routed.refusal is not None:
            return routed.refusal  # answered at once (an abort, no backend): nothing to mirror
        for policy in routed.matched.rule.mirrors:
            start = self._admit_mirror(routed, policy, _content_length(forwarded))  # mirrors.py
            if start is not None:
                self._h1_start_mirror(exchange, routed, start)
        return routed.refusal

    def _rewritten(self, request: h11.Request, state: RouteState | None) -> h11.Request:
        """The forwarded request without ``l5d-retry-*`` headers (honoured or not, they stop here) and with
        the rule's request header modifications."""
        headers = [(name, value) for name, value in _text_headers(http1.pairs(request)) if name not in RETRY_HEADERS]
        modifier = state.matched.rule.request_headers if state is not None else None
        if modifier is not None:
            headers = apply_header_modifier(modifier, headers)
        return h11.Request(method=request.method, target=request.target, headers=_byte_headers(headers))

    # ---------------------------------------------------------------- endpoint choice (balancing.py)

    def _h1_choose(self, exchange: Exchange, endpoint_set: EndpointSet) -> ProxyError | None:
        """Choose the exchange's endpoint (balancing.py); returns the error to answer with if refused."""
        if self._picker is not None:
            exchange.endpoint = self._picker.pick(endpoint_set, self._rng)
            return None
        backend = self._backend(endpoint_set.name, endpoint_set.endpoints, HTTP)
        refusal = self._take_lease(exchange, exchange.exchange_id, backend)
        if exchange.handle is not None:
            exchange.endpoint = exchange.handle.endpoint
            if exchange.route is not None:
                self._attempt_sent(exchange.route)
        return refusal

    def _h1_endpoint_ready(self, exchange: Exchange, handle: Handle) -> None:
        """A request that waited in the failfast queue has an endpoint."""
        exchange.endpoint = handle.endpoint
        if exchange.route is not None:
            self._attempt_sent(exchange.route)
        if exchange.live and exchange.state is ExchangeState.QUEUED and exchange.upstream_id is None:
            self._dispatch(exchange, self._now_ns)

    def _h1_endpoint_refused(self, exchange: Exchange, error: ProxyError) -> None:
        if exchange.live:
            self._fail_after_request(exchange, error, self._now_ns)

    # ---------------------------------------------------------------- attempts

    def _h1_attempt_started(self, exchange: Exchange) -> None:
        """The attempt's request head went upstream: its response and attempt timeouts start."""
        state = exchange.route
        assert state is not None
        self._route_attempt_started(exchange.exchange_id, state)

    def _h1_request_bytes(self, exchange: Exchange, data: bytes) -> None:
        state = exchange.route
        assert state is not None
        if state.replay is not None:
            state.replay.append(data)
        for mirror_id in state.mirror_ids:
            self._h1_mirror_body(mirror_id, data)
        self._h1_activity(exchange, state)

    def _h1_activity(self, exchange: Exchange, state: RouteState) -> None:
        self._route_activity(exchange.exchange_id, state)

    def _h1_request_ended(self, exchange: Exchange) -> None:
        state = exchange.route
        assert state is not None
        for mirror_id in state.mirror_ids:
            mirror = self._exchanges.get(mirror_id)
            if mirror is not None and mirror.live and not mirror.request_received:
                mirror.request_received = True
                upstream = self._upstream.get(mirror.upstream_id) if mirror.upstream_id is not None else None
                if upstream is not None and upstream.state is UpstreamState.BUSY:
                    self._finish_request_upstream(mirror, upstream, self._now_ns)

    def _h1_routed_response(
        self, exchange: Exchange, upstream: Upstream, response: h11.Response
    ) -> h11.Response | None:
        """A routed attempt's response head: None if it is discarded and the request retried, else the head
        to forward (with the rule's response header modifications)."""
        state = exchange.route
        assert state is not None
        status = response.status_code
        self._attempt_answered(state, status, None, attempt_started_ns(exchange))
        state.attempt_deadline_ns = None
        delay_ns = self._retry_delay(state, AttemptOutcome(http_status=status))
        if delay_ns is not None:
            self._h1_retry(exchange, delay_ns, http_outcome(status))
            return None
        self._route_answered(state, status, None)
        self._route_rearm(exchange.exchange_id, state)
        modifier = state.matched.rule.response_headers
        if modifier is None:
            return response
        headers = apply_header_modifier(modifier, _text_headers(http1.pairs(response)))
        return h11.Response(status_code=status, headers=_byte_headers(headers), reason=response.reason)

    def _h1_failed_attempt(self, exchange: Exchange, error: ProxyError) -> bool:
        """``_fail`` is about to answer ``error``: retry instead if the policy allows (True), else record
        the route's final answer (False)."""
        state = exchange.route
        assert state is not None
        attempted = self._attempt_failed(state, exchange, error)
        delay_ns = self._retry_delay(state, AttemptOutcome(http_status=error.status)) if attempted else None
        if delay_ns is not None:
            self._h1_retry(exchange, delay_ns, error_outcome(error))
            return True
        self._route_answered(state, error.status, error.kind.label)
        self._route_done(exchange.exchange_id, state)
        return False

    def _h1_retry(self, exchange: Exchange, delay_ns: int, outcome: Outcome) -> None:
        """Discard the current attempt and send the request again after ``delay_ns``."""
        state = exchange.route
        assert state is not None and state.replay is not None and state.replay.replayable
        self._drop_lease(exchange, exchange.exchange_id, outcome)
        self._leave_pool_queue(exchange)
        self._detach_upstream(exchange)  # resets a connection the attempt was written to
        exchange.advance(Step.RETRY)
        exchange.endpoint = None
        exchange.pending_body = deque(state.replay.chunks())
        exchange.pending_body_bytes = state.replay.size
        self._route_backoff(exchange.exchange_id, state, delay_ns)

    def _leave_pool_queue(self, exchange: Exchange) -> None:
        if exchange.endpoint is None or exchange.upstream_id is not None:
            return
        waiting = self._pool(exchange.endpoint).waiting_exchange_ids
        if exchange.exchange_id in waiting:
            waiting.remove(exchange.exchange_id)

    def _h1_next_attempt(self, exchange: Exchange) -> None:
        """After a fault delay or a backoff: a new balancer pick for the route's backend, and dispatch."""
        state = exchange.route
        assert state is not None and state.backend_set is not None
        refusal = self._h1_choose(exchange, state.backend_set)
        if refusal is not None:
            self._fail_after_request(exchange, refusal, self._now_ns)
        elif exchange.endpoint is not None:
            self._dispatch(exchange, self._now_ns)
        downstream = self._downstream.get(exchange.downstream_id)
        if downstream is not None:
            self._sync_reading_downstream(downstream)

    # ---------------------------------------------------------------- the route timer

    def _h1_route_timer(self, exchange: Exchange) -> None:
        state = exchange.route
        if state is None or not exchange.live:
            return
        state.armed_ns = None  # the heap just dropped it
        now_ns = self._now_ns
        kind = state.timers.expired(now_ns) if state.timers is not None else None
        if kind is not None:
            self._h1_route_timeout(exchange, state, kind)
            return
        if state.attempt_deadline_ns is not None and state.attempt_deadline_ns <= now_ns:
            self._h1_attempt_timed_out(exchange, state)
        elif state.wake_ns is not None and state.wake_ns <= now_ns:
            waiting, state.wake_ns, state.waiting = state.waiting, None, None
            if waiting is Waiting.BACKOFF:
                exchange.advance(Step.REDISPATCH)
                self._h1_next_attempt(exchange)
            elif state.abort is not None:
                self._fail_after_request(exchange, answer_error(state.abort), now_ns)
            else:
                self._h1_next_attempt(exchange)
        if exchange.live and exchange.exchange_id in self._exchanges:
            self._route_rearm(exchange.exchange_id, state)

    def _h1_route_timeout(self, exchange: Exchange, state: RouteState, kind: TimeoutKind) -> None:
        assert state.timers is not None
        state.timed_out = True
        state.counters.record_timeout(kind)
        error = timeout_error(state.timers, kind)
        if not exchange.response_started:
            self._fail(exchange, error, self._now_ns)
            return
        # The head went out: a truncated body must never pass for a complete one.
        self._effects.append(LogError(conn_id=exchange.downstream_id, message=f"{error.reason}; resetting the client"))
        self._route_done(exchange.exchange_id, state)
        self._abandon(exchange, self._now_ns)
        downstream = self._downstream.get(exchange.downstream_id)
        if downstream is not None:
            self._close_downstream(downstream, reset=True)

    def _h1_attempt_timed_out(self, exchange: Exchange, state: RouteState) -> None:
        """The retry policy's attempt timeout cut the attempt: retried as a failure, or the 504 answer."""
        policy = state.policy
        assert policy is not None and policy.attempt_timeout_ns is not None
        delay_ns = self._attempt_timeout_retry(state, attempt_started_ns(exchange))
        if delay_ns is not None:
            self._h1_retry(exchange, delay_ns, Outcome.FAILURE)
            return
        duration = format_duration(policy.attempt_timeout_ns)
        reason = f"{exchange.endpoint} did not answer within {duration} (retry timeout)"
        self._fail(exchange, ProxyError(ProxyErrorKind.RESPONSE_TIMEOUT, reason), self._now_ns)

    # ---------------------------------------------------------------- mirrors

    def _h1_start_mirror(self, primary: Exchange, state: RouteState, start: MirrorStart) -> None:
        endpoint_set = start.endpoint_set
        # A client connection id that never exists: every write towards the mirror's client is skipped.
        mirror = Exchange(self._new_id(), self._new_id(), primary.request, endpoint_set.name, self._now_ns)
        self._exchanges[mirror.exchange_id] = mirror
        self._track_mirror(state, mirror.exchange_id, start.ticket)
        refusal = self._h1_choose(mirror, endpoint_set)
        target_addr = str(mirror.endpoint) if mirror.endpoint is not None else ""
        mirror.labels = self.telemetry.http_labels(start.authority, target_addr)
        self.telemetry.request_started(mirror.service, mirror.labels)
        if refusal is not None:
            self._abandon(mirror, self._now_ns)
        elif mirror.endpoint is not None:
            self._dispatch(mirror, self._now_ns)

    def _h1_mirror_body(self, mirror_id: int, data: bytes) -> None:
        mirror = self._exchanges.get(mirror_id)
        if mirror is None or mirror_id not in self._mirror_tickets or not mirror.live or mirror.response_started:
            return
        upstream = self._upstream.get(mirror.upstream_id) if mirror.upstream_id is not None else None
        unsent = upstream.unsent_bytes if upstream is not None else mirror.pending_body_bytes
        if not self._mirror_keeps(mirror_id, len(data), unsent + len(data)):
            self._abandon(mirror, self._now_ns)
        elif upstream is not None and upstream.state is UpstreamState.BUSY:
            self._send(upstream, upstream.h11.send(h11.Data(data=data)))
        else:
            mirror.pending_body.append(data)
            mirror.pending_body_bytes += len(data)

    def _h1_exchange_over(self, exchange: Exchange) -> None:
        """The exchange ends for good (answered, failed or abandoned): timers off, mirror ticket back."""
        if exchange.route is not None:
            self._route_answered(exchange.route, None, "cancelled")  # a no-op once its answer was recorded
            self._route_done(exchange.exchange_id, exchange.route)
        if self._mirror_tickets:
            self._release_mirror(exchange.exchange_id)

    if TYPE_CHECKING:

        def _close_downstream(self, downstream: Downstream, *, reset: bool = False) -> None: ...
