"""Short versions of the four traffic experiments (and of slow-endpoint under Linkerd's conditions), each
asserting the property it shows.

The shipped scenarios (sim/scenarios/) run for a minute of virtual time; these take the same files and
shrink them (fewer seconds, a lower rate, the window moved to fit) so the whole module stays within a
few tens of seconds. Each test asserts what the experiment shows with the proxy's balancers, circuit
breaking, routes and retries.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether.sim.experiments import Run, run_balancers
from tether.sim.results import RunResult
from tether.sim.scenario import Scenario, scenario_from_mapping

SCENARIOS = Path(__file__).parents[2] / "sim" / "scenarios"


def shrunk(name: str, change: Callable[[dict[str, Any]], None]) -> Scenario:
    path = SCENARIOS / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    change(data)
    return scenario_from_mapping(data, str(path))


def server(data: dict[str, Any], host: str) -> dict[str, Any]:
    return next(entry for entry in data["servers"] if entry["host"] == host)


def in_seconds(result: RunResult, first: int, last: int) -> tuple[int, int]:
    """(requests, successes) among requests started in virtual seconds first..last inclusive."""
    rows = [row for row in result.timeline if first <= int(row["t"] or 0) <= last]
    return sum(int(row["requests"] or 0) for row in rows), sum(int(row["ok"] or 0) for row in rows)


# ---------------------------------------------------------------- (a) beyond round robin


def _short_slow_endpoint(data: dict[str, Any]) -> None:
    # 10 s at 300/s; web-11 slow from 3 s to 8 s: 4.5 % of requests meet it under round robin, as in the
    # full experiment (30 of 60 s, one endpoint of 11), so round robin's p95 stays healthy and its p99 not.
    data["duration_s"] = 10
    data["clients"][0]["rate_per_s"] = 300
    server(data, "web-11")["windows"] = [{"from_s": 3, "until_s": 8, "latency": {"kind": "fixed", "ms": 2000}}]


@pytest.fixture(scope="module")
def slow_endpoint() -> dict[str, Run]:
    scenario = shrunk("slow-endpoint", _short_slow_endpoint)
    return {run.balancer: run for run in run_balancers(scenario, ["round-robin", "p2c-ewma", "least-loaded"])}


def test_slow_endpoint_round_robin_degrades_above_p95(slow_endpoint: dict[str, Run]) -> None:
    result = slow_endpoint["round-robin"].result
    assert result.violations == []
    assert result.percentiles_ms["p95"] is not None and result.percentiles_ms["p95"] < 400
    assert result.percentiles_ms["p99"] is not None and result.percentiles_ms["p99"] >= 990  # the 1 s timeout
    assert result.proxy_errors.get("response_timeout", 0) > 0
    # Round robin gives the slow endpoint its eleventh whether it is slow or not (circuit breaking is off in
    # this experiment, so the balancers are compared alone).
    counts = result.endpoint_requests
    assert max(counts.values()) - min(counts.values()) <= 1


def test_slow_endpoint_balancer_override_reaches_every_proxy(slow_endpoint: dict[str, Run]) -> None:
    for balancer, run in slow_endpoint.items():
        assert run.result.balancers == [balancer]


def test_slow_endpoint_p2c_ewma_p99_is_at_most_three_tenths_of_round_robin(slow_endpoint: dict[str, Run]) -> None:
    p2c = slow_endpoint["p2c-ewma"].result.percentiles_ms["p99"]
    round_robin = slow_endpoint["round-robin"].result.percentiles_ms["p99"]
    assert p2c is not None and round_robin is not None
    assert p2c <= 0.3 * round_robin


def test_slow_endpoint_least_loaded_degrades_only_above_p99(slow_endpoint: dict[str, Run]) -> None:
    """Requests pile up on the slow endpoint, so least-loaded sends it less than round robin: its p99 stays
    near healthy where round robin's is the timeout, and it loses fewer requests."""
    least_loaded, round_robin = slow_endpoint["least-loaded"].result, slow_endpoint["round-robin"].result
    assert least_loaded.endpoint_requests["web-11"] < round_robin.endpoint_requests["web-11"]
    assert least_loaded.percentiles_ms["p99"] is not None and round_robin.percentiles_ms["p99"] is not None
    assert least_loaded.percentiles_ms["p99"] <= 0.5 * round_robin.percentiles_ms["p99"]
    assert least_loaded.success_rate is not None and round_robin.success_rate is not None
    assert least_loaded.success_rate > round_robin.success_rate


# ---------------------------------------------------------------- (a') beyond round robin, Linkerd's conditions

