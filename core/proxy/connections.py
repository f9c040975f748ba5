"""The proxy's record of each connection: what it is for, and what is buffered or owed on it."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tether.core.address import Address
from tether.core.proxy.h1fast import H1Connection
from tether.core.proxy.h2session import H2Session

if TYPE_CHECKING:
    from tether.core.proxy.balancing import Backend
    from tether.core.proxy.telemetry import HttpLabels
    from tether.core.traffic.balancer import Handle


class Mode(enum.Enum):
    """What a downstream connection carries; DETECT until its first bytes decide (see detect.py)."""

    __hash__ = object.__hash__  # identity, in C (see ExchangeState)

    DETECT = "detect"
    HTTP1 = "http1"
    OPAQUE = "opaque"
    HTTP2 = "h2"


@dataclass(slots=True)
class Downstream:
    conn_id: int
    h11: H1Connection  # h11.Connection's interface, with a fast path (h1fast.py)
    peer: Address | None
    target: str | None  # an authority the driver routes by instead of the Host header
    identity: str | None  # the client's identity once TLS is terminated (identity issue); None today
    mode: Mode = Mode.HTTP1
    exchange_id: int | None = None
    unsent_bytes: int = 0
    reading: bool = True
    closing: bool = False  # close once the current exchange ends
    # Detection and opaque tunnels: bytes read but not yet handed on (bounded by max_buffered_bytes),
    # whether the client has closed its side, and the upstream connection of the tunnel.
    detect_buffer: bytearray = field(default_factory=bytearray)
    pending: deque[bytes] = field(default_factory=deque)
    pending_bytes: int = 0
    eof: bool = False
    tunnel_upstream_id: int | None = None
    # HTTP/2: the session, its streams (stream id -> StreamExchange id), and where every stream goes when
    # a meshed peer's transport header named the workload port.
    h2: H2Session | None = None
    streams: dict[int, int] = field(default_factory=dict)
    fixed_endpoint: Address | None = None
    ping_due: bool = False  # a keepalive PING is out and unanswered
    # An opaque tunnel's endpoint choice (balancing.py): held for the connection's life, or waiting.
    backend: Backend | None = None
    handle: Handle | None = None
    awaiting_endpoint: bool = False
    # The lane's last request labels (h1lane.py): (authority, endpoint, local identity, labels).
    lane_labels: tuple[str, Address | None, str | None, HttpLabels] | None = None


class UpstreamState(enum.Enum):
    __hash__ = object.__hash__  # identity, in C (see ExchangeState)

    CONNECTING = "connecting"
    IDLE = "idle"
    BUSY = "busy"
    READY = "ready"  # an HTTP/2 connection: open, taking streams up to the peer's limit


@dataclass(slots=True)
class Upstream:
    conn_id: int
    h11: H1Connection  # h11.Connection's interface, with a fast path (h1fast.py)
    endpoint: Address
    state: UpstreamState = UpstreamState.CONNECTING
    exchange_id: int | None = None
    unsent_bytes: int = 0
    reading: bool = True
    eof: bool = False  # the endpoint closed its side
    tunnel_downstream_id: int | None = None  # set for an opaque tunnel; such a connection is never pooled
    # Connections of StreamExchanges (streams.py): HTTP/2 ones, and HTTP/1.1 ones restoring l5d-orig-proto.
    stream_world: bool = False
    h2: H2Session | None = None
    streams: dict[int, int] = field(default_factory=dict)
    preamble: bytes = b""  # written once connected, before anything else
    pool_key: tuple[Address, bytes] | None = None
    ping_due: bool = False
