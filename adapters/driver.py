"""Runs a core ``Proxy`` on real sockets with anyio.

This module translates and decides nothing: it reads sockets and calls the machine with the current
monotonic time, carries out the effects the machine returns, and keeps one timer armed at the machine's
``next_deadline_ns()``.

Sockets are plain non-blocking sockets waited on with ``anyio.wait_readable`` / ``wait_writable`` rather
than anyio's socket streams: a ``Send`` is written at once from the effect loop when nothing is queued
before it, and only what the kernel does not take waits for the connection's writer task. A request then
costs two task wake-ups (one read on each side) instead of four, which is most of what the driver adds
per request. Every byte the kernel takes is reported through ``proxy.sent``, so the machine's
backpressure sees the kernel's pace. Per connection there is a reader task (paused and resumed by
``SetReading``) and a writer task that only runs when the kernel's buffer was full.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc
import anyio.lowlevel

from tether.adapters.sockets import close_socket, connect, original_destination
from tether.core.address import Address
from tether.core.effects import Close, Connect, LogError, Send, SetReading, ShutdownWrite
from tether.core.proxy import Proxy
from tether.core.proxy.mtls import CertificateExpired, CertificateUpdate

log = logging.getLogger("tether.proxy")

READ_SIZE = 64 * 1024
_CLOSE = object()  # queued marker: flush, then close
_RESET = object()  # queued marker: abort now
_SHUTDOWN_WRITE = object()  # queued marker: flush, then send FIN and keep reading


@dataclass(slots=True)
class _Connection:
    sock: socket.socket | None = None
    # Bytes (and close markers) the kernel has not taken yet, oldest first. The machine bounds it: it
    # stops reading whatever feeds a connection once max_buffered_bytes are unsent.
    queued: deque[object] = field(default_factory=deque)
    writer_wakeup: anyio.Event = field(default_factory=anyio.Event)
    reading_allowed: anyio.Event = field(default_factory=anyio.Event)
    reading: bool = True
    closed: bool = False
    connect_scope: anyio.CancelScope | None = None


def _new_connection(sock: socket.socket | None = None) -> _Connection:
    connection = _Connection(sock)
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
        self._sent: list[tuple[int, int]] = []  # writes the kernel took, not yet reported to the machine
        self._applying = False

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
        # anyio's TCP listener may hold several sockets (one per address family): accept on each.
        sockets = [
            each.extra(anyio.abc.SocketAttribute.raw_socket) for each in getattr(listener, "listeners", [listener])
        ]
        try:
            with scope:
                async with anyio.create_task_group() as accepting:
                    for listening in sockets:
                        accepting.start_soon(self._accept_loop, listening, connections)
        finally:
            await listener.aclose()

    async def _accept_loop(self, listening: socket.socket, connections: anyio.abc.TaskGroup) -> None:
        while True:
            await anyio.wait_readable(listening)
            try:
                sock, _peer = listening.accept()
            except BlockingIOError:
                continue
            except OSError as error:  # out of file descriptors, say: wait, do not spin
                log.warning("%s: accept failed: %s", self.name, error.strerror or error)
                await anyio.sleep(0.1)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connections.start_soon(self._accepted, sock)

    async def _accepted(self, sock: socket.socket) -> None:
        try:
            peer = sock.getpeername()
        except OSError:  # already reset by the client
            peer = None
        peer_address = Address(str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        target = original_destination(sock)
        conn_id = self.proxy.accepted(self._clock_ns(), peer=peer_address, target=str(target) if target else None)
        connection = _new_connection(sock)
        self._connections[conn_id] = connection
        self._apply_effects()
        await self._run_connection(conn_id, connection)

    async def _dial(self, conn_id: int, address: Address) -> None:
        connection = self._connections[conn_id]
        with anyio.CancelScope() as scope:
            connection.connect_scope = scope
            try:
                sock = await connect(address)
            except OSError as error:
                self._connections.pop(conn_id, None)
                reason = error.strerror or str(error)
                self._feed(conn_id, self.proxy.connect_failed, conn_id, reason, self._clock_ns())
                return
            connection.connect_scope = None
            connection.sock = sock
            self._feed(conn_id, self.proxy.connected, conn_id, self._clock_ns())
        if scope.cancelled_caught:
            return  # the machine gave up on the connect (its timeout) and already forgot the id
        await self._run_connection(conn_id, connection)

    async def _run_connection(self, conn_id: int, connection: _Connection) -> None:
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._write_loop, conn_id, connection)
                await self._read_loop(conn_id, connection)
                if not connection.closed:
                    await _wait_closed(connection)
                task_group.cancel_scope.cancel()
        finally:
            self._close_socket(connection, reset=False)
            if self._connections.get(conn_id) is connection:
                self._connections.pop(conn_id, None)

    async def _read_loop(self, conn_id: int, connection: _Connection) -> None:
        sock = connection.sock
        assert sock is not None
        ready = False  # whether the kernel probably holds more bytes (the last read filled the buffer)
        while not connection.closed:
            if not connection.reading:
                await connection.reading_allowed.wait()
                continue
            if not ready:
                try:
                    await anyio.wait_readable(sock)
                except (anyio.ClosedResourceError, OSError):
                    return
            else:
                await anyio.lowlevel.checkpoint()  # others get their turn between full reads
            if connection.closed:
                return
            try:
                data = sock.recv(READ_SIZE)
            except BlockingIOError:
                ready = False
                continue
            except OSError:
                self._lost(conn_id)
                return
            ready = len(data) == READ_SIZE
            self._feed(conn_id, self.proxy.received, conn_id, data, self._clock_ns())
            if not data:
                return

    async def _write_loop(self, conn_id: int, connection: _Connection) -> None:
        """Writes what the kernel could not take at once, as its buffer drains."""
        while not connection.closed:
            await connection.writer_wakeup.wait()
            connection.writer_wakeup = anyio.Event()
            while connection.queued and not connection.closed:
                if not await self._write_queued(conn_id, connection):
                    return

    async def _write_queued(self, conn_id: int, connection: _Connection) -> bool:
        """Write the oldest queued item; False when the connection is finished with."""
        sock = connection.sock
        assert sock is not None
        item = connection.queued[0]
        if item is _CLOSE or item is _RESET:
            self._close_socket(connection, reset=item is _RESET)
            return False
        if item is _SHUTDOWN_WRITE:
            connection.queued.popleft()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            return True
        assert isinstance(item, bytes)
        try:
            written = sock.send(item)
        except BlockingIOError:
            written = 0
        except OSError:
            self._lost(conn_id)
            return False
        if written == len(item):
            connection.queued.popleft()
        else:
            connection.queued[0] = item[written:]
        if written:
            self._feed(conn_id, self.proxy.sent, conn_id, written, self._clock_ns())
        if written < len(item):  # the kernel's buffer is full: wait until it takes more
            try:
                await anyio.wait_writable(sock)
            except (anyio.ClosedResourceError, OSError):
                return False
        return True

    def control(self, update: CertificateUpdate | CertificateExpired) -> None:
        """A control-plane input for the machine (today: certificates from the identity agent)."""
        self._feed(None, self.proxy.control, update, self._clock_ns())

    def _feed(self, conn_id: int | None, method: Callable[..., None], *args: object) -> None:
        """Give the machine one input. A bug it raises costs that connection, never the process."""
        self._guarded(conn_id, method, *args)
        self._apply_effects()

    def _guarded(self, conn_id: int | None, method: Callable[..., None], *args: object) -> None:
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

    def _lost(self, conn_id: int) -> None:
        """The kernel reported the connection broken (reset, broken pipe)."""
        connection = self._connections.get(conn_id)
        if connection is not None:
            self._close_socket(connection, reset=True)
        self._guarded(conn_id, self.proxy.closed, conn_id, self._clock_ns())
        self._apply_effects()

    def _apply_effects(self) -> None:
        if self._applying:
            return  # the outer call's loop picks up what this input produced
        self._applying = True
        try:
            while True:
                effects = self.proxy.effects()
                for effect in effects:
                    self._apply(effect)
                if self._sent:
                    sent, self._sent = self._sent, []
                    now_ns = self._clock_ns()
                    for conn_id, count in sent:
                        self._guarded(conn_id, self.proxy.sent, conn_id, count, now_ns)
                elif not effects:
                    break
        finally:
            self._applying = False
        self._rearm_timer()

    def _apply(self, effect: object) -> None:
        if isinstance(effect, Send):
            self._send(effect.conn_id, effect.data)
        elif isinstance(effect, SetReading):
            self._set_reading(effect.conn_id, effect.enabled)
        elif isinstance(effect, Connect):
            self._connections[effect.conn_id] = _new_connection()
            assert self._task_group is not None
            self._task_group.start_soon(self._dial, effect.conn_id, effect.address)
        elif isinstance(effect, Close):
            self._close(effect.conn_id, reset=effect.reset)
        elif isinstance(effect, ShutdownWrite):
            self._queue(effect.conn_id, _SHUTDOWN_WRITE)
        elif isinstance(effect, LogError):
            log.warning("%s: %s", self.name, effect.message)

    def _send(self, conn_id: int, data: bytes) -> None:
        connection = self._connections.get(conn_id)
        if connection is None or connection.closed:
            return
        if connection.queued or connection.sock is None:
            self._queue(conn_id, data)
            return
        try:
            written = connection.sock.send(data)
        except BlockingIOError:
            written = 0
        except OSError:
            self._close_socket(connection, reset=True)
            self._guarded(conn_id, self.proxy.closed, conn_id, self._clock_ns())
            return
        if written:
            self._sent.append((conn_id, written))
        if written < len(data):
            self._queue(conn_id, data[written:])

    def _queue(self, conn_id: int, item: object) -> None:
        connection = self._connections.get(conn_id)
        if connection is None or connection.closed:
            return
        if item is _SHUTDOWN_WRITE and not connection.queued and connection.sock is not None:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_WR)
            return
        connection.queued.append(item)
        connection.writer_wakeup.set()

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
        if reset or not connection.queued:
            self._close_socket(connection, reset=reset)  # which wakes the reader and the writer
        else:
            self._queue(conn_id, _CLOSE)  # after what is still queued

    def _close_socket(self, connection: _Connection, *, reset: bool) -> None:
        sock = connection.sock
        if connection.closed or sock is None:
            connection.closed = True
            return
        connection.closed = True
        connection.queued.clear()
        connection.writer_wakeup.set()
        connection.reading_allowed.set()
        close_socket(sock, reset=reset)

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


async def _wait_closed(connection: _Connection) -> None:
    """After the peer's EOF, a connection stays open until the machine closes it (half-close)."""
    while not connection.closed:
        event = anyio.Event()
        connection.reading_allowed = event
        await event.wait()
