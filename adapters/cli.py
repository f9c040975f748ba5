"""The ``tether`` command.

Subcommands that live in this package are defined here; others (``tether sim``) register through the
``tether.commands`` entry point group, so this module never imports the simulator (the import-linter
contract keeps the two drivers apart).

Exit codes: 0 success; 1 the job ran and found a failure (``tether demo`` saw failed requests);
2 bad usage or configuration (click's convention); 3 a port could not be bound.
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from importlib.metadata import entry_points

import click

from tether.core.address import Address, AddressError
from tether.core.config import MS, PROTOCOLS, ConfigError, ProxyConfig

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BIND = 3


class _PluginGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *(ep.name for ep in entry_points(group="tether.commands"))})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is not None:
            return found
        for entry in entry_points(group="tether.commands"):
            if entry.name == cmd_name:
                command = entry.load()
                assert isinstance(command, click.Command), entry
                return command
        return None


@click.group(cls=_PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log verbosity (stderr).",
)
def cli(log_level: str) -> None:
    """Tether: a service mesh whose every decision also runs in a deterministic simulator."""
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the errors


def parse_address(value: str, what: str) -> Address:
    try:
        return Address.parse(value)
    except AddressError as error:
        raise click.BadParameter(str(error), param_hint=what) from None


@cli.command()
@click.option("--listen", "listen", required=True, metavar="HOST:PORT", help="Address to accept clients on.")
@click.option(
    "--to",
    "to",
    required=True,
    metavar="HOST:PORT[,HOST:PORT...]",
    help="Endpoints to forward every request to (round robin for now).",
)
@click.option("--connect-timeout-ms", default=1000, show_default=True, help="Upstream connect timeout (504).")
@click.option(
    "--response-timeout-ms",
    default=10000,
    show_default=True,
    help="From the request's last byte to the response head (504); 0 disables.",
)
@click.option("--idle-timeout-ms", default=60000, show_default=True, help="Close client connections idle this long.")
@click.option(
    "--drain-timeout-ms",
    default=10000,
    show_default=True,
    help="On SIGTERM/Ctrl-C, how long requests in flight may take to finish.",
)
@click.option(
    "--admin",
    "admin",
    default="127.0.0.1:4191",
    show_default=True,
    metavar="HOST:PORT",
    help="Admin server: /metrics, /ready, /live, /proxy-log-level, /shutdown.",
)
@click.option("--shutdown-endpoint", is_flag=True, help="Enable POST /shutdown on the admin server.")
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default="http1",
    show_default=True,
    help="http1: HTTP/1.1 only; detect: HTTP/1.1 if the client speaks it, else an opaque TCP tunnel; "
    "opaque: every connection is a TCP tunnel.",
)
@click.option(
    "--detect-timeout-ms",
    default=10000,
    show_default=True,
    help="With --protocol detect: tunnel a client that sends nothing for this long (server-speaks-first).",
)
def proxy(
    listen: str,
    to: str,
    connect_timeout_ms: int,
    response_timeout_ms: int,
    idle_timeout_ms: int,
    drain_timeout_ms: int,
    admin: str,
    shutdown_endpoint: bool,
    protocol: str,
    detect_timeout_ms: int,
) -> None:
    """Run an HTTP/1.1 proxy from LISTEN to the endpoints in TO."""
    import anyio

    from tether.adapters.serve import run_proxy

    listen_address = parse_address(listen, "--listen")
    admin_address = parse_address(admin, "--admin")
    endpoints = [parse_address(part, "--to") for part in to.split(",") if part.strip()]
    if not endpoints:
        raise click.BadParameter("name at least one endpoint, for example --to 127.0.0.1:8080", param_hint="--to")
    try:
        config = ProxyConfig(
            connect_timeout_ns=connect_timeout_ms * MS,
            response_timeout_ns=response_timeout_ms * MS,
            idle_timeout_ns=idle_timeout_ms * MS,
            drain_timeout_ns=drain_timeout_ms * MS,
            protocol=protocol,
            detect_timeout_ns=detect_timeout_ms * MS,
        )
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    try:
        anyio.run(
            partial(
                run_proxy, listen_address, endpoints, config, admin=admin_address, shutdown_endpoint=shutdown_endpoint
            )
        )
    except OSError as error:
        click.echo(
            f"tether proxy: cannot listen on {listen_address} or {admin_address}: {error.strerror or error}", err=True
        )
        sys.exit(EXIT_BIND)
    except KeyboardInterrupt:
        pass


@cli.command()
@click.option(
    "--duration",
    "duration_s",
    type=click.FloatRange(min=0.5),
    default=None,
    help="Stop after this many seconds (default: run until Ctrl-C).",
)
@click.option(
    "--rate",
    "rate_per_s",
    type=click.FloatRange(min=0.1, max=5000),
    default=50.0,
    show_default=True,
    help="Requests per second the load generator sends to the web service.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary at the end instead of tables.")
def demo(duration_s: float | None, rate_per_s: float, as_json: bool) -> None:
    """Run a small mesh on loopback (web -> backend, each behind a Tether proxy) with live metrics.

    Exits 0 when every request succeeded, 1 when some failed.
    """
    import anyio
    from rich.console import Console

    from tether.adapters.demo import run_demo

    code = anyio.run(run_demo, duration_s, rate_per_s, as_json, Console())
    sys.exit(code)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
