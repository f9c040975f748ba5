"""Routes: the model (HTTPRoute, GRPCRoute and ServiceProfile shapes as one), matching and backend choice.

Theory of operation
-------------------
The model is plain frozen data. A ``Route`` has hostnames and ``RouteRule`` s; a rule has matches
(``HttpRouteMatch`` or ``GrpcRouteMatch``, OR-ed; the conditions inside one match are AND-ed), filters
(request and response ``HeaderModifier``, ``FaultInjection``, ``MirrorPolicy``), weighted ``BackendRef`` s,
``RouteTimeouts`` and a ``RetryPolicy``. route_config.py reads Kubernetes-shaped YAML into it; the
control plane will build the same values.

``RouteTable.match(method, authority, path, query, headers)`` picks at most one (route, rule, match):

1. Candidate routes: those with no hostnames, or a hostname matching the authority's host (port ignored,
   case-insensitive; ``*.example.com`` matches any name ending in ``.example.com``, not the bare name).
2. Kind: a gRPC request (``content-type: application/grpc...``) is matched against the GRPCRoutes when
   any candidate is one, and only then; everything else against the HTTPRoutes. The two are never merged,
   as the Gateway API requires.
3. Precedence, higher first, ties going to the next criterion (``RouteTable.precedence_key``):
   - HTTP: characters of the matching non-wildcard hostname, characters of the matching hostname, then
     the Gateway API's rule criteria: exact path, then path regex, then path prefix (longest first), then
     a method match, then the most header matches, then the most query parameter matches.
   - gRPC: the two hostname criteria, then characters in the matching service, characters in the
     matching method, then the most header matches (GRPCRoute's list).
   - Remaining ties: the route listed first (the caller lists routes oldest first, standing in for the
     creation timestamp; the loader keeps file order), then the first rule, then the first match.

   The Gateway API leaves regex precedence to implementations. A regex match ranks below exact and
   above every prefix: a regex must match the whole path, so it is at least as specific as any prefix it
   overlaps, and ranking it below prefixes would make every regex rule unreachable behind a rule with no
   path (which is ``PathPrefix /``). Linkerd's proxy orders by matched length, which has the same effect.
4. A table built from a ServiceProfile (``first_match=True``) instead takes the first route, in order,
   whose condition matches, as Linkerd does for profiles.

No match: Gateway API routes answer 404 (``UNMATCHED_NOT_FOUND``); with a ServiceProfile, or no routes
at all, the request goes to the service as if unrouted (``UNMATCHED_DEFAULT``). ``RouteTable.unmatched``
says which.

Matching details: paths are compared as sent (no normalisation or percent-decoding); a prefix matches
whole segments (``/abc`` matches ``/abc``, ``/abc/`` and ``/abc/d``, not ``/abcd``; a trailing ``/`` in the
prefix is ignored); every regex must match the whole value (Python ``re`` syntax); header names are
case-insensitive and a repeated header matches if any of its values does; a query parameter is matched on
its first value, percent-decoded. ``choose_backend`` draws a weighted backend with the injected RNG.
"""

from __future__ import annotations

import enum
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from tether.core.address import parse_authority
from tether.core.traffic.retry import RetryDecision, RetryPolicy, RetryReason
from tether.core.traffic.timeouts import NO_TIMEOUTS, GrpcCode, RouteTimeouts, TimeoutKind

if TYPE_CHECKING:
    from tether.core.traffic.faults import FaultDecision, MirrorDecision

# Gateway API limits (MaxLength / MaxItems in its CRDs); route_config.py enforces the list sizes.
MAX_PATH_LENGTH = 1024
MAX_HEADER_VALUE_LENGTH = 4096
MAX_WEIGHT = 1_000_000


class PathMatchKind(enum.Enum):
    EXACT = "Exact"
    PREFIX = "PathPrefix"
    REGEX = "RegularExpression"


PATH_RANK = {PathMatchKind.EXACT: 3, PathMatchKind.REGEX: 2, PathMatchKind.PREFIX: 1}


@dataclass(frozen=True, slots=True)
class PathMatch:
    """A path condition. ``specificity(path)`` is None when it does not match."""

    kind: PathMatchKind
    value: str
    pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        assert 0 < len(self.value) <= MAX_PATH_LENGTH, self.value
        if self.kind is PathMatchKind.REGEX:
            object.__setattr__(self, "pattern", re.compile(self.value))
        else:
            assert self.value.startswith("/"), self.value

    def specificity(self, path: str) -> tuple[int, int] | None:
        """(rank of the kind, characters of the prefix) when ``path`` matches, else None."""
        if self.kind is PathMatchKind.EXACT:
            return (PATH_RANK[self.kind], 0) if path == self.value else None
        if self.kind is PathMatchKind.REGEX:
            assert self.pattern is not None
            return (PATH_RANK[self.kind], 0) if self.pattern.fullmatch(path) else None
        prefix = self.value.rstrip("/")
        if not prefix:
            return (PATH_RANK[self.kind], 0)
        if path == prefix or path.startswith(prefix + "/"):
            return (PATH_RANK[self.kind], len(prefix))
        return None


