"""Flow control of every StreamExchange: acknowledgements, credits, and which connections are read.

Theory of operation
-------------------
Flow control is end to end (h2flows.py's docstring): bytes from an HTTP/2 producer are acknowledged (its
window reopened) only once they left towards the consumer, and only while the consumer's connection is
not backed up past ``max_buffered_bytes`` (``_settle``). HTTP/1.1 producers are paced by not reading them
(``_sync_h1_source_reading`` here, ``_sync_h1_sink_reading`` in h2h1sink.py). An exchange that ends
credits back whatever it still held (``_credit_all``), so that the connections' windows do not shrink by
what its streams carried. Whenever bytes of an exchange leave a queue or a connection,
``_exchange_progress`` re-runs these checks and finishes an exchange whose last response bytes left.
This class holds only methods; the state lives in the ``Proxy`` that inherits it (machine.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tether.core.proxy.connections import Downstream, Mode, Upstream
from tether.core.proxy.parts import ProxyParts
from tether.core.proxy.streams import StreamExchange


class H2Windows(ProxyParts):
    if TYPE_CHECKING:  # defined by the other flows

        def _finish_stream(self, exchange: StreamExchange) -> None: ...
        def _sink_connection(self, exchange: StreamExchange) -> Upstream | None: ...
        def _sink_queued(self, exchange: StreamExchange) -> int: ...
        def _sync_h1_sink_reading(self, upstream: Upstream) -> None: ...

    def _credit_all(self, exchange: StreamExchange) -> None:
        """The exchange is ending: bytes still unacknowledged are credited back to both connections (the
        streams are done with, and the connections' windows must not shrink by what they carried)."""
        source = self._downstream.get(exchange.source_id)
        if exchange.source_unacked and source is not None and source.h2 is not None:
            assert exchange.source_stream is not None
            source.h2.acknowledge(exchange.source_stream, exchange.source_unacked)
            self._write_h2(source)
        exchange.source_unacked = 0
        self._credit_sink(exchange)

    def _credit_sink(self, exchange: StreamExchange) -> None:
        """Response bytes still unacknowledged are credited back to the sink's connection. Call it while
        ``sink_id`` still names that connection: a stream the endpoint reset is gone, its connection's
        window is not (h2 credits the connection window of a closed stream)."""
        sink = self._sink_connection(exchange)
        if exchange.sink_unacked and sink is not None and sink.h2 is not None:
            assert exchange.sink_stream is not None
            sink.h2.acknowledge(exchange.sink_stream, exchange.sink_unacked)
            self._write_h2(sink)
        exchange.sink_unacked = 0

    def _source_queued(self, exchange: StreamExchange) -> int:
        """Response bytes waiting for the client's HTTP/2 window."""
        source = self._downstream.get(exchange.source_id)
        if source is None or source.h2 is None or exchange.source_stream is None:
            return 0
        return source.h2.queued_bytes(exchange.source_stream)

    def _settle(self, exchange: StreamExchange) -> None:
        """Acknowledge HTTP/2 bytes that have left towards the other side (see the module docstring)."""
        limit = self.config.max_buffered_bytes
        source = self._downstream.get(exchange.source_id)
        sink = self._sink_connection(exchange)
        source_session = source.h2 if source is not None else None
        sink_session = sink.h2 if sink is not None else None
        source_clear = source is None or source.unsent_bytes < limit
        sink_clear = sink is None or sink.unsent_bytes < limit
        if exchange.source_unacked and source_session is not None and exchange.source_stream is not None and sink_clear:
            passed = exchange.source_unacked - self._sink_queued(exchange)
            if passed > 0:
                source_session.acknowledge(exchange.source_stream, passed)
                exchange.source_unacked -= passed
                self._write_h2(source)  # type: ignore[arg-type]
        if exchange.sink_unacked and sink_session is not None and exchange.sink_stream is not None and source_clear:
            queued = 0
            if source_session is not None and exchange.source_stream is not None:
                queued = source_session.queued_bytes(exchange.source_stream)
            passed = exchange.sink_unacked - queued
            if passed > 0:
                sink_session.acknowledge(exchange.sink_stream, passed)
                exchange.sink_unacked -= passed
                self._write_h2(sink)  # type: ignore[arg-type]

    def _write_h2(self, connection: Downstream | Upstream) -> None:
        if connection.h2 is not None:
            data = connection.h2.data_to_send()
            if data:
                self._send(connection, data)

    def _sync_h2_reading(self, connection: Downstream | Upstream) -> None:
        """An HTTP/2 connection is read unless what we owe it is backed up (windows bound the rest)."""
        self._set_reading(connection, connection.unsent_bytes < self.config.max_buffered_bytes)

    def _in_stream_world(self, connection: Downstream | Upstream) -> bool:
        if isinstance(connection, Upstream):
            return connection.stream_world
        return connection.mode is Mode.HTTP2 or connection.exchange_id in self._streams

    def _stream_connection_drained(self, connection: Downstream | Upstream) -> None:
        """A connection that was backed up took bytes: acknowledge and read what waited on it."""
        if connection.h2 is not None:
            self._sync_h2_reading(connection)
            exchange_ids = list(connection.streams.values())
        else:
            exchange_ids = [connection.exchange_id] if connection.exchange_id is not None else []
        for exchange_id in exchange_ids:
            exchange = self._streams.get(exchange_id)
            if exchange is not None:
                self._exchange_progress(exchange)

    def _exchange_progress(self, exchange: StreamExchange) -> None:
        """Bytes of the exchange left a queue or a connection: acknowledge them, read the HTTP/1.1 side
        that waited on them, and finish an exchange whose last response bytes just left."""
        self._settle(exchange)
        source = self._downstream.get(exchange.source_id)
        if source is not None and exchange.source_stream is None:
            self._sync_h1_source_reading(source)
        sink = self._sink_connection(exchange)
        if sink is not None and sink.h2 is None:
            self._sync_h1_sink_reading(sink)
        if exchange.response_ended and not exchange.done and self._source_queued(exchange) == 0:
            self._finish_stream(exchange)

    def _sync_h1_source_reading(self, downstream: Downstream) -> None:
        """An HTTP/1.1 client of a meshed peer is read while its upload can go somewhere."""
        exchange = self._streams.get(downstream.exchange_id or -1)
        if exchange is None or downstream.conn_id not in self._downstream:
            return
        if exchange.request_ended or exchange.done:
            wanted = False  # HTTP/1.1 answers in order: the next request waits for this response
        else:
            sink = self._sink_connection(exchange)
            limit = self.config.max_buffered_bytes
            wanted = self._sink_queued(exchange) < limit and (sink is None or sink.unsent_bytes < limit)
        self._set_reading(downstream, wanted)
