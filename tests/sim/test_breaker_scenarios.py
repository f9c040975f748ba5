"""The success-rate circuit breaker, set from a scenario file, against an endpoint that fails 40 %.

A shortened copy of sim/scenarios/flaky-endpoint.yaml (16 virtual seconds, web-5 failing from 3 s to 10 s)
runs twice: as shipped (``breaker_success_rate_min: 0.8``) and with the success-rate detector off, which
leaves Linkerd's consecutive-failure accrual (7 in a row) alone. The first must eject web-5 for its success
rate and readmit it once healed; the second shows why the detector is needed at 40 %.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tether.core.traffic.breaker import BreakerStats
from tether.sim.results import RunResult
from tether.sim.scenario import scenario_from_mapping

SCENARIO = Path(__file__).parents[2] / "sim" / "scenarios" / "flaky-endpoint.yaml"
FAILING_FROM_S, HEALED_AT_S = 3, 10
ENDPOINTS = ("web-1", "web-2", "web-3", "web-4", "web-5")


def _run(success_rate_min: float) -> tuple[RunResult, BreakerStats, int]:
    """(result, web's breaker counters, web-5's failures) of the shortened scenario."""
    data: dict[str, Any] = yaml.safe_load(SCENARIO.read_text())
    data["duration_s"] = 16
    flaky = next(entry for entry in data["servers"] if entry["host"] == "web-5")
    flaky["windows"] = [{"from_s": FAILING_FROM_S, "until_s": HEALED_AT_S, "failure_rate": 0.4, "failure_status": 503}]
    data["proxies"][0]["config"]["breaker_success_rate_min"] = success_rate_min
    scenario = scenario_from_mapping(data, str(SCENARIO))
    world = scenario.build(scenario.default_seed)
    result = world.run(scenario.duration_ns)
    breaker = world.proxies["proxy"].proxy.telemetry.traffic.balancers["web", "http"].stats.breaker
    assert breaker is not None  # consecutive failures stay on in both runs
    return result, breaker, world.tallies["web-5"].failures


@pytest.fixture(scope="module")
def success_rate_run() -> tuple[RunResult, BreakerStats, int]:
    return _run(0.8)


@pytest.fixture(scope="module")
def consecutive_only_run() -> tuple[RunResult, BreakerStats, int]:
    return _run(0.0)


def _share_of_web_5(result: RunResult, first_s: int, last_s: int) -> float:
    """web-5's requests over the mean of the other four endpoints', in seconds first..last inclusive."""
    others = [result.endpoint_requests_between(host, first_s, last_s) for host in ENDPOINTS[:-1]]
    return result.endpoint_requests_between("web-5", first_s, last_s) / (sum(others) / len(others))


def test_breaker_success_rate_ejects_an_endpoint_failing_40_percent(
    success_rate_run: tuple[RunResult, BreakerStats, int],
) -> None:
    result, breaker, _ = success_rate_run
    assert result.violations == []
    assert breaker.ejections_success_rate >= 1
    assert breaker.ejections_consecutive_failures == 0  # the success rate did it, not seven in a row
    # Once the window has forgotten the successes before the failures (5 s window, 80 %: about 2.5 s), web-5
    # spends most of the time ejected: well under half the share of a healthy endpoint.
    assert _share_of_web_5(result, FAILING_FROM_S + 3, HEALED_AT_S - 1) < 0.5


def test_breaker_success_rate_readmits_the_endpoint_once_healed(
    success_rate_run: tuple[RunResult, BreakerStats, int],
) -> None:
    result, breaker, _ = success_rate_run
    assert breaker.readmissions >= 1 and breaker.probes >= breaker.readmissions
    # From 2 s after healing to the end: web-5 is back to its share and nobody fails.
    assert _share_of_web_5(result, HEALED_AT_S + 2, 15) > 0.8
    rows = [row for row in result.timeline if int(row["t"] or 0) >= HEALED_AT_S + 2]
    assert sum(int(row["ok"] or 0) for row in rows) == sum(int(row["requests"] or 0) for row in rows) > 0


def test_breaker_consecutive_failures_alone_keep_the_flaky_endpoint_in_rotation(
    consecutive_only_run: tuple[RunResult, BreakerStats, int],
    success_rate_run: tuple[RunResult, BreakerStats, int],
) -> None:
    result, breaker, failures = consecutive_only_run
    assert result.violations == [] and breaker.ejections_success_rate == 0
    assert _share_of_web_5(result, FAILING_FROM_S, HEALED_AT_S - 1) > 0.8  # seven in a row rarely come
    _, _, failures_with_success_rate = success_rate_run
    assert failures_with_success_rate < 0.6 * failures