MATCH_ALL_PATHS = PathMatch(PathMatchKind.PREFIX, "/")


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header or query parameter condition: ``name`` equals ``value``, or fully matches it as a regex."""

    name: str
    value: str
    regex: bool = False
    pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        assert self.name and len(self.value) <= MAX_HEADER_VALUE_LENGTH, (self.name, self.value)
        if self.regex:
            object.__setattr__(self, "pattern", re.compile(self.value))

    def accepts(self, candidate: str) -> bool:
        if self.pattern is not None:
            return self.pattern.fullmatch(candidate) is not None
        return candidate == self.value


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRouteMatch:
    """All of: the path, every header, every query parameter, and the method (upper case) if given."""

    path: PathMatch = MATCH_ALL_PATHS
    headers: tuple[ValueMatch, ...] = ()  # names lower case
    query_params: tuple[ValueMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GrpcRouteMatch:
    """A gRPC service and method (each optional: None matches any) and headers."""

    service: str | None = None
    method: str | None = None
    headers: tuple[ValueMatch, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderModifier:
    """Gateway API header filter: set (replace), add (append a field line), remove; names lower case."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendRef:
    """A service to send to, and its share of the rule's traffic (weight 0: none)."""

    name: str
    namespace: str | None = None
    port: int | None = None
    weight: int = 1

    def __post_init__(self) -> None:
        assert 0 <= self.weight <= MAX_WEIGHT, self.weight
        assert self.port is None or 1 <= self.port <= 65535, self.port


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultAbort:
    """Answer ``http_status`` (gRPC: ``grpc_status``, or the code gRPC maps that status to) to ``ratio``
    of the requests, without sending them on."""

    http_status: int
    grpc_status: GrpcCode | None = None
    ratio: float = 1.0

    def __post_init__(self) -> None:
        assert 200 <= self.http_status <= 599 and 0.0 <= self.ratio <= 1.0, self


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultDelay:
    """Hold ``ratio`` of the requests for ``duration_ns`` before sending them on."""

    duration_ns: int
    ratio: float = 1.0

    def __post_init__(self) -> None:
        assert self.duration_ns > 0 and 0.0 <= self.ratio <= 1.0, self


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultInjection:
    """A rule's injected faults (a Tether extension; the Gateway API has no fault filter)."""

    abort: FaultAbort | None = None
    delay: FaultDelay | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MirrorPolicy:
    """Copy ``ratio`` of the requests to ``backend`` and discard its responses (Gateway API RequestMirror)."""

    backend: BackendRef
    ratio: float = 1.0

    def __post_init__(self) -> None:
        assert 0.0 <= self.ratio <= 1.0, self.ratio


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteRule:
    """One rule: where its matching requests go and what happens on the way."""

    name: str | None = None
    matches: tuple[HttpRouteMatch, ...] | tuple[GrpcRouteMatch, ...] = ()
    backends: tuple[BackendRef, ...] = ()  # empty: the parent service itself (GAMMA)
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    fault: FaultInjection | None = None
    mirrors: tuple[MirrorPolicy, ...] = ()
    timeouts: RouteTimeouts = NO_TIMEOUTS
    retry: RetryPolicy | None = None
    allow_l5d_request_headers: bool = False  # honour l5d-retry-* headers (retry.apply_retry_headers)


class RouteKind(enum.Enum):
    HTTP = "HTTPRoute"
    GRPC = "GRPCRoute"
    PROFILE = "ServiceProfile"


@dataclass(frozen=True, slots=True, order=True)
class ParentRef:
    """A Service a route attaches to (GAMMA: routes for mesh traffic name Services as parents)."""

    name: str
    namespace: str
    port: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """A named set of rules for some hostnames (none: every hostname), attached to ``parents``."""

    kind: RouteKind
    name: str
    namespace: str = "default"
    hostnames: tuple[str, ...] = ()  # lower case; "*.example.com" for a wildcard
    rules: tuple[RouteRule, ...] = ()
    parents: tuple[ParentRef, ...] = ()  # none: the route applies to whichever table it is put in


