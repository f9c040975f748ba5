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

import inspect
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.proxy import Proxy
from tether.core.traffic.route_config import RouteConfig
from tether.sim.apps import CallerClient, ServerSpec, VirtualHttpServer, WorkloadClient, WorkloadSpec
from tether.sim.behaviour import Tally
from tether.sim.grpc_apps import GrpcWorkloadClient, GrpcWorkloadSpec, VirtualGrpcServer
from tether.sim.identity_host import ControlPlane, HostIdentity, IdentitySpec, SimIdentityAgent
from tether.sim.kernel import Kernel
from tether.sim.network import LinkSpec, Network
from tether.sim.proxy_host import SimProxy
from tether.sim.results import RunResult, summarise
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
# A client whose timeout is shorter than this has a deadline of its own (an experiment's 1 s): ending by it
# is an outcome the results count, not a stall. Longer timeouts are there only to catch stalls.
DEADLINE_NS_MAX = 10 * S

__all__ = ["DEADLINE_NS_MAX", "Fault", "InvariantViolation", "RunResult", "World"]


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
        self.tallies: dict[str, Tally] = {}  # what each HTTP server host received, across restarts
        self.callers: dict[str, CallerClient] = {}  # chained services' own clients, by host
        self.proxy_endpoint_hosts: dict[str, list[str]] = {}  # outbound proxy -> hosts it sends requests to
        self._grpc_specs: dict[str, ServerSpec] = {}
        # By name: the host for an outbound proxy, "HOST/inbound" for the inbound role beside a workload.
        self.proxies: dict[str, SimProxy] = {}
        self.violations: list[str] = []
        self._server_specs: dict[str, ServerSpec] = {}
        self._heal_actions: list[Callable[[], None]] = []
        self._healing = False
        self._faulted = False  # any scheduled fault or lossy link: client timeouts can then be legitimate
        self.control_plane: ControlPlane | None = None  # the identity service, once enable_identity ran
        self.identity_agents: dict[str, SimIdentityAgent] = {}  # by host

    # ---------------------------------------------------------------- building

    def _host(self, name: str) -> None:
        if name not in self.network.hosts:
            self.network.add_host(name)

    def add_server(self, host: str, spec: ServerSpec, *, calls: WorkloadSpec | None = None) -> None:
        """An HTTP server; with ``calls``, a chained service that calls the next one (through the proxy
        ``calls.target``) once for each request it handles, and answers with that call's status."""
        self._host(host)
        self._server_specs[host] = spec
        self.tallies[host] = Tally()
        if calls is not None:
            rng = self.kernel.rng_for("caller", host)
            self.callers[host] = CallerClient(self.network, host, calls, rng, self._violation)
        self.servers[host] = self._new_server(host, 0)

    def _new_server(self, host: str, restarts: int) -> VirtualHttpServer:
        return VirtualHttpServer(
            self.network,
            host,
            self._server_specs[host],
            self.kernel.rng_for("server", host, restarts),
            tally=self.tallies[host],
            caller=self.callers.get(host),
        )

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
        route_config: RouteConfig | None = None,
        identities: Mapping[str, str] | None = None,
    ) -> None:
        """An outbound proxy. ``meshed`` maps route hosts whose endpoints run an inbound proxy to its port:
        HTTP to them rides HTTP/2 to that port, opened with a transport header. ``route_config`` (retries,
        timeouts, weighted splits) is handed to the proxy when its constructor takes one (see
        ``route_keyword``), and kept on the SimProxy either way. ``identities`` maps meshed route hosts to
        the identity their endpoints prove: connections to them carry mTLS (see ``enable_identity``)."""
        self._host(host)
        extra = {ROUTE_KEYWORD: route_config} if ROUTE_KEYWORD is not None and route_config is not None else {}

        def factory(restart: int) -> Proxy:
            resolver = StaticResolver(
                default=endpoints, by_host=routes, default_name=service, meshed_hosts=meshed, identities=identities
            )
            return Proxy(config, resolver, self.kernel.rng_for("proxy", host, restart), **extra)

        self.proxies[host] = SimProxy(self.network, host, port, factory)
        self.proxies[host].route_config = route_config
        targets = [*endpoints, *(address for addresses in (routes or {}).values() for address in addresses)]
        self.proxy_endpoint_hosts[host] = list(dict.fromkeys(address.host for address in targets))

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

    def enable_identity(self, spec: IdentitySpec) -> None:
        """A control-plane host running the identity service (sim/identity_host.py); its CA is made now."""
        assert self.control_plane is None, "one control plane per world"
        self._host(spec.host)
        self.control_plane = ControlPlane(self.network, spec, self.kernel.rng_for("identity", "ca"))

    def identity_of(self, serviceaccount: str) -> str:
        """The identity name of a service account in this world's mesh."""
        assert self.control_plane is not None, "enable_identity first"
        return self.control_plane.spec.identity_of(serviceaccount)

    def add_identity(self, host: str, who: HostIdentity) -> None:
        """An identity agent for ``host``: every proxy there (outbound, inbound) gets its certificates.
        It starts at virtual time 0; requests before the first certificate arrives fail closed."""
        assert self.control_plane is not None, "enable_identity first"
        assert host not in self.identity_agents, f"{host} has an identity already"
        self._host(host)
        agent = SimIdentityAgent(
            self.network,
            host,
            who,
            self.control_plane,
            proxies=lambda: [proxy for proxy in self.proxies.values() if proxy.host == host],
            rng_for=lambda generation: self.kernel.rng_for("identity", host, generation),
        )
        self.identity_agents[host] = agent
        self.kernel.at(0, agent.start)

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
            self.servers[host] = self._new_server(host, restarts)
        if self.control_plane is not None and host == self.control_plane.spec.host:
            self.control_plane.listen()
        if host in self.identity_agents:
            self.identity_agents[host].restart()

    def _heal_servers(self) -> None:
        """Server windows are faults too: from healing on, every server behaves as its own settings say."""
        for host, spec in self._server_specs.items():
            if spec.behaviour is not None and spec.behaviour.windows:
                self._server_specs[host] = replace(spec, behaviour=replace(spec.behaviour, windows=()))
                if host in self.servers:
                    self.servers[host].behaviour = self._server_specs[host].behaviour
                self.kernel.log(host, "windows end: healing")

    def _violation(self, message: str) -> None:
        self.kernel.log("invariant", message)
        self.violations.append(f"t={self.kernel.now_ns / 1e9:.6f}s {message}")

    # ---------------------------------------------------------------- running

    def run(self, duration_ns: int, *, check: bool = False) -> RunResult:
        started = time.perf_counter()
        self._faulted = (
            bool(self._heal_actions)
            or self.network.lossy()
            or any(spec.behaviour is not None and spec.behaviour.windows for spec in self._server_specs.values())
        )
        self.kernel.run_until(duration_ns)
        self.kernel.log("world", "healing: faults end, no new requests")
        self._healing = True
        for heal in self._heal_actions:
            heal()
        self._heal_servers()
        everyone = [*self.clients, *self.callers.values()]
        all_ended = lambda: all(client.pending == 0 for client in everyone)  # noqa: E731
        self.kernel.run_until(duration_ns + GRACE_NS, stop=all_ended)
        self.kernel.run_until(self.kernel.now_ns + SETTLE_NS)
        self.network.clear_loss()  # the liveness phase runs on a healed network, as FoundationDB's unclog
        self.kernel.log("world", "liveness: probing every client's target")
        for client in self.clients:
            client.probe(PROBES, PROBE_SPACING_NS)
        self.kernel.run_until(self.kernel.now_ns + PROBE_WAIT_NS, stop=all_ended)
        self._check_liveness()
        result = summarise(self, time.perf_counter() - started, duration_ns)
        result.identity = self.identity_report()
        if check and result.violations:
            raise InvariantViolation(self.failure_message(result))
        return result

    def _misissued(self) -> dict[str, SimIdentityAgent]:
        """Hosts whose certificate is for another workload than the one they claim (``certificate_for``)."""
        return {host: agent for host, agent in self.identity_agents.items() if agent.identity != agent.certified_as}

    def _misissued_refusal(self, error: str | None) -> bool:
        return (
            error is not None
            and "mTLS handshake failed" in error
            and any(f"connect to {host}:" in error for host in self._misissued())
        )

    def refused_peers(self) -> dict[str, dict[str, object]]:
        """Each misissued host: the identity it claimed, the one its certificate names, and how many mTLS
        handshakes with it were refused. The refusal's own text names the expected identity; the world knows
        the presented one."""
        refused: dict[str, dict[str, object]] = {}
        for host, agent in sorted(self._misissued().items()):
            count = sum(
                number
                for sim_proxy in self.proxies.values()
                for message, number in sim_proxy.errors.items()
                if f"connect to {host}:" in message and "mTLS handshake failed" in message
            )
            refused[host] = {"expected": agent.identity, "presented": agent.certified_as, "refusals": count}
        return refused

    def requests_by_peer(self) -> dict[str, dict[str, int]]:
        """Per proxy, the requests it counted (``request_total``) by the identity of the peer mTLS proved:
        the server's for an outbound proxy, the client's for an inbound one; ``plaintext`` without mTLS."""
        found: dict[str, dict[str, int]] = {}
        for name, sim_proxy in sorted(self.proxies.items()):
            counts: dict[str, int] = {}
            for labels, count in sim_proxy.proxy.telemetry.request_total.items():
                peer = labels.peer_id if labels.tls == "true" else "plaintext"
                counts[peer] = counts.get(peer, 0) + count
            found[name] = dict(sorted(counts.items()))
        return found

    def identity_report(self) -> dict[str, object]:
        """Certificates issued and refused, each host's rotations and expiries, and the mTLS refusals the
        proxies logged and the proxy errors clients were answered with (by text); empty without identity."""
        if self.control_plane is None:
            return {}
        tls_errors: dict[str, int] = {}
        for sim_proxy in self.proxies.values():
            for message, count in sim_proxy.errors.items():
                if "TLS" in message:
                    tls_errors[message] = tls_errors.get(message, 0) + count
        reasons: dict[str, int] = {}
        for client in self.clients:
            for record in client.records:
                if record.proxy_error is not None and not record.probe:
                    reasons[record.proxy_error] = reasons.get(record.proxy_error, 0) + 1
        return {
            "leaf_lifetime_s": self.control_plane.spec.leaf_lifetime_s,
            "issued": dict(sorted(self.control_plane.issued.items())),
            "refused": dict(sorted(self.control_plane.refused.items())),
            "hosts": {host: agent.report.as_json() for host, agent in sorted(self.identity_agents.items())},
            "tls_errors": dict(sorted(tls_errors.items())),
            "refused_peers": self.refused_peers(),
            "requests_by_peer": self.requests_by_peer(),
            "proxy_error_reasons": dict(sorted(reasons.items())),
        }

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
        for client in [*self.clients, *self.callers.values()]:
            deadline = client.spec.timeout_ns < DEADLINE_NS_MAX
            for record in client.records:
                if not record.done:
                    self._violation(f"request {record.request_id} got neither a response nor an error")
                elif record.probe and self._misissued_refusal(record.error or record.proxy_error):
                    pass  # a declared misissued host stays refused: that is the property, not a stall
                elif record.probe and (record.error is not None or record.proxy_error is not None):
                    self._violation(
                        f"liveness: probe {record.request_id} failed after every fault healed: "
                        f"{record.error or record.proxy_error}"
                    )
                elif record.error == "client_timeout" and not faulted and not deadline:
                    # Without faults every request is answered well within the client's timeout; with
                    # faults a wedged client connection is possible, and the probes check recovery.
                    self._violation(f"request {record.request_id} timed out at the client in a run without faults")


def route_keyword() -> str | None:
    """The keyword under which ``Proxy`` takes a RouteConfig, if its constructor has one yet.

    Routes are read by the proxy in the traffic issue's wiring, which lands separately; until then the
    simulator parses and keeps them (``SimProxy.route_config``) and this returns None, so the same scenario
    files work before and after.
    """
    parameters = inspect.signature(Proxy).parameters
    for name in ("route_config", "routes"):
        if name in parameters:
            return name
    return None


ROUTE_KEYWORD = route_keyword()
