"""What every flow of the proxy machine shares: the state ``Proxy`` holds and the helpers it provides.

The flows (h1flows.py, tunnel.py, h2flows.py, h2upstream.py) are mixins that hold only methods. They
inherit this class so that the state and the shared helpers are declared once, here; ``Proxy``
(machine.py) sets the state in its constructor and defines the helpers.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import h11

from tether.core.address import Address
from tether.core.balance import Picker
from tether.core.config import ProxyConfig
from tether.core.discovery import Resolver
from tether.core.effects import Effect
from tether.core.proxy.connections import Downstream, Upstream
from tether.core.proxy.exchange import Exchange
from tether.core.proxy.h1heads import FieldMemo
from tether.core.proxy.pool import EndpointPool
from tether.core.proxy.streams import H2Pool, StreamExchange
from tether.core.proxy.telemetry import Telemetry
from tether.core.timers import Deadlines


class ProxyParts:
    config: ProxyConfig
    resolver: Resolver
    telemetry: Telemetry
    _rng: random.Random
    _picker: Picker | None  # set: the older stateless seam instead of the balancers
    _effects: list[Effect]
    _downstream: dict[int, Downstream]
    _upstream: dict[int, Upstream]
    _exchanges: dict[int, Exchange]  # HTTP/1.1 to HTTP/1.1 (h1flows.py)
    _streams: dict[int, StreamExchange]  # anything touching HTTP/2 (h2flows.py, h2upstream.py)
    _pools: dict[Address, EndpointPool]
    _h2_pools: dict[tuple[Address, bytes], H2Pool]
    _h1_sink_pools: dict[Address, EndpointPool]
    _deadlines: Deadlines
    _draining: bool
    _now_ns: int  # the latest time any input carried
    _tls_refusal: str  # why meshed connections cannot be opened now (mtls.py)
    _field_memo: FieldMemo  # heads and fields this proxy has checked before (h1heads.py)

    if TYPE_CHECKING:  # defined by Proxy (machine.py)

        def _new_id(self) -> int: ...
        def _send(self, connection: Downstream | Upstream, data: bytes | None) -> None: ...
        def _set_reading(self, connection: Downstream | Upstream, enabled: bool) -> None: ...
        def _close_downstream(self, downstream: Downstream, *, reset: bool = False) -> None: ...
        def _close_upstream(self, upstream: Upstream, *, reset: bool = False) -> None: ...
        def _forget_upstream(self, upstream: Upstream) -> None: ...
        def _new_upstream_parser(self) -> h11.Connection: ...
        def _connect(self, conn_id: int, address: Address, server_identity: str | None) -> bool: ...
        def _shutdown_write(self, connection: Downstream | Upstream) -> None: ...
        def tls_labels(self, downstream: Downstream | None, server_identity: str | None) -> tuple[str, str, str]: ...
