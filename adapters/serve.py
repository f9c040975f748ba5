"""``tether proxy``: build a Proxy from command-line values and run it until SIGTERM or Ctrl-C.

A first signal stops accepting and drains requests in flight (bounded by the drain timeout, which the
machine owns); a second one exits at once.
"""

from __future__ import annotations

import logging
import random
import signal
import sys
from functools import partial

import anyio

from tether.adapters.admin import AdminServer
from tether.adapters.driver import ProxyDriver
from tether.adapters.http_server import serve_http
from tether.adapters.prometheus import merge
from tether.adapters.proxy_config import ProcessConfig, RoleConfig, describe
from tether.core.address import Address
from tether.core.discovery import StaticResolver
from tether.core.proxy import Proxy
from tether.core.traffic.route_config import RouteConfig

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
    )
    return Proxy(role.config, resolver, _seeded_rng(), direction=role.direction, routes=routes)


async def run_proxy(process: ProcessConfig) -> None:
    stop = anyio.Event()
    proxies = [build_role_proxy(role, process.routes) for role in process.roles]
    listeners = [await _listen(role.listen) for role in process.roles]
    admin_listener, admin_bound = await _listen(process.admin)
    admin_server = AdminServer(
        lambda: merge([proxy.telemetry for proxy in proxies]),
        ready=lambda: not stop.is_set(),
        shutdown=stop.set if process.shutdown_endpoint else None,
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
        async with anyio.create_task_group() as roles:
            for proxy, role, (listener, _bound) in zip(proxies, process.roles, listeners, strict=True):
                roles.start_soon(partial(ProxyDriver(proxy, name=role.name).serve, listener, stop=stop))
        task_group.cancel_scope.cancel()
    print("tether proxy stopped", flush=True)


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
