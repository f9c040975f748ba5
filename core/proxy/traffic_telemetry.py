"""Traffic-management metrics as plain data: per route, per route backend, retries and balancers.

Names and labels follow Linkerd's policy-based families (``outbound_http_route_*``,
``outbound_http_balancer_endpoints``) rather than the ServiceProfile-era ``route_*`` ones (``rt_route``,
``dst``): those have no backend dimension, so a weighted split could not be seen in them, and the retry
counters Linkerd added for HTTPRoutes (``outbound_http_route_retry_*``) exist only in the newer families.
Rendering (Prometheus text) is the admin adapter's job (adapters/prometheus.py).

Recorded only for requests a route matched: a proxy without routes pays nothing here. A route rule is
named by its parent (the Service), its route and the rule (Tether's ``route_rule`` label: the rule's
name or index, since one route's rules may send to different backends). Durations are in seconds with
Linkerd's buckets (coarser for the route, finer for each backend). Balancer gauges are read at rendering
time from the live balancers (``balancers``), keyed by (service, kind).

Cardinality: bounded by configuration (routes x rules x backends) and by the proxy's backend limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tether.core.traffic.balancer import Balancer

ROUTE_DURATION_BUCKETS_S = (0.05, 0.5, 1.0, 10.0)
BACKEND_DURATION_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0)
NS_PER_S = 1_000_000_000

# Linkerd's ``error`` label values for failures that have no status of their own (a proxy error kind's
# label -> Linkerd's name); answers with a status of their own (a fault, a rate limit) carry the status.
ERROR_LABELS = {
    "failfast": "FAIL_FAST",
    "load_shed": "LOAD_SHED",
    "request_timeout": "REQUEST_TIMEOUT",
    "response_timeout": "RESPONSE_HEADERS_TIMEOUT",
    "idle_timeout": "IDLE_TIMEOUT",
    "upstream_closed": "RESET",
    "connect_failed": "IO",
    "connect_timeout": "IO",
    "cancelled": "CANCEL",
}


@dataclass(frozen=True, slots=True, order=True)
class RouteLabels:
    """One route rule under one parent Service."""

    parent_namespace: str
    parent_name: str
    parent_port: str
    route_kind: str
    route_namespace: str
    route_name: str
    route_rule: str


@dataclass(frozen=True, slots=True, order=True)
class BackendLabels:
    """One backend a route rule sends to (the parent Service itself when the rule names none)."""

    backend_namespace: str
    backend_name: str
    backend_port: str


@dataclass(slots=True)
class BucketHistogram:
    """Cumulative-on-render histogram over fixed upper bounds (seconds); last slot: above the largest."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    count: int = 0
    sum_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def record_ns(self, duration_ns: int) -> None:
        seconds = max(0, duration_ns) / NS_PER_S
        self.count += 1
        self.sum_s += seconds
        for index, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[index] += 1
                return
        self.counts[-1] += 1


@dataclass(slots=True)
class RetryCounts:
    """Linkerd's outbound_http_route_retry_* counters for one route rule."""

    requests: int = 0  # retries sent
    successes: int = 0  # requests that succeeded after at least one retry
    limit_exceeded: int = 0  # a retryable failure with the policy's limit used up
    overflow: int = 0  # a retry the service's budget refused


def status_labels(status: int | None, error_label: str | None) -> tuple[str, str]:
    """(http_status, error) label values: a Linkerd error name, or the status the client got."""
    name = ERROR_LABELS.get(error_label or "")
    if name is not None:
        return "", name
    return (str(status) if status is not None else ""), ""


@dataclass(slots=True)
class TrafficTelemetry:
    route_statuses: dict[tuple[RouteLabels, str, str], int] = field(default_factory=dict)
    route_durations: dict[RouteLabels, BucketHistogram] = field(default_factory=dict)
    backend_requests: dict[tuple[RouteLabels, BackendLabels], int] = field(default_factory=dict)
    backend_statuses: dict[tuple[RouteLabels, BackendLabels, str, str], int] = field(default_factory=dict)
    backend_durations: dict[tuple[RouteLabels, BackendLabels], BucketHistogram] = field(default_factory=dict)
    retries: dict[RouteLabels, RetryCounts] = field(default_factory=dict)
    balancers: dict[tuple[str, str], Balancer] = field(default_factory=dict)
    # Requests the inbound side's local rate limit refused, by the bucket that refused them.
    rate_limited: dict[str, int] = field(default_factory=dict)

    def route_finished(self, route: RouteLabels, status: int | None, error_label: str | None, elapsed_ns: int) -> None:
        """A routed request got its final answer (or was abandoned: ``error_label`` "cancelled")."""
        key = (route, *status_labels(status, error_label))
        self.route_statuses[key] = self.route_statuses.get(key, 0) + 1
        histogram = self.route_durations.get(route)
        if histogram is None:
            histogram = self.route_durations[route] = BucketHistogram(ROUTE_DURATION_BUCKETS_S)
        histogram.record_ns(elapsed_ns)

    def backend_requested(self, route: RouteLabels, backend: BackendLabels) -> None:
        """One attempt went to ``backend`` (retries count again, as Linkerd counts them)."""
        key = (route, backend)
        self.backend_requests[key] = self.backend_requests.get(key, 0) + 1

    def backend_answered(
        self, route: RouteLabels, backend: BackendLabels, status: int | None, error_label: str | None, elapsed_ns: int
    ) -> None:
        """One attempt ended: its response head arrived, or it failed before one."""
        key = (route, backend, *status_labels(status, error_label))
        self.backend_statuses[key] = self.backend_statuses.get(key, 0) + 1
        histogram = self.backend_durations.get((route, backend))
        if histogram is None:
            histogram = self.backend_durations[(route, backend)] = BucketHistogram(BACKEND_DURATION_BUCKETS_S)
        histogram.record_ns(elapsed_ns)

    def retry_counts(self, route: RouteLabels) -> RetryCounts:
        counts = self.retries.get(route)
        if counts is None:
            counts = self.retries[route] = RetryCounts()
        return counts

    def merge_from(self, other: TrafficTelemetry) -> None:
        """Add ``other``'s tables (another proxy role's; their label sets differ) for one rendering."""
        self.route_statuses.update(other.route_statuses)
        self.route_durations.update(other.route_durations)
        self.backend_requests.update(other.backend_requests)
        self.backend_statuses.update(other.backend_statuses)
        self.backend_durations.update(other.backend_durations)
        self.retries.update(other.retries)
        self.balancers.update(other.balancers)
        for key, value in other.rate_limited.items():
            self.rate_limited[key] = self.rate_limited.get(key, 0) + value
