"""Scenario files: YAML that builds a World. See sim/scenarios/basic.yaml for every field, and
meshed-http.yaml and grpc.yaml for the meshed topology (``meshed``, ``inbound``) and gRPC apps; identity
and mTLS (``identity``, ``proxies[].identity``) are read by scenario_identity.py (mtls-*.yaml use them). The fields
of traffic experiments (latency models, windows, chained services, routes) are read by scenario_fields.py;
slow-endpoint.yaml, retry-storm.yaml, failing-endpoint.yaml, flaky-endpoint.yaml and canary.yaml use them.
``proxies[].config`` takes every limit of the proxy's configuration file (core/config_file.py), the circuit
breaker's included (flaky-endpoint.yaml turns on its success-rate detector).

Errors name the file, the field (as a path such as ``clients[0].rate_per_s``) and what to write instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from tether.core.config import BALANCERS, MS, ConfigError, ProxyConfig
from tether.core.config_file import ConfigFileError, FieldReader, read_proxy_config
from tether.sim.apps import ServerSpec, WorkloadSpec
from tether.sim.grpc_apps import GrpcWorkloadSpec
from tether.sim.identity_host import HostIdentity
from tether.sim.network import LinkSpec
from tether.sim.scenario_fields import (
    ARRIVALS,
    http_server_spec,
    read_calls,
    read_route_config,
)
from tether.sim.scenario_identity import check_identity_hosts, host_identities, read_identity_spec, route_identities
from tether.sim.tcp_apps import TcpWorkloadSpec
from tether.sim.world import Fault, World

S = 1_000_000_000


# A scenario file is wrong: the same error, with the file, the field and the fix, as any config file.
ScenarioError = ConfigFileError


@dataclass(slots=True)
class Scenario:
    source: str
    data: Mapping[str, Any]
    duration_ns: int
    default_seed: int
    balancer: str | None = None  # the scenario's ``balancer:``, for proxies whose config names none

    def build(self, seed: int, *, keep_trace: bool = False, balancer: str | None = None) -> World:
        """A world for ``seed``; ``balancer`` (as ``tether sim --balancer``) overrides every proxy's."""
        if balancer is not None and balancer not in BALANCERS:
            raise ScenarioError(self.source, "balancer", f"{balancer!r} is not a balancer", _BALANCER_FIX)
        return _build(self, seed, keep_trace=keep_trace, balancer=balancer)

    def shortened(self, duration_s: float) -> Scenario:
        """The same scenario with another ``duration_s`` (clients stop with it unless they say otherwise)."""
        return scenario_from_mapping({**self.data, "duration_s": duration_s}, self.source)


_BALANCER_FIX = f"use one of {', '.join(BALANCERS)}"


