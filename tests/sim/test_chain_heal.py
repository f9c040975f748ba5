"""The chain-heal experiment (sim/scenarios/chain-heal.yaml), shortened: client -> A -> B -> C through three
outbound proxies with circuit breaking on, C failing half its requests with 503 until it heals.

What it pins: the fault at the bottom makes every proxy above eject healthy endpoints (the edge mostly fails
fast), the cascade is still going on after the heal (the edge ejects its healthy callee again, on account of
the tiers below), and yet the edge is back to every request succeeding within a bound after the heal, and
the liveness probes that end the run are answered. tests/core/traffic/test_chain_recovery.py shows why the
bound holds (each tier comes back within one backoff of the last failure it sees).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tether.core.traffic.breaker import BreakerStats
from tether.sim.results import RunResult
from tether.sim.scenario import scenario_from_mapping
from tether.sim.world import World

SCENARIO = Path(__file__).parents[2] / "sim" / "scenarios" / "chain-heal.yaml"
S = 1_000_000_000
HEAL_S = 15
DURATION_S = 30
# A 15 s fault at 50 % leaves backoffs of a few seconds (seed 1: at most about 10 s, at C's proxy, and the
# edge still ejecting after the heal); the chain's sum-of-backoffs bound with the breaker's caps would be
# 3 x (90 s + 3 s). Seed 1 is back 5 s after the heal; a stuck edge never is.
RECOVERED_BY_S = HEAL_S + 10


def edge_breaker(world: World) -> BreakerStats:
    (balancer,) = world.proxies["edge-proxy"].proxy.telemetry.traffic.balancers.values()
    stats = balancer.stats.breaker
    assert stats is not None, "circuit breaking is on in chain-heal.yaml"
    return stats


@pytest.fixture(scope="module")
def chain_heal() -> tuple[RunResult, BreakerStats, BreakerStats]:
    data = yaml.safe_load(SCENARIO.read_text())
    data["duration_s"] = DURATION_S
    for server in data["servers"]:
        for window in server.get("windows", []):
            window["until_s"] = HEAL_S
    scenario = scenario_from_mapping(data, str(SCENARIO))
    world = scenario.build(scenario.default_seed)
    at_heal: list[BreakerStats] = []
    world.kernel.at(HEAL_S * S, lambda: at_heal.append(edge_breaker(world)))
    result = world.run(scenario.duration_ns)
    return result, at_heal[0], edge_breaker(world)


def success(result: RunResult, first_s: int, last_s: int) -> tuple[int, int]:
    rows = [row for row in result.timeline if first_s <= int(row["t"] or 0) <= last_s]
    return sum(int(row["ok"] or 0) for row in rows), sum(int(row["requests"] or 0) for row in rows)


def test_chain_heal_the_fault_at_the_bottom_ejects_the_healthy_tiers_above(
    chain_heal: tuple[RunResult, BreakerStats, BreakerStats],
) -> None:
    result, at_heal, _end = chain_heal
    # A's servers never fail on their own: every ejection at the edge is of a healthy callee.
    assert at_heal.ejections_consecutive_failures + at_heal.ejections_probe_failed > 0
    assert result.proxy_errors.get("failfast", 0) > 0
    ok, requests = success(result, 0, HEAL_S - 1)
    assert requests > 0 and ok / requests < 0.6


def test_chain_heal_the_edge_is_back_within_the_bound_after_the_heal(
    chain_heal: tuple[RunResult, BreakerStats, BreakerStats],
) -> None:
    result, at_heal, end = chain_heal
    assert result.violations == []  # the liveness probes after the run are answered too
    # The cascade outlives the heal: the edge's probes still fail on account of the tiers below ...
    assert end.ejections_probe_failed + end.ejections_consecutive_failures > (
        at_heal.ejections_probe_failed + at_heal.ejections_consecutive_failures
    )
    assert end.readmissions > at_heal.readmissions
    # ... and yet from the bound on every request the client sends succeeds.
    for second in range(RECOVERED_BY_S, DURATION_S):
        ok, requests = success(result, second, second)
        assert requests > 0 and ok == requests, (second, ok, requests)
