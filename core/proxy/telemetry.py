"""What the proxy counts, with Linkerd's metric names and labels, kept as plain data in core.

The machine reports events here (a request started, a response head arrived, bytes moved, a connection
opened or closed); this module keeps two views of them:

- ``services``: per destination service, for ``tether demo`` and the simulator's summaries;
- the Linkerd families, keyed by label tuples: ``request_total``, ``response_total``,
  ``response_latency_ms``, ``tcp_open_total``, ``tcp_close_total``, ``tcp_open_connections``,
  ``tcp_read_bytes_total``, ``tcp_write_bytes_total``, ``tcp_connection_duration_ms``;
- ``traffic``: routes, route backends, retries and balancers (traffic_telemetry.py).

Rendering (Prometheus text) is the admin adapter's job. TLS labels follow Linkerd: ``tls="true"`` with the
peer's identity (``client_id`` inbound, ``server_id`` outbound, both held in ``peer_id`` here), or
``tls="no_identity"`` with a ``no_tls_reason`` (mtls.py lists them; "disabled" when the proxy has no
identity). An inbound connection's labels are known only after its first bytes (and its handshake): until
then it is *unsettled*, its bytes are kept aside, and it is counted as opened once it settles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from tether.core.proxy.stats import LatencyHistogram, ProxyStats
from tether.core.proxy.traffic_telemetry import TrafficTelemetry

NO_TLS = ("no_identity", "disabled")
TlsLabel = tuple[str, str, str]  # (tls, no_tls_reason, peer identity)
NO_TLS_LABEL: TlsLabel = ("no_identity", "disabled", "")


# Labels are named tuples: they key every metric table, and a tuple hashes and compares in C where a frozen
# dataclass runs Python code for both, several times per request.
class HttpLabels(NamedTuple):
    direction: str
    authority: str
    target_addr: str
    tls: str = NO_TLS[0]
    no_tls_reason: str = NO_TLS[1]
    peer_id: str = ""


class TcpLabels(NamedTuple):
    direction: str
    peer: str  # "src": a connection a client opened to us; "dst": one we opened to an endpoint
    target_addr: str
    tls: str = NO_TLS[0]
    no_tls_reason: str = NO_TLS[1]
    peer_id: str = ""


@dataclass(slots=True)
class _OpenConnection:
    labels: TcpLabels
    opened_ns: int
    settled: bool = True
    read_before: int = 0  # bytes moved while unsettled, counted when it settles
    written_before: int = 0


def classify(status: int) -> str:
    """Linkerd's HTTP classification: a 5xx is a failure, anything else a success."""
    return "failure" if status >= 500 else "success"


