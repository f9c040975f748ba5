"""The ``tether`` command.

Subcommands that live in this package are defined here; others (``tether sim``) register through the
``tether.commands`` entry point group, so this module never imports the simulator (the import-linter
contract keeps the two drivers apart).

Exit codes: 0 success; 1 the job ran and found a failure (``tether demo`` saw failed requests);
2 bad usage or configuration (click's convention); 3 a port could not be bound.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import click

from tether.core.address import Address, AddressError
from tether.core.config import BALANCERS, PROTOCOLS
from tether.core.config_file import ConfigFileError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BIND = 3


def event_loop_options() -> dict[str, Any]:
    """uvloop where it is installed (it roughly halves the event loop's share of each request), else
    asyncio's own loop; TETHER_EVENT_LOOP=asyncio forces the latter."""
    import importlib.util
    import os

    wanted = os.environ.get("TETHER_EVENT_LOOP", "uvloop")
    return {"use_uvloop": wanted == "uvloop" and importlib.util.find_spec("uvloop") is not None}


# Built-in commands whose modules are imported only when the command runs: `tether identity` needs
# cryptography (about 14 MB resident), which a proxy without mTLS never loads.
_LAZY_COMMANDS = {"identity": ("tether.adapters.identity_cli", "identity")}


class _PluginGroup(click.Group):
    """Built-in commands, the lazily imported ones above, and plugins from the `tether.commands` entry points
    (read only when a name is not built in: importlib.metadata costs 2 MB and 40 ms at startup)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from importlib.metadata import entry_points

        plugins = (entry.name for entry in entry_points(group="tether.commands"))
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS, *plugins})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is not None:
            return found
        if cmd_name in _LAZY_COMMANDS:
            module_name, attribute = _LAZY_COMMANDS[cmd_name]
            command = getattr(importlib.import_module(module_name), attribute)
            assert isinstance(command, click.Command), cmd_name
            return command
        from importlib.metadata import entry_points

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


def parse_address(value: str, what: str, *, listening: bool = False) -> Address:
    try:
        return Address.parse(value, listening=listening)
    except AddressError as error:
        raise click.BadParameter(str(error), param_hint=what) from None


def _count_option(name: str, help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(name, type=click.IntRange(min=0), default=None, help=help_text)


_ms_option = _count_option  # durations are whole milliseconds


def _ratio_option(name: str, help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(name, type=click.FloatRange(0.0, 1.0), default=None, help=help_text)


# Circuit breaking (docs/configuration.md): each flag sets the limit of the same name, as the file does.
BREAKER_OPTIONS = (
    _count_option(
        "--breaker-consecutive-failures", "Eject an endpoint after this many failures in a row; 0: off.  [default: 7]"
    ),
    _ms_option("--breaker-backoff-min-ms", "An endpoint's first ejection lasts this long.  [default: 1000]"),
    _ms_option("--breaker-backoff-max-ms", "Ejections in a row double up to this.  [default: 60000]"),
    _ratio_option("--breaker-backoff-jitter-ratio", "Up to this share is added to each ejection.  [default: 0.5]"),
    _ratio_option(
        "--breaker-success-rate-min",
        "Eject an endpoint whose success rate over the window falls below this; 0: off.  [default: 0]",
    ),
    _count_option("--breaker-success-rate-requests-min", "Verdicts the window needs first.  [default: 20]"),
    _ms_option("--breaker-success-rate-window-ms", "The success rate's sliding window.  [default: 10000]"),
    _count_option("--breaker-success-rate-buckets", "Buckets the window slides by.  [default: 10]"),
    _count_option(
        "--breaker-success-rate-max-ejected-percent", "At most this share of endpoints ejected for it.  [default: 50]"
    ),
    _count_option(
        "--breaker-success-rate-ready-endpoints-min", "Never eject for it below this many un-ejected.  [default: 1]"
    ),
)


def _breaker_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(BREAKER_OPTIONS):
        command = option(command)
    return command


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML file with admin, limits, outbound and inbound (see docs/configuration.md).",
)
@click.option(
    "--listen",
    "listen",
    default=None,
    metavar="HOST:PORT",
    help="The older single-role form: accept here and forward to --to (HTTP/1.1 unless --protocol).",
)
@click.option(
    "--to",
    "to",
    default=None,
    metavar="HOST:PORT[,HOST:PORT...]",
    help="With --listen: endpoints for every request (balanced by --balancer).",
)
@click.option(
    "--to-h2c",
    "to_h2c",
    default=None,
    metavar="HOST:PORT[,HOST:PORT...]",
    help="With --listen: endpoints for HTTP/2 clients, when the workload serves h2c on its own port.  "
    "[default: the --to endpoints]",
)
@click.option(
    "--admin",
    "admin",
    default=None,
    metavar="HOST:PORT",
    help="Admin server: /metrics, /ready, /live, /proxy-log-level, /shutdown.  [default: 127.0.0.1:4191]",
)
@click.option("--shutdown-endpoint", is_flag=True, help="Enable POST /shutdown on the admin server.")
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default=None,
    help="http1: HTTP/1.1, or HTTP/2 if the client opens with its preface; detect: HTTP/2 or HTTP/1.1 if "
    "the client speaks it, else an opaque TCP tunnel; opaque: every connection is a TCP tunnel.  "
    "[default: http1 with --listen, else detect]",
)
@click.option(
    "--routes",
    "routes_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML with HTTPRoute, GRPCRoute, ServiceProfile and HTTPLocalRateLimitPolicy documents: weighted "
    "backends, retries, timeouts, faults, mirrors, rate limits (docs/traffic.md).",
)
@click.option(
    "--balancer",
    type=click.Choice(BALANCERS),
    default=None,
    help="How requests choose among a service's endpoints.  [default: p2c-ewma]",
)
@_ms_option("--connect-timeout-ms", "Upstream connect timeout (504).  [default: 1000]")
@_ms_option(
    "--response-timeout-ms", "From the request's last byte to the response head (504); 0 disables.  [default: 10000]"
)
@_ms_option("--idle-timeout-ms", "Close client connections idle this long.  [default: 60000]")
@_ms_option("--drain-timeout-ms", "On SIGTERM/Ctrl-C, how long requests in flight may take.  [default: 10000]")
@_ms_option("--detect-timeout-ms", "With detect: tunnel a client silent this long.  [default: 10000]")
@_breaker_options
@click.option(
    "--identity-local-name",
    metavar="NAME",
    default=None,
    help="This proxy's identity (its certificate's name), e.g. web.default.serviceaccount.identity.linkerd."
    "cluster.local. Turns on mTLS; needs the three below too.",
)
@click.option("--identity-svc-addr", metavar="HOST:PORT", default=None, help="The identity service to ask.")
@click.option("--identity-trust-anchors", metavar="FILE", default=None, help="PEM file of the mesh's trust anchors.")
@click.option(
    "--identity-token-file", metavar="FILE", default=None, help="The token proving who we are, read before each call."
)
def proxy(
    config_path: str | None,
    listen: str | None,
    to: str | None,
    to_h2c: str | None,
    admin: str | None,
    shutdown_endpoint: bool,
    protocol: str | None,
    identity_local_name: str | None,
    identity_svc_addr: str | None,
    identity_trust_anchors: str | None,
    identity_token_file: str | None,
    routes_path: str | None,
    balancer: str | None,
    **limit_flags: float | None,
) -> None:
    """Run the proxy: outbound (127.0.0.1:4140) and inbound (0.0.0.0:4143) roles, or --listen/--to.

    Settings come from defaults, then --config FILE, then TETHER_PROXY_* variables, then these flags.
    With an identity (--identity-* or the config file's identity:), the proxy gets a certificate from the
    identity service, answers /ready only once it has one, and speaks mTLS to meshed peers.
    """
    import anyio

    from tether.adapters import proxy_config
    from tether.adapters.serve import run_proxy

    if (listen is None) != (to is None):
        raise click.UsageError("--listen and --to go together, for example --listen 127.0.0.1:4140 --to 127.0.0.1:8080")
    endpoints = tuple(parse_address(part, "--to") for part in (to or "").split(",") if part.strip())
    if to is not None and not endpoints:
        raise click.BadParameter("name at least one endpoint, for example --to 127.0.0.1:8080", param_hint="--to")
    h2c_endpoints = tuple(parse_address(part, "--to-h2c") for part in (to_h2c or "").split(",") if part.strip())
    if to_h2c is not None and listen is None:
        raise click.UsageError("--to-h2c goes with --listen and --to")
    flag_limits: dict[str, Any] = {key: value for key, value in limit_flags.items() if value is not None}
    if balancer is not None:
        flag_limits["balancer"] = balancer
    if protocol is not None:
        flag_limits["protocol"] = protocol
    elif listen is not None:
        flag_limits.setdefault("protocol", "http1")
    try:
        process = proxy_config.load(
            config_path=config_path,
            flag_limits=flag_limits,
            listen=parse_address(listen, "--listen", listening=True) if listen else None,
            to=endpoints,
            to_h2c=h2c_endpoints,
            admin=parse_address(admin, "--admin", listening=True) if admin else None,
            shutdown_endpoint=shutdown_endpoint,
            identity_flags={
                "local_name": identity_local_name,
                "svc_addr": identity_svc_addr,
                "trust_anchors": identity_trust_anchors,
                "token_file": identity_token_file,
            },
            routes_path=routes_path,
        )
    except ConfigFileError as error:
        click.echo(f"tether proxy: {error}", err=True)
        sys.exit(EXIT_USAGE)
    try:
        anyio.run(run_proxy, process, backend_options=event_loop_options())
    except OSError as error:
        click.echo(f"tether proxy: {error.strerror or error}", err=True)
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
@click.option(
    "--mtls/--no-mtls",
    default=True,
    show_default=True,
    help="Certify every pod with an identity service started for the run and speak mTLS between them.",
)
def demo(duration_s: float | None, rate_per_s: float, as_json: bool, mtls: bool) -> None:
    """Run a small mesh on loopback (load generator -> web -> backend, each pod with its Tether proxies, mTLS
    between them) with live metrics.

    Exits 0 when every request succeeded, 1 when some failed.
    """
    import anyio
    from rich.console import Console

    from tether.adapters.demo import run_demo

    code = anyio.run(partial(run_demo, duration_s, rate_per_s, as_json, Console(), mtls=mtls))
    sys.exit(code)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
