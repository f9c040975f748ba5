"""Renders core telemetry as the Prometheus text exposition format (version 0.0.4).

Names, labels and histogram buckets are Linkerd's, so dashboards and queries written for Linkerd's proxy
(``request_total``, ``response_latency_ms_bucket``, ``tcp_open_connections``, ...) work unchanged. Traffic
management adds Linkerd's policy families (``outbound_http_route_*`` per route rule and backend,
``outbound_http_balancer_endpoints``) and two of Tether's own: every balancer state per backend
(``outbound_balancer_endpoint_states``) and the inbound rate limit's refusals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from tether.core.proxy.stats import LATENCY_BUCKETS_MS, LatencyHistogram
from tether.core.proxy.telemetry import HttpLabels, TcpLabels, Telemetry
from tether.core.proxy.traffic_telemetry import BackendLabels, BucketHistogram, RouteLabels, TrafficTelemetry
from tether.core.traffic.balancer import Balancer, EndpointCounts

if TYPE_CHECKING:
    from tether.core.identity.client import IdentityMetrics  # cryptography: loaded only with identity

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(telemetries: Telemetry | Iterable[Telemetry], extra: Iterable[str] = ()) -> str:
    """One exposition for one proxy role or several (their series differ by the ``direction`` label)."""
    if isinstance(telemetries, Telemetry):
        telemetries = [telemetries]
    telemetry = merge(list(telemetries))
    lines: list[str] = []
    _counter(
        lines,
        "request_total",
        "Requests the proxy received.",
        ((_http(labels), count) for labels, count in sorted(telemetry.request_total.items())),
    )
    _counter(
        lines,
        "response_total",
        "Responses the proxy sent, by classification and status.",
        (
            (_http(labels, classification=classification, status_code=str(status), grpc_status=grpc), count)
            for (labels, classification, status, grpc), count in sorted(telemetry.response_total.items())
        ),
    )
    _histogram(
        lines,
        "response_latency_ms",
        "Time from the request head to the response head.",
        (
            (_http(labels, status_code=str(status)), histogram)
            for (labels, status), histogram in sorted(telemetry.response_latency_ms.items(), key=_by_key)
        ),
    )
    _counter(lines, "tcp_open_total", "Connections opened.", _tcp(telemetry.tcp_open_total))
    _counter(
        lines,
        "tcp_close_total",
        "Connections closed.",
        ((labels + [("errno", "")], count) for labels, count in _tcp(telemetry.tcp_close_total)),
    )
    _gauge(lines, "tcp_open_connections", "Connections open now.", _tcp(telemetry.tcp_open_connections))
    _counter(lines, "tcp_read_bytes_total", "Bytes read from peers.", _tcp(telemetry.tcp_read_bytes_total))
    _counter(lines, "tcp_write_bytes_total", "Bytes written to peers.", _tcp(telemetry.tcp_write_bytes_total))
    _histogram(
        lines,
        "tcp_connection_duration_ms",
        "Lifetime of closed connections.",
        (
            (_tcp_labels(labels), histogram)
            for labels, histogram in sorted(telemetry.tcp_connection_duration_ms.items(), key=_by_key)
        ),
    )
    _traffic(lines, telemetry.traffic)
    lines.extend(extra)
    return "\n".join(lines) + "\n"


Labels = list[tuple[str, str]]


def merge(telemetries: list[Telemetry]) -> Telemetry:
    """A read-only union of several roles' telemetry; label sets never collide across directions."""
    if len(telemetries) == 1:
        return telemetries[0]
    merged = Telemetry(direction="merged")
    for telemetry in telemetries:
        if telemetry.direction == "inbound":  # one workload, no balancing to show; its rate limit counts
            for scope, count in telemetry.traffic.rate_limited.items():
                merged.traffic.rate_limited[scope] = merged.traffic.rate_limited.get(scope, 0) + count
        else:
            merged.traffic.merge_from(telemetry.traffic)
    for name in (
        "request_total",
        "response_total",
        "response_latency_ms",
        "tcp_open_total",
        "tcp_close_total",
        "tcp_open_connections",
        "tcp_read_bytes_total",
        "tcp_write_bytes_total",
        "tcp_connection_duration_ms",
    ):
        table = getattr(merged, name)
        for telemetry in telemetries:
            table.update(getattr(telemetry, name))
    return merged


