"""HTTP/2 plumbing for the simulator's virtual gRPC apps: h2 on a virtual socket, and gRPC's framing.

Theory of operation
-------------------
``H2Wire`` owns one ``h2.connection.H2Connection`` (client or server side) and the virtual socket it
runs on, and is that socket's handler. Bytes from the socket go to h2; every event h2 returns goes to
the owner (``H2Owner.on_h2_event``), and whatever h2 then has to write (SETTINGS acks, PING answers,
WINDOW_UPDATEs, the owner's frames) is flushed once the batch is handled.

Writes respect the peer's windows: DATA waits in a per-stream queue until the stream's and the
connection's send windows allow it, and a WINDOW_UPDATE or a SETTINGS change flushes every queue again.
A stream's end (the END_STREAM flag, or trailers) goes out after its last queued byte. Received DATA is
acknowledged at once, because the apps consume what they read.

Both sides keep streams open after a GOAWAY (``keep_open_after_goaway``) so calls in flight finish, as
RFC 9113 intends and as real gRPC stacks do. A peer that breaks HTTP/2 gets its connection reset; the
owner hears of it through ``on_h2_broken``.

gRPC framing (``grpc_frame``, ``grpc_messages``): each message is a 1-byte compressed flag (always 0
here) and a 4-byte big-endian length, then the message bytes.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from tether.core.proxy.h2session import keep_open_after_goaway
from tether.sim.network import VirtualSocket

GRPC_CONTENT_TYPE = b"application/grpc"
DEFAULT_WINDOW = 65_535  # HTTP/2's initial window, per stream and per connection


class H2Owner(Protocol):
    def on_h2_event(self, wire: H2Wire, event: h2.events.Event) -> None: ...
    def on_h2_broken(self, wire: H2Wire, reason: str) -> None: ...


@dataclass(slots=True)
class _Outgoing:
    chunks: deque[bytes] = field(default_factory=deque)
    end: bool = False
    trailers: list[tuple[bytes, bytes]] | None = None


class H2Wire:
    """One HTTP/2 connection of a virtual app; see the module docstring."""

    def __init__(self, owner: H2Owner, *, client: bool, connection_window: int = DEFAULT_WINDOW) -> None:
        self.owner = owner
        self.sock: VirtualSocket | None = None  # set once connected (client) or accepted (server)
        # What arrives is validated (a proxy that sends malformed headers is caught by h2); what the apps
        # write is well-formed by construction, and checking it again would cost a tenth of a run.
        config = h2.config.H2Configuration(
            client_side=client, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.h2 = h2.connection.H2Connection(config)
        keep_open_after_goaway(self.h2)
        self.h2.initiate_connection()
        if connection_window > DEFAULT_WINDOW:
            # Only the connection window: streams keep HTTP/2's 64 KiB, so large messages still wait on it.
            self.h2.increment_flow_control_window(connection_window - DEFAULT_WINDOW)
        self.broken = False
        self._outgoing: dict[int, _Outgoing] = {}

    # ---------------------------------------------------------------- socket events (SocketHandler)

    def on_data(self, sock: VirtualSocket, data: bytes) -> None:
        if self.broken:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as error:
            self._break(f"protocol_error: {type(error).__name__}")
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                # A closed stream's share still reopens the connection window (h2 handles that case).
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._pump_all()
            elif isinstance(event, h2.events.StreamReset):
                self._outgoing.pop(event.stream_id, None)
            self.owner.on_h2_event(self, event)
            if self.broken:
                return
        self.flush()

    def on_eof(self, sock: VirtualSocket) -> None:
        self._break("connection_closed")

    def on_reset(self, sock: VirtualSocket) -> None:
        self._break("connection_reset")

    # ---------------------------------------------------------------- output

    def attach(self, sock: VirtualSocket) -> None:
        """The connection is up: write what h2 has queued since ``initiate_connection``."""
        self.sock = sock
        sock.attach(self)
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.sock is not None and not self.broken:
            self.sock.send(data)

    def send(
        self, stream_id: int, data: bytes = b"", *, end: bool = False, trailers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Queue ``data`` (and the stream's end, with trailers if given) and write what the windows allow."""
        outgoing = self._outgoing.setdefault(stream_id, _Outgoing())
        if data:
            outgoing.chunks.append(data)
        outgoing.end = outgoing.end or end or trailers is not None
        outgoing.trailers = trailers if trailers is not None else outgoing.trailers
        self._pump(stream_id, outgoing)
        self.flush()

    def reset_stream(self, stream_id: int, code: int) -> None:
        self._outgoing.pop(stream_id, None)
        with contextlib.suppress(h2.exceptions.ProtocolError):  # already closed both ways: nothing to reset
            self.h2.reset_stream(stream_id, code)
        self.flush()

    def close(self, *, goaway: bool = True) -> None:
        """Say GOAWAY (unless told not to) and close the socket; the owner is not called back."""
        if self.broken:
            return
        if goaway:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()
            self.flush()
        self.broken = True
        if self.sock is not None and not self.sock.dead:
            self.sock.close()

    def abort(self) -> None:
        """Reset the socket; the owner is not called back."""
        self.broken = True
        if self.sock is not None and not self.sock.dead:
            self.sock.reset()

    # ---------------------------------------------------------------- internals

    def _break(self, reason: str) -> None:
        if self.broken:
            return
        self.broken = True
        if self.sock is not None and not self.sock.dead:
            self.sock.reset()
        self.owner.on_h2_broken(self, reason)

    def _pump_all(self) -> None:
        for stream_id, outgoing in list(self._outgoing.items()):
            self._pump(stream_id, outgoing)

    def _pump(self, stream_id: int, outgoing: _Outgoing) -> None:
        try:
            while outgoing.chunks:
                window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
                if window <= 0:
                    return
                chunk = outgoing.chunks.popleft()
                if len(chunk) > window:
                    outgoing.chunks.appendleft(chunk[window:])
                    chunk = chunk[:window]
                self.h2.send_data(stream_id, chunk)
            if outgoing.end:
                del self._outgoing[stream_id]
                if outgoing.trailers is not None:
                    self.h2.send_headers(stream_id, outgoing.trailers, end_stream=True)
                else:
                    self.h2.end_stream(stream_id)
        except h2.exceptions.ProtocolError:
            self._outgoing.pop(stream_id, None)  # reset or closed under us: what was queued is moot


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def grpc_messages(body: bytes) -> list[bytes] | None:
    """The messages of a gRPC body, or None unless it is a whole number of uncompressed messages."""
    messages = []
    position = 0
    while position < len(body):
        if len(body) - position < 5 or body[position] != 0:
            return None
        length = int.from_bytes(body[position + 1 : position + 5], "big")
        end = position + 5 + length
        if end > len(body):
            return None
        messages.append(body[position + 5 : end])
        position = end
    return messages


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None
