"""The proxy with every lane closed: all traffic through h11 events and the event path.

The lanes (h1lane.py for HTTP/1.1, meshlane.py for the meshed hop) promise to behave exactly as the event
path does and only to skip work. ``EventPathProxy`` is that path alone: the reference the lanes'
differential tests (tests/core/test_h1lane.py, test_meshlane.py) compare against, and what the core
benchmarks' ``--no-lane`` measure. It is not meant for serving; it is only slower.
"""

from __future__ import annotations

from tether.core.proxy import h2translate as tr
from tether.core.proxy.connections import Downstream, Upstream
from tether.core.proxy.h1heads import Head
from tether.core.proxy.machine import Proxy
from tether.core.proxy.streams import StreamExchange


class EventPathProxy(Proxy):
    """A ``Proxy`` whose lanes decline everything and whose heads are all written by h11."""

    def _lane_request(self, downstream: Downstream, data: bytes, now_ns: int) -> bool:
        return False

    def _lane_response(self, upstream: Upstream, data: bytes, now_ns: int) -> bool:
        return False

    def _mesh_lane_request(self, downstream: Downstream, head: Head, *args: object) -> bool:
        return False

    def _sink_lane_response(self, upstream: Upstream, data: bytes) -> bool:
        return False

    def _sink_request_head_bytes(self, exchange: StreamExchange, upstream: Upstream, *, has_body: bool) -> bytes:
        return upstream.h11.send(tr.h1_request(exchange.head, has_body=has_body))

    def _source_response_head_bytes(
        self,
        exchange: StreamExchange,
        downstream: Downstream,
        status: int,
        headers: list[tuple[bytes, bytes]],
        close: bool,
    ) -> bytes:
        return downstream.h11.send(tr.h1_response(status, headers, close=close))
