"""Reading and backpressure for HTTP/1.1 exchanges, as a part of the proxy machine.

Theory of operation
-------------------
A connection is read only while what it feeds can take more. Each sync below recomputes whether one
connection should be read from the state of the exchange it carries, and emits ``SetReading`` only when
that answer changes:

- a client connection (``_sync_reading_downstream``): read while there is no exchange; while its request is
  complete and answered in order, read on until the parser holds ``max_buffered_bytes`` (pipelining);
  while queued or backing off, until the exchange holds that much body; otherwise, while the upstream
  connection's unsent bytes are under the limit;
- an endpoint connection (``_sync_reading_upstream``): read while its client takes the bytes;
- ``_sync_reading_all_for``: a connection drained (``sent``), so the connection feeding it may read again.

Moved out of h1flows.py unchanged. This class holds only methods; the state lives in the ``Proxy`` that
inherits it (machine.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tether.core.proxy.connections import Downstream, Mode, Upstream, UpstreamState
from tether.core.proxy.exchange import LIVE_STATES, ExchangeState
from tether.core.proxy.parts import ProxyParts


class H1Reading(ProxyParts):
    if TYPE_CHECKING:  # defined by the other flows

        def _sync_tunnel_reading(self, downstream: Downstream) -> None: ...
        def _sync_h1_source_reading(self, downstream: Downstream) -> None: ...

    def _sync_reading_downstream(self, downstream: Downstream) -> None:
        if downstream.conn_id not in self._downstream:
            return
        if downstream.exchange_id in self._streams:
            self._sync_h1_source_reading(downstream)
            return
        exchange = self._exchanges.get(downstream.exchange_id)  # type: ignore[arg-type]  (None: no exchange)
        limit = self.config.max_buffered_bytes
        if exchange is None:
            wanted = True
        elif exchange.request_received and exchange.state in LIVE_STATES:
            # HTTP/1.1 answers in order: a pipelined request waits in the parser until this one is answered.
            # Reading on (up to the limit) spares the driver a pause and a resume for every request.
            wanted = downstream.h11.buffered_bytes < limit
        elif not exchange.live:
            wanted = False  # answered early (an error): the rest of this request is not wanted
        elif exchange.state is ExchangeState.QUEUED or exchange.state is ExchangeState.BACKOFF:
            wanted = exchange.pending_body_bytes < limit
        else:
            upstream = self._upstream.get(exchange.upstream_id) if exchange.upstream_id is not None else None
            wanted = upstream is None or upstream.unsent_bytes < limit
        if downstream.reading is not wanted:
            self._set_reading(downstream, wanted)

    def _sync_reading_upstream(self, upstream: Upstream) -> None:
        if upstream.state is not UpstreamState.BUSY:
            return
        exchange = self._exchanges.get(upstream.exchange_id)  # type: ignore[arg-type]
        downstream = self._downstream.get(exchange.downstream_id) if exchange is not None else None
        wanted = downstream is None or downstream.unsent_bytes < self.config.max_buffered_bytes
        if upstream.reading is not wanted:
            self._set_reading(upstream, wanted)

    def _sync_reading_all_for(self, connection: Downstream | Upstream) -> None:
        """``connection`` drained some bytes: the connection feeding it may be read again."""
        downstream = connection if isinstance(connection, Downstream) else None
        if isinstance(connection, Upstream) and connection.tunnel_downstream_id is not None:
            downstream = self._downstream.get(connection.tunnel_downstream_id)
        if downstream is not None:
            if downstream.mode is Mode.OPAQUE:
                self._sync_tunnel_reading(downstream)
                return
            exchange = self._exchanges.get(downstream.exchange_id)  # type: ignore[arg-type]  (None: none)
            upstream = self._upstream.get(exchange.upstream_id) if exchange is not None else None  # type: ignore[arg-type]
            if upstream is not None:
                self._sync_reading_upstream(upstream)
            return
        exchange = self._exchanges.get(connection.exchange_id)  # type: ignore[arg-type]
        downstream = self._downstream.get(exchange.downstream_id) if exchange is not None else None
        if downstream is not None:
            self._sync_reading_downstream(downstream)
