"""The meshed topology in the simulator: HTTP/1.1 rides HTTP/2 between an outbound and an inbound proxy,
and server-speaks-first TCP is tunnelled once the detect timeout passes.

Runs are shortened versions of the shipped scenarios (a few virtual seconds, the faults moved early), so
the whole file takes a few seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tether.core.proxy.telemetry import TcpLabels
from tether.sim.scenario import Scenario, scenario_from_mapping
from tether.sim.world import RunResult, World

SCENARIOS = Path(__file__).parents[2] / "sim" / "scenarios"


def shortened(name: str, duration_s: float, faults: list[dict[str, Any]]) -> Scenario:
    data = yaml.safe_load((SCENARIOS / f"{name}.yaml").read_text())
    data.update(duration_s=duration_s, faults=faults)
    return scenario_from_mapping(data, name)


MESHED_FAULTS = [
    {"kind": "partition", "at_s": 1, "duration_s": 1.5, "hosts": ["out", "web-1"]},
    {"kind": "crash", "at_s": 3, "duration_s": 1, "hosts": ["web-2"]},
]


def run_meshed(seed: int, faults: list[dict[str, Any]] = MESHED_FAULTS) -> tuple[World, RunResult]:
    scenario = shortened("meshed-http", 5, faults)
    world = scenario.build(seed)
    return world, world.run(scenario.duration_ns)


def test_meshed_http_same_seed_same_trace_hash() -> None:
    (_, first), (_, second) = run_meshed(5), run_meshed(5)
    assert first.violations == [] and first.requests > 300
    assert first.trace_hash == second.trace_hash
    assert first.as_json()["responses"] == second.as_json()["responses"]


def test_meshed_http_requests_cross_one_http2_connection_per_peer() -> None:
    """Without faults, every request to web rides one HTTP/2 connection per inbound proxy, opened with a
    transport header; the outbound proxy never dials the workload port, and the inbound proxy restores
    HTTP/1.1 on its own connections to the workload."""
    world, result = run_meshed(9, faults=[])
    assert result.violations == []
    assert result.responses.get(200, 0) > 0.95 * result.requests
    outbound = world.proxies["out"].proxy.telemetry
    dialled = {labels.target_addr: count for labels, count in outbound.tcp_open_total.items() if labels.peer == "dst"}
    # One per peer for the run, and one for the liveness probes once the pool closed the idle one.
    assert dialled == {"web-1:4143": 2, "web-2:4143": 2}
    requests = {labels.target_addr: count for labels, count in outbound.request_total.items()}
    assert set(requests) == {"web-1:8080", "web-2:8080"} and min(requests.values()) > 100
    for host in ("web-1", "web-2"):
        inbound = world.proxies[f"{host}/inbound"].proxy.telemetry
        served = sum(count for labels, count in inbound.request_total.items() if labels.direction == "inbound")
        assert served == requests[f"{host}:8080"]
        # The connections in are those the outbound proxy opened: the multiplexed HTTP/2 ones.
        assert inbound.tcp_open_total[TcpLabels("inbound", "src", "")] == 2
        assert any(labels.target_addr == f"{host}:8080" for labels in inbound.tcp_open_total)


def test_meshed_http_survives_a_partition_and_a_crash() -> None:
    world, result = run_meshed(2)
    assert result.violations == []
    # The partition and the crash cost some requests (answered by the proxy), never a wrong answer.
    assert result.responses.get(200, 0) > 0.8 * result.requests
    assert set(result.responses) <= {200, 500, 502, 503, 504}
    assert world.proxies["web-2/inbound"].restarts == 1


def test_detect_timeout_tunnels_server_speaks_first_sessions() -> None:
    """Sessions whose server speaks first take at least the detect timeout (1 s outbound, 2 s inbound),
    then every byte comes back; HTTP on the same detecting port is not delayed."""
    scenario = shortened("detect-timeout", 6, [])
    world = scenario.build(3)
    result = world.run(scenario.duration_ns)
    assert result.violations == [] and result.errors == {}
    waits = {"mailer": 1.0, "app": 2.0}
    for client in world.clients:
        durations = [(r.ended_ns - r.started_ns) / 1e9 for r in client.records if r.ended_ns is not None]
        assert durations and all(r.error is None for r in client.records), client.host
        if client.host in waits:
            assert min(durations) >= waits[client.host], client.host
            assert max(durations) < waits[client.host] + 0.5, client.host
        else:
            assert max(durations) < 0.5, client.host
    assert result.tcp_sessions_ok > 30


def test_a_crash_that_never_started_restarts_nothing() -> None:
    """Healing comes before a crash scheduled past the end of the run: the host's processes, and the
    connections they hold, live on (a restart would orphan the inbound proxy's HTTP/2 connection)."""
    late = [{"kind": "crash", "at_s": 30, "duration_s": 1, "hosts": ["web-2"]}]
    world, result = run_meshed(4, faults=late)
    assert result.violations == []
    assert world.proxies["web-2/inbound"].restarts == 0
    assert result.responses.get(200, 0) > 0.97 * result.requests


# One HTTP/1.1 request at a time over the meshed pair, default limits, no fault: a 200 KB body each way.
BIG_BODY = {
    "duration_s": 2,
    "servers": [{"host": "web", "port": 8080}],
    "proxies": [
        {"host": "out", "port": 4140, "routes": {"web": ["web:8080"]}, "meshed": {"web": 4143}},
        {"host": "web", "inbound": {"port": 4143, "to": 8080}},
    ],
    "clients": [{"host": "client", "target": "out:4140", "authority": "web", "rate_per_s": 5, "connections": 1}],
}


@pytest.mark.parametrize("direction", ["request_bytes", "response_bytes"])
def test_a_body_larger_than_the_stream_window_crosses_the_meshed_pair(direction: str) -> None:
    data = {**BIG_BODY, "clients": [{**BIG_BODY["clients"][0], direction: [200_000, 200_000], "timeout_s": 10}]}
    scenario = scenario_from_mapping(data, direction)
    result = scenario.build(1).run(scenario.duration_ns)
    assert result.violations == [] and result.errors == {}, (result.errors, result.violations[:1])