@dataclass(frozen=True, slots=True)
class RouteKey:
    """Names a rule for metrics: route kind, namespace, name and the rule's name (or its index)."""

    kind: str
    namespace: str
    name: str
    rule: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MatchedRule:
    """What ``RouteTable.match`` found: the route, the rule and the indices of the rule and match."""

    route: Route
    rule: RouteRule
    rule_index: int
    match_index: int

    @property
    def key(self) -> RouteKey:
        rule_name = self.rule.name if self.rule.name is not None else str(self.rule_index)
        return RouteKey(self.route.kind.value, self.route.namespace, self.route.name, rule_name)


UNMATCHED_NOT_FOUND = "not_found"  # Gateway API: no rule matched -> 404
UNMATCHED_DEFAULT = "default"  # no routes, or a ServiceProfile: send to the service unrouted


class RouteTable:
    """The routes of one service (or listener); see the module docstring for the precedence."""

    def __init__(self, routes: Sequence[Route], *, first_match: bool = False) -> None:
        self.routes = tuple(routes)
        self.first_match = first_match
        if first_match:
            assert all(route.kind is RouteKind.PROFILE for route in self.routes), "first_match is for profiles"
        self.unmatched = UNMATCHED_DEFAULT if first_match or not self.routes else UNMATCHED_NOT_FOUND

    def match(
        self, method: str, authority: str, path: str, query: str, headers: Sequence[tuple[str, str]]
    ) -> MatchedRule | None:
        """The rule for this request, or None (see ``unmatched``). Header names may be any case."""
        host, _port = parse_authority(authority)
        request = _Request(method.upper(), path, query, headers)
        candidates = [(index, route, _host_score(route, host)) for index, route in enumerate(self.routes)]
        applicable = [(index, route, score) for index, route, score in candidates if score is not None]
        if request.grpc_target is not None and any(route.kind is RouteKind.GRPC for _, route, _ in applicable):
            applicable = [entry for entry in applicable if entry[1].kind is RouteKind.GRPC]
        else:
            applicable = [entry for entry in applicable if entry[1].kind is not RouteKind.GRPC]
        best: tuple[tuple[int, ...], MatchedRule] | None = None
        for route_index, route, host_score in applicable:
            for rule_index, rule in enumerate(route.rules):
                for match_index, condition in enumerate(_conditions(route, rule)):
                    score = _match_score(condition, request)
                    if score is None:
                        continue
                    found = MatchedRule(route=route, rule=rule, rule_index=rule_index, match_index=match_index)
                    if self.first_match:
                        return found
                    key = (*host_score, *score, -route_index, -rule_index, -match_index)
                    if best is None or key > best[0]:
                        best = (key, found)
        return best[1] if best is not None else None


def _conditions(route: Route, rule: RouteRule) -> Sequence[HttpRouteMatch | GrpcRouteMatch]:
    # A rule without matches matches everything: Gateway API defaults to a PathPrefix "/" match.
    if rule.matches:
        return rule.matches
    return (GrpcRouteMatch(),) if route.kind is RouteKind.GRPC else (HttpRouteMatch(),)


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    query: str
    headers: Sequence[tuple[str, str]]
    _query_values: dict[str, str] | None = None
    _header_values: dict[str, list[str]] | None = None

    @property
    def grpc_target(self) -> tuple[str, str] | None:
        """(service, method) for a gRPC request with a well-formed ``/service/method`` path, else None."""
        if not any(v.startswith("application/grpc") for v in self.header_values("content-type")):
            return None
        service, slash, method = self.path[1:].partition("/")
        if not self.path.startswith("/") or not slash or not service or not method or "/" in method:
            return None
        return service, method

    def header_values(self, name: str) -> list[str]:
        if self._header_values is None:
            self._header_values = {}
            for key, value in self.headers:
                self._header_values.setdefault(key.lower(), []).append(value)
        return self._header_values.get(name, [])

    def query_value(self, name: str) -> str | None:
        if self._query_values is None:
            self._query_values = {}
            for key, value in parse_qsl(self.query, keep_blank_values=True):
                self._query_values.setdefault(key, value)  # the first value of a repeated parameter
        return self._query_values.get(name)


def _host_score(route: Route, host: str) -> tuple[int, int] | None:
    """(characters of the matching exact hostname, characters of the matching hostname), best of the
    route's hostnames; (0, 0) for a route without hostnames; None if none matches."""
    if not route.hostnames:
        return (0, 0)
    scores = []
    for hostname in route.hostnames:
        if hostname.startswith("*."):
            if host.endswith(hostname[1:]) and len(host) > len(hostname) - 1:
                scores.append((0, len(hostname)))
        elif host == hostname:
            scores.append((len(hostname), len(hostname)))
    return max(scores) if scores else None


