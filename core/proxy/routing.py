"""Routes in the proxy: the rule a request matches, the backend it goes to, and the route's per-request state.

Theory of operation
-------------------
The proxy holds one ``RouteConfig`` (``Proxy(routes=...)``, replaced by ``control(RoutesUpdated(...))``).
For each request the outbound side looks up the table of the request's *parent service* (the endpoint set
the resolver gave: its name as ``NAME``, ``NAME.NAMESPACE`` or ``NAME.NAMESPACE.svc...``, namespace
``default`` otherwise, and the authority's port) and matches the request against it
(core/traffic/routes.py). Tables are cached per (service, namespace, port) until the configuration changes.

- no routes for the service (or a ServiceProfile / no-routes table that does not match): the request goes
  on exactly as without routes, and nothing below is paid for;
- no rule matched in a Gateway API table: 404 with ``l5d-proxy-error`` (gRPC UNIMPLEMENTED);
- a rule matched: a ``RouteState`` is made for the request. It picks a weighted backend (a backend name
  resolves through the resolver to an endpoint set of its own, with its own balancer; none named: the
  parent service), applies header modifiers, deposits in the service's retry budget, starts the rule's
  timers (``RequestTimers``), draws the fault (delay, abort) and the mirrors.

Everything after that is per protocol (h1traffic.py for HTTP/1.1 exchanges, h2traffic.py for streams):
where to hook in the body bytes, how to discard an attempt. This module keeps what both share: the
decision to retry (``_retry_decision``: the policy, then the budget), the one route timer of a request
(``("route", request id)``: the earliest of the route timeouts, the retry's attempt timeout, and the end of a
fault delay or a backoff), and the metrics (traffic_telemetry.py).

Inbound, the proxy applies the first ``HTTPLocalRateLimitPolicy`` of its configuration to every request
(one inbound proxy serves one Server): refused requests get 429 (gRPC RESOURCE_EXHAUSTED).

Limits: at most ``MAX_ROUTE_TABLES`` cached tables (the cache is emptied past it); per request, one
``RouteState`` with a replay buffer of at most 64 KiB (retry.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tether.core.address import parse_authority
from tether.core.discovery import EndpointSet
from tether.core.effects import LogError
from tether.core.proxy.errors import ATTEMPT_FAILURES, ProxyError, ProxyErrorKind
from tether.core.proxy.parts import ProxyParts
from tether.core.proxy.traffic_telemetry import BackendLabels, RouteLabels
from tether.core.traffic.budget import DEFAULT_RETRY_BUDGET, RetryBudget, RetryBudgetConfig, RetryBudgets
from tether.core.traffic.faults import MirrorGate, decide_fault
from tether.core.traffic.ratelimit import LocalRateLimiter, rate_limited_answer
from tether.core.traffic.retry import (
    AttemptOutcome,
    ReplayBuffer,
    RetryDecision,
    RetryPolicy,
    RetryReason,
    apply_retry_headers,
    should_retry,
    spend_budget,
)
from tether.core.traffic.routes import (
    UNMATCHED_NOT_FOUND,
    BackendRef,
    MatchedRule,
    RouteCounters,
    RouteStats,
    RouteTable,
    choose_backend,
)
from tether.core.traffic.timeouts import NO_TIMEOUTS, ProxyAnswer, RequestTimers, TimeoutKind, timeout_answer

if TYPE_CHECKING:  # route_config.py pulls in the YAML parser, which the running proxy never needs
    from tether.core.proxy.exchange import Exchange
    from tether.core.proxy.streams import StreamExchange
    from tether.core.traffic.route_config import RouteConfig

MAX_ROUTE_TABLES = 1024
ANSWER_KINDS = {
    "fault_injected": ProxyErrorKind.FAULT_INJECTED,
    "rate_limited": ProxyErrorKind.RATE_LIMITED,
    "request_timeout": ProxyErrorKind.REQUEST_TIMEOUT,
    "response_timeout": ProxyErrorKind.RESPONSE_TIMEOUT,
    "idle_timeout": ProxyErrorKind.IDLE_TIMEOUT,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutesUpdated:
    """Control-plane event (``Proxy.control``): the routes, profiles and rate limits changed.

    Requests in flight keep the rule they matched; the next request sees the new configuration.
    ``routes=None`` removes them all.
    """

    routes: RouteConfig | None


class Waiting(enum.Enum):
    """What a routed request waits for before its next attempt goes out."""

    DELAY = "delay"  # an injected fault's delay
    BACKOFF = "backoff"  # the backoff before a retry


@dataclass(slots=True)
class _Table:
    """A cached route table for one parent service, with what the metrics and budget need."""

    table: RouteTable | None  # None: no routes for this service (go on unrouted)
    namespace: str
    port: str
    budget: RetryBudgetConfig


class RouteState:
    """One routed request: its rule, where it goes, and its retry, timer and fault state."""

    __slots__ = (
        "abort",
        "armed_ns",
        "attempt",
        "attempt_deadline_ns",
        "backend_labels",
        "backend_set",
        "budget",
        "counters",
        "final",
        "labels",
        "matched",
        "mirror_ids",
        "policy",
        "recorded",
        "refusal",
        "replay",
        "started_ns",
        "timed_out",
        "timers",
        "wake_ns",
        "waiting",
    )

    def __init__(self, matched: MatchedRule, labels: RouteLabels, counters: RouteCounters, started_ns: int) -> None:
        self.matched = matched
        self.labels = labels
        self.counters = counters
        self.started_ns = started_ns
        self.backend_set: EndpointSet | None = None
        self.backend_labels = BackendLabels("", "", "")
        self.refusal: ProxyError | None = None  # answer this instead of sending the request on
        self.policy: RetryPolicy | None = None
        self.budget: RetryBudget | None = None
        self.replay: ReplayBuffer | None = None  # the body kept for replay (a policy exists)
        self.attempt = 1
        self.final = False  # no more retry decisions: the next failure is the answer
        self.timers: RequestTimers | None = None
        self.timed_out = False  # a route timeout fired: never retried
        self.attempt_deadline_ns: int | None = None  # the retry policy's attempt timeout
        self.wake_ns: int | None = None
        self.waiting: Waiting | None = None
        self.abort: ProxyAnswer | None = None  # an injected abort, answered once the delay (if any) is over
        self.armed_ns: int | None = None
        self.recorded = False  # the route's request metric is in (the final answer went out)
        self.mirror_ids: list[int] = []


def answer_error(answer: ProxyAnswer) -> ProxyError:
    """A ``ProxyAnswer`` from core/traffic as the proxy's error, with its own status and gRPC code."""
    kind = ANSWER_KINDS.get(answer.label, ProxyErrorKind.FAULT_INJECTED)
    return ProxyError(kind, answer.reason, status_override=answer.http_status, grpc_override=int(answer.grpc_status))