LINKERD_SLOW_FROM_S, LINKERD_SLOW_UNTIL_S = 4, 14
SLOW_MS = 2000  # web-11's latency in its window: its first slow answer comes this long after the window opens


def _short_slow_endpoint_linkerd(data: dict[str, Any]) -> None:
    # 20 s at 200/s, web-11 slow for half of it as in the full run: round robin sends it 4.5 % of requests.
    data["duration_s"] = 20
    data["clients"][0]["rate_per_s"] = 200
    window = {
        "from_s": LINKERD_SLOW_FROM_S,
        "until_s": LINKERD_SLOW_UNTIL_S,
        "latency": {"kind": "fixed", "ms": SLOW_MS},
    }
    server(data, "web-11")["windows"] = [window]


@pytest.fixture(scope="module")
def slow_endpoint_linkerd() -> dict[str, Run]:
    scenario = shrunk("slow-endpoint-linkerd", _short_slow_endpoint_linkerd)
    runs = run_balancers(scenario, ["round-robin", "least-loaded", "p2c-ewma"], within_ms=1000)
    return {run.balancer: run for run in runs}


def over_one_second(run: Run, first: int = 0) -> int:
    """Requests started from virtual second ``first`` on that did not succeed within 1 s."""
    assert run.within is not None
    rows = run.result.timeline[first:]
    return sum(int(row["requests"] or 0) for row in rows) - sum(run.within.by_second[first:])


def test_slow_endpoint_linkerd_each_balancer_degrades_where_the_issue_expects(
    slow_endpoint_linkerd: dict[str, Run],
) -> None:
    """Nothing times out in the path, so every request succeeds; read with Linkerd's 1 s bound, round robin
    degrades above p95 and least-loaded above p99, as in the 2016 experiment."""
    for run in slow_endpoint_linkerd.values():
        assert run.result.violations == []
        assert run.result.success_rate == 1.0
    round_robin = slow_endpoint_linkerd["round-robin"].result.percentiles_ms
    least_loaded = slow_endpoint_linkerd["least-loaded"].result.percentiles_ms
    p2c = slow_endpoint_linkerd["p2c-ewma"].result.percentiles_ms
    assert round_robin["p95"] is not None and round_robin["p95"] < 1000
    assert round_robin["p99"] is not None and round_robin["p99"] >= SLOW_MS
    assert least_loaded["p99"] is not None and least_loaded["p99"] < 1000
    assert least_loaded["p999"] is not None and least_loaded["p999"] >= SLOW_MS
    assert p2c["p99"] is not None and p2c["p99"] <= 0.3 * round_robin["p99"]


def test_slow_endpoint_linkerd_the_latency_aware_balancers_send_the_slow_endpoint_less(
    slow_endpoint_linkerd: dict[str, Run],
) -> None:
    def web_11_share(balancer: str) -> float:
        counts = slow_endpoint_linkerd[balancer].result.endpoint_requests
        return counts["web-11"] / sum(counts.values())

    assert web_11_share("p2c-ewma") < web_11_share("least-loaded") < web_11_share("round-robin")
    slow = {balancer: over_one_second(run) for balancer, run in slow_endpoint_linkerd.items()}
    assert slow["p2c-ewma"] < slow["least-loaded"] < slow["round-robin"], slow


def test_slow_endpoint_linkerd_p2c_ewma_keeps_p999_once_the_slow_answers_are_seen(
    slow_endpoint_linkerd: dict[str, Run],
) -> None:
    """Before web-11's first slow answer only its pending count can steer P2C away, and that costs a few
    requests (in proportion to the rate): more than 0.1 % of a run this short, under 0.1 % of the full
    minute. From the first slow answer on, P2C's requests over 1 s stay under 0.1 %: its p99.9 is healthy."""
    p2c = slow_endpoint_linkerd["p2c-ewma"]
    seen = LINKERD_SLOW_FROM_S + SLOW_MS // 1000
    requests = sum(int(row["requests"] or 0) for row in p2c.result.timeline[seen:])
    assert over_one_second(p2c, seen) <= 0.001 * requests
    least_loaded = slow_endpoint_linkerd["least-loaded"]
    assert over_one_second(least_loaded, seen) > 0.001 * requests  # the bound tells the balancers apart


# ---------------------------------------------------------------- (b) retry storm


@pytest.fixture(scope="module")
def retry_storm() -> RunResult:
    scenario = shrunk("retry-storm", lambda data: data.update(duration_s=8))
    (run,) = run_balancers(scenario, ["p2c-ewma"])
    return run.result


