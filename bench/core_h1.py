"""Core cost of one proxied HTTP/1.1 request, with no sockets: the proxy machine alone, driven in memory.

    python bench/core_h1.py [--requests N] [--profile] [--no-lane] [--driver]

Prints microseconds of CPU per request (keep-alive client, keep-alive endpoint, a small response), the
figure that bounds what any driver can reach. ``--profile`` prints the top functions by own time.
``--no-lane`` closes the common-case lane (core/proxy/h1lane.py): every byte goes through h11 events.
``--driver`` runs the same traffic through adapters/driver.py's protocol callbacks over stand-in transports
that take every write at once: the machine plus the driver's Python, without the loop and the kernel.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import socket
import time
from typing import Any

from tether.adapters.driver import ProxyDriver, _Link
from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.effects import Connect, Send
from tether.core.proxy import Proxy
from tether.core.proxy.event_path import EventPathProxy

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 27 Nov 2026 18:00:00 GMT\r\nContent-Type: text/html\r\n"
    b"Content-Length: 12\r\nConnection: keep-alive\r\n\r\nhello world\n"
)


def run(requests: int, *, lane: bool = True) -> float:
    endpoint = Address("127.0.0.1", 8080)
    proxy = (Proxy if lane else EventPathProxy)(ProxyConfig(), StaticResolver(default=[endpoint]), random.Random(1))
    now = 1
    client = proxy.accepted(now)
    upstream: int | None = None
    started = time.process_time()
    for _ in range(requests):
        now += 1000
        proxy.received(client, REQUEST, now)
        for effect in proxy.effects():
            if isinstance(effect, Connect):
                upstream = effect.conn_id
                proxy.connected(upstream, now)
            elif isinstance(effect, Send):
                proxy.sent(effect.conn_id, len(effect.data), now)
        proxy.effects()
        assert upstream is not None
        proxy.received(upstream, RESPONSE, now)
        answered = False
        for effect in proxy.effects():
            if isinstance(effect, Send) and effect.conn_id == client:
                answered = True
                proxy.sent(client, len(effect.data), now)
        proxy.effects()
        assert answered
    return (time.process_time() - started) / requests * 1e6


class _Socket:
    family = socket.AF_INET6  # original_destination reads nothing for it

    def setsockopt(self, *args: object) -> None:
        pass

    def getpeername(self) -> tuple[str, int]:
        return ("::1", 40000)


class _Transport:
    """Takes every write at once, as the kernel does on an idle loopback connection."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self._socket = _Socket()

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return self._socket

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Loop:
    """Stands in for the event loop: the driver's dial task is replaced by the bench connecting at once."""

    def create_task(self, coroutine: Any) -> object:
        coroutine.close()
        return object()

    def call_later(self, delay: float, callback: Any) -> _Timer:
        return _Timer()


class _Timer:
    def cancel(self) -> None:
        pass


def run_driver(requests: int, *, lane: bool = True) -> float:
    endpoint = Address("127.0.0.1", 8080)
    proxy = (Proxy if lane else EventPathProxy)(ProxyConfig(), StaticResolver(default=[endpoint]), random.Random(1))
    clock = iter(range(1, 10**12, 1000))
    driver = ProxyDriver(proxy, clock_ns=lambda: next(clock))
    driver._loop = _Loop()  # type: ignore[assignment]
    client = _Link(driver)
    client_transport = _Transport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    upstream: _Link | None = None
    upstream_transport = _Transport()
    started = time.process_time()
    for _ in range(requests):
        client.data_received(REQUEST)
        if upstream is None:
            (conn_id,) = driver._dials
            upstream = _Link(driver, conn_id)
            upstream.connection_made(upstream_transport)  # type: ignore[arg-type]
        assert upstream_transport.written
        upstream_transport.written.clear()
        upstream.data_received(RESPONSE)
        assert client_transport.written
        client_transport.written.clear()
    return (time.process_time() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-lane", action="store_true", help="every byte through h11 events")
    parser.add_argument("--driver", action="store_true", help="through the driver's callbacks as well")
    args = parser.parse_args()
    lane = not args.no_lane
    runner = run_driver if args.driver else run
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        runner(args.requests, lane=lane)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    runner(2000, lane=lane)  # warm up
    where = "the proxy machine and the driver" if args.driver else "the proxy machine"
    print(f"{runner(args.requests, lane=lane):.1f} µs of CPU per request in {where}")


if __name__ == "__main__":
    main()
