"""``tether sim SCENARIO.yaml``: run a scenario in the simulator and summarise it.

Registered as a plugin command (entry point group ``tether.commands``) so that the CLI in adapters/
never imports the simulator. Exit codes: 0 the run held every invariant; 1 an invariant failed (the
seed and replay command are printed); 2 bad usage or a bad scenario file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from tether.core.config import BALANCERS
from tether.sim.results import RunResult
from tether.sim.scenario import ScenarioError, load_scenario

SCENARIOS = Path(__file__).parent / "scenarios"


@click.command("sim")
@click.argument("scenario", metavar="SCENARIO.yaml")
@click.option("--seed", type=int, default=None, help="Seed of the run (default: the scenario's, else 1).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option(
    "--balancer",
    type=click.Choice(BALANCERS),
    default=None,
    help="Give every proxy this balancer, whatever the scenario says (compare them on one scenario).",
)
@click.option(
    "--trace",
    "trace_path",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write the trace (one line per event; legend in docs/sim.md) to this file.",
)
def sim_command(scenario: str, seed: int | None, as_json: bool, balancer: str | None, trace_path: str | None) -> None:
    """Run SCENARIO.yaml in the deterministic simulator.

    SCENARIO may also name a shipped scenario (for example 'basic'); `tether sim --list` is not needed:
    they live in the package's scenarios/ folder and are listed when a name is not found.
    """
    path = resolve_scenario(scenario)
    try:
        loaded = load_scenario(path)
    except ScenarioError as error:
        click.echo(f"tether sim: {error}", err=True)
        sys.exit(2)
    run_seed = loaded.default_seed if seed is None else seed
    world = loaded.build(run_seed, keep_trace=trace_path is not None, balancer=balancer)
    world.replay_hint = f"tether sim {scenario}"
    if not as_json:
        click.echo(
            f"simulating {path} with seed {run_seed} for {loaded.duration_ns / 1e9:g} virtual seconds ...", err=True
        )
    result = world.run(loaded.duration_ns)
    if trace_path is not None:
        Path(trace_path).write_text("\n".join(world.kernel.trace.lines) + "\n")
    if as_json:
        click.echo(json.dumps(result.as_json(), sort_keys=False))
    else:
        _print_summary(result)
    if result.violations:
        click.echo(world.failure_message(result), err=True)
        sys.exit(1)


def resolve_scenario(scenario: str) -> Path:
    path = Path(scenario)
    if path.exists():
        return path
    shipped = SCENARIOS / (scenario if scenario.endswith(".yaml") else f"{scenario}.yaml")
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.yaml")))
    raise click.BadParameter(
        f"no file {scenario!r}, and no shipped scenario of that name (shipped: {names})", param_hint="SCENARIO"
    )


def _print_summary(result: RunResult) -> None:
    console = Console()
    balancers = ", ".join(result.balancers) or "-"
    table = Table(title=f"seed {result.seed}  balancer {balancers}  trace {result.trace_hash[:16]}")
    for column in ("requests", "success", "errors", "retries", "virtual s", "wall s", "req/wall s"):
        table.add_column(column, justify="right")
    rate = result.success_rate
    table.add_row(
        str(result.requests),
        "-" if rate is None else f"{100 * rate:.2f}%",
        str(sum(result.errors.values())),
        str(result.retries),
        f"{result.virtual_s:g}",
        f"{result.wall_s:.2f}",
        f"{result.requests_per_wall_s:,.0f}",
    )
    console.print(table)
    latency = Table(title="latency (ms), from issue to end")
    names = ("p50", "p90", "p95", "p99", "p999")
    for name in names:
        latency.add_column(name.replace("p999", "p99.9"), justify="right")
    latency.add_row(*(_ms(result.percentiles_ms[name]) for name in names))
    console.print(latency)
    detail = Table(show_header=True)
    detail.add_column("outcome")
    detail.add_column("count", justify="right")
    for status, count in sorted(result.responses.items()):
        detail.add_row(f"HTTP {status}", str(count))
    for code, count in sorted(result.grpc_statuses.items()):
        detail.add_row(f"gRPC status {code}", str(count))
    for kind, count in sorted(result.errors.items()):
        detail.add_row(f"error: {kind}", str(count))
    for kind, count in sorted(result.proxy_errors.items()):
        detail.add_row(f"proxy answered: {kind}", str(count))
    for host, count in result.endpoint_requests.items():
        detail.add_row(f"endpoint {host} received", str(count))
    console.print(detail)
    if result.identity:
        _print_identity(console, result.identity)
    verdict = "all invariants held" if not result.violations else f"{len(result.violations)} invariant violations"
    console.print(verdict)


def _print_identity(console: Console, report: dict[str, Any]) -> None:
    """Per meshed host: its certificates (rotations), expiries and failed attempts; then mTLS refusals."""
    table = Table(title=f"identity: SERVICEACCOUNT.NAMESPACE, leaf lifetime {report['leaf_lifetime_s']} s")
    for column in ("host", "identity", "certificates", "rotations", "expiries", "failed tries"):
        table.add_column(column, justify="left" if column in ("host", "identity") else "right")
    for host, row in report["hosts"].items():
        shown = _workload(row["identity"])
        if row["certified_as"] != row["identity"]:
            shown += f" (certified as {_workload(row['certified_as'])})"
        table.add_row(
            host,
            shown,
            str(row["certificates"]),
            str(row["rotations"]),
            str(row["expiries"]),
            str(row["failed_attempts"]),
        )
    console.print(table)
    for host, refused in report["refused_peers"].items():
        console.print(
            f"{host}: {refused['refusals']} mTLS handshakes refused: presented {refused['presented']}, "
            f"expected {refused['expected']}"
        )
    for reason, count in report["proxy_error_reasons"].items():
        console.print(f"{count} requests answered by the proxy: {reason}")


def _workload(identity: str) -> str:
    return identity.split(".serviceaccount.")[0]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