def timeout_error(timers: RequestTimers, kind: TimeoutKind) -> ProxyError:
    return answer_error(timeout_answer(kind, timers.duration_ns(kind)))


def parent_of(endpoint_set: EndpointSet) -> tuple[str, str]:
    """(name, namespace) of the Service an endpoint set stands for: ``NAME.NAMESPACE[.svc...]`` or ``NAME``."""
    host, _port = parse_authority(endpoint_set.name)
    host = host or endpoint_set.name
    labels = host.split(".")
    if len(labels) >= 2 and not labels[0].isdigit() and (len(labels) == 2 or labels[2] == "svc"):
        return labels[0], labels[1]
    return host, "default"


def backend_authority(ref: BackendRef, parent_namespace: str) -> str:
    """What to resolve for a backend: its name (qualified when in another namespace), with its port."""
    name = ref.name if ref.namespace in (None, parent_namespace) else f"{ref.name}.{ref.namespace}"
    return f"{name}:{ref.port}" if ref.port is not None else name


class Routing(ProxyParts):
    routes: RouteConfig | None
    _route_tables: dict[tuple[str, str, int | None], _Table]
    _route_stats: RouteStats
    _budgets: RetryBudgets
    _mirror_gate: MirrorGate
    _rate_limiter: LocalRateLimiter | None
    _traffic_on: bool  # routes or a rate limit: requests take the traffic path at all

    def _init_routing(self, routes: RouteConfig | None, now_ns: int) -> None:
        self._route_stats = RouteStats()
        self._budgets = RetryBudgets()
        self._mirror_gate = MirrorGate()
        self._set_routes(routes, now_ns)

    def _set_routes(self, routes: RouteConfig | None, now_ns: int) -> None:
        self.routes = routes
        self._route_tables = {}
        inbound = self.telemetry.direction == "inbound"
        limits = routes.rate_limits if routes is not None and inbound else ()
        self._rate_limiter = LocalRateLimiter(limits[0][2], now_ns) if limits else None
        outbound_routes = routes is not None and not inbound and bool(routes.routes or routes.profiles)
        self._traffic_on = outbound_routes or self._rate_limiter is not None

    # ---------------------------------------------------------------- matching

    def _table(self, endpoint_set: EndpointSet, authority: str) -> tuple[_Table, str, str]:
        name, namespace = parent_of(endpoint_set)
        _host, port = parse_authority(authority)
        key = (name, namespace, port)
        cached = self._route_tables.get(key)
        if cached is None:
            if len(self._route_tables) >= MAX_ROUTE_TABLES:
                self._route_tables.clear()
            routes = self.routes
            assert routes is not None
            table = routes.table_for(name, namespace, port)
            useful = bool(table.routes) or table.unmatched == UNMATCHED_NOT_FOUND
            budget = routes.budget_for(name, namespace) or DEFAULT_RETRY_BUDGET
            port_label = str(port) if port is not None else ""
            cached = self._route_tables[key] = _Table(table if useful else None, namespace, port_label, budget)
        return cached, name, namespace

    def _route(
        self,
        endpoint_set: EndpointSet,
        authority: str,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        content_length: int | None,
    ) -> RouteState | ProxyError | None:
        """Match a request to its parent service's routes: None (unrouted), the 404 of no match, or its
        ``RouteState`` (whose ``refusal`` may already say how to answer it)."""
        if self.routes is None or self.telemetry.direction == "inbound":
            return None
        cached, name, namespace = self._table(endpoint_set, authority)
        if cached.table is None:
            return None
        path, _, query = target.partition("?")
        found = cached.table.match(method, authority, path, query, headers)
        if found is None:
            if cached.table.unmatched == UNMATCHED_NOT_FOUND:
                return ProxyError(ProxyErrorKind.NO_ROUTE, f"no route of {name}.{namespace} matched {method} {path}")
            return None
        key = found.key
        labels = RouteLabels(namespace, name, cached.port, key.kind, key.namespace, key.name, key.rule)
        counters = self._route_stats.for_rule(key)
        counters.requests += 1
        state = RouteState(found, labels, counters, self._now_ns)
        self._choose_route_backend(state, endpoint_set, namespace)
        rule = found.rule
        state.policy, problems = apply_retry_headers(rule.retry, headers, allowed=rule.allow_l5d_request_headers)
        for problem in problems:
            self._effects.append(LogError(conn_id=0, message=f"ignored: {problem}"))
        state.budget = self._budgets.for_service(f"{namespace}/{name}", cached.budget)
        state.budget.deposit(self._now_ns)
        if state.policy is not None and state.policy.limit > 0:
            state.replay = ReplayBuffer(content_length=content_length)
        if rule.timeouts is not NO_TIMEOUTS:
            state.timers = RequestTimers(rule.timeouts, self._now_ns)
        fault = decide_fault(rule.fault, self._rng)
        if rule.fault is not None:
            counters.record_fault(fault)
        if fault.delay_ns:
            state.wake_ns, state.waiting = self._now_ns + fault.delay_ns, Waiting.DELAY
            state.abort = fault.abort
        elif fault.abort is not None and state.refusal is None:
            state.refusal = answer_error(fault.abort)
        return state

    def _choose_route_backend(self, state: RouteState, parent: EndpointSet, namespace: str) -> None:
        backends = state.matched.rule.backends
        chosen = choose_backend(backends, self._rng)
        if chosen is None and backends:
            state.refusal = ProxyError(ProxyErrorKind.NO_BACKEND, "the route's backends all have weight 0")
            return
        if chosen is None:
            state.backend_set = parent
            state.backend_labels = BackendLabels(namespace, state.labels.parent_name, state.labels.parent_port)
            return
        resolved = self.resolver.resolve(backend_authority(chosen, namespace))
        state.backend_labels = BackendLabels(
            chosen.namespace or namespace, chosen.name, str(chosen.port) if chosen.port is not None else ""
        )
        if resolved is None or not resolved.endpoints:
            state.refusal = ProxyError(ProxyErrorKind.NO_ENDPOINTS, f"no endpoints for backend {chosen.name}")
            return
        state.backend_set = resolved

    # ---------------------------------------------------------------- retries

    def _retry_decision(self, state: RouteState, outcome: AttemptOutcome) -> RetryDecision:
        """Whether to retry after the current attempt failed with ``outcome`` (policy, then budget)."""
        replayable = state.replay is not None and state.replay.replayable
        decision = should_retry(state.policy, state.attempt, outcome, replayable, state.timed_out, rng=self._rng)
        if state.budget is not None:
            decision = spend_budget(decision, state.budget, self._now_ns)
        state.counters.record_retry(decision)
        if decision.reason is RetryReason.RETRY:
            self.telemetry.traffic.retry_counts(state.labels).requests += 1
        elif decision.reason is RetryReason.LIMIT_REACHED:
            self.telemetry.traffic.retry_counts(state.labels).limit_exceeded += 1
        elif decision.reason is RetryReason.BUDGET_EXHAUSTED:
            self.telemetry.traffic.retry_counts(state.labels).overflow += 1
        return decision

    def _is_retryable(self, state: RouteState, outcome: AttemptOutcome) -> bool:
        """Whether the policy names this outcome at all (so a head is worth a decision)."""
        policy = state.policy
        return policy is not None and policy.limit > 0 and policy.conditions.matches(outcome)

    def _retry_delay(self, state: RouteState, outcome: AttemptOutcome) -> int | None:
        """An attempt answered ``outcome``: the backoff before retrying it if the policy and the budget allow
        one (neither a final answer nor a route timeout is ever retried), else None."""
        if state.final or state.timed_out or not self._is_retryable(state, outcome):
            return None
        return self._retry_decision(state, outcome).delay_ns

    def _attempt_timeout_retry(self, state: RouteState, started_ns: int | None) -> int | None:
        """The policy's attempt timeout cut the attempt: the backoff before retrying it, or None when the
        504 is final."""
        state.attempt_deadline_ns = None
        self._attempt_answered(state, None, "response_timeout", started_ns)
        decision = self._retry_decision(state, AttemptOutcome(http_status=504, attempt_timed_out=True))
        if decision.delay_ns is None:
            state.final = True
        return decision.delay_ns

    def _route_backoff(self, request_id: int, state: RouteState, delay_ns: int) -> None:
        """The attempt was discarded: the next one starts after ``delay_ns``."""
        state.attempt += 1
        if state.timers is not None:
            state.timers.attempt_ended(self._now_ns)
        state.attempt_deadline_ns = None
        state.wake_ns, state.waiting = self._now_ns + delay_ns, Waiting.BACKOFF
        self._route_rearm(request_id, state)

    def _route_attempt_started(self, request_id: int, state: RouteState) -> None:
        """The attempt's request head went out: its response and attempt timeouts start."""
        if state.timers is not None:
            state.timers.attempt_started(self._now_ns)
        policy = state.policy
        if policy is not None and policy.attempt_timeout_ns is not None:
            state.attempt_deadline_ns = self._now_ns + policy.attempt_timeout_ns
        self._route_rearm(request_id, state)

    def _route_activity(self, request_id: int, state: RouteState) -> None:
        """Bytes moved: the idle timeout starts again."""
        timers = state.timers
        if timers is not None and timers.timeouts.idle_ns is not None:
            timers.activity(self._now_ns)
            self._route_rearm(request_id, state)

    # ---------------------------------------------------------------- the route timer

    def _route_rearm(self, request_id: int, state: RouteState) -> None:
        candidates = [state.wake_ns, state.attempt_deadline_ns]
        if state.timers is not None:
            candidates.append(state.timers.next_deadline_ns())
        due = [deadline for deadline in candidates if deadline is not None]
        deadline_ns = min(due) if due else None
        if deadline_ns != state.armed_ns:
            state.armed_ns = deadline_ns
            if deadline_ns is None:
                self._deadlines.cancel(("route", request_id))
            else:
                self._deadlines.set(("route", request_id), deadline_ns)

    def _route_done(self, request_id: int, state: RouteState) -> None:
        """The request is over: no more timers."""
        state.wake_ns = state.attempt_deadline_ns = None
        state.timers = None
        if state.armed_ns is not None:
            state.armed_ns = None
            self._deadlines.cancel(("route", request_id))

    # ---------------------------------------------------------------- metrics

    def _route_answered(self, state: RouteState, status: int | None, error_label: str | None) -> None:
        """The final answer of a routed request (once)."""
        if state.recorded:
            return
        state.recorded = True
        self.telemetry.traffic.route_finished(state.labels, status, error_label, self._now_ns - state.started_ns)
        if state.attempt > 1 and status is not None and status < 500 and error_label is None:
            self.telemetry.traffic.retry_counts(state.labels).successes += 1

    def _attempt_sent(self, state: RouteState) -> None:
        self.telemetry.traffic.backend_requested(state.labels, state.backend_labels)

    def _attempt_failed(self, state: RouteState, exchange: Exchange | StreamExchange, error: ProxyError) -> bool:
        """Count a failed attempt on the backend when one was made (an endpoint was picked and the error is an
        attempt's, not the route's own answer); True if so, for the caller's retry decision."""
        attempted = error.kind in ATTEMPT_FAILURES and exchange.endpoint is not None
        if attempted:
            self._attempt_answered(state, error.status, error.kind.label, attempt_started_ns(exchange))
        return attempted

    def _attempt_answered(
        self, state: RouteState, status: int | None, error_label: str | None, started_ns: int | None
    ) -> None:
        elapsed_ns = self._now_ns - (started_ns if started_ns is not None else state.started_ns)
        self.telemetry.traffic.backend_answered(state.labels, state.backend_labels, status, error_label, elapsed_ns)

    # ---------------------------------------------------------------- inbound rate limit

    def _rate_limited(self, identity: str | None) -> ProxyError | None:
        limiter = self._rate_limiter
        if limiter is None:
            return None
        decision = limiter.check(identity, self._now_ns)
        if decision.allowed:
            return None
        scope = decision.limited_by or "total"
        self.telemetry.traffic.rate_limited[scope] = self.telemetry.traffic.rate_limited.get(scope, 0) + 1
        return answer_error(rate_limited_answer(decision))


def attempt_started_ns(exchange: Exchange | StreamExchange) -> int | None:
    """When the current attempt's balancer lease started, if it holds one (the route's start otherwise)."""
    return exchange.handle.started_ns if exchange.handle is not None else None