def _match_score(condition: HttpRouteMatch | GrpcRouteMatch, request: _Request) -> tuple[int, ...] | None:
    if isinstance(condition, GrpcRouteMatch):
        return _grpc_score(condition, request)
    if condition.method is not None and condition.method != request.method:
        return None
    path_score = condition.path.specificity(request.path)
    if path_score is None:
        return None
    if not all(_header_matches(match, request) for match in condition.headers):
        return None
    for match in condition.query_params:
        value = request.query_value(match.name)
        if value is None or not match.accepts(value):
            return None
    return (*path_score, condition.method is not None, len(condition.headers), len(condition.query_params))


def _grpc_score(condition: GrpcRouteMatch, request: _Request) -> tuple[int, ...] | None:
    target = request.grpc_target
    if target is None:
        return None
    service, method = target
    if condition.service is not None and condition.service != service:
        return None
    if condition.method is not None and condition.method != method:
        return None
    if not all(_header_matches(match, request) for match in condition.headers):
        return None
    return (len(condition.service or ""), len(condition.method or ""), len(condition.headers))


def _header_matches(match: ValueMatch, request: _Request) -> bool:
    return any(match.accepts(value) for value in request.header_values(match.name))


def split_target(target: str) -> tuple[str, str]:
    """A request target (``/path?query``) as (path, query)."""
    path, _, query = target.partition("?")
    return path, query


def choose_backend(backends: Sequence[BackendRef], rng: random.Random) -> BackendRef | None:
    """One backend drawn by weight, or None when no backend has a weight above 0.

    Draws once from ``rng`` (when there is a choice to make). An empty list means the rule names no
    backends (send to the parent service); a non-empty list without weight is a rule that may send
    nowhere, which the Gateway API answers with 500.
    """
    total = sum(backend.weight for backend in backends)
    if total == 0:
        return None
    live = [backend for backend in backends if backend.weight > 0]
    if len(live) == 1:
        return live[0]
    draw = rng.randrange(total)
    for backend in live:
        if draw < backend.weight:
            return backend
        draw -= backend.weight
    raise AssertionError("weights changed during the draw")


def apply_header_modifier(modifier: HeaderModifier, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` after the filter: removed and set names dropped, set and add values appended."""
    dropped = {name for name in modifier.remove} | {name for name, _ in modifier.set}
    out = [(name, value) for name, value in headers if name.lower() not in dropped]
    out.extend(modifier.set)
    out.extend(modifier.add)
    return out


# ------------------------------------------------------------------ per-route counters


@dataclass(slots=True)
class RouteCounters:
    """What happened on one route rule, as plain counts (Linkerd's names in comments)."""

    requests: int = 0
    retries: int = 0  # outbound_http_route_retry_requests_total
    retry_limit_reached: int = 0  # outbound_http_route_retry_limit_exceeded_total
    retry_budget_exhausted: int = 0  # outbound_http_route_retry_overflow_total
    retry_body_too_large: int = 0
    fault_aborts: int = 0
    fault_delays: int = 0
    mirrored: int = 0
    mirror_skipped: int = 0
    timeouts: dict[str, int] = field(default_factory=lambda: {kind.value: 0 for kind in TimeoutKind})

    def record_retry(self, decision: RetryDecision) -> None:
        if decision.reason is RetryReason.RETRY:
            self.retries += 1
        elif decision.reason is RetryReason.LIMIT_REACHED:
            self.retry_limit_reached += 1
        elif decision.reason is RetryReason.BUDGET_EXHAUSTED:
            self.retry_budget_exhausted += 1
        elif decision.reason is RetryReason.BODY_NOT_BUFFERED:
            self.retry_body_too_large += 1

    def record_fault(self, decision: FaultDecision) -> None:
        self.fault_delays += decision.delay_ns > 0
        self.fault_aborts += decision.abort is not None

    def record_mirror(self, decision: MirrorDecision) -> None:
        if decision.ticket is not None:
            self.mirrored += 1
        else:
            self.mirror_skipped += 1

    def record_timeout(self, kind: TimeoutKind) -> None:
        self.timeouts[kind.value] += 1


class RouteStats:
    """Counters per ``RouteKey``. Bounded by configuration: one entry per configured rule that saw traffic."""

    def __init__(self) -> None:
        self._counters: dict[RouteKey, RouteCounters] = {}

    def for_rule(self, key: RouteKey) -> RouteCounters:
        counters = self._counters.get(key)
        if counters is None:
            counters = self._counters[key] = RouteCounters()
        return counters

    def items(self) -> list[tuple[RouteKey, RouteCounters]]:
        """Every rule's counters, sorted by key so renderings are stable."""
        return sorted(self._counters.items(), key=lambda item: _key_order(item[0]))


def _key_order(key: RouteKey) -> tuple[str, str, str, str]:
    return (key.kind, key.namespace, key.name, key.rule)
