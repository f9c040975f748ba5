"""The experiment fields of scenario files: latency models, windows, chains, arrivals, balancer, routes.

Valid files build the world they describe; hostile ones get one error naming the file, the field path and
the fix, before anything runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.sim.behaviour import Behaviour, Latency, Window
from tether.sim.scenario import ScenarioError, load_scenario

MS = 1_000_000
S = 1_000_000_000

INLINE_ROUTE = (
    "    route_config: {apiVersion: gateway.networking.k8s.io/v1, kind: HTTPRoute, metadata: {name: r},\n"
    "                   spec: {rules: [{backendRefs: [{name: b}]}]}}\n"
)
GOOD = (
    """
duration_s: 5
servers:
  - host: b
    latency: {kind: lognormal, median_ms: 50, sigma: 0.3}
    failure_status: 503
    windows:
      - {from_s: 1, until_s: 2, latency: {kind: fixed, ms: 900}}
      - {from_s: 2, until_s: 3, failure_rate: 1.0}
  - {host: front, calls: {target: "p2:4140", authority: b, connections: 4, timeout_s: 3}}
proxies:
  - {host: p, to: ["front:8080"], config: {balancer: least-loaded}}
  - host: p2
    to: ["b:8080"]
"""
    + INLINE_ROUTE
    + """clients: [{host: c, target: "p:4140", rate_per_s: 10, arrivals: uniform}]