def _tls(labels: HttpLabels | TcpLabels) -> Labels:
    """Linkerd's TLS labels: the peer's identity when TLS is on (client_id inbound, server_id outbound),
    else the reason it is not."""
    if labels.tls == "true":
        name = "client_id" if labels.direction == "inbound" else "server_id"
        return [("tls", "true"), (name, labels.peer_id)]
    return [("tls", labels.tls), ("no_tls_reason", labels.no_tls_reason)]


def _http(labels: HttpLabels, **more: str) -> Labels:
    pairs = [("direction", labels.direction), ("authority", labels.authority), ("target_addr", labels.target_addr)]
    return pairs + _tls(labels) + list(more.items())


def _tcp_labels(labels: TcpLabels) -> Labels:
    return [("direction", labels.direction), ("peer", labels.peer), ("target_addr", labels.target_addr)] + _tls(labels)


def _tcp(table: Mapping[TcpLabels, int]) -> list[tuple[Labels, int]]:
    return [(_tcp_labels(labels), value) for labels, value in sorted(table.items())]


def _by_key(item: tuple[object, LatencyHistogram]) -> object:
    return item[0]


def _format(labels: Labels) -> str:
    if not labels:
        return ""
    body = ",".join(f'{name}="{_escape(value)}"' for name, value in labels)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _header(lines: list[str], name: str, help_text: str, kind: str) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")


def _counter(lines: list[str], name: str, help_text: str, samples: Iterable[tuple[Labels, int]]) -> None:
    _header(lines, name, help_text, "counter")
    lines.extend(f"{name}{_format(labels)} {value}" for labels, value in samples)


def _gauge(lines: list[str], name: str, help_text: str, samples: Iterable[tuple[Labels, int]]) -> None:
    _header(lines, name, help_text, "gauge")
    lines.extend(f"{name}{_format(labels)} {value}" for labels, value in samples)


def _histogram(lines: list[str], name: str, help_text: str, samples: Iterable[tuple[Labels, LatencyHistogram]]) -> None:
    _header(lines, name, help_text, "histogram")
    for labels, histogram in samples:
        cumulative = 0
        for bound, count in zip(LATENCY_BUCKETS_MS, histogram.counts, strict=False):
            cumulative += count
            lines.append(f"{name}_bucket{_format(labels + [('le', str(bound))])} {cumulative}")
        lines.append(f"{name}_bucket{_format(labels + [('le', '+Inf')])} {histogram.count}")
        lines.append(f"{name}_sum{_format(labels)} {histogram.sum_ms:.3f}")
        lines.append(f"{name}_count{_format(labels)} {histogram.count}")


def identity_lines(metrics: IdentityMetrics) -> list[str]:
    """Linkerd's two identity metrics: the certificate's expiry (absent before the first) and the count of
    certificates accepted."""
    lines: list[str] = []
    values = dict(metrics.samples())
    expiration = values.get("identity_cert_expiration_timestamp_seconds")
    _header(lines, "identity_cert_expiration_timestamp_seconds", "When the current certificate expires.", "gauge")
    if expiration is not None:
        lines.append(f"identity_cert_expiration_timestamp_seconds {expiration:.0f}")
    _header(lines, "identity_cert_refresh_count", "Certificates received from the identity service.", "counter")
    lines.append(f"identity_cert_refresh_count {metrics.refresh_count}")
    return lines


# ---------------------------------------------------------------- traffic management