@dataclass(slots=True)
class Telemetry:
    direction: str = "outbound"
    services: ProxyStats = field(default_factory=ProxyStats)
    request_total: dict[HttpLabels, int] = field(default_factory=dict)
    response_total: dict[tuple[HttpLabels, str, int, str], int] = field(default_factory=dict)  # +grpc_status
    response_latency_ms: dict[tuple[HttpLabels, int], LatencyHistogram] = field(default_factory=dict)
    tcp_open_total: dict[TcpLabels, int] = field(default_factory=dict)
    tcp_close_total: dict[TcpLabels, int] = field(default_factory=dict)
    tcp_open_connections: dict[TcpLabels, int] = field(default_factory=dict)
    tcp_read_bytes_total: dict[TcpLabels, int] = field(default_factory=dict)
    tcp_write_bytes_total: dict[TcpLabels, int] = field(default_factory=dict)
    tcp_connection_duration_ms: dict[TcpLabels, LatencyHistogram] = field(default_factory=dict)
    traffic: TrafficTelemetry = field(default_factory=TrafficTelemetry)  # routes, retries, balancers
    _open: dict[int, _OpenConnection] = field(default_factory=dict)

    # ---------------------------------------------------------------- HTTP

    def http_labels(self, authority: str, target_addr: str, tls: TlsLabel = NO_TLS_LABEL) -> HttpLabels:
        return HttpLabels(self.direction, authority, target_addr, *tls)

    def request_started(self, service: str, labels: HttpLabels) -> None:
        self.services.service(service).requests += 1
        table = self.request_total
        table[labels] = table.get(labels, 0) + 1

    def response_started(
        self, service: str, labels: HttpLabels, status: int, latency_ms: float, *, count: bool = True
    ) -> None:
        """A response head went out: its latency is recorded now, and unless ``count`` is False (gRPC,
        whose outcome is in the trailers: ``response_finished``) the response is counted too."""
        stats = self.services.service(service)
        stats.latency.record(latency_ms)
        by_status = stats.responses_by_status
        by_status[status] = by_status.get(status, 0) + 1
        if count:
            key = (labels, "failure" if status >= 500 else "success", status, "")  # classify(status), inline
            self.response_total[key] = self.response_total.get(key, 0) + 1
        histogram = self.response_latency_ms.get((labels, status))
        if histogram is None:
            histogram = self.response_latency_ms[(labels, status)] = LatencyHistogram()
        histogram.record(latency_ms)

    def response_finished(self, labels: HttpLabels, status: int, grpc_status: int | None) -> None:
        """A gRPC response ended: classified by its grpc-status (none at all, as when reset, is a failure)."""
        classification = "success" if grpc_status == 0 else "failure"
        shown = str(grpc_status) if grpc_status is not None else ""
        _add(self.response_total, (labels, classification, status, shown), 1)

    def proxy_error(self, service: str, kind_label: str) -> None:
        _add(self.services.service(service).proxy_errors_by_kind, kind_label, 1)

    def aborted(self, service: str) -> None:
        self.services.service(service).aborted += 1

    # ---------------------------------------------------------------- TCP

    def tcp_opened(
        self,
        conn_id: int,
        peer: str,
        target_addr: str,
        now_ns: int,
        tls: TlsLabel = NO_TLS_LABEL,
        *,
        settled: bool = True,
    ) -> None:
        assert conn_id not in self._open, conn_id
        labels = TcpLabels(self.direction, peer, target_addr, *tls)
        self._open[conn_id] = _OpenConnection(labels, now_ns, settled)
        if settled:
            _add(self.tcp_open_total, labels, 1)
            _add(self.tcp_open_connections, labels, 1)

    def tcp_settled(self, conn_id: int, tls: TlsLabel | None = None) -> None:
        """An unsettled connection's TLS labels are known (None: as it was opened): count it from now on."""
        connection = self._open.get(conn_id)
        if connection is None or connection.settled:
            return
        if tls is not None:
            old = connection.labels
            connection.labels = TcpLabels(old.direction, old.peer, old.target_addr, *tls)
        connection.settled = True
        labels = connection.labels
        _add(self.tcp_open_total, labels, 1)
        _add(self.tcp_open_connections, labels, 1)
        if connection.read_before:
            _add(self.tcp_read_bytes_total, labels, connection.read_before)
        if connection.written_before:
            _add(self.tcp_write_bytes_total, labels, connection.written_before)

    def tcp_read(self, conn_id: int, byte_count: int) -> None:
        connection = self._open.get(conn_id)
        if connection is not None and byte_count:
            if connection.settled:
                table, labels = self.tcp_read_bytes_total, connection.labels
                table[labels] = table.get(labels, 0) + byte_count
            else:
                connection.read_before += byte_count

    def tcp_written(self, conn_id: int, byte_count: int) -> None:
        connection = self._open.get(conn_id)
        if connection is not None and byte_count:
            if connection.settled:
                table, labels = self.tcp_write_bytes_total, connection.labels
                table[labels] = table.get(labels, 0) + byte_count
            else:
                connection.written_before += byte_count

    def tcp_closed(self, conn_id: int, now_ns: int) -> None:
        """Idempotent: closing an id that never opened (a failed connect) or closed already does nothing."""
        self.tcp_settled(conn_id)
        connection = self._open.pop(conn_id, None)
        if connection is None:
            return
        labels = connection.labels
        _add(self.tcp_close_total, labels, 1)
        _add(self.tcp_open_connections, labels, -1)
        assert self.tcp_open_connections[labels] >= 0, labels
        histogram = self.tcp_connection_duration_ms.get(labels)
        if histogram is None:
            histogram = self.tcp_connection_duration_ms[labels] = LatencyHistogram()
        histogram.record((now_ns - connection.opened_ns) / 1_000_000)


def _add(table: dict, key: object, amount: int) -> None:  # type: ignore[type-arg]
    table[key] = table.get(key, 0) + amount