"""
)


def write(tmp_path: Path, text: str, name: str = "scenario.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_scenario_fields_build_what_they_describe(tmp_path: Path) -> None:
    world = load_scenario(write(tmp_path, GOOD)).build(1)
    behaviour = world.servers["b"].behaviour
    assert behaviour.latency == Latency(kind="lognormal", median_ns=50 * MS, sigma=0.3, min_ns=0)
    assert behaviour.failure_status == 503
    assert behaviour.at(int(1.5 * S)) == (Latency(kind="fixed", min_ns=900 * MS), 0.0, 503)
    assert behaviour.at(int(2.5 * S))[1:] == (1.0, 503)
    assert behaviour.at(4 * S) == (behaviour.latency, 0.0, 503)
    assert "front" in world.callers and world.callers["front"].spec.max_connections == 4
    assert world.proxies["p"].proxy.config.balancer == "least-loaded"
    assert world.proxies["p2"].route_config is not None
    assert world.proxies["p2"].route_config.routes[0].name == "r"
    assert world.clients[0].spec.arrivals == "uniform"


def test_scenario_proxy_config_turns_on_the_success_rate_breaker(tmp_path: Path) -> None:
    breaker_keys = "breaker_success_rate_min: 0.9, breaker_success_rate_window_ms: 2000, breaker_backoff_max_ms: 8000"
    text = GOOD.replace("config: {balancer: least-loaded}", f"config: {{balancer: least-loaded, {breaker_keys}}}")
    config = load_scenario(write(tmp_path, text)).build(1).proxies["p"].proxy.config.breaker_config()
    assert config is not None and config.success_rate is not None
    assert (config.success_rate.success_rate_min, config.success_rate.bucket_ns * config.success_rate.buckets) == (
        0.9,
        2 * S,
    )
    assert (config.backoff_max_ns, config.consecutive_failures_max) == (8 * S, 7)


def test_scenario_balancer_applies_unless_the_proxy_or_the_command_line_says_otherwise(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, "balancer: round-robin\n" + GOOD))
    world = scenario.build(1)
    assert world.proxies["p"].proxy.config.balancer == "least-loaded"  # its own config wins over the scenario's
    assert world.proxies["p2"].proxy.config.balancer == "round-robin"
    overridden = scenario.build(1, balancer="p2c-ewma")
    assert {proxy.proxy.config.balancer for proxy in overridden.proxies.values()} == {"p2c-ewma"}
    with pytest.raises(ScenarioError, match="balancer.*use one of"):
        scenario.build(1, balancer="random")


def test_scenario_route_config_from_a_path_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "routes").mkdir()
    (tmp_path / "routes" / "split.yaml").write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: split}\n"
        "spec: {rules: [{backendRefs: [{name: b, weight: 9}, {name: c, weight: 1}]}]}\n"
    )
    text = GOOD.replace(INLINE_ROUTE, "    route_config: routes/split.yaml\n")
    world = load_scenario(write(tmp_path, text)).build(1)
    route_config = world.proxies["p2"].route_config
    assert route_config is not None
    assert [backend.weight for backend in route_config.routes[0].rules[0].backends] == [9, 1]


HOSTILE = [
    ("median_ms: 50", "median_ms: 0", "servers[0].latency.median_ms", "median latency"),
    ("sigma: 0.3", "sigma: 40", "servers[0].latency.sigma", "at most"),
    ("kind: lognormal", "kind: pareto", "servers[0].latency.kind", "use one of exponential, lognormal, fixed"),
    (
        "kind: fixed, ms: 900",
        "kind: fixed, ms: 900, median_ms: 3",
        "servers[0].windows[0].latency.median_ms",
        "use one of",
    ),
    ("failure_status: 503", "failure_status: 404", "servers[0].failure_status", "500 to 599"),
    ("{from_s: 1, until_s: 2,", "{from_s: 2, until_s: 1,", "servers[0].windows[0].until_s", "later than from_s"),
    ("{from_s: 2, until_s: 3,", "{from_s: 1.5, until_s: 3,", "servers[0].windows[1].from_s", "follow one another"),
    ("{from_s: 2, until_s: 3, failure_rate: 1.0}", "{from_s: 2, until_s: 3}", "servers[0].windows[1]", "give latency"),
    ("failure_rate: 1.0}", "failure_rate: 1.5}", "servers[0].windows[1].failure_rate", "at most 1.0"),
    (
        "    failure_status: 503\n",
        "    failure_status: 503\n    latency_ms: {min: 1}\n",
        "servers[0].latency",
        "keep one",
    ),
    ('target: "p2:4140", ', "", "servers[1].calls.target", "HOST:PORT"),
    ("connections: 4", "connections: 0", "servers[1].calls.connections", "at least 1"),
    ("authority: b,", "authority: b, retries: 3,", "servers[1].calls.retries", "use one of"),
    ("arrivals: uniform", "arrivals: bursty", "clients[0].arrivals", "poisson, uniform"),
    ("balancer: least-loaded", "balancer: fastest", "proxies[0].config.balancer", "p2c-ewma"),
    (
        "balancer: least-loaded",
        "balancer: least-loaded, breaker_success_rate_min: 80",
        "proxies[0].config.breaker_success_rate_min",
        "at most 1.0",
    ),
    (
        "balancer: least-loaded",
        "balancer: least-loaded, breaker_backoff_min_ms: 5000, breaker_backoff_max_ms: 2000",
        "proxies[0].config.breaker_backoff_max_ms",
        "at least breaker_backoff_min",
    ),
    ("kind: HTTPRoute", "kind: Ingress", "proxies[1].route_config", "HTTPRoute"),
    ("spec: {rules:", "spec: {colour: red, rules:", "spec.colour", "unknown"),
    (INLINE_ROUTE, "    route_config: 42\n", "proxies[1].route_config", "give a path, a document"),
]


@pytest.mark.parametrize(("old", "new", "field", "fix"), HOSTILE)
def test_scenario_hostile_field_is_named_with_its_fix(tmp_path: Path, old: str, new: str, field: str, fix: str) -> None:
    assert old in GOOD, old
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    message = str(caught.value)
    assert str(path) in message
    assert field in message
    assert fix in message


@pytest.mark.parametrize(
    ("top", "field", "fix"),
    [
        ("balancer: fastest\n", "balancer", "use one of p2c-ewma, round-robin, least-loaded"),
        ("balancer: [p2c-ewma]\n", "balancer", ""),
    ],
)
def test_scenario_top_level_balancer_is_validated(tmp_path: Path, top: str, field: str, fix: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        load_scenario(write(tmp_path, top + GOOD))
    assert f": {field}:" in str(caught.value) and fix in str(caught.value)


def test_scenario_route_config_path_that_is_missing_names_the_field(tmp_path: Path) -> None:
    text = GOOD.replace(INLINE_ROUTE, "    route_config: nowhere.yaml\n")
    with pytest.raises(ScenarioError, match=r"proxies\[1\]\.route_config: cannot read 'nowhere.yaml'.*relative"):
        load_scenario(write(tmp_path, text))


def test_scenario_windows_are_bounded(tmp_path: Path) -> None:
    windows = "".join(f"      - {{from_s: {i}, until_s: {i + 0.5}, failure_rate: 0.1}}\n" for i in range(65))
    text = GOOD.replace(
        "      - {from_s: 1, until_s: 2, latency: {kind: fixed, ms: 900}}\n"
        "      - {from_s: 2, until_s: 3, failure_rate: 1.0}\n",
        windows,
    )
    with pytest.raises(ScenarioError, match=r"servers\[0\]\.windows: has 65 entries; give at most 64"):
        load_scenario(write(tmp_path, text))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    low_ms=st.integers(0, 50),
    tail_ms=st.integers(0, 50),
    rate=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_behaviour_exponential_draws_as_the_simulator_always_did(
    seed: int, low_ms: int, tail_ms: int, rate: float
) -> None:
    """Old scenarios keep their trace hashes: same draws, same order, as the code before latency models."""
    import random

    behaviour = Behaviour(latency=Latency(min_ns=low_ms * MS, tail_mean_ns=tail_ms * MS), failure_rate=rate)
    ours, old = random.Random(seed), random.Random(seed)
    for _ in range(5):
        delay, status = behaviour.draw(ours, 0)
        old_delay = low_ms * MS + int(old.expovariate(1.0 / (tail_ms * MS))) if tail_ms else low_ms * MS
        assert delay == old_delay
        assert (status == 500) == (old.random() < rate)


@settings(max_examples=100, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 100), min_size=0, max_size=8, unique=True).map(sorted),
    now_s=st.integers(0, 110),
)
def test_behaviour_window_in_force_is_the_one_covering_now(cuts: list[int], now_s: int) -> None:
    """Against a naive model: split time at the cuts into windows, each failing at its own rate."""
    windows = tuple(
        Window(from_ns=a * S, until_ns=b * S, failure_rate=index / 10)
        for index, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False))
    )
    behaviour = Behaviour(failure_rate=0.99, windows=windows)
    expected = 0.99
    for index, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        if a <= now_s < b:
            expected = index / 10
    assert behaviour.at(now_s * S)[1] == expected
