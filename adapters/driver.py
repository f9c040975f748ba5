"""Runs a core ``Proxy`` on real sockets with anyio.

This module translates and decides nothing: it reads sockets and calls the machine with the current
monotonic time, carries out the effects the machine returns, and keeps one timer armed at the machine's
``next_deadline_ns()``. Per connection it runs a reader task (paused and resumed by ``SetReading``) and
a writer task fed by an outbox; the writer reports each write back through ``proxy.sent`` so the
machine's backpressure accounting sees the kernel's pace.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tether.core.address import Address
from tether.core.effects import Close, Connect, LogError, Send, SetReading, ShutdownWrite
from tether.core.proxy import Proxy

log = logging.getLogger("tether.proxy")

READ_SIZE = 64 * 1024
_CLOSE = object()  # outbox marker: flush, then close
_RESET = object()  # outbox marker: abort now
_SHUTDOWN_WRITE = object()  # outbox marker: flush, then send FIN and keep reading


@dataclass(slots=True)
class _Connection:
    outbox_in: MemoryObjectSendStream[object]
    outbox_out: MemoryObjectReceiveStream[object]
    reading_allowed: anyio.Event = field(default_factory=anyio.Event)
    reading: bool = True
    stream: anyio.abc.SocketStream | None = None
    connect_scope: anyio.CancelScope | None = None


def _new_connection() -> _Connection:
    # The outbox is unbounded here because the machine bounds it: it stops reading whatever feeds a
    # connection once max_buffered_bytes are unsent (see core/proxy/machine.py, "Backpressure").
    outbox_in, outbox_out = anyio.create_memory_object_stream[object](math.inf)
    connection = _Connection(outbox_in, outbox_out)
    connection.reading_allowed.set()
    return connection


class ProxyDriver:
    """Drives one ``Proxy``; call ``serve`` inside a task group."""

    def __init__(self, proxy: Proxy, *, clock_ns: Callable[[], int] = time.monotonic_ns, name: str = "proxy") -> None:
        self.proxy = proxy
        self.name = name
        self._clock_ns = clock_ns
        self._connections: dict[int, _Connection] = {}
        self._task_group: anyio.abc.TaskGroup | None = None
        self._timer_changed = anyio.Event()
        self._armed_deadline_ns: int | None = None

    async def serve(self, listener: anyio.abc.SocketListener, *, stop: anyio.Event) -> None:
        """Accept on ``listener`` until ``stop`` is set, then drain and return."""
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            task_group.start_soon(self._run_timer)
            accept_scope = anyio.CancelScope()
            task_group.start_soon(self._accept_until_cancelled, listener, accept_scope, task_group)
            await stop.wait()
            accept_scope.cancel()
            self.proxy.shutdown(self._clock_ns())
            self._apply_effects()
            while not self.proxy.is_drained():
                await anyio.sleep(0.01)
            task_group.cancel_scope.cancel()

    async def _accept_until_cancelled(
        self, listener: anyio.abc.SocketListener, scope: anyio.CancelScope, connections: anyio.abc.TaskGroup
    ) -> None:
        # Connection tasks live in ``connections``, not under ``scope``: cancelling the accept loop at
        # shutdown must not cut the requests in flight, which the machine drains.
        try:
            with scope:
                await listener.serve(self._accepted, task_group=connections)
        finally:
            await listener.aclose()

    async def _accepted(self, stream: anyio.abc.SocketStream) -> None:
        peer = stream.extra(anyio.abc.SocketAttribute.remote_address, None)
        peer_address = Address(str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        target = original_destination(stream.extra(anyio.abc.SocketAttribute.raw_socket))
        conn_id = self.proxy.accepted(self._clock_ns(), peer=peer_address, target=str(target) if target else None)
        connection = _new_connection()
        connection.stream = stream
        self._connections[conn_id] = connection
        self._apply_effects()
        await self._run_connection(conn_id, connection)

    async def _dial(self, conn_id: int, address: Address) -> None:
        connection = self._connections[conn_id]
        with anyio.CancelScope() as scope:
            connection.connect_scope = scope
            try:
                stream = await anyio.connect_tcp(address.host, address.port)
            except OSError as error:
                self._connections.pop(conn_id, None)
                reason = error.strerror or str(error)
                self._feed(conn_id, self.proxy.connect_failed, conn_id, reason, self._clock_ns())
                return
            connection.connect_scope = None
            connection.stream = stream
            stream.extra(anyio.abc.SocketAttribute.raw_socket).setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._feed(conn_id, self.proxy.connected, conn_id, self._clock_ns())
        if scope.cancelled_caught:
            return  # the machine gave up on the connect (its timeout) and already forgot the id
        await self._run_connection(conn_id, connection)

    async def _run_connection(self, conn_id: int, connection: _Connection) -> None:
        assert connection.stream is not None
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._read_loop, conn_id, connection)
            await self._write_loop(conn_id, connection)
            task_group.cancel_scope.cancel()
        self._connections.pop(conn_id, None)

    async def _read_loop(self, conn_id: int, connection: _Connection) -> None:
        stream = connection.stream
        assert stream is not None
        while True:
            await connection.reading_allowed.wait()
            try:
                data = await stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                data = b""
            except (anyio.BrokenResourceError, OSError):
                self._lost(conn_id)
                return
            self._feed(conn_id, self.proxy.received, conn_id, data, self._clock_ns())
            if not data:
                return

    async def _write_loop(self, conn_id: int, connection: _Connection) -> None:
        stream = connection.stream
        assert stream is not None
        async for item in connection.outbox_out:
            if item is _CLOSE or item is _RESET:
                await _close_stream(stream, reset=item is _RESET)
                return
            if item is _SHUTDOWN_WRITE:
                with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await stream.send_eof()
                continue
            chunks = [item]
            while True:  # coalesce what is already queued into one write
                try:
                    more = connection.outbox_out.receive_nowait()
                except anyio.WouldBlock:
                    break
                if more is _CLOSE or more is _RESET or more is _SHUTDOWN_WRITE:
                    connection.outbox_in.send_nowait(more)
                    break
                chunks.append(more)
            data = b"".join(chunks)  # type: ignore[arg-type]
            try:
                await stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self._lost(conn_id)
                await _close_stream(stream, reset=True)
                return
            self._feed(conn_id, self.proxy.sent, conn_id, len(data), self._clock_ns())

    def _feed(self, conn_id: int | None, method: Callable[..., None], *args: object) -> None:
        """Give the machine one input. A bug it raises costs that connection, never the process."""
        try:
            method(*args)
        except Exception:
            log.exception("%s: internal error handling connection %s; aborting it", self.name, conn_id)
            if conn_id is not None:
                self._close(conn_id, reset=True)
                try:
                    self.proxy.closed(conn_id, self._clock_ns())
                except Exception:
                    log.exception("%s: internal error while dropping connection %s", self.name, conn_id)
        self._apply_effects()

    def _lost(self, conn_id: int) -> None:
        connection = self._connections.get(conn_id)
        self.proxy.closed(conn_id, self._clock_ns())
        if connection is not None:
            connection.outbox_in.send_nowait(_RESET)
        self._apply_effects()

    def _apply_effects(self) -> None:
        for effect in self.proxy.effects():
            if isinstance(effect, Send):
                connection = self._connections.get(effect.conn_id)
                if connection is not None:
                    connection.outbox_in.send_nowait(effect.data)
            elif isinstance(effect, SetReading):
                self._set_reading(effect.conn_id, effect.enabled)
            elif isinstance(effect, Connect):
                self._connections[effect.conn_id] = _new_connection()
                assert self._task_group is not None
                self._task_group.start_soon(self._dial, effect.conn_id, effect.address)
            elif isinstance(effect, Close):
                self._close(effect.conn_id, reset=effect.reset)
            elif isinstance(effect, ShutdownWrite):
                connection = self._connections.get(effect.conn_id)
                if connection is not None:
                    connection.outbox_in.send_nowait(_SHUTDOWN_WRITE)
            elif isinstance(effect, LogError):
                log.warning("%s: %s", self.name, effect.message)
        self._rearm_timer()

    def _set_reading(self, conn_id: int, enabled: bool) -> None:
        connection = self._connections.get(conn_id)
        if connection is None or connection.reading == enabled:
            return
        connection.reading = enabled
        if enabled:
            connection.reading_allowed.set()
        else:
            connection.reading_allowed = anyio.Event()

    def _close(self, conn_id: int, *, reset: bool) -> None:
        connection = self._connections.get(conn_id)
        if connection is None:
            return
        if connection.connect_scope is not None:
            connection.connect_scope.cancel()
            self._connections.pop(conn_id, None)
            return
        connection.outbox_in.send_nowait(_RESET if reset else _CLOSE)
        connection.reading_allowed.set()  # let the reader notice the close instead of waiting forever

    def _rearm_timer(self) -> None:
        deadline = self.proxy.next_deadline_ns()
        if deadline is not None and (self._armed_deadline_ns is None or deadline < self._armed_deadline_ns):
            self._timer_changed.set()

    async def _run_timer(self) -> None:
        while True:
            self._armed_deadline_ns = deadline = self.proxy.next_deadline_ns()
            self._timer_changed = anyio.Event()
            delay = math.inf if deadline is None else max(0.0, (deadline - self._clock_ns()) / 1e9)
            with anyio.move_on_after(delay):
                await self._timer_changed.wait()
            now_ns = self._clock_ns()
            deadline = self.proxy.next_deadline_ns()
            if deadline is not None and deadline <= now_ns:
                self._feed(None, self.proxy.on_timer, now_ns)


SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def original_destination(sock: socket.socket) -> Address | None:
    """Where the client was going before iptables redirected it here, or None if it came here directly.

    Linux keeps the pre-NAT address of a REDIRECTed connection, readable with SO_ORIGINAL_DST (IPv4);
    the proxy routes by it as Linkerd's does. A connection that was not redirected reads back the
    proxy's own address, and so yields None.
    """
    if sock.family != socket.AF_INET:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port = struct.unpack("!H", raw[2:4])[0]
    address = Address(socket.inet_ntoa(raw[4:8]), port)
    local_host, local_port = sock.getsockname()[:2]
    return None if (address.host, address.port) == (local_host, local_port) else address


async def _close_stream(stream: anyio.abc.SocketStream, *, reset: bool) -> None:
    if reset:
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        if raw is not None and raw.fileno() >= 0:
            # SO_LINGER with a zero timeout makes close() send RST: the peer sees an abort, not a clean end.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with anyio.CancelScope(shield=True):
        await stream.aclose()
