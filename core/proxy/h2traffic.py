"""Traffic management for StreamExchanges (HTTP/2, and HTTP/1.1 to meshed peers): routes, retries, timeouts.

Theory of operation
-------------------
The same hooks as h1traffic.py, at the stream flows' points (h2flows.py, h2upstream.py), each behind
``exchange.route is not None`` (or ``_traffic_on`` for the request head):

- request head (``_stream_traffic_start``): the inbound rate limit, the route match, the head's headers
  without ``l5d-retry-*`` and with the rule's modifications; the endpoint set the stream goes to becomes the
  chosen backend's.
- attempt started (a sink stream opened, or an HTTP/1.1 sink bound): response and attempt timeouts start.
- request body bytes: kept for replay (64 KiB), copied to mirrors, and the idle timeout restarts.
- response head (``_stream_routed_head``): retried when the policy names its status, or, for gRPC, the
  grpc-status of a trailers-only response (a gRPC response with a body carries its status in trailers,
  after the head went to the client, so it is not retried, as in Linkerd). The endpoint's stream is
  reset (CANCEL) and the request goes out again after the backoff on a new balancer pick, its body replayed
  from the buffer. HTTP/2 flow control stays end to end: bytes already acknowledged to the client are
  served from the replay buffer, which is bounded.
- a failure before the head (``_stream_failed_attempt``, from ``_stream_fail``): retried the same way.
- the route timer: route timeouts (504 / trailers-only DEADLINE_EXCEEDED, never retried; after the head the
  client's stream is reset), the attempt timeout, the end of a fault delay or a backoff.

Mirrors (mirrors.py ``StreamMirrors``): after the head's rewrite each of the rule's mirrors is drawn
through the proxy's ``MirrorGate``; an admitted copy is a StreamExchange of its own with no client, sent the
way its primary would go (an HTTP/2 stream to an h2c or meshed endpoint; HTTP/1.1 for an HTTP/1.1 client's
copy to a backend outside the mesh). The primary's body bytes are copied while the gate keeps the copy, its
end (and trailers) ends the copies' requests, and a primary that ends first cuts its unfinished copies. A
copy's response is read, acknowledged and discarded; a copy never holds back or fails its primary.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

from tether.core.discovery import EndpointSet
from tether.core.proxy import h2translate as tr
from tether.core.proxy.balancing import (
    H2C,
    HTTP,
    Balancing,
    error_outcome,
    grpc_outcome,
    http_outcome,
)
from tether.core.proxy.connections import Downstream
from tether.core.proxy.errors import ProxyError, ProxyErrorKind
from tether.core.proxy.mirrors import StreamMirrors
from tether.core.proxy.routing import RouteState, Waiting, answer_error, attempt_started_ns, timeout_error
from tether.core.proxy.streams import StreamExchange
from tether.core.traffic.balancer import Handle
from tether.core.traffic.breaker import Outcome
from tether.core.traffic.retry import RETRY_HEADERS, AttemptOutcome
from tether.core.traffic.routes import apply_header_modifier
from tether.core.traffic.timeouts import TimeoutKind, format_duration

_RETRY_HEADER_PREFIX = b"l5d-retry-"


def _text(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


def _bytes(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1").lower(), value.encode("latin-1")) for name, value in headers]


class H2Traffic(StreamMirrors, Balancing):
    _traffic_on: bool

    if TYPE_CHECKING:  # defined by the other flows

        def _dispatch_stream(self, exchange: StreamExchange, endpoint_set: EndpointSet | None) -> None: ...
        def _stream_fail(self, exchange: StreamExchange, error: ProxyError) -> None: ...
        def _stream_abort(
            self, exchange: StreamExchange, reason: str, code: int = ErrorCodes.INTERNAL_ERROR
        ) -> None: ...
        def _detach_sink(self, exchange: StreamExchange, code: int) -> None: ...
        def _sync_h1_source_reading(self, downstream: Downstream) -> None: ...

    # ---------------------------------------------------------------- request head

    def _stream_traffic_start(
        self, downstream: Downstream, exchange: StreamExchange, authority: str, endpoint_set: EndpointSet | None
    ) -> EndpointSet | None:
        """Rate limit, route and header rewrites for a new stream. Returns the endpoint set to choose from
        now (None: nothing to choose now: a refusal in ``exchange.refusal``, an injected delay, or a stream
        whose endpoint is fixed)."""
        refused = self._rate_limited(downstream.identity)
        if refused is not None:
            exchange.refusal = refused
            return None
        if endpoint_set is None:
            return None
        head = exchange.head
        content_length = None
        for name, value in head.headers:
            if name == b"content-length" and value.isdigit():
                content_length = int(value)
        routed = self._route(
            endpoint_set,
            authority,
            head.method.decode("ascii", "replace"),
            head.path.decode("latin-1"),
            _text(head.headers),
            content_length,
        )
        if isinstance(routed, ProxyError):
            exchange.refusal = routed
            return None
        if routed is None:
            if any(name.startswith(_RETRY_HEADER_PREFIX) for name, _ in head.headers):
                head.headers = [(name, value) for name, value in head.headers if name.decode() not in RETRY_HEADERS]
            return endpoint_set
        exchange.route = routed
        headers = [(name, value) for name, value in _text(head.headers) if name not in RETRY_HEADERS]
        modifier = routed.matched.rule.request_headers
        head.headers = _bytes(apply_header_modifier(modifier, headers) if modifier is not None else headers)
        if routed.refusal is not None:
            exchange.refusal = routed.refusal
            return None  # answered at once (an abort, no backend): nothing to mirror
        if routed.matched.rule.mirrors:
            self._stream_start_mirrors(exchange, routed, content_length)  # mirrors.py
        exchange.endpoint_set = routed.backend_set
        return routed.backend_set if routed.waiting is None else None

    # ---------------------------------------------------------------- endpoint choice (balancing.py)

    def _stream_choose(self, exchange: StreamExchange, endpoint_set: EndpointSet, *, h2c: bool) -> None:
        """Choose the stream's endpoint (balancing.py): HTTP/2 clients' streams go to the set's h2c
        endpoints when it names them. A refusal waits in ``exchange.refusal`` for ``_dispatch_stream``."""
        endpoints = endpoint_set.h2c_endpoints if h2c else endpoint_set.endpoints
        if not endpoints:
            return
        if self._picker is not None:
            chosen = EndpointSet(endpoint_set.name, endpoints) if h2c else endpoint_set
            exchange.endpoint = self._picker.pick(chosen, self._rng)
            return
        backend = self._backend(endpoint_set.name, endpoints, H2C if h2c else HTTP)
        exchange.refusal = self._take_lease(exchange, exchange.exchange_id, backend)
        if exchange.handle is not None:
            exchange.endpoint = exchange.handle.endpoint
            if exchange.route is not None:
                self._attempt_sent(exchange.route)

    def _stream_endpoint_ready(self, exchange: StreamExchange, handle: Handle) -> None:
        """A stream that waited in the failfast queue has an endpoint."""
        exchange.endpoint = handle.endpoint
        if exchange.route is not None:
            self._attempt_sent(exchange.route)
        if not exchange.done:
            self._dispatch_stream(exchange, exchange.endpoint_set)

    def _stream_endpoint_refused(self, exchange: StreamExchange, error: ProxyError) -> None:
        self._stream_fail(exchange, error)

    # ---------------------------------------------------------------- attempts

    def _stream_attempt_started(self, exchange: StreamExchange) -> None:
        state = exchange.route
        assert state is not None
        self._route_attempt_started(exchange.exchange_id, state)

    def _stream_request_bytes(self, exchange: StreamExchange, data: bytes) -> None:
        state = exchange.route
        assert state is not None
        if state.replay is not None:
            state.replay.append(data)
        if state.mirror_ids:
            self._stream_mirror_body(state, data)
        self._stream_activity(exchange)

    def _stream_activity(self, exchange: StreamExchange) -> None:
        state = exchange.route
        assert state is not None
        self._route_activity(exchange.exchange_id, state)

    def _stream_routed_head(
        self, exchange: StreamExchange, status: int, headers: list[tuple[bytes, bytes]], *, ended: bool
    ) -> list[tuple[bytes, bytes]] | None:
        """A routed attempt's response head: None if discarded and retried, else the headers to forward."""
        state = exchange.route
        assert state is not None
        grpc_status = tr.grpc_status(headers) if exchange.grpc and ended else None
        self._attempt_answered(state, status, None, attempt_started_ns(exchange))
        state.attempt_deadline_ns = None
        delay_ns = self._retry_delay(state, AttemptOutcome(http_status=status, grpc_status=grpc_status))
        if delay_ns is not None:
            verdict = grpc_outcome(status, grpc_status) if exchange.grpc else http_outcome(status)
            self._stream_retry(exchange, delay_ns, verdict)
            return None
        self._route_answered(state, status, None)
        self._route_rearm(exchange.exchange_id, state)
        modifier = state.matched.rule.response_headers
        if modifier is None:
            return headers
        return _bytes(apply_header_modifier(modifier, _text(headers)))

    def _stream_failed_attempt(self, exchange: StreamExchange, error: ProxyError) -> bool:
        """``_stream_fail`` is about to answer ``error``: retry instead if allowed (True)."""
        state = exchange.route
        assert state is not None
        attempted = self._attempt_failed(state, exchange, error)
        if attempted and not exchange.response_started:
            grpc_code = tr.grpc_code_for(error) if exchange.grpc else None
            delay_ns = self._retry_delay(state, AttemptOutcome(http_status=error.status, grpc_status=grpc_code))
            if delay_ns is not None:
                self._stream_retry(exchange, delay_ns, error_outcome(error))
                return True
        self._route_answered(state, error.status, error.kind.label)
        self._route_done(exchange.exchange_id, state)
        return False

    def _stream_retry(self, exchange: StreamExchange, delay_ns: int, outcome: Outcome) -> None:
        """Discard the current attempt (reset its stream) and send the request again after ``delay_ns``."""
        state = exchange.route
        assert state is not None and state.replay is not None and state.replay.replayable
        self._drop_lease(exchange, exchange.exchange_id, outcome)
        self._deadlines.cancel(("response", exchange.exchange_id))
        self._leave_sink_queues(exchange.exchange_id)
        self._detach_sink(exchange, ErrorCodes.CANCEL)
        exchange.sink_id = exchange.sink_stream = None
        exchange.endpoint = None
        exchange.sink_is_h2 = True
        exchange.sink_request_ended = False
        exchange.sink_body_bytes = 0
        exchange.to_sink = deque(state.replay.chunks())
        exchange.to_sink_bytes = state.replay.size
        self._route_backoff(exchange.exchange_id, state, delay_ns)

    def _leave_sink_queues(self, exchange_id: int) -> None:
        """A retried stream must not be served by a pool it waited in for its previous attempt."""
        for pool in self._h2_pools.values():
            if exchange_id in pool.waiting:
                pool.waiting.remove(exchange_id)
        for sink_pool in self._h1_sink_pools.values():
            if exchange_id in sink_pool.waiting_exchange_ids:
                sink_pool.waiting_exchange_ids.remove(exchange_id)

    def _stream_next_attempt(self, exchange: StreamExchange) -> None:
        state = exchange.route
        assert state is not None and state.backend_set is not None
        self._stream_choose(exchange, state.backend_set, h2c=False)
        self._dispatch_stream(exchange, state.backend_set)
        if (
            not exchange.done
            and exchange.request_ended
            and not exchange.response_started
            and self.config.response_timeout_ns
        ):
            self._deadlines.set(("response", exchange.exchange_id), self._now_ns + self.config.response_timeout_ns)
        downstream = self._downstream.get(exchange.source_id)
        if downstream is not None and exchange.source_stream is None:
            self._sync_h1_source_reading(downstream)

    # ---------------------------------------------------------------- the route timer

    def _stream_route_timer(self, exchange: StreamExchange) -> None:
        state = exchange.route
        if state is None or exchange.done:
            return
        state.armed_ns = None
        now_ns = self._now_ns
        kind = state.timers.expired(now_ns) if state.timers is not None else None
        if kind is not None:
            self._stream_route_timeout(exchange, state, kind)
            return
        if state.attempt_deadline_ns is not None and state.attempt_deadline_ns <= now_ns:
            self._stream_attempt_timed_out(exchange, state)
        elif state.wake_ns is not None and state.wake_ns <= now_ns:
            waiting, state.wake_ns, state.waiting = state.waiting, None, None
            if waiting is Waiting.DELAY and state.abort is not None:
                self._stream_fail(exchange, answer_error(state.abort))
            else:
                exchange.refusal = None
                self._stream_next_attempt(exchange)
        if not exchange.done:
            self._route_rearm(exchange.exchange_id, state)

    def _stream_route_timeout(self, exchange: StreamExchange, state: RouteState, kind: TimeoutKind) -> None:
        assert state.timers is not None
        state.timed_out = True
        state.counters.record_timeout(kind)
        error = timeout_error(state.timers, kind)
        if not exchange.response_started:
            self._stream_fail(exchange, error)
        else:
            self._route_done(exchange.exchange_id, state)
            self._stream_abort(exchange, error.reason, ErrorCodes.CANCEL)

    def _stream_attempt_timed_out(self, exchange: StreamExchange, state: RouteState) -> None:
        policy = state.policy
        assert policy is not None and policy.attempt_timeout_ns is not None
        delay_ns = self._attempt_timeout_retry(state, attempt_started_ns(exchange))
        if delay_ns is not None:
            self._stream_retry(exchange, delay_ns, Outcome.FAILURE)
            return
        reason = (
            f"{exchange.endpoint} did not answer within {format_duration(policy.attempt_timeout_ns)} (retry timeout)"
        )
        self._stream_fail(exchange, ProxyError(ProxyErrorKind.RESPONSE_TIMEOUT, reason))

    def _stream_exchange_over(self, exchange: StreamExchange) -> None:
        state = exchange.route
        assert state is not None
        self._route_answered(state, None, "cancelled")  # a no-op once its answer was recorded
        self._route_done(exchange.exchange_id, state)
        if state.mirror_ids:
            self._stream_mirrors_orphaned(state)
