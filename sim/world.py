"""A simulated mesh: hosts running virtual apps and core proxies on one virtual network, under faults.

A run has two phases, after FoundationDB and TigerBeetle: until ``duration`` the workload runs and the
fault schedule plays; then every fault is healed, crashed hosts restart, no new requests start, and the
world runs until every request has ended (or a grace period passes). Safety invariants are checked as
events happen (a wrong or corrupt response, a request ending twice); liveness is checked at the end
(every request ended, and none by a client timeout that no crash explains).

A host runs any mix of virtual apps (HTTP, gRPC, TCP) and proxies: an outbound proxy, and beside a
workload the inbound role (a second proxy process on the same host, named ``HOST/inbound``). A crash
takes everything on the host down at once, as a pod's crash would, and its restart brings all of it back.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.proxy import Proxy
from tether.sim.apps import ServerSpec, VirtualHttpServer, WorkloadClient, WorkloadSpec
from tether.sim.grpc_apps import GrpcWorkloadClient, GrpcWorkloadSpec, VirtualGrpcServer
from tether.sim.kernel import Kernel
from tether.sim.network import LinkSpec, Network
from tether.sim.proxy_host import SimProxy
from tether.sim.tcp_apps import TcpSessionClient, TcpWorkloadSpec, VirtualEchoServer

MS = 1_000_000
S = 1_000_000_000
GRACE_NS = 120 * S
# Liveness phase: once every request of the fault phase has ended, wait for idle connections to expire
# (pool idle 10 s, client idle 5 s), then each client sends PROBES requests that must all be answered.
SETTLE_NS = 15 * S
PROBES = 10
PROBE_SPACING_NS = 100 * MS
PROBE_WAIT_NS = 60 * S


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """One scheduled fault. ``kind`` is partition, crash, loss or latency."""

    kind: str
    at_ns: int
    duration_ns: int
    hosts: tuple[str, ...]
    one_way: bool = False
    loss: float = 0.0
    latency_min_ns: int = 0
    latency_tail_mean_ns: int = 0


class InvariantViolation(AssertionError):
    """A safety or liveness property failed; the message carries the seed and the replay command."""


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
            "virtual_s": self.virtual_s,
            "wall_s": round(self.wall_s, 3),
            "events": self.events,
            "violations": self.violations,
        }


class World:
    def __init__(
        self,
        seed: int,
        *,
        default_link: LinkSpec | None = None,
        mss: int = 64 * 1024,
        keep_trace: bool = False,
        replay_hint: str = "",
    ) -> None:
        self.seed = seed
        self.kernel = Kernel(seed, keep_trace=keep_trace)
        self.network = Network(self.kernel, self.kernel.rng_for("network"), default_link=default_link, mss=mss)
        self.replay_hint = replay_hint
        self.clients: list[WorkloadClient | TcpSessionClient | GrpcWorkloadClient] = []
        self._tcp_servers: dict[str, tuple[int, bool]] = {}
        self.servers: dict[str, VirtualHttpServer] = {}
        self._grpc_specs: dict[str, ServerSpec] = {}
        # By name: the host for an outbound proxy, "HOST/inbound" for the inbound role beside a workload.
        self.proxies: dict[str, SimProxy] = {}
        self.violations: list[str] = []
        self._server_specs: dict[str, ServerSpec] = {}
        self._heal_actions: list[Callable[[], None]] = []
        self._healing = False
        self._faulted = False  # any scheduled fault or lossy link: client timeouts can then be legitimate

    # ---------------------------------------------------------------- building

    def _host(self, name: str) -> None:
        if name not in self.network.hosts:
            self.network.add_host(name)

    def add_server(self, host: str, spec: ServerSpec) -> None:
        self._host(host)
        self._server_specs[host] = spec
        self.servers[host] = VirtualHttpServer(self.network, host, spec, self.kernel.rng_for("server", host, 0))

    def add_proxy(
        self,
        host: str,
        port: int,
        endpoints: Sequence[Address],
        config: ProxyConfig,
        *,
        routes: dict[str, Sequence[Address]] | None = None,
        service: str = "default",
        meshed: Mapping[str, int] | None = None,
    ) -> None:
        """An outbound proxy. ``meshed`` maps route hosts whose endpoints run an inbound proxy to its port:
        HTTP to them rides HTTP/2 to that port, opened with a transport header."""
        self._host(host)

        def factory(restart: int) -> Proxy:
            resolver = StaticResolver(default=endpoints, by_host=routes, default_name=service, meshed_hosts=meshed)
            return Proxy(config, resolver, self.kernel.rng_for("proxy", host, restart))

        self.proxies[host] = SimProxy(self.network, host, port, factory)

    def add_inbound_proxy(
        self, host: str, port: int, workload_port: int, config: ProxyConfig, *, service: str = "inbound"
    ) -> None:
        """The inbound role beside a workload on ``host``: a second proxy process there, whose every
        connection goes to the local workload (the port a peer's transport header names, else
        ``workload_port``), as ``tether proxy``'s inbound role."""
        self._host(host)
        workload = [Address(host, workload_port)]

        def factory(restart: int) -> Proxy:
            resolver = StaticResolver(default=workload, default_name=service)
            return Proxy(config, resolver, self.kernel.rng_for("inbound", host, restart), direction="inbound")

        name = f"{host}/inbound"
        self.proxies[name] = SimProxy(self.network, host, port, factory, name=name)

    def add_grpc_server(self, host: str, spec: ServerSpec) -> None:
        self._host(host)
        self._grpc_specs[host] = spec
        VirtualGrpcServer(self.network, host, spec, self.kernel.rng_for("grpc-server", host, 0), self._violation)

    def add_grpc_client(self, host: str, spec: GrpcWorkloadSpec) -> None:
        self._host(host)
        rng = self.kernel.rng_for("grpc-workload", host)
        self.clients.append(GrpcWorkloadClient(self.network, host, spec, rng, self._violation))

    def add_tcp_server(self, host: str, port: int, *, server_first: bool) -> None:
        self._host(host)
        self._tcp_servers[host] = (port, server_first)
        VirtualEchoServer(self.network, host, port, server_first=server_first)

    def add_tcp_client(self, host: str, spec: TcpWorkloadSpec) -> None:
        self._host(host)
        rng = self.kernel.rng_for("tcp-workload", host)
        self.clients.append(TcpSessionClient(self.network, host, spec, rng, self._violation))

    def add_client(self, host: str, spec: WorkloadSpec) -> None:
        self._host(host)
        rng = self.kernel.rng_for("workload", host)
        self.clients.append(WorkloadClient(self.network, host, spec, rng, self._violation))

    def set_link(self, a: str, b: str, spec: LinkSpec) -> None:
        self._host(a)
        self._host(b)
        self.network.set_link(a, b, spec)

    def schedule(self, fault: Fault) -> None:
        for host in fault.hosts:
            assert host in self.network.hosts, f"fault names unknown host {host!r}"
        start, end = fault.at_ns, fault.at_ns + fault.duration_ns
        if fault.kind == "partition":
            a, b = fault.hosts
            self._from(start, lambda: self.network.partition(a, b, one_way=fault.one_way))
            self._until(end, lambda: self.network.heal(a, b, one_way=fault.one_way))
        elif fault.kind == "crash":
            (host,) = fault.hosts
            self._from(start, lambda: self.network.crash(host))
            self._until(end, lambda: self._restart(host))
        elif fault.kind in ("loss", "latency"):
            a, b = fault.hosts
            before = self.network.link(a, b)
            worse = LinkSpec(
                latency_min_ns=before.latency_min_ns + fault.latency_min_ns,
                latency_tail_mean_ns=before.latency_tail_mean_ns + fault.latency_tail_mean_ns,
                loss=max(before.loss, fault.loss),
            )
            self._from(start, lambda: self._set_link_logged(a, b, worse))
            self._until(end, lambda: self._set_link_logged(a, b, before))
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")

    def _from(self, start_ns: int, action: Callable[[], None]) -> None:
        """Start a fault at ``start_ns`` unless the run is already healing (a fault past the run's end)."""
        self.kernel.at(start_ns, lambda: None if self._healing else action())

    def _until(self, end_ns: int, action: Callable[[], None]) -> None:
        """Undo a fault at ``end_ns``, or when the run enters its healing phase, whichever is first."""
        done = {"yes": False}

        def once() -> None:
            if not done["yes"]:
                done["yes"] = True
                action()

        self.kernel.at(end_ns, once)
        self._heal_actions.append(once)

    def _set_link_logged(self, a: str, b: str, spec: LinkSpec) -> None:
        self.network.set_link(a, b, spec)
        self.kernel.log("network", f"link {a}<->{b} {spec}")

    def _restart(self, host: str) -> None:
        if self.network.hosts[host].alive:
            # A crash that never started (healing came first) or that an overlapping one already ended:
            # restarting the processes of a live host would orphan their open connections.
            return
        self.network.restart(host)
        restarts = self.network.hosts[host].epoch
        for sim_proxy in self.proxies.values():
            if sim_proxy.host == host:
                sim_proxy.restart()
        if host in self._grpc_specs:
            rng = self.kernel.rng_for("grpc-server", host, restarts)
            VirtualGrpcServer(self.network, host, self._grpc_specs[host], rng, self._violation)
        if host in self._tcp_servers:
            port, server_first = self._tcp_servers[host]
            VirtualEchoServer(self.network, host, port, server_first=server_first)
        if host in self.servers:
            spec = self._server_specs[host]
            self.servers[host] = VirtualHttpServer(
                self.network, host, spec, self.kernel.rng_for("server", host, restarts)
            )

    def _violation(self, message: str) -> None:
        self.kernel.log("invariant", message)
        self.violations.append(f"t={self.kernel.now_ns / 1e9:.6f}s {message}")

    # ---------------------------------------------------------------- running

    def run(self, duration_ns: int, *, check: bool = False) -> RunResult:
        started = time.perf_counter()
        self._faulted = bool(self._heal_actions) or self.network.lossy()
        self.kernel.run_until(duration_ns)
        self.kernel.log("world", "healing: faults end, no new requests")
        self._healing = True
        for heal in self._heal_actions:
            heal()
        all_ended = lambda: all(client.pending == 0 for client in self.clients)  # noqa: E731
        self.kernel.run_until(duration_ns + GRACE_NS, stop=all_ended)
        self.kernel.run_until(self.kernel.now_ns + SETTLE_NS)
        self.network.clear_loss()  # the liveness phase runs on a healed network, as FoundationDB's unclog
        self.kernel.log("world", "liveness: probing every client's target")
        for client in self.clients:
            client.probe(PROBES, PROBE_SPACING_NS)
        self.kernel.run_until(self.kernel.now_ns + PROBE_WAIT_NS, stop=all_ended)
        self._check_liveness()
        result = self._result(time.perf_counter() - started)
        if check and result.violations:
            raise InvariantViolation(self.failure_message(result))
        return result

    def failure_message(self, result: RunResult) -> str:
        shown = "\n  ".join(result.violations[:10])
        more = f"\n  (+{len(result.violations) - 10} more)" if len(result.violations) > 10 else ""
        return (
            f"{len(result.violations)} invariant violation(s) with seed {self.seed}:\n  {shown}{more}\n"
            f"python {platform.python_version()}; replay with: {self.replay_hint or 'tether sim SCENARIO'}"
            f" --seed {self.seed}"
        )

    def _check_liveness(self) -> None:
        faulted = self._faulted
        for client in self.clients:
            for record in client.records:
                if not record.done:
                    self._violation(f"request {record.request_id} got neither a response nor an error")
                elif record.probe and (record.error is not None or record.proxy_error is not None):
                    self._violation(
                        f"liveness: probe {record.request_id} failed after every fault healed: "
                        f"{record.error or record.proxy_error}"
                    )
                elif record.error == "client_timeout" and not faulted:
                    # Without faults every request is answered well within the client's timeout; with
                    # faults a wedged client connection is possible, and the probes check recovery.
                    self._violation(f"request {record.request_id} timed out at the client in a run without faults")

    def _result(self, wall_s: float) -> RunResult:
        records = [record for client in self.clients for record in client.records if not record.probe]
        tcp_sessions_ok = 0
        responses: dict[int, int] = {}
        grpc_statuses: dict[int, int] = {}
        errors: dict[str, int] = {}
        latencies: list[float] = []
        for record in records:
            if record.status is None and record.error is None and record.done:
                tcp_sessions_ok += 1
            if record.status is not None:
                responses[record.status] = responses.get(record.status, 0) + 1
            if record.grpc_status is not None:
                grpc_statuses[record.grpc_status] = grpc_statuses.get(record.grpc_status, 0) + 1
            elif record.error is not None:
                kind = record.error.split(":")[0]
                errors[kind] = errors.get(kind, 0) + 1
            if record.ended_ns is not None:
                latencies.append((record.ended_ns - record.started_ns) / MS)
        proxy_errors: dict[str, int] = {}
        for sim_proxy in self.proxies.values():
            for stats in sim_proxy.proxy.stats.services.values():
                for kind, count in stats.proxy_errors_by_kind.items():
                    proxy_errors[kind] = proxy_errors.get(kind, 0) + count
        return RunResult(
            seed=self.seed,
            trace_hash=self.kernel.trace.hexdigest(),
            requests=len(records),
            responses=responses,
            errors=errors,
            latency_ms=_percentiles(latencies),
            virtual_s=self.kernel.now_ns / S,
            wall_s=wall_s,
            events=self.kernel.events_run,
            violations=list(self.violations),
            proxy_errors=proxy_errors,
            tcp_sessions_ok=tcp_sessions_ok,
            grpc_statuses=grpc_statuses,
        )


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "p999": None}
    if len(values) == 1:
        return {"p50": round(values[0], 3), "p99": round(values[0], 3), "p999": round(values[0], 3)}
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    return {"p50": round(cuts[499], 3), "p99": round(cuts[989], 3), "p999": round(cuts[998], 3)}
