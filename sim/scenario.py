"""Scenario files: YAML that builds a World. See sim/scenarios/basic.yaml for every field.

Errors name the file, the field (as a path such as ``clients[0].rate_per_s``) and what to write instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tether.core.address import Address, AddressError
from tether.core.config import MS, ConfigError, ProxyConfig
from tether.sim.apps import ServerSpec, WorkloadSpec
from tether.sim.network import LinkSpec
from tether.sim.world import Fault, World

S = 1_000_000_000
_PROXY_CONFIG_MS_FIELDS = {
    "connect_timeout_ms": "connect_timeout_ns",
    "response_timeout_ms": "response_timeout_ns",
    "idle_timeout_ms": "idle_timeout_ns",
    "pool_idle_timeout_ms": "pool_idle_timeout_ns",
    "drain_timeout_ms": "drain_timeout_ns",
    "detect_timeout_ms": "detect_timeout_ns",
}
_PROXY_CONFIG_PLAIN_FIELDS = (
    "max_header_bytes",
    "pool_max_connections_per_endpoint",
    "pool_max_idle_per_endpoint",
    "pool_max_waiters_per_endpoint",
    "max_buffered_bytes",
)


class ScenarioError(ValueError):
    def __init__(self, source: str, field: str, problem: str, fix: str) -> None:
        super().__init__(f"{source}: {field}: {problem}; {fix}")


@dataclass(slots=True)
class _Reader:
    """Reads one mapping of a scenario, remembering where it is for error messages."""

    source: str
    path: str
    data: Mapping[str, Any]

    def fail(self, key: str, problem: str, fix: str) -> ScenarioError:
        return ScenarioError(self.source, f"{self.path}{key}", problem, fix)

    def known(self, *keys: str) -> None:
        for key in self.data:
            if key not in keys:
                raise self.fail(str(key), "unknown field", f"use one of: {', '.join(keys)}")

    def number(
        self, key: str, default: float | None = None, *, minimum: float = 0.0, maximum: float | None = None
    ) -> float:
        value = self.data.get(key, default)
        if value is None:
            raise self.fail(key, "missing", "give a number")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"{value!r} is not a number", "give a number such as 10 or 0.5")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise self.fail(key, f"{value} is out of range", f"give at least {minimum}{upper}")
        return float(value)

    def text(self, key: str, default: str | None = None) -> str:
        value = self.data.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"{value!r} is not a name", "give a non-empty string")
        return value

    def address(self, value: object, key: str) -> Address:
        try:
            return Address.parse(str(value))
        except AddressError as error:
            raise self.fail(key, str(error), "write HOST:PORT, for example backend-1:8080") from None

    def child(self, key: str) -> _Reader:
        value = self.data.get(key, {})
        if not isinstance(value, Mapping):
            raise self.fail(key, "is not a mapping", "write key: value pairs under it")
        return _Reader(self.source, f"{self.path}{key}.", value)

    def items(self, key: str) -> list[_Reader]:
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise self.fail(key, "is not a list", "write one '- ' entry per item")
        readers = []
        for index, item in enumerate(value):
            if not isinstance(item, Mapping):
                raise self.fail(f"{key}[{index}]", "is not a mapping", "write key: value pairs")
            readers.append(_Reader(self.source, f"{self.path}{key}[{index}].", item))
        return readers

    def pair(self, key: str, default: tuple[int, int]) -> tuple[int, int]:
        value = self.data.get(key, list(default))
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) for v in value)
            or value[0] < 0
            or value[0] > value[1]
        ):
            raise self.fail(key, f"{value!r} is not a range", "write [LOW, HIGH] with 0 <= LOW <= HIGH")
        return int(value[0]), int(value[1])

    def latency(self, key: str, default_ms: tuple[float, float]) -> tuple[int, int]:
        node = self.child(key)
        node.known("min", "tail_mean")
        return (int(node.number("min", default_ms[0]) * MS), int(node.number("tail_mean", default_ms[1]) * MS))


@dataclass(slots=True)
class Scenario:
    source: str
    data: Mapping[str, Any]
    duration_ns: int
    default_seed: int

    def build(self, seed: int, *, keep_trace: bool = False) -> World:
        return _build(self, seed, keep_trace=keep_trace)


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
    top = _Reader(source, "", data)
    top.known("description", "duration_s", "seed", "network", "links", "proxies", "servers", "clients", "faults")
    duration_ns = int(top.number("duration_s", 30, minimum=0.001) * S)
    seed = int(top.number("seed", 1))
    scenario = Scenario(source, data, duration_ns, seed)
    _build(scenario, seed)  # validate everything now, so errors surface before a run starts
    return scenario


def _build(scenario: Scenario, seed: int, *, keep_trace: bool = False) -> World:
    top = _Reader(scenario.source, "", scenario.data)
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
    for server in top.items("servers"):
        server.known("host", "port", "latency_ms", "failure_rate")
        low, tail = server.latency("latency_ms", (1.0, 2.0))
        world.add_server(
            server.text("host"),
            ServerSpec(
                port=int(server.number("port", 8080, minimum=1)),
                latency_min_ns=low,
                latency_tail_mean_ns=tail,
                failure_rate=server.number("failure_rate", 0.0, maximum=1.0),
            ),
        )
    for proxy in top.items("proxies"):
        _add_proxy(world, proxy)
    for client in top.items("clients"):
        _add_client(world, client, scenario.duration_ns)
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


def _add_proxy(world: World, proxy: _Reader) -> None:
    proxy.known("host", "port", "to", "service", "routes", "config")
    endpoints = [proxy.address(item, "to") for item in proxy.data.get("to", [])]
    routes = {
        str(host): [proxy.address(item, f"routes.{host}") for item in items]
        for host, items in dict(proxy.data.get("routes", {})).items()
    }
    options = proxy.child("config")
    options.known(*_PROXY_CONFIG_MS_FIELDS, *_PROXY_CONFIG_PLAIN_FIELDS, "protocol")
    values: dict[str, int | str] = {}
    if "protocol" in options.data:
        values["protocol"] = options.text("protocol")
    for key, field_name in _PROXY_CONFIG_MS_FIELDS.items():
        if key in options.data:
            values[field_name] = int(options.number(key) * MS)
    for key in _PROXY_CONFIG_PLAIN_FIELDS:
        if key in options.data:
            values[key] = int(options.number(key))
    try:
        config = ProxyConfig(**values)
    except ConfigError as error:
        raise options.fail(error.field, str(error), "see docs/configuration.md") from None
    world.add_proxy(
        proxy.text("host"),
        int(proxy.number("port", 4140, minimum=1)),
        endpoints,
        config,
        routes=routes,
        service=proxy.text("service", "default"),
    )


def _add_client(world: World, client: _Reader, duration_ns: int) -> None:
    client.known(
        "host",
        "target",
        "authority",
        "rate_per_s",
        "start_s",
        "stop_s",
        "connections",
        "request_bytes",
        "response_bytes",
        "chunked_ratio",
        "timeout_s",
    )
    spec = WorkloadSpec(
        target=client.address(client.data.get("target"), "target"),
        authority=client.text("authority", "default"),
        rate_per_s=client.number("rate_per_s", 100, minimum=0.001, maximum=1_000_000),
        start_ns=int(client.number("start_s", 0) * S),
        stop_ns=int(client.number("stop_s", duration_ns / S) * S),
        max_connections=int(client.number("connections", 8, minimum=1)),
        request_bytes=client.pair("request_bytes", (0, 0)),
        response_bytes=client.pair("response_bytes", (64, 512)),
        chunked_ratio=client.number("chunked_ratio", 0.25, maximum=1.0),
        timeout_ns=int(client.number("timeout_s", 60, minimum=0.001) * S),
    )
    world.add_client(client.text("host"), spec)


def _two_hosts(reader: _Reader, key: str, world: World) -> tuple[str, str]:
    value = reader.data.get(key)
    if not isinstance(value, list) or len(value) != 2:
        raise reader.fail(key, f"{value!r} is not two host names", "write [HOST_A, HOST_B]")
    for host in value:
        if host not in world.network.hosts:
            raise reader.fail(key, f"unknown host {host!r}", f"use one of {sorted(world.network.hosts)}")
    return str(value[0]), str(value[1])


def _fault(fault: _Reader, world: World) -> Fault:
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
