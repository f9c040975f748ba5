"""Requests that touch HTTP/2: one record per request, whichever protocols its two sides speak.

A ``StreamExchange`` has a *source* (where the request came from: a stream of an HTTP/2 client
connection, or an HTTP/1.1 client connection whose request goes to a meshed peer) and a *sink* (where it
goes: a stream of a pooled HTTP/2 connection, or an HTTP/1.1 connection when the inbound proxy restores
a request that arrived with ``l5d-orig-proto``). HTTP/1.1 to HTTP/1.1 stays in exchange.py.

Flow control bookkeeping, per direction: ``*_unacked`` counts bytes an HTTP/2 peer sent that the proxy
has not yet acknowledged (it acknowledges once they left towards the other side); ``to_sink`` holds
request bytes that arrived before the sink was ready, bounded by the window the source was given (HTTP/2)
or by stopping reads (HTTP/1.1).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tether.core.address import Address
from tether.core.proxy.h2translate import RequestHead
from tether.core.proxy.telemetry import HttpLabels

if TYPE_CHECKING:
    from tether.core.discovery import EndpointSet
    from tether.core.proxy.balancing import Backend
    from tether.core.proxy.errors import ProxyError
    from tether.core.proxy.routing import RouteState
    from tether.core.traffic.balancer import Handle


@dataclass(slots=True)
class StreamExchange:
    exchange_id: int
    source_id: int  # the downstream connection
    source_stream: int | None  # its HTTP/2 stream, or None for an HTTP/1.1 client
    head: RequestHead
    service: str
    started_ns: int
    labels: HttpLabels
    grpc: bool
    endpoint: Address | None = None
    sink_id: int | None = None  # the upstream connection, once bound
    sink_stream: int | None = None  # its HTTP/2 stream; None for an HTTP/1.1 sink
    sink_is_h2: bool = True
    request_ended: bool = False
    # False when the head said no body follows (HEADERS with END_STREAM; an HTTP/1.1 head without body framing):
    # the sink's request then ends on its head (HEADERS with END_STREAM, or HTTP/1.1 without chunked framing).
    request_has_body: bool = True
    request_trailers: list[tuple[bytes, bytes]] | None = None
    sink_request_ended: bool = False  # the end (or trailers) went to the sink
    sink_body_bytes: int = 0  # request body bytes handed to an HTTP/2 sink (a GOAWAY can replay a stream with none)
    request_chunked: bool = False  # an HTTP/1.1 sink got the body chunked (so trailers can follow)
    to_sink: deque[bytes] = field(default_factory=deque)
    to_sink_bytes: int = 0
    source_unacked: int = 0
    sink_unacked: int = 0
    response_status: int | None = None
    head_grpc_status: int | None = None  # a grpc-status in the response head (gRPC classifies by head or trailers)
    head_ns: int | None = None  # when the response head arrived (the RTT a gRPC response feeds the balancer)
    response_chunked: bool = True  # HTTP/1.1 client: whether trailers can be written
    response_ended: bool = False
    done: bool = False
    # Endpoint choice (balancing.py): the endpoint set the request resolved to (where a stream that waited
    # for an endpoint goes once it has one), the backend, its handle, or waiting in its failfast queue.
    endpoint_set: EndpointSet | None = None
    backend: Backend | None = None
    handle: Handle | None = None
    awaiting_endpoint: bool = False
    refusal: ProxyError | None = None  # refused before dispatch (failfast, a route): answered by _dispatch_stream
    route: RouteState | None = None  # set when a route rule matched (routing.py, h2traffic.py)

    @property
    def response_started(self) -> bool:
        return self.response_status is not None


@dataclass(slots=True)
class H2Pool:
    """The multiplexed HTTP/2 connections to one endpoint (as reached: address plus transport header)."""

    address: Address
    preamble: bytes  # written before the HTTP/2 preface: the transport header to a meshed peer, or b""
    server_identity: str | None = None  # the identity a meshed peer must prove (mTLS), when discovery knows it
    connection_ids: list[int] = field(default_factory=list)
    waiting: deque[int] = field(default_factory=deque)  # exchange ids, bounded by the pool's waiter limit
