"""Run one scenario under each balancer and write a markdown table and a plot.

    python -m tether.sim.experiments SCENARIO [--balancers p2c-ewma,round-robin,least-loaded]
        [--seed N] [--duration-s S] [--within-ms MS] [--table OUT.md] [--plot OUT.png] [--json OUT.json]

SCENARIO is a path or a shipped scenario's name, as for ``tether sim``. Runs are sequential (the simulator
is single-threaded and deterministic: the same seed gives the same table). The table goes to stdout and, with
``--table``, to a file; ``--plot`` needs matplotlib (``pip install 'tether[plots]'``). Exit codes as
``tether sim``: 1 when a run broke an invariant, 2 for bad usage or a bad scenario file.

The plot has four panels: latency percentiles per balancer (log scale), the success rate per virtual
second, the p99 per virtual second, and the requests each endpoint received.

``--within-ms`` reads the results with a latency bound, as Linkerd's 2016 experiment did: a request slower
than the bound counts as failed. The table gains a column, the share of requests that succeeded within it,
and the plot's success panel shows that share instead of the plain success rate.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tether.core.config import BALANCERS
from tether.sim.cli import resolve_scenario
from tether.sim.results import MS, RunResult, succeeded
from tether.sim.scenario import Scenario, ScenarioError, load_scenario

if TYPE_CHECKING:
    from tether.sim.apps import RequestRecord

S = 1_000_000_000
PERCENTILE_NAMES = ("p50", "p90", "p95", "p99", "p999")
PLOT_DPI = 72  # keeps each committed PNG well under 100 KB


@dataclass(frozen=True, slots=True)
class WithinBound:
    """The requests that succeeded within ``ms`` of being issued: in all, and by the virtual second they
    started in (the seconds of the run's timeline)."""

    ms: float
    successes: int
    by_second: list[int]


@dataclass(slots=True)
class Run:
    balancer: str
    result: RunResult
    violations_message: str = ""
    within: WithinBound | None = None  # with ``within_ms``


def run_balancers(
    scenario: Scenario, balancers: Sequence[str], *, seed: int | None = None, within_ms: float | None = None
) -> list[Run]:
    """One run per balancer, same seed and scenario; the balancer overrides every proxy's. With
    ``within_ms``, each run also counts the requests that succeeded within that bound."""
    runs = []
    for balancer in balancers:
        world = scenario.build(scenario.default_seed if seed is None else seed, balancer=balancer)
        world.replay_hint = f"tether sim {scenario.source} --balancer {balancer}"
        result = world.run(scenario.duration_ns)
        run = Run(balancer, result, world.failure_message(result) if result.violations else "")
        if within_ms is not None:
            records = [record for client in world.clients for record in client.records if not record.probe]
            run.within = successes_within(records, within_ms, len(result.timeline))
        runs.append(run)
    return runs


def successes_within(records: Sequence[RequestRecord], bound_ms: float, seconds: int) -> WithinBound:
    """Count the records that succeeded no later than ``bound_ms`` after they were issued."""
    by_second = [0] * seconds
    total = 0
    for record in records:
        if record.ended_ns is None or not succeeded(record):
            continue
        if record.ended_ns - record.started_ns > bound_ms * MS:
            continue
        total += 1
        second = record.started_ns // S
        if second < seconds:
            by_second[second] += 1
    return WithinBound(bound_ms, total, by_second)


def markdown_table(runs: Sequence[Run]) -> str:
    """The comparison as markdown: outcomes and latency, then the requests each endpoint received."""
    bound = next((run.within.ms for run in runs if run.within is not None), None)
    header = ["balancer", "requests", "success"]
    header += [] if bound is None else [f"success within {bound:,g} ms"]
    header += [_label(name) + " ms" for name in PERCENTILE_NAMES]
    header += ["retries", "wall s", "req/wall s"]
    lines = [_row(header), _row(["---"] + ["---:"] * (len(header) - 1))]
    for run in runs:
        result = run.result
        cells = [f"`{run.balancer}`", f"{result.requests:,}", _share(result.successes, result.requests)]
        if bound is not None:
            cells.append(_share(run.within.successes if run.within else None, result.requests))
        cells += [_ms(result.percentiles_ms.get(name)) for name in PERCENTILE_NAMES]
        cells += [f"{result.retries:,}", f"{result.wall_s:.1f}", f"{result.requests_per_wall_s:,.0f}"]
        lines.append(_row(cells))
    endpoints = list(dict.fromkeys(host for run in runs for host in run.result.endpoint_requests))
    if endpoints:
        lines += ["", _row(["requests received", *endpoints]), _row(["---"] + ["---:"] * len(endpoints))]
        for run in runs:
            counts = run.result.endpoint_requests
            lines.append(_row([f"`{run.balancer}`", *(f"{counts.get(host, 0):,}" for host in endpoints)]))
    proxies = list(dict.fromkeys(name for run in runs for name in run.result.proxy_retries))
    if len(proxies) > 1:
        lines += ["", _row(["requests sent / retried", *proxies]), _row(["---"] + ["---:"] * len(proxies))]
        for run in runs:
            sent, retried = run.result.proxy_requests, run.result.proxy_retries
            cells = [f"{sent.get(name, 0):,} / {retried.get(name, 0):,}" for name in proxies]
            lines.append(_row([f"`{run.balancer}`", *cells]))
    return "\n".join(lines) + "\n"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _label(name: str) -> str:
    return "p99.9" if name == "p999" else name


def _share(count: int | None, total: int) -> str:
    return "-" if count is None or not total else f"{100 * count / total:.2f} %"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def plot(runs: Sequence[Run], title: str, path: str | Path) -> None:
    """Write the four-panel comparison to ``path`` (PNG); needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.UsageError("--plot needs matplotlib: pip install 'tether[plots]'") from None
    figure, axes = plt.subplots(2, 2, figsize=(11, 6.6), dpi=PLOT_DPI)
    figure.suptitle(title, fontsize=11)
    _plot_percentiles(axes[0][0], runs)
    bound = next((run.within.ms for run in runs if run.within is not None), None)
    success_title = "success rate per second (%)" if bound is None else f"success within {bound:,g} ms per second (%)"
    _plot_timeline(axes[0][1], runs, "success", success_title)
    _plot_timeline(axes[1][0], runs, "p99", "p99 per second (ms)")
    _plot_endpoints(axes[1][1], runs)
    figure.tight_layout()
    figure.savefig(path, dpi=PLOT_DPI, metadata={"Software": None})
    plt.close(figure)


def _plot_percentiles(axis: Any, runs: Sequence[Run]) -> None:
    width = 0.8 / max(1, len(runs))
    for index, run in enumerate(runs):
        values = [run.result.percentiles_ms.get(name) or 0.0 for name in PERCENTILE_NAMES]
        positions = [slot + index * width for slot in range(len(PERCENTILE_NAMES))]
        axis.bar(positions, values, width, label=run.balancer)
    centre = width * (len(runs) - 1) / 2
    axis.set_xticks([slot + centre for slot in range(len(PERCENTILE_NAMES))])
    axis.set_xticklabels([_label(name) for name in PERCENTILE_NAMES])
    axis.set_yscale("log")
    shown = [value for run in runs for value in run.result.percentiles_ms.values() if value]
    if shown:
        axis.set_ylim(bottom=min(shown) / 2)  # every bar visible above the axis
    axis.yaxis.set_major_formatter(_plain_numbers())
    axis.yaxis.set_minor_formatter(_plain_numbers(minor=True))
    axis.set_title("latency (ms, log scale)", fontsize=10)
    axis.legend(fontsize=8)


def _plot_timeline(axis: Any, runs: Sequence[Run], what: str, title: str) -> None:
    for run in runs:
        seconds, values = [], []
        for index, row in enumerate(run.result.timeline):
            requests = int(row["requests"] or 0)
            if not requests:
                continue
            ok = run.within.by_second[index] if run.within is not None else int(row["ok"] or 0)
            seconds.append(row["t"])
            values.append(100 * ok / requests if what == "success" else row["p99_ms"])
        axis.plot(seconds, values, label=run.balancer, linewidth=1.2)
    axis.set_xlabel("virtual second", fontsize=9)
    axis.set_title(title, fontsize=10)
    if what == "success":
        axis.set_ylim(top=100.5)
    axis.legend(fontsize=8, loc="lower left" if what == "success" else "upper left")


def _plot_endpoints(axis: Any, runs: Sequence[Run]) -> None:
    endpoints = list(dict.fromkeys(host for run in runs for host in run.result.endpoint_requests))
    width = 0.8 / max(1, len(runs))
    for index, run in enumerate(runs):
        counts = [run.result.endpoint_requests.get(host, 0) for host in endpoints]
        axis.bar([slot + index * width for slot in range(len(endpoints))], counts, width, label=run.balancer)
    axis.set_xticks([slot + width * (len(runs) - 1) / 2 for slot in range(len(endpoints))])
    axis.set_xticklabels(endpoints, rotation=45, fontsize=8)
    axis.set_title("requests each endpoint received", fontsize=10)
    axis.legend(fontsize=8, loc="lower right", framealpha=0.95)


def _json(run: Run) -> dict[str, object]:
    if run.within is None:
        return run.result.as_json()
    within = {"ms": run.within.ms, "successes": run.within.successes, "by_second": run.within.by_second}
    return {**run.result.as_json(), "successes_within": within}


def _plain_numbers(*, minor: bool = False) -> Any:
    """Tick labels as plain numbers (1000, not 10^3); on minor ticks only 2x, 3x and 5x a power of ten."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _position: int) -> str:
        if minor and f"{value:g}"[0] not in "235":
            return ""
        return f"{value:g}"

    return FuncFormatter(label)


@click.command("experiments")
@click.argument("scenario", metavar="SCENARIO")
@click.option(
    "--balancers",
    default=",".join(BALANCERS),
    show_default=True,
    help="Comma-separated balancers to compare, each run with the same seed.",
)
@click.option("--seed", type=int, default=None, help="Seed of every run (default: the scenario's).")
@click.option(
    "--duration-s", type=float, default=None, help="Virtual seconds of the fault phase (default: the scenario's)."
)
@click.option(
    "--within-ms",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Also count the requests that succeeded within this many milliseconds (a slower one counts as failed).",
)
@click.option(
    "--table", "table_path", type=click.Path(dir_okay=False), default=None, help="Also write the markdown table here."
)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write the PNG plot here.")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write every run's results here."
)
def experiments_command(
    scenario: str,
    balancers: str,
    seed: int | None,
    duration_s: float | None,
    within_ms: float | None,
    table_path: str | None,
    plot_path: str | None,
    json_path: str | None,
) -> None:
    """Run SCENARIO under each balancer and compare them."""
    chosen = [name.strip() for name in balancers.split(",") if name.strip()]
    for name in chosen:
        if name not in BALANCERS:
            raise click.BadParameter(
                f"{name!r} is not a balancer; use {', '.join(BALANCERS)}", param_hint="--balancers"
            )
    path = resolve_scenario(scenario)
    try:
        loaded = load_scenario(path)
        if duration_s is not None:
            loaded = loaded.shortened(duration_s)
    except ScenarioError as error:
        click.echo(f"experiments: {error}", err=True)
        sys.exit(2)
    runs = run_balancers(loaded, chosen, seed=seed, within_ms=within_ms)
    table = markdown_table(runs)
    click.echo(table, nl=False)
    if table_path:
        Path(table_path).write_text(table)
    if json_path:
        Path(json_path).write_text(json.dumps({run.balancer: _json(run) for run in runs}, indent=1) + "\n")
    if plot_path:
        seed_shown = loaded.default_seed if seed is None else seed
        plot(runs, f"{Path(path).stem} (seed {seed_shown})", plot_path)
    broken = [run for run in runs if run.violations_message]
    for run in broken:
        click.echo(run.violations_message, err=True)
    if broken:
        sys.exit(1)


if __name__ == "__main__":
    experiments_command()
