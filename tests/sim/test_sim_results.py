"""`tether sim --balancer` and `--json`, the experiment runner's table and plot, and what a run measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tether.sim import apps
from tether.sim.apps import RequestRecord
from tether.sim.cli import sim_command
from tether.sim.experiments import experiments_command, markdown_table, run_balancers, successes_within
from tether.sim.results import percentiles, succeeded, timeline
from tether.sim.scenario import load_scenario

SCENARIOS = Path(__file__).parents[2] / "sim" / "scenarios"
S = 1_000_000_000
MS = 1_000_000

TINY = """
duration_s: 2
balancer: least-loaded
servers:
  - {host: b-1, latency: {kind: lognormal, median_ms: 5, sigma: 0.2}}
  - host: b-2
    latency: {kind: fixed, ms: 5}
    windows: [{from_s: 0.5, until_s: 1, failure_rate: 1.0, failure_status: 503}]
proxies: [{host: p, to: ["b-1:8080", "b-2:8080"]}]
clients: [{host: c, target: "p:4140", rate_per_s: 100, arrivals: uniform, timeout_s: 1, chunked_ratio: 0}]
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_sim_balancer_option_overrides_the_scenario_and_json_has_every_figure(tiny: Path) -> None:
    done = CliRunner().invoke(sim_command, [str(tiny), "--balancer", "round-robin", "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["balancers"] == ["round-robin"]
    assert set(report["percentiles_ms"]) == {"p50", "p90", "p95", "p99", "p999"}
    assert set(report["latency_ms"]) == {"p50", "p99", "p999"}  # unchanged for older readers
    assert report["requests"] == 200 and sum(report["endpoint_requests"].values()) == 210  # probes too
    assert report["success_rate"] == pytest.approx(1 - report["responses"]["503"] / 200)
    assert report["retries"] == 0 and report["proxy_retries"] == {"p": 0}
    assert report["wall_s"] > 0 and report["requests_per_wall_s"] > 0
    assert [row["t"] for row in report["timeline"]] == [0, 1]
    assert sum(row["requests"] for row in report["timeline"]) == 200


def test_sim_without_balancer_option_keeps_the_scenarios(tiny: Path) -> None:
    done = CliRunner().invoke(sim_command, [str(tiny), "--json"])
    assert json.loads(done.output)["balancers"] == ["least-loaded"]


def test_sim_balancer_option_refuses_unknown_names(tiny: Path) -> None:
    done = CliRunner().invoke(sim_command, [str(tiny), "--balancer", "random"])
    assert done.exit_code == 2 and "random" in done.output


def test_sim_table_shows_latency_percentiles_and_speed(tiny: Path) -> None:
    done = CliRunner().invoke(sim_command, [str(tiny), "--balancer", "p2c-ewma"], env={"COLUMNS": "120"})
    assert done.exit_code == 0, done.output
    for text in ("balancer p2c-ewma", "p99.9", "req/wall s", "retries", "endpoint b-2 received"):
        assert text in done.output


def test_experiments_write_one_row_per_balancer(tiny: Path, tmp_path: Path) -> None:
    table = tmp_path / "out.md"
    done = CliRunner().invoke(
        experiments_command, [str(tiny), "--balancers", "round-robin,least-loaded", "--table", str(table)]
    )
    assert done.exit_code == 0, done.output
    lines = table.read_text().splitlines()
    assert lines[0].startswith("| balancer | requests | success | p50 ms | p90 ms | p95 ms | p99 ms | p99.9 ms")
    assert [line.split(" | ")[0] for line in lines[2:4]] == ["| `round-robin`", "| `least-loaded`"]
    assert "| requests received | b-1 | b-2 |" in lines


def test_experiments_refuse_an_unknown_balancer(tiny: Path) -> None:
    done = CliRunner().invoke(experiments_command, [str(tiny), "--balancers", "p2c-ewma,fastest"])
    assert done.exit_code == 2 and "fastest" in done.output


def test_experiments_plot_is_a_small_png(tiny: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "out.png"
    done = CliRunner().invoke(experiments_command, [str(tiny), "--balancers", "p2c-ewma", "--plot", str(plot)])
    assert done.exit_code == 0, done.output
    data = plot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) < 100_000


def test_experiments_same_seed_same_table(tiny: Path) -> None:
    scenario = load_scenario(tiny)
    first = run_balancers(scenario, ["round-robin"], seed=3)
    second = run_balancers(scenario, ["round-robin"], seed=3)
    assert first[0].result.trace_hash == second[0].result.trace_hash
    strip = lambda text: [line.rsplit(" | ", 2)[0] for line in text.splitlines()]  # noqa: E731 (wall time differs)
    assert strip(markdown_table(first)) == strip(markdown_table(second))


def record(
    started_s: float, ended_s: float | None, *, status: int | None = 200, error: str | None = None
) -> RequestRecord:
    return RequestRecord(
        request_id="r",
        started_ns=int(started_s * S),
        body=b"",
        response_bytes=0,
        chunked=False,
        ended_ns=None if ended_s is None else int(ended_s * S),
        status=status,
        error=error,
    )


def test_successes_within_count_only_successes_no_slower_than_the_bound() -> None:
    records = [
        record(0.1, 0.3),  # 200 ms: within
        record(0.5, 1.5),  # exactly 1 s: within
        record(0.6, 1.7),  # 1.1 s: over
        record(1.2, 1.3, status=503),  # fast, failed
        record(1.4, None),  # never ended
        record(2.5, 2.6),  # started after the timeline's seconds: counted in all only
    ]
    within = successes_within(records, 1000, 2)
    assert (within.ms, within.successes, within.by_second) == (1000, 3, [2, 0])


def test_experiments_within_ms_adds_a_column(tiny: Path, tmp_path: Path) -> None:
    table = tmp_path / "out.md"
    args = [str(tiny), "--balancers", "round-robin", "--within-ms", "4", "--table", str(table)]
    done = CliRunner().invoke(experiments_command, args)
    assert done.exit_code == 0, done.output
    header, _, row = table.read_text().splitlines()[:3]
    assert header.startswith("| balancer | requests | success | success within 4 ms | p50 ms |")
    success, within = (float(cell.rstrip(" %")) for cell in row.split(" | ")[2:4])
    assert within < success  # b-1 is log-normal around 5 ms: most of its answers take longer than 4 ms


def test_results_success_is_a_status_below_500_without_error() -> None:
    assert succeeded(record(0, 1))
    assert succeeded(record(0, 1, status=404))
    assert not succeeded(record(0, 1, status=503))
    assert not succeeded(record(0, 1, status=None, error="client_timeout"))
    assert not succeeded(record(0, None))


def test_results_percentiles_and_timeline() -> None:
    values = [float(index) for index in range(1, 1001)]
    cut = percentiles(values)
    assert cut["p50"] == pytest.approx(500.5) and cut["p99"] == pytest.approx(990.01, abs=0.02)
    assert percentiles([]) == dict.fromkeys(("p50", "p90", "p95", "p99", "p999"))
    rows = timeline([record(0.2, 0.3), record(1.5, 2.5, status=502), record(5, 6)], 2 * S)
    assert rows == [
        {"t": 0, "requests": 1, "ok": 1, "p99_ms": 100.0},
        {"t": 1, "requests": 1, "ok": 0, "p99_ms": 1000.0},
    ]


def test_apps_fast_parser_and_strict_h11_give_the_same_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The apps' fast HTTP/1.1 path decides as h11 does: same run, byte for byte, either way."""
    scenario = load_scenario(SCENARIOS / "basic.yaml").shortened(3)
    fast = scenario.build(4).run(scenario.duration_ns)
    monkeypatch.setattr(apps, "STRICT_H11", True)
    strict = scenario.build(4).run(scenario.duration_ns)
    assert fast.violations == strict.violations == []
    assert fast.trace_hash == strict.trace_hash and fast.requests == strict.requests > 500