def load_scenario(path: str | Path) -> Scenario:
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ScenarioError(source, "(file)", error.strerror or str(error), "check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ScenarioError(source, "(file)", f"not valid YAML ({error})", "fix the syntax") from None
    return scenario_from_mapping(data, source)


def scenario_from_mapping(data: object, source: str) -> Scenario:
    if not isinstance(data, Mapping):
        raise ScenarioError(source, "(top level)", "is not a mapping", "start with 'duration_s: 30' and friends")
    top = FieldReader(source, "", data)
    top.known(
        "description",
        "duration_s",
        "seed",
        "network",
        "links",
        "proxies",
        "servers",
        "clients",
        "faults",
        "tcp_servers",
        "tcp_clients",
        "grpc_servers",
        "grpc_clients",
        "balancer",
        "identity",
    )
    duration_ns = int(top.number("duration_s", 30, minimum=0.001) * S)
    seed = int(top.number("seed", 1))
    balancer = None
    if "balancer" in data:
        balancer = top.text("balancer")
        if balancer not in BALANCERS:
            raise top.fail("balancer", f"{balancer!r} is not a balancer", _BALANCER_FIX)
    scenario = Scenario(source, data, duration_ns, seed, balancer)
    _build(scenario, seed)  # validate everything now, so errors surface before a run starts
    return scenario


def _build(scenario: Scenario, seed: int, *, keep_trace: bool = False, balancer: str | None = None) -> World:
    top = FieldReader(scenario.source, "", scenario.data)
    network = top.child("network")
    network.known("latency_ms", "loss", "mss")
    latency_min, latency_tail = network.latency("latency_ms", (0.2, 0.1))
    default_link = LinkSpec(
        latency_min_ns=latency_min, latency_tail_mean_ns=latency_tail, loss=network.number("loss", 0.0, maximum=0.9)
    )
    mss = int(network.number("mss", 65536, minimum=1))
    world = World(
        seed, default_link=default_link, mss=mss, keep_trace=keep_trace, replay_hint=f"tether sim {scenario.source}"
    )
    ports = _Ports()
    identity = read_identity_spec(top)
    hosts = host_identities(top.items("proxies"), identity)
    check_identity_hosts(identity, hosts, top)
    if identity is not None:
        world.enable_identity(identity)
        ports.claim(top.child("identity"), "port", identity.host, identity.port)
    for server in top.items("servers"):
        spec = http_server_spec(server, _server_spec(server, ports, default_port=8080, http=True))
        world.add_server(server.text("host"), spec, calls=read_calls(server))
    for server in top.items("grpc_servers"):
        world.add_grpc_server(server.text("host"), _server_spec(server, ports, default_port=50051))
    for proxy in top.items("proxies"):
        _add_proxy(world, proxy, ports, hosts, balancer=balancer, default_balancer=scenario.balancer)
    for host, who in hosts.items():
        world.add_identity(host, who)
    for client in top.items("clients"):
        _add_client(world, client, scenario.duration_ns)
    for client in top.items("grpc_clients"):
        _add_grpc_client(world, client, scenario.duration_ns)
    for server in top.items("tcp_servers"):
        server.known("host", "port", "server_first")
        port = int(server.number("port", 9000, minimum=1))
        ports.claim(server, "port", server.text("host"), port)
        world.add_tcp_server(server.text("host"), port, server_first=bool(server.data.get("server_first", False)))
    for client in top.items("tcp_clients"):
        client.known("host", "target", "rate_per_s", "start_s", "stop_s", "payload_bytes", "server_first", "timeout_s")
        world.add_tcp_client(
            client.text("host"),
            TcpWorkloadSpec(
                target=client.address(client.data.get("target"), "target"),
                rate_per_s=client.number("rate_per_s", 20, minimum=0.001, maximum=100_000),
                start_ns=int(client.number("start_s", 0) * S),
                stop_ns=int(client.number("stop_s", scenario.duration_ns / S) * S),
                payload_bytes=client.pair("payload_bytes", (1, 4096)),
                server_first=bool(client.data.get("server_first", False)),
                timeout_ns=int(client.number("timeout_s", 60, minimum=0.001) * S),
            ),
        )
    for link in top.items("links"):
        link.known("between", "latency_ms", "loss")
        a, b = _two_hosts(link, "between", world)
        low, tail = link.latency("latency_ms", (latency_min / MS, latency_tail / MS))
        world.set_link(
            a, b, LinkSpec(latency_min_ns=low, latency_tail_mean_ns=tail, loss=link.number("loss", 0.0, maximum=0.9))
        )
    for fault in top.items("faults"):
        world.schedule(_fault(fault, world))
    return world


class _Ports:
    """Which (host, port) pairs something listens on already: two listeners on one port is a mistake."""

    def __init__(self) -> None:
        self._taken: set[tuple[str, int]] = set()

    def claim(self, reader: FieldReader, key: str, host: str, port: int) -> None:
        if (host, port) in self._taken:
            raise reader.fail(key, f"{host}:{port} already has a listener", "give each app and proxy its own port")
        self._taken.add((host, port))


HTTP_SERVER_KEYS = ("latency", "failure_status", "windows", "calls")


def _server_spec(server: FieldReader, ports: _Ports, *, default_port: int, http: bool = False) -> ServerSpec:
    server.known("host", "port", "latency_ms", "failure_rate", *(HTTP_SERVER_KEYS if http else ()))
    low, tail = server.latency("latency_ms", (1.0, 2.0))
    port = int(server.number("port", default_port, minimum=1, maximum=65535))
    ports.claim(server, "port", server.text("host"), port)
    return ServerSpec(
        port=port,
        latency_min_ns=low,
        latency_tail_mean_ns=tail,
        failure_rate=server.number("failure_rate", 0.0, maximum=1.0),
    )


OUTBOUND_KEYS = ("port", "to", "service", "routes", "meshed", "config", "route_config")


def _add_proxy(
    world: World,
    proxy: FieldReader,
    ports: _Ports,
    hosts: dict[str, HostIdentity],
    *,
    balancer: str | None,
    default_balancer: str | None,
) -> None:
    """An outbound proxy, an inbound one (``inbound: {port, to, config}``), or both on one host.

    An entry with ``inbound`` and none of the outbound keys runs only the inbound role. The balancer is
    ``balancer`` (the command line's) if given, else the proxy config's, else the scenario's.
    """
    proxy.known("host", *OUTBOUND_KEYS, "inbound", "identity")
    host = proxy.text("host")
    if "inbound" in proxy.data:
        _add_inbound(world, host, proxy.child("inbound"), ports, balancer=balancer)
        if not any(key in proxy.data for key in OUTBOUND_KEYS):
            return
    endpoints = [proxy.address(item, "to") for item in proxy.data.get("to", [])]
    routes = {
        str(name): [proxy.address(item, f"routes.{name}") for item in items]
        for name, items in dict(proxy.child("routes").data).items()
    }
    meshed_node = proxy.child("meshed")
    meshed = {str(name): int(meshed_node.number(str(name), minimum=1, maximum=65535)) for name in meshed_node.data}
    for name in meshed:
        if name not in routes:
            raise meshed_node.fail(name, "names no route", "add it under routes, or remove it from meshed")
    port = int(proxy.number("port", 4140, minimum=1, maximum=65535))
    ports.claim(proxy, "port", host, port)
    config = _proxy_config(proxy.child("config"), balancer, default_balancer)
    world.add_proxy(
        host,
        port,
        endpoints,
        config,
        routes=routes,
        service=proxy.text("service", "default"),
        meshed=meshed,
        route_config=read_route_config(proxy, "route_config"),
        identities=route_identities(proxy, routes, meshed, hosts, world.control_plane and world.control_plane.spec),
    )


def _proxy_config(node: FieldReader, balancer: str | None, default_balancer: str | None) -> ProxyConfig:
    """``read_proxy_config`` plus ``balancer`` (validated here until the shared reader learns it)."""
    config = read_proxy_config(node, extra_fields=("balancer",))
    chosen = balancer or (node.text("balancer") if "balancer" in node.data else None) or default_balancer
    if chosen is None:
        return config
    try:
        return replace(config, balancer=chosen)
    except ConfigError as error:
        raise node.fail("balancer", error.problem, error.fix) from None


def _add_inbound(world: World, host: str, inbound: FieldReader, ports: _Ports, *, balancer: str | None) -> None:
    inbound.known("port", "to", "service", "config")
    port = int(inbound.number("port", 4143, minimum=1, maximum=65535))
    ports.claim(inbound, "port", host, port)
    workload_port = int(inbound.number("to", minimum=1, maximum=65535))
    # The inbound role detects protocols unless told otherwise, as `tether proxy`'s does.
    config_node = inbound.child("config")
    config = _proxy_config(
        FieldReader(config_node.source, config_node.path, {"protocol": "detect", **config_node.data}), balancer, None
    )
    world.add_inbound_proxy(host, port, workload_port, config, service=inbound.text("service", "inbound"))


_WORKLOAD_KEYS = (
    "host",
    "target",
    "authority",
    "rate_per_s",
    "start_s",
    "stop_s",
    "connections",
    "request_bytes",
    "response_bytes",
    "timeout_s",
    "arrivals",
)


def _workload(
    client: FieldReader, duration_ns: int, *, rate: float, connections: int, sizes: tuple[tuple[int, int], ...]
) -> dict[str, Any]:
    """The fields HTTP and gRPC clients share, with their own defaults (rate, connections, body sizes)."""
    request_bytes, response_bytes = sizes
    return {
        "target": client.address(client.data.get("target"), "target"),
        "authority": client.text("authority", "default"),
        "rate_per_s": client.number("rate_per_s", rate, minimum=0.001, maximum=1_000_000),
        "start_ns": int(client.number("start_s", 0) * S),
        "stop_ns": int(client.number("stop_s", duration_ns / S) * S),
        "max_connections": int(client.number("connections", connections, minimum=1)),
        "request_bytes": client.pair("request_bytes", request_bytes),
        "response_bytes": client.pair("response_bytes", response_bytes),
        "timeout_ns": int(client.number("timeout_s", 60, minimum=0.001) * S),
        "arrivals": _arrivals(client),
    }


def _arrivals(client: FieldReader) -> str:
    arrivals = client.text("arrivals", "poisson")
    if arrivals not in ARRIVALS:
        raise client.fail("arrivals", f"{arrivals!r} is not an arrival process", f"use one of {', '.join(ARRIVALS)}")
    return arrivals


def _add_client(world: World, client: FieldReader, duration_ns: int) -> None:
    client.known(*_WORKLOAD_KEYS, "chunked_ratio")
    shared = _workload(client, duration_ns, rate=100, connections=8, sizes=((0, 0), (64, 512)))
    spec = WorkloadSpec(**shared, chunked_ratio=client.number("chunked_ratio", 0.25, maximum=1.0))
    world.add_client(client.text("host"), spec)


def _add_grpc_client(world: World, client: FieldReader, duration_ns: int) -> None:
    client.known(*_WORKLOAD_KEYS, "connection_window")
    shared = _workload(client, duration_ns, rate=50, connections=1, sizes=((0, 1024), (64, 1024)))
    window = int(client.number("connection_window", 65_535, minimum=65_535, maximum=2**31 - 1))
    world.add_grpc_client(client.text("host"), GrpcWorkloadSpec(**shared, connection_window=window))


def _two_hosts(reader: FieldReader, key: str, world: World) -> tuple[str, str]:
    value = reader.data.get(key)
    if not isinstance(value, list) or len(value) != 2:
        raise reader.fail(key, f"{value!r} is not two host names", "write [HOST_A, HOST_B]")
    for host in value:
        if host not in world.network.hosts:
            raise reader.fail(key, f"unknown host {host!r}", f"use one of {sorted(world.network.hosts)}")
    return str(value[0]), str(value[1])


def _fault(fault: FieldReader, world: World) -> Fault:
    fault.known("kind", "at_s", "duration_s", "hosts", "one_way", "loss", "latency_ms")
    kind = fault.text("kind")
    kinds = ("partition", "crash", "loss", "latency")
    if kind not in kinds:
        raise fault.fail("kind", f"unknown fault {kind!r}", f"use one of {', '.join(kinds)}")
    hosts_value = fault.data.get("hosts")
    if kind == "crash":
        if not isinstance(hosts_value, list) or len(hosts_value) != 1 or hosts_value[0] not in world.network.hosts:
            raise fault.fail(
                "hosts",
                f"{hosts_value!r} is not one known host",
                f"write [HOST] with HOST one of {sorted(world.network.hosts)}",
            )
        hosts: tuple[str, ...] = (str(hosts_value[0]),)
    else:
        hosts = _two_hosts(fault, "hosts", world)
    extra_min, extra_tail = fault.latency("latency_ms", (0.0, 0.0)) if "latency_ms" in fault.data else (0, 0)
    return Fault(
        kind=kind,
        at_ns=int(fault.number("at_s") * S),
        duration_ns=int(fault.number("duration_s") * S),
        hosts=hosts,
        one_way=bool(fault.data.get("one_way", False)),
        loss=fault.number("loss", 0.0, maximum=0.9),
        latency_min_ns=extra_min,
        latency_tail_mean_ns=extra_tail,
    )
