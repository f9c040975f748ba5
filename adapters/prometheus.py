"""Renders core telemetry as the Prometheus text exposition format (version 0.0.4).

Names, labels and histogram buckets are Linkerd's, so dashboards and queries written for Linkerd's proxy
(``request_total``, ``response_latency_ms_bucket``, ``tcp_open_connections``, ...) work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tether.core.identity.client import IdentityMetrics
from tether.core.proxy.stats import LATENCY_BUCKETS_MS, LatencyHistogram
from tether.core.proxy.telemetry import HttpLabels, TcpLabels, Telemetry

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
    lines.extend(extra)
    return "\n".join(lines) + "\n"


Labels = list[tuple[str, str]]


def merge(telemetries: list[Telemetry]) -> Telemetry:
    """A read-only union of several roles' telemetry; label sets never collide across directions."""
    if len(telemetries) == 1:
        return telemetries[0]
    merged = Telemetry(direction="merged")
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
