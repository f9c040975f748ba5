"""Core cost of one proxied HTTP/2 stream, with no sockets: the proxy machine between two h2 peers in memory.

    python bench/core_h2.py [--requests N] [--streams M] [--profile]

    h2 client =(h2c, M streams in flight)=> Proxy =(h2c)=> h2 server

The client keeps ``--streams`` GETs in flight on one connection (as ``h2load -c1 -mM``), the server answers each
with a small body; only the time spent inside the proxy machine's calls is counted, not the peers' (they
are the h2 library too, and would double the figure). ``--profile`` prints the top functions by own time
inside the proxy's calls.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events

from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.effects import Connect, Send
from tether.core.proxy import Proxy

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"bench"), (b":path", b"/index.html")]
RESPONSE = [(b":status", b"200"), (b"server", b"nginx"), (b"content-type", b"text/html"), (b"content-length", b"12")]
BODY = b"hello world\n"
ENDPOINT = Address("127.0.0.1", 8081)


class Bench:
    def __init__(self, streams: int) -> None:
        resolver = StaticResolver(default=[Address("127.0.0.1", 8080)], default_h2c=[ENDPOINT])
        self.proxy = Proxy(ProxyConfig(protocol="detect"), resolver, random.Random(1))
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.streams = streams
        self.inside_s = 0.0  # CPU time inside the proxy's calls
        self.profiler: cProfile.Profile | None = None  # on only inside the proxy's calls
        self.now_ns = 1
        self.downstream = self._call(self.proxy.accepted, self.now_ns)
        self.upstream: int | None = None
        self.sent = self.done = 0

    def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        if self.profiler is not None:
            self.profiler.enable()
        started = time.process_time()
        result = method(*args)
        self.inside_s += time.process_time() - started
        if self.profiler is not None:
            self.profiler.disable()
        return result

    def run(self, requests: int) -> None:
        target = self.done + requests
        while self.done < target:
            while self.sent - self.done < self.streams and self.sent < target:
                self.client.send_headers(self.client.get_next_available_stream_id(), REQUEST, end_stream=True)
                self.sent += 1
            self.now_ns += 1000
            self._pump()
        assert self.done == target

    def _pump(self) -> None:
        moved = True
        while moved:
            moved = False
            data = self.client.data_to_send()
            if data:
                moved = True
                self._call(self.proxy.received, self.downstream, data, self.now_ns)
            data = self.server.data_to_send()
            if data and self.upstream is not None:
                moved = True
                self._call(self.proxy.received, self.upstream, data, self.now_ns)
            for effect in self._call(self.proxy.effects):
                moved = True
                self._apply(effect)

    def _apply(self, effect: object) -> None:
        if isinstance(effect, Connect):
            self.upstream = effect.conn_id
            self._call(self.proxy.connected, effect.conn_id, self.now_ns)
        elif isinstance(effect, Send):
            self._call(self.proxy.sent, effect.conn_id, len(effect.data), self.now_ns)
            peer = self.client if effect.conn_id == self.downstream else self.server
            for event in peer.receive_data(effect.data):
                self._peer_event(peer, event)

    def _peer_event(self, peer: h2.connection.H2Connection, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            peer.send_headers(event.stream_id, RESPONSE)
            peer.send_data(event.stream_id, BODY, end_stream=True)
        elif isinstance(event, h2.events.DataReceived):
            peer.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and peer is self.client:
            self.done += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    bench = Bench(args.streams)
    bench.run(200)  # the connections are set up here, not measured
    bench.inside_s = 0.0
    if args.profile:
        bench.profiler = cProfile.Profile()
        bench.run(args.requests)
        pstats.Stats(bench.profiler).sort_stats("tottime").print_stats(30)
        return
    bench.run(args.requests)
    cost = bench.inside_s / args.requests * 1e6
    print(f"{cost:.1f} µs of CPU per HTTP/2 stream in the proxy machine ({args.streams} streams in flight)")


if __name__ == "__main__":
    main()
