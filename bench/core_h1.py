"""Core cost of one proxied HTTP/1.1 request, with no sockets: the proxy machine alone, driven in memory.

    python bench/core_h1.py [--requests N] [--profile] [--no-lane]

Prints microseconds of CPU per request (keep-alive client, keep-alive endpoint, a small response), the
figure that bounds what any driver can reach. ``--profile`` prints the top functions by own time.
``--no-lane`` closes the common-case lane (core/proxy/h1lane.py): every byte goes through h11 events.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time

from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.effects import Connect, Send
from tether.core.proxy import Proxy
from tether.core.proxy.connections import Downstream, Upstream

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 27 Nov 2026 18:00:00 GMT\r\nContent-Type: text/html\r\n"
    b"Content-Length: 12\r\nConnection: keep-alive\r\n\r\nhello world\n"
)


class EventPathProxy(Proxy):
    """The proxy with its lane closed (h1lane.py declines everything)."""

    def _lane_request(self, downstream: Downstream, data: bytes, now_ns: int) -> bool:
        return False

    def _lane_response(self, upstream: Upstream, data: bytes, now_ns: int) -> bool:
        return False


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-lane", action="store_true", help="every byte through h11 events")
    args = parser.parse_args()
    lane = not args.no_lane
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run(args.requests, lane=lane)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    run(2000, lane=lane)  # warm up
    print(f"{run(args.requests, lane=lane):.1f} µs of CPU per request in the proxy machine")


if __name__ == "__main__":
    main()
