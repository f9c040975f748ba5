"""``tether proxy``: build a Proxy from command-line values and run it until SIGTERM or Ctrl-C.

A first signal stops accepting and drains requests in flight (bounded by the drain timeout, which the
machine owns); a second one exits at once.

With identity settings, the process also runs one ``IdentityAgent`` (adapters/identity_agent.py): every
certificate it gets reaches every role's proxy, ``/ready`` answers 503 until the first one, and ``/metrics``
carries ``identity_cert_expiration_timestamp_seconds`` and ``identity_cert_refresh_count``.
"""

from __future__ import annotations

import logging
import random
import signal
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from tether.adapters.admin import AdminServer
from tether.adapters.driver import ProxyDriver
from tether.adapters.http_server import serve_http
from tether.adapters.prometheus import identity_lines, merge
from tether.adapters.proxy_config import ProcessConfig, RoleConfig, describe
from tether.core.address import Address
from tether.core.discovery import StaticResolver
from tether.core.proxy import Proxy
from tether.core.traffic.route_config import RouteConfig

if TYPE_CHECKING:
    # The identity agent needs cryptography (about 14 MB resident): imported only when the process has
    # identity settings, in the two functions that build it.
    from tether.adapters.identity_agent import ControlUpdate, IdentityAgentDriver
    from tether.adapters.identity_settings import IdentitySettings
    from tether.core.identity.agent import IdentityAgent

log = logging.getLogger("tether.proxy")


def _seeded_rng() -> random.Random:
    # The adapter is the only place that draws OS entropy; the machine gets a seeded Random.
    return random.Random(random.SystemRandom().getrandbits(64))


async def _listen(address: Address) -> tuple[anyio.abc.SocketListener, Address]:
    try:
        listener = await anyio.create_tcp_listener(local_host=address.host, local_port=address.port, reuse_port=False)
    except OSError as error:
        raise OSError(error.errno, f"cannot listen on {address}: {error.strerror or error}") from None
    bound = listener.extra(anyio.abc.SocketAttribute.local_address)
    return listener, Address(str(bound[0]), int(bound[1]))


def build_role_proxy(role: RoleConfig, routes: RouteConfig | None = None) -> Proxy:
    """The machine for one role: its limits, a static resolver from its endpoints and routes, a seeded RNG,
    and the route configuration (outbound: routing; inbound: the local rate limit)."""
    resolver = StaticResolver(
        default=role.endpoints or None,
        by_host=role.routes,
        default_name=role.name,
        dial_authority=role.dial_authority,
        meshed_hosts=role.meshed,
        default_h2c=role.h2c_endpoints,
        identities=role.identities,
    )
    return Proxy(role.config, resolver, _seeded_rng(), direction=role.direction, routes=routes)


def build_identity_agent(settings: IdentitySettings) -> IdentityAgent:
    """The process's identity agent: its name, the trust anchors, the identity service; a seeded RNG."""
    from tether.core.identity.agent import IdentityAgent, IdentityAgentConfig
    from tether.core.identity.client import IdentityClientConfig

    client = IdentityClientConfig(identity=settings.local_name, trust_anchors_pem=settings.trust_anchors_pem)
    return IdentityAgent(IdentityAgentConfig(client=client, service_address=settings.svc_addr), _seeded_rng())


def readiness(agent: IdentityAgent | None, stop: anyio.Event) -> str | None:
    """None when ready; else why not, for /ready's 503."""
    if stop.is_set():
        return "draining"
    return agent.unready_reason() if agent is not None else None


async def run_proxy(process: ProcessConfig) -> None:
    stop = anyio.Event()
    proxies = [build_role_proxy(role, process.routes) for role in process.roles]
    drivers = [ProxyDriver(proxy, name=role.name) for proxy, role in zip(proxies, process.roles, strict=True)]
    listeners = [await _listen(role.listen) for role in process.roles]
    admin_listener, admin_bound = await _listen(process.admin)
    agent = build_identity_agent(process.identity) if process.identity is not None else None
    admin_server = AdminServer(
        lambda: merge([proxy.telemetry for proxy in proxies]),
        ready=lambda: readiness(agent, stop),
        shutdown=stop.set if process.shutdown_endpoint else None,
        extra_metrics=lambda: identity_lines(agent.metrics()) if agent is not None else (),
    )
    for line in describe(process, [bound for _listener, bound in listeners]):
        print(f"tether {line}", flush=True)
    if process.routes_source is not None:
        routes = process.routes
        assert routes is not None
        counts = f"{len(routes.routes)} routes, {len(routes.profiles)} profiles, {len(routes.rate_limits)} rate limits"
        print(f"tether proxy routes from {process.routes_source}: {counts}", flush=True)
    print(f"tether proxy admin on {admin_bound}", flush=True)
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(_stop_on_signal, stop, task_group.cancel_scope)
        task_group.start_soon(serve_http, admin_listener, admin_server)
        if agent is not None and process.identity is not None:
            task_group.start_soon(identity_driver(agent, process.identity.token_file, drivers).run)
        async with anyio.create_task_group() as roles:
            for driver, (listener, _bound) in zip(drivers, listeners, strict=True):
                roles.start_soon(partial(driver.serve, listener, stop=stop))
        task_group.cancel_scope.cancel()
    print("tether proxy stopped", flush=True)


def identity_driver(agent: IdentityAgent, token_file: Path, drivers: list[ProxyDriver]) -> IdentityAgentDriver:
    """The agent on sockets, handing every certificate (or its expiry) to each of ``drivers``' proxies."""
    from tether.adapters.identity_agent import IdentityAgentDriver

    def apply(update: ControlUpdate) -> None:
        for driver in drivers:
            driver.control(update)

    return IdentityAgentDriver(agent, token_file=token_file, apply=apply)


async def _stop_on_signal(stop: anyio.Event, scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if stop.is_set():
                print("second signal: exiting without draining", file=sys.stderr, flush=True)
                scope.cancel()
                return
            name = signal.Signals(signum).name
            print(f"{name}: draining requests in flight (again to exit now)", file=sys.stderr, flush=True)
            stop.set()
