"""Runs a core ``Proxy`` on real sockets, inside anyio's event loop.

This module translates and decides nothing: it hands the machine what the sockets report, with the current
monotonic time, carries out the effects the machine returns, and keeps one timer armed at the machine's
``next_deadline_ns()``.

Sockets are served by asyncio protocols on the loop anyio runs on (uvloop where installed): the loop calls
``data_received`` straight from its poller, so a request costs no task switches at all, where a task per
connection waiting with ``wait_readable`` cost two wake-ups per request and most of the driver's share of
each request. Writes go to the transport at once. The machine's backpressure needs to know what the kernel
took: the transports' write buffers have a high-water mark of zero, so ``pause_writing`` says bytes are
held back and ``resume_writing`` says they all left; ``proxy.sent`` is told exactly that. ``SetReading``
pauses and resumes a transport's reading. anyio still owns the process: the listeners arrive as anyio
listeners and ``serve`` returns when its ``stop`` event is set and the machine has drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable

import anyio
import anyio.abc

from tether.adapters.sockets import original_destination
from tether.core.address import Address
from tether.core.effects import Close, Connect, LogError, Send, SetReading, ShutdownWrite
from tether.core.proxy import Proxy
from tether.core.proxy.mtls import CertificateExpired, CertificateUpdate

log = logging.getLogger("tether.proxy")


class _Link(asyncio.Protocol):
    """One connection between the loop and the machine: an accepted one, or one the machine asked for."""

    __slots__ = ("driver", "conn_id", "transport", "held", "closed", "eof_sent")

    def __init__(self, driver: ProxyDriver, conn_id: int | None = None) -> None:
        self.driver = driver
        self.conn_id = conn_id
        self.transport: asyncio.Transport | None = None
        self.held = 0  # bytes written to the transport and not yet reported to the machine as sent
        self.closed = False
        self.eof_sent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (uvloop's transports are not asyncio subclasses)
        transport.set_write_buffer_limits(high=0)  # every held-back byte pauses writing: exact sent() counts
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.conn_id is None:
            self.driver._accepted(self, sock)
        else:  # a connection the machine asked for: registered before any byte can arrive on it
            self.driver._connected(self)

    def data_received(self, data: bytes) -> None:
        # _feed written out: this runs twice per proxied request, and each call level is about 0.1 µs.
        driver = self.driver
        try:
            driver.proxy.received(self.conn_id, data, driver._clock_ns())  # type: ignore[arg-type]
        except Exception:
            driver._failed(self.conn_id)
        driver._apply_effects()

    def eof_received(self) -> bool:
        self.driver._feed(self.conn_id, self.driver.proxy.received, self.conn_id, b"", self.driver._clock_ns())
        return True  # keep the transport: a half-closed connection stays open until the machine closes it

    def pause_writing(self) -> None:
        pass  # the transport holds bytes; resume_writing reports them once they left

    def resume_writing(self) -> None:
        if self.held and not self.closed:
            held, self.held = self.held, 0
            self.driver._feed(self.conn_id, self.driver.proxy.sent, self.conn_id, held, self.driver._clock_ns())

    def connection_lost(self, exc: Exception | None) -> None:
        driver = self.driver
        if driver._links.get(self.conn_id) is self:  # type: ignore[arg-type]
            del driver._links[self.conn_id]  # type: ignore[arg-type]
        if not self.closed:  # lost on the peer's or the kernel's side, not closed by the machine
            self.closed = True
            driver._feed(self.conn_id, driver.proxy.closed, self.conn_id, driver._clock_ns())


class ProxyDriver:
    """Drives one ``Proxy``; call ``serve`` inside a task group."""

    def __init__(self, proxy: Proxy, *, clock_ns: Callable[[], int] = time.monotonic_ns, name: str = "proxy") -> None:
        self.proxy = proxy
        self.name = name
        self._clock_ns = clock_ns
        self._links: dict[int, _Link] = {}
        self._dials: dict[int, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline_ns: int | None = None
        self._sent: list[tuple[int, int]] = []  # writes the kernel took at once, not yet reported
        self._applying = False

    async def serve(self, listener: anyio.abc.SocketListener, *, stop: anyio.Event) -> None:
        """Accept on ``listener`` until ``stop`` is set, then drain and return."""
        self._loop = asyncio.get_running_loop()
        # anyio's TCP listener may hold several sockets (one per address family): serve each.
        sockets = [
            each.extra(anyio.abc.SocketAttribute.raw_socket) for each in getattr(listener, "listeners", [listener])
        ]
        servers = [await self._loop.create_server(lambda: _Link(self), sock=sock) for sock in sockets]
        try:
            await stop.wait()
        finally:
            for server in servers:
                server.close()  # stop accepting; connections in flight are the machine's to drain
            self.proxy.shutdown(self._clock_ns())
            self._apply_effects()
            with anyio.CancelScope(shield=True):
                while not self.proxy.is_drained():
                    await anyio.sleep(0.01)
            for link in list(self._links.values()):
                if link.transport is not None:
                    link.transport.abort()
            if self._timer is not None:
                self._timer.cancel()

    def control(self, update: CertificateUpdate | CertificateExpired) -> None:
        """A control-plane input for the machine (today: certificates from the identity agent)."""
        self._feed(None, self.proxy.control, update, self._clock_ns())

    # ---------------------------------------------------------------- inputs

    def _accepted(self, link: _Link, sock: socket.socket) -> None:
        try:
            peer = sock.getpeername()
        except OSError:  # already reset by the client
            peer = None
        peer_address = Address(str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        target = original_destination(sock)  # type: ignore[arg-type]
        conn_id = self.proxy.accepted(self._clock_ns(), peer=peer_address, target=str(target) if target else None)
        link.conn_id = conn_id
        self._links[conn_id] = link
        self._apply_effects()

    async def _dial(self, conn_id: int, address: Address) -> None:
        assert self._loop is not None
        try:
            await self._loop.create_connection(lambda: _Link(self, conn_id), address.host, address.port)
        except OSError as error:
            self._links.pop(conn_id, None)
            self._feed(conn_id, self.proxy.connect_failed, conn_id, error.strerror or str(error), self._clock_ns())
        except asyncio.CancelledError:
            pass  # the machine gave up on the connect (its timeout, or a Close) and already forgot the id
        finally:
            self._dials.pop(conn_id, None)

    def _connected(self, link: _Link) -> None:
        conn_id = link.conn_id
        assert conn_id is not None
        if conn_id not in self._dials:  # the machine gave up while the kernel was connecting
            link.closed = True
            if link.transport is not None:
                link.transport.abort()
            return
        self._links[conn_id] = link
        self._feed(conn_id, self.proxy.connected, conn_id, self._clock_ns())

    def _feed(self, conn_id: int | None, method: Callable[..., None], *args: object) -> None:
        """Give the machine one input. A bug it raises costs that connection, never the process."""
        self._guarded(conn_id, method, *args)
        self._apply_effects()

    def _guarded(self, conn_id: int | None, method: Callable[..., None], *args: object) -> None:
        try:
            method(*args)
        except Exception:
            self._failed(conn_id)

    def _failed(self, conn_id: int | None) -> None:
        """The machine raised while handling ``conn_id`` (inside an ``except`` block): abort that connection."""
        log.exception("%s: internal error handling connection %s; aborting it", self.name, conn_id)
        if conn_id is not None:
            self._close(conn_id, reset=True)
            try:
                self.proxy.closed(conn_id, self._clock_ns())
            except Exception:
                log.exception("%s: internal error while dropping connection %s", self.name, conn_id)

    # ---------------------------------------------------------------- effects

    def _apply_effects(self) -> None:
        if self._applying:
            return  # the outer call's loop picks up what this input produced
        self._applying = True
        proxy = self.proxy
        try:
            while True:
                effects = proxy.effects()
                for effect in effects:
                    if type(effect) is Send:  # most effects: skip _apply's dispatch
                        self._send(effect.conn_id, effect.data)
                    else:
                        self._apply(effect)
                if self._sent:
                    sent, self._sent = self._sent, []
                    now_ns = self._clock_ns()
                    for conn_id, count in sent:
                        try:
                            proxy.sent(conn_id, count, now_ns)
                        except Exception:
                            self._failed(conn_id)
                elif not effects:
                    break
        finally:
            self._applying = False
        self._rearm_timer()

    def _apply(self, effect: object) -> None:
        kind = type(effect)
        if kind is Send:
            self._send(effect.conn_id, effect.data)  # type: ignore[attr-defined]
        elif kind is SetReading:
            link = self._links.get(effect.conn_id)  # type: ignore[attr-defined]
            if link is not None and link.transport is not None and not link.closed:
                if effect.enabled:  # type: ignore[attr-defined]
                    link.transport.resume_reading()
                else:
                    link.transport.pause_reading()
        elif kind is Connect:
            assert self._loop is not None
            self._dials[effect.conn_id] = self._loop.create_task(self._dial(effect.conn_id, effect.address))  # type: ignore[attr-defined]
        elif kind is Close:
            self._close(effect.conn_id, reset=effect.reset)  # type: ignore[attr-defined]
        elif kind is ShutdownWrite:
            link = self._links.get(effect.conn_id)  # type: ignore[attr-defined]
            if link is not None and link.transport is not None and not link.closed and not link.eof_sent:
                link.eof_sent = True
                with contextlib.suppress(OSError, RuntimeError):
                    link.transport.write_eof()  # after what is still buffered
        elif kind is LogError:
            log.warning("%s: %s", self.name, effect.message)  # type: ignore[attr-defined]

    def _send(self, conn_id: int, data: bytes) -> None:
        link = self._links.get(conn_id)
        if link is None or link.closed or link.transport is None:
            return
        transport = link.transport
        # Bytes the transport still holds are all in ``held`` (resume_writing clears it once they left): with
        # none held, the buffer is empty and one size query is enough.
        before = transport.get_write_buffer_size() if link.held else 0
        transport.write(data)
        held = transport.get_write_buffer_size() - before
        taken = len(data) - held
        link.held += held
        if taken:
            self._sent.append((conn_id, taken))

    def _close(self, conn_id: int, *, reset: bool) -> None:
        dial = self._dials.pop(conn_id, None)
        if dial is not None:
            dial.cancel()
        link = self._links.pop(conn_id, None)
        if link is None or link.closed:
            return
        link.closed = True
        transport = link.transport
        if transport is None:
            return
        if reset:
            sock = transport.get_extra_info("socket")
            with contextlib.suppress(OSError):
                # SO_LINGER with a zero timeout makes the close send RST: the peer sees an abort.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()  # flushes what is buffered first

    # ---------------------------------------------------------------- the machine's timer

    def _rearm_timer(self) -> None:
        deadline = self.proxy.next_deadline_ns()
        armed = self._timer_deadline_ns
        if armed is not None and (deadline is None or armed <= deadline):
            # The armed timer fires no later than needed; _timer_fired looks again then. Most inputs push the
            # earliest deadline back (an idle timer re-armed by every request): no new loop timer for them.
            return
        if deadline == armed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_deadline_ns = None
        if deadline is not None and self._loop is not None:
            delay = max(0.0, (deadline - self._clock_ns()) / 1e9)
            self._timer = self._loop.call_later(delay, self._timer_fired)
            self._timer_deadline_ns = deadline

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_deadline_ns = None
        now_ns = self._clock_ns()
        deadline = self.proxy.next_deadline_ns()
        if deadline is not None and deadline <= now_ns:
            self._feed(None, self.proxy.on_timer, now_ns)
        else:
            self._rearm_timer()
