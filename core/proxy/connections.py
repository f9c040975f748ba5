"""The proxy's record of each connection: what it is for, and what is buffered or owed on it."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import h11

from tether.core.address import Address


class Mode(enum.Enum):
    """What a downstream connection carries; DETECT until its first bytes decide (see detect.py)."""

    DETECT = "detect"
    HTTP1 = "http1"
    OPAQUE = "opaque"


@dataclass(slots=True)
class Downstream:
    conn_id: int
    h11: h11.Connection
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


class UpstreamState(enum.Enum):
    CONNECTING = "connecting"
    IDLE = "idle"
    BUSY = "busy"


@dataclass(slots=True)
class Upstream:
    conn_id: int
    h11: h11.Connection
    endpoint: Address
    state: UpstreamState = UpstreamState.CONNECTING
    exchange_id: int | None = None
    unsent_bytes: int = 0
    reading: bool = True
    eof: bool = False  # the endpoint closed its side
    tunnel_downstream_id: int | None = None  # set for an opaque tunnel; such a connection is never pooled
