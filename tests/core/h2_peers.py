"""h2-based peers for driving the proxy machine in tests: a client and an endpoint, both sans-IO."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events

from tether.core.proxy.h2session import keep_open_after_goaway

Harness = Any  # tests/core/conftest.py's Harness


@dataclass
class Stream:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None


class H2Peer:
    """One side of an HTTP/2 connection through the harness: feeds what the proxy wrote into h2."""

    def __init__(self, h: Harness, conn_id: int, *, client: bool, auto_ack: bool = True) -> None:
        self.h = h
        self.conn_id = conn_id
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client, header_encoding=None))
        keep_open_after_goaway(self.h2)  # as a real client (curl, grpcio) finishes streams after GOAWAY
        self.streams: dict[int, Stream] = {}
        self.events: list[h2.events.Event] = []
        self.auto_ack = auto_ack
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.h2.initiate_connection()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.h.recv(self.conn_id, data)

    def read(self) -> list[h2.events.Event]:
        """Take what the proxy wrote to this connection and let h2 parse it."""
        events = self.h2.receive_data(self.h.take(self.conn_id))
        for event in events:
            self.events.append(event)
            stream_id = getattr(event, "stream_id", None)
            stream = self.streams.setdefault(stream_id, Stream()) if stream_id else None
            if isinstance(event, h2.events.RequestReceived | h2.events.ResponseReceived):
                stream.headers = list(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                stream.data.extend(event.data)
                if self.auto_ack:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                stream.trailers = list(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                stream.ended = True
            elif isinstance(event, h2.events.StreamReset):
                stream.reset = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
        self.flush()
        return events

    def request(self, path: str = "/", *, body: bytes = b"", end: bool = True, extra=()) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        headers = [
            (b":method", b"POST" if body else b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"svc"),
            (b":path", path.encode()),
            *extra,
        ]
        self.h2.send_headers(stream_id, headers, end_stream=end and not body)
        if body:
            self.h2.send_data(stream_id, body, end_stream=end)
        self.flush()
        return stream_id

    def respond(self, stream_id: int, status: int = 200, body: bytes = b"", trailers=None, extra=()) -> None:
        self.h2.send_headers(stream_id, [(b":status", str(status).encode()), *extra])
        if body:
            self.h2.send_data(stream_id, body)
        if trailers:
            self.h2.send_headers(stream_id, trailers, end_stream=True)
        else:
            self.h2.end_stream(stream_id)
        self.flush()


def client_for(h: Harness) -> H2Peer:
    """A client that opened a connection to the proxy and sent its preface."""
    client = H2Peer(h, h.accept(), client=True)
    client.flush()
    client.read()
    return client


def endpoint_for(h: Harness) -> H2Peer:
    """The endpoint side of the proxy's latest upstream connection (connected now)."""
    conn_id = h.connects[-1].conn_id
    h.connected(conn_id)
    peer = H2Peer(h, conn_id, client=False)
    peer.flush()
    peer.read()
    return peer