def _traffic(lines: list[str], traffic: TrafficTelemetry) -> None:
    route_families = (
        ("outbound_http_route_retry_requests_total", "Retries sent.", "requests"),
        ("outbound_http_route_retry_successes_total", "Requests that succeeded after a retry.", "successes"),
        ("outbound_http_route_retry_limit_exceeded_total", "Retryable failures past the limit.", "limit_exceeded"),
        ("outbound_http_route_retry_overflow_total", "Retries the retry budget refused.", "overflow"),
    )
    _counter(
        lines,
        "outbound_http_route_request_statuses_total",
        "Routed requests by final status or error.",
        (
            (_route(route) + [("http_status", status), ("error", error)], count)
            for (route, status, error), count in sorted(traffic.route_statuses.items())
        ),
    )
    _seconds(
        lines,
        "outbound_http_route_request_duration_seconds",
        "Routed requests from head to final response head, retries and backoffs included.",
        ((_route(route), histogram) for route, histogram in sorted(traffic.route_durations.items(), key=_by_key)),
    )
    _counter(
        lines,
        "outbound_http_route_backend_requests_total",
        "Attempts sent to each backend of a route rule (retries count again).",
        (
            (_route(route) + _backend(backend), count)
            for (route, backend), count in sorted(traffic.backend_requests.items())
        ),
    )
    _counter(
        lines,
        "outbound_http_route_backend_response_statuses_total",
        "Attempts by status or error, per backend.",
        (
            (_route(route) + _backend(backend) + [("http_status", status), ("error", error)], count)
            for (route, backend, status, error), count in sorted(traffic.backend_statuses.items())
        ),
    )
    _seconds(
        lines,
        "outbound_http_route_backend_response_duration_seconds",
        "Attempts from dispatch to response head (or failure), per backend.",
        (
            (_route(route) + _backend(backend), histogram)
            for (route, backend), histogram in sorted(traffic.backend_durations.items(), key=_by_key)
        ),
    )
    for name, help_text, attribute in route_families:
        _counter(
            lines,
            name,
            help_text,
            ((_route(route), getattr(counts, attribute)) for route, counts in sorted(traffic.retries.items())),
        )
    _balancers(lines, traffic.balancers)
    _counter(
        lines,
        "inbound_http_rate_limited_total",
        "Requests the local rate limit refused (429), by the bucket that refused them.",
        (([("limit", scope)], count) for scope, count in sorted(traffic.rate_limited.items())),
    )


def _balancers(lines: list[str], balancers: Mapping[tuple[str, str], Balancer]) -> None:
    http = sorted((key, balancer.counts()) for key, balancer in balancers.items() if key[1] != "opaque")
    everything = sorted((key, balancer.counts()) for key, balancer in balancers.items())

    def linkerd(state: str, counts: EndpointCounts) -> int:
        # Linkerd's pending: every endpoint in the balancer that is not ready (draining ones take nothing new
        # and are on their way out, as Linkerd drops them at once).
        return counts.ready if state == "ready" else counts.pending + counts.probing + counts.ejected

    _gauge(
        lines,
        "outbound_http_balancer_endpoints",
        "Endpoints of each HTTP balancer, ready or not (pending includes ejected and probing ones).",
        (
            ([("backend_name", name), ("backend_protocol", kind), ("endpoint_state", state)], linkerd(state, counts))
            for (name, kind), counts in http
            for state in ("ready", "pending")
        ),
    )
    states = ("ready", "pending", "probing", "ejected", "draining")
    _gauge(
        lines,
        "outbound_balancer_endpoint_states",
        "Endpoints of each balancer (HTTP, h2c, opaque TCP) in each state, circuit breaking included.",
        (
            ([("backend_name", name), ("backend_protocol", kind), ("endpoint_state", state)], getattr(counts, state))
            for (name, kind), counts in everything
            for state in states
        ),
    )


def _route(route: RouteLabels) -> Labels:
    return [
        ("parent_namespace", route.parent_namespace),
        ("parent_name", route.parent_name),
        ("parent_port", route.parent_port),
        ("route_kind", route.route_kind),
        ("route_namespace", route.route_namespace),
        ("route_name", route.route_name),
        ("route_rule", route.route_rule),
    ]


def _backend(backend: BackendLabels) -> Labels:
    return [
        ("backend_namespace", backend.backend_namespace),
        ("backend_name", backend.backend_name),
        ("backend_port", backend.backend_port),
    ]


def _seconds(lines: list[str], name: str, help_text: str, samples: Iterable[tuple[Labels, BucketHistogram]]) -> None:
    _header(lines, name, help_text, "histogram")
    for labels, histogram in samples:
        cumulative = 0
        for bound, count in zip(histogram.bounds, histogram.counts, strict=False):
            cumulative += count
            lines.append(f"{name}_bucket{_format(labels + [('le', repr(bound))])} {cumulative}")
        lines.append(f"{name}_bucket{_format(labels + [('le', '+Inf')])} {histogram.count}")
        lines.append(f"{name}_sum{_format(labels)} {histogram.sum_s:.6f}")
        lines.append(f"{name}_count{_format(labels)} {histogram.count}")