def test_retry_storm_every_request_crosses_each_tier(retry_storm: RunResult) -> None:
    result = retry_storm
    assert result.violations == []
    tiers = {tier: sum(n for host, n in result.endpoint_requests.items() if host.startswith(tier)) for tier in "abc"}
    # Each tier sees every request that reached it once (probes included); C's 503s travel back up.
    assert tiers["a"] >= result.requests and tiers["b"] >= tiers["a"] and tiers["c"] >= tiers["b"]
    # C fails half its answers; each tier's budgeted retries recover most of them before the client.
    assert 0 < result.responses.get(503, 0) / result.requests < 0.25


def test_retry_storm_retries_stay_within_the_budget_at_every_tier(retry_storm: RunResult) -> None:
    result = retry_storm
    # Linkerd's default budget (core/traffic/budget.py): over any 10 s window, retries <= 20 % of the
    # original requests + a reserve of 10/s x 10 s. The run spans three windows at most: 8 s of load, the
    # 15 s settle and the liveness probes (which retry against a refilled budget).
    reserve = 10 * 10 * 3
    assert result.proxy_retries["b-proxy"] > 0  # C fails half its requests: its callers do retry
    for proxy, retries in result.proxy_retries.items():
        assert retries <= 0.2 * result.proxy_requests[proxy] + reserve, proxy
    at_c = result.endpoint_requests["c-1"] + result.endpoint_requests["c-2"]
    assert at_c <= (1.2**3) * result.requests + 3 * reserve  # no multiplication through the chain


# ---------------------------------------------------------------- (c) failing endpoint


def _short_failing_endpoint(data: dict[str, Any]) -> None:
    data["duration_s"] = 14
    server(data, "web-5")["windows"] = [{"from_s": 3, "until_s": 9, "failure_rate": 1.0, "failure_status": 503}]


@pytest.fixture(scope="module")
def failing_endpoint() -> tuple[RunResult, dict[str, int]]:
    scenario = shrunk("failing-endpoint", _short_failing_endpoint)
    world = scenario.build(scenario.default_seed)
    result = world.run(scenario.duration_ns)
    return result, {host: tally.failures for host, tally in world.tallies.items()}


def test_failing_endpoint_is_readmitted_once_healed(failing_endpoint: tuple[RunResult, dict[str, int]]) -> None:
    result, _ = failing_endpoint
    assert result.violations == []
    healed = {host: result.endpoint_requests_between(host, 11, 13) for host in result.endpoint_timeline}
    assert healed["web-5"] >= 0.5 * sum(healed.values()) / len(healed)
    # Before the failure, nobody failed; after it healed, nobody fails.
    assert in_seconds(result, 0, 2)[0] == in_seconds(result, 0, 2)[1]
    assert in_seconds(result, 10, 13)[0] == in_seconds(result, 10, 13)[1]


def test_failing_endpoint_failures_come_from_the_failing_endpoint(
    failing_endpoint: tuple[RunResult, dict[str, int]],
) -> None:
    result, failures = failing_endpoint
    requests_meanwhile, _ = in_seconds(result, 3, 8)
    assert failures == {"web-1": 0, "web-2": 0, "web-3": 0, "web-4": 0, "web-5": failures["web-5"]}
    assert result.responses.get(503, 0) == failures["web-5"] > 0  # no retries: each failure reaches the client
    assert result.responses.get(503, 0) < requests_meanwhile


def test_failing_endpoint_is_ejected_and_success_recovers(failing_endpoint: tuple[RunResult, dict[str, int]]) -> None:
    result, _ = failing_endpoint
    requests, successes = in_seconds(result, 5, 8)  # from 2 s after the failure starts to its end
    assert successes >= 0.99 * requests
    assert result.endpoint_requests_between("web-5", 5, 8) <= 0.05 * requests  # probes only


# ---------------------------------------------------------------- (d) canary


@pytest.fixture(scope="module")
def canary() -> RunResult:
    scenario = shrunk("canary", lambda data: data.update(duration_s=4))
    (run,) = run_balancers(scenario, ["p2c-ewma"])
    return run.result


def test_canary_every_request_is_served(canary: RunResult) -> None:
    assert canary.violations == []
    assert canary.requests == 2000 and canary.success_rate == 1.0


def test_canary_split_lands_within_two_points_of_ten_percent(canary: RunResult) -> None:
    counts = canary.endpoint_requests
    share = counts["canary-1"] / sum(counts.values())
    assert 0.08 <= share <= 0.12, counts
