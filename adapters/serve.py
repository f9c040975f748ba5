"""``tether proxy``: build a Proxy from command-line values and run it until SIGTERM or Ctrl-C.

A first signal stops accepting and drains requests in flight (bounded by the drain timeout, which the
machine owns); a second one exits at once.
"""

from __future__ import annotations

import logging
import random
import signal
import sys
from collections.abc import Sequence

import anyio

from tether.adapters.admin import AdminServer
from tether.adapters.driver import ProxyDriver
from tether.adapters.http_server import serve_http
from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.proxy import Proxy

log = logging.getLogger("tether.proxy")


def build_proxy(
    config: ProxyConfig, endpoints: Sequence[Address], *, service: str = "default", direction: str = "outbound"
) -> Proxy:
    # The adapter is the only place that draws OS entropy; the machine gets a seeded Random.
    rng = random.Random(random.SystemRandom().getrandbits(64))
    return Proxy(config, StaticResolver(default=endpoints, default_name=service), rng, direction=direction)


async def _listen(address: Address) -> tuple[anyio.abc.SocketListener, Address]:
    listener = await anyio.create_tcp_listener(local_host=address.host, local_port=address.port, reuse_port=False)
    bound = listener.extra(anyio.abc.SocketAttribute.local_address)
    return listener, Address(str(bound[0]), int(bound[1]))


async def run_proxy(
    listen: Address,
    endpoints: Sequence[Address],
    config: ProxyConfig,
    *,
    admin: Address,
    shutdown_endpoint: bool = False,
) -> None:
    proxy = build_proxy(config, endpoints)
    driver = ProxyDriver(proxy)
    stop = anyio.Event()
    listener, bound = await _listen(listen)
    admin_listener, admin_bound = await _listen(admin)
    admin_server = AdminServer(
        lambda: proxy.telemetry, ready=lambda: not stop.is_set(), shutdown=stop.set if shutdown_endpoint else None
    )
    targets = ", ".join(str(endpoint) for endpoint in endpoints)
    print(f"tether proxy listening on {bound} -> {targets}; admin on {admin_bound}", flush=True)
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(_stop_on_signal, stop, task_group.cancel_scope)
        task_group.start_soon(serve_http, admin_listener, admin_server)
        await driver.serve(listener, stop=stop)
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
