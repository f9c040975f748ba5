"""What one run measured: counts, latency percentiles, success, per-endpoint load, retries, speed, timeline.

Definitions (docs/sim.md repeats them):

- a request *succeeds* when it ends with a status below 500 and, for gRPC, grpc-status 0; an opaque TCP
  session succeeds when every byte came back. Errors (timeouts, resets) and proxy answers are failures;
- latency is from the moment a client issues a request to its end, whatever the end (a request cut by the
  client's 1 s timeout counts 1 s), so a balancer that parks requests on a slow endpoint shows in the tail;
- ``endpoint_requests``: requests each HTTP server host received, across restarts;
- ``proxy_retries``: for each outbound proxy in front of HTTP servers, the requests its endpoints received
  beyond those the proxy was sent (a request that reached an endpoint once counts nothing); ``retries`` is
  their sum. Until the proxy counts its own retries this is the figure; a request a proxy answered itself
  without an attempt (a connect timeout) makes it an undercount;
- ``timeline``: per virtual second of the fault phase, requests started, succeeded, and their p99;
  ``endpoint_timeline``: per endpoint host, the requests it received in each of those seconds.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tether.sim.apps import RequestRecord
    from tether.sim.world import World

MS = 1_000_000
S = 1_000_000_000
PERCENTILES = {"p50": 499, "p90": 899, "p95": 949, "p99": 989, "p999": 998}  # cut index of 999 cuts


@dataclass(slots=True)
class RunResult:
    seed: int
    trace_hash: str
    requests: int
    responses: dict[int, int]
    errors: dict[str, int]
    latency_ms: dict[str, float | None]
    virtual_s: float
    wall_s: float
    events: int
    violations: list[str] = field(default_factory=list)
    proxy_errors: dict[str, int] = field(default_factory=dict)
    tcp_sessions_ok: int = 0  # opaque TCP sessions whose every byte came back
    grpc_statuses: dict[int, int] = field(default_factory=dict)  # gRPC calls by the grpc-status they ended with
    percentiles_ms: dict[str, float | None] = field(default_factory=dict)  # p50, p90, p95, p99, p999
    successes: int = 0
    endpoint_requests: dict[str, int] = field(default_factory=dict)
    proxy_requests: dict[str, int] = field(default_factory=dict)  # requests each proxy was sent
    retries: int = 0
    proxy_retries: dict[str, int] = field(default_factory=dict)  # the same, per outbound proxy
    balancers: list[str] = field(default_factory=list)  # the balancers the outbound proxies were given
    timeline: list[dict[str, float | int | None]] = field(default_factory=list)
    endpoint_timeline: dict[str, list[int]] = field(default_factory=dict)  # requests received per second
    identity: dict[str, object] = field(default_factory=dict)  # World.identity_report(); empty without identity

    def endpoint_requests_between(self, host: str, first_s: int, last_s: int) -> int:
        """Requests ``host`` received in virtual seconds ``first_s`` to ``last_s``, inclusive."""
        return sum(self.endpoint_timeline.get(host, [])[first_s : last_s + 1])

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.requests if self.requests else None

    @property
    def requests_per_wall_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "trace_hash": self.trace_hash,
            "requests": self.requests,
            "responses": {str(status): count for status, count in sorted(self.responses.items())},
            "errors": sum(self.errors.values()),
            "errors_by_kind": dict(sorted(self.errors.items())),
            "proxy_errors": dict(sorted(self.proxy_errors.items())),
            "tcp_sessions_ok": self.tcp_sessions_ok,
            "grpc_status": {str(code): count for code, count in sorted(self.grpc_statuses.items())},
            "latency_ms": self.latency_ms,
            "percentiles_ms": self.percentiles_ms,
            "success_rate": None if self.success_rate is None else round(self.success_rate, 6),
            "endpoint_requests": dict(self.endpoint_requests),
            "proxy_requests": dict(self.proxy_requests),
            "retries": self.retries,
            "proxy_retries": dict(self.proxy_retries),
            "balancers": self.balancers,
            "virtual_s": self.virtual_s,
            "wall_s": round(self.wall_s, 3),
            "requests_per_wall_s": round(self.requests_per_wall_s, 1),
            "events": self.events,
            "violations": self.violations,
            "timeline": self.timeline,
            "endpoint_timeline": self.endpoint_timeline,
            **({"identity": self.identity} if self.identity else {}),
        }


def summarise(world: World, wall_s: float, fault_phase_ns: int) -> RunResult:
    records = [record for client in world.clients for record in client.records if not record.probe]
    tally = _Outcomes()
    for record in records:
        tally.add(record)
    proxy_errors: dict[str, int] = {}
    proxy_requests: dict[str, int] = {}
    balancers: list[str] = []
    for name, sim_proxy in world.proxies.items():
        services = sim_proxy.proxy.stats.services.values()
        proxy_requests[name] = sum(stats.requests for stats in services)
        for stats in services:
            for kind, count in stats.proxy_errors_by_kind.items():
                proxy_errors[kind] = proxy_errors.get(kind, 0) + count
        if not name.endswith("/inbound") and sim_proxy.proxy.config.balancer not in balancers:
            balancers.append(sim_proxy.proxy.config.balancer)
    endpoint_requests = {host: tally_.requests for host, tally_ in world.tallies.items()}
    proxy_retries = {
        name: max(0, sum(endpoint_requests.get(host, 0) for host in hosts) - proxy_requests[name])
        for name, hosts in world.proxy_endpoint_hosts.items()
        if any(host in endpoint_requests for host in hosts)
    }
    return RunResult(
        seed=world.seed,
        trace_hash=world.kernel.trace.hexdigest(),
        requests=len(records),
        responses=tally.responses,
        errors=tally.errors,
        latency_ms={key: value for key, value in percentiles(tally.latencies).items() if key in ("p50", "p99", "p999")},
        percentiles_ms=percentiles(tally.latencies),
        virtual_s=world.kernel.now_ns / S,
        wall_s=wall_s,
        events=world.kernel.events_run,
        violations=list(world.violations),
        proxy_errors=proxy_errors,
        tcp_sessions_ok=tally.tcp_sessions_ok,
        grpc_statuses=tally.grpc_statuses,
        successes=tally.successes,
        endpoint_requests=endpoint_requests,
        proxy_requests=proxy_requests,
        retries=sum(proxy_retries.values()),
        proxy_retries=proxy_retries,
        balancers=balancers,
        timeline=timeline(records, fault_phase_ns),
        endpoint_timeline={
            host: [tally_.by_second.get(second, [0, 0])[0] for second in range(_seconds(fault_phase_ns))]
            for host, tally_ in world.tallies.items()
        },
    )


def _seconds(duration_ns: int) -> int:
    return max(1, -(-duration_ns // S))


class _Outcomes:
    """Counts of how requests ended, accumulated one record at a time."""

    def __init__(self) -> None:
        self.responses: dict[int, int] = {}
        self.grpc_statuses: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.latencies: list[float] = []
        self.tcp_sessions_ok = 0
        self.successes = 0

    def add(self, record: RequestRecord) -> None:
        if record.status is None and record.error is None and record.done:
            self.tcp_sessions_ok += 1
        if record.status is not None:
            self.responses[record.status] = self.responses.get(record.status, 0) + 1
        if record.grpc_status is not None:
            self.grpc_statuses[record.grpc_status] = self.grpc_statuses.get(record.grpc_status, 0) + 1
        elif record.error is not None:
            kind = record.error.split(":")[0]
            self.errors[kind] = self.errors.get(kind, 0) + 1
        if record.ended_ns is not None:
            self.latencies.append((record.ended_ns - record.started_ns) / MS)
        if succeeded(record):
            self.successes += 1


def succeeded(record: RequestRecord) -> bool:
    if not record.done or record.error is not None:
        return False
    if record.grpc_status is not None:
        return record.grpc_status == 0
    return record.status is None or record.status < 500  # None: an opaque TCP session, whole


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return dict.fromkeys(PERCENTILES)
    if len(values) == 1:
        return dict.fromkeys(PERCENTILES, round(values[0], 3))
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    return {name: round(cuts[index], 3) for name, index in PERCENTILES.items()}


def timeline(records: list[RequestRecord], fault_phase_ns: int) -> list[dict[str, float | int | None]]:
    """Per virtual second of the fault phase: requests started in it, how many succeeded, their p99 (ms)."""
    seconds = _seconds(fault_phase_ns)
    started: list[list[RequestRecord]] = [[] for _ in range(seconds)]
    for record in records:
        second = record.started_ns // S
        if second < seconds:
            started[second].append(record)
    rows: list[dict[str, float | int | None]] = []
    for second, bucket in enumerate(started):
        latencies = [(r.ended_ns - r.started_ns) / MS for r in bucket if r.ended_ns is not None]
        ok = sum(1 for record in bucket if succeeded(record))
        rows.append({"t": second, "requests": len(bucket), "ok": ok, "p99_ms": percentiles(latencies)["p99"]})
    return rows
