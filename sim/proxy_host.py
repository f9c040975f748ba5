"""Drives a core ``Proxy`` on the virtual network: the simulator's counterpart of adapters/driver.py.

It maps the machine's connection ids to virtual sockets, carries out effects, and keeps exactly one
kernel event armed at the machine's ``next_deadline_ns()`` (stale timer events are recognised by a
generation number and ignored). Writes complete at once on the virtual network, so ``sent`` follows
each ``Send`` immediately; backpressure still applies through ``SetReading``, which pauses delivery.
"""

from __future__ import annotations

from collections.abc import Callable

from tether.core.address import Address
from tether.core.effects import Close, Connect, LogError, Send, SetReading, ShutdownWrite
from tether.core.proxy import Proxy
from tether.core.proxy.mtls import CertificateExpired, CertificateUpdate
from tether.core.traffic.route_config import RouteConfig
from tether.sim.kernel import MachineTimer
from tether.sim.network import Network, VirtualSocket


class SimProxy:
    """One proxy process on host ``host``, listening on ``port``; rebuilt by ``factory`` after a crash.

    ``name`` is who the trace says acted (the host, unless two proxies share it: an inbound role).
    """

    def __init__(
        self, network: Network, host: str, port: int, factory: Callable[[int], Proxy], *, name: str | None = None
    ) -> None:
        self.network = network
        self.kernel = network.kernel
        self.host = host
        self.name = name or host
        self.port = port
        self.factory = factory
        self.restarts = 0
        # Routes for this proxy (retries, timeouts, weighted splits), parsed from the scenario. The proxy
        # reads them once the traffic wiring lands; until then they wait here for it (world.route_keyword).
        self.route_config: RouteConfig | None = None
        self.proxy = factory(0)
        self._sockets: dict[int, VirtualSocket] = {}
        self._ids: dict[int, int] = {}  # id(socket) -> conn id
        self._pending_connects: dict[int, Callable[[], None]] = {}
        self._timer = MachineTimer(
            self.kernel, lambda: self.proxy.next_deadline_ns(), self._timer_fired, lambda: network.hosts[host].alive
        )
        # The machine's error lines by message (the connection id left out), for results: an mTLS refusal
        # names the identities involved. Bounded by the distinct messages a run produces (a few dozen).
        self.errors: dict[str, int] = {}
        network.listen(host, port, self._accept)

    def restart(self) -> None:
        """After a crash: a fresh process with no connections and a new RNG stream."""
        self.restarts += 1
        self.proxy = self.factory(self.restarts)
        self._sockets.clear()
        self._ids.clear()
        self._pending_connects.clear()
        self._timer.reset()
        self.network.listen(self.host, self.port, self._accept)

    def control(self, update: CertificateUpdate | CertificateExpired) -> None:
        """A certificate from the host's identity agent (sim/identity_host.py), or its expiry."""
        if not self.network.hosts[self.host].alive:
            return
        self.proxy.control(update, self.kernel.now_ns)
        self._apply()

    # ---------------------------------------------------------------- socket events -> machine

    def _accept(self, sock: VirtualSocket) -> SimProxy:
        peer = sock.peer.host if sock.peer is not None else "?"
        conn_id = self.proxy.accepted(self.kernel.now_ns, peer=Address(peer, 1))
        self._register(conn_id, sock)
        self.kernel.log(self.name, f"accept c{conn_id} from {peer}")
        self._apply()
        return self

    def on_data(self, sock: VirtualSocket, data: bytes) -> None:
        conn_id = self._ids.get(id(sock))
        if conn_id is not None:
            self.proxy.received(conn_id, data, self.kernel.now_ns)
            self._apply()

    def on_eof(self, sock: VirtualSocket) -> None:
        conn_id = self._ids.get(id(sock))
        if conn_id is not None:
            self.kernel.log(self.name, f"eof c{conn_id}")
            self.proxy.received(conn_id, b"", self.kernel.now_ns)
            self._apply()

    def on_reset(self, sock: VirtualSocket) -> None:
        conn_id = self._ids.pop(id(sock), None)
        if conn_id is not None:
            self._sockets.pop(conn_id, None)
            self.kernel.log(self.name, f"reset c{conn_id}")
            self.proxy.closed(conn_id, self.kernel.now_ns)
            self._apply()

    def _connect_result(self, conn_id: int, generation: int, sock: VirtualSocket | None, reason: str) -> None:
        if generation != self.restarts or self._pending_connects.pop(conn_id, None) is None:
            if sock is not None:
                sock.reset()
            return
        if sock is None:
            self.kernel.log(self.name, f"connect c{conn_id} failed: {reason}")
            self.proxy.connect_failed(conn_id, reason, self.kernel.now_ns)
        else:
            sock.attach(self)
            self._register(conn_id, sock)
            self.kernel.log(self.name, f"connected c{conn_id}")
            self.proxy.connected(conn_id, self.kernel.now_ns)
        self._apply()

    # ---------------------------------------------------------------- machine effects -> sockets

    def _apply(self) -> None:
        # Acknowledging a write (``sent``) can itself produce effects, such as resuming a paused reader;
        # keep draining until the machine has nothing more to say.
        effects = self.proxy.effects()
        while effects:
            for effect in effects:
                self._carry_out(effect)
            effects = self.proxy.effects()
        self._timer.arm()

    def _carry_out(self, effect: object) -> None:
        proxy = self.proxy
        if isinstance(effect, Send):
            sock = self._sockets.get(effect.conn_id)
            if sock is not None:
                sock.send(effect.data)
            proxy.sent(effect.conn_id, len(effect.data), self.kernel.now_ns)
        elif isinstance(effect, SetReading):
            sock = self._sockets.get(effect.conn_id)
            if sock is not None:
                sock.set_reading(effect.enabled)
        elif isinstance(effect, Connect):
            self._connect(effect.conn_id, effect.address)
        elif isinstance(effect, Close):
            self._close(effect.conn_id, reset=effect.reset)
        elif isinstance(effect, ShutdownWrite):
            sock = self._sockets.get(effect.conn_id)
            if sock is not None:
                self.kernel.log(self.name, f"shutdown-write c{effect.conn_id}")
                sock.shutdown_write()
        elif isinstance(effect, LogError):
            self.kernel.log(self.name, f"error c{effect.conn_id}: {effect.message}")
            self.errors[effect.message] = self.errors.get(effect.message, 0) + 1

    def _connect(self, conn_id: int, address: Address) -> None:
        self.kernel.log(self.name, f"connect c{conn_id} to {address}")
        generation = self.restarts
        cancel = self.network.connect(
            self.host, address, lambda sock, reason: self._connect_result(conn_id, generation, sock, reason)
        )
        self._pending_connects[conn_id] = cancel

    def _close(self, conn_id: int, *, reset: bool) -> None:
        cancel = self._pending_connects.pop(conn_id, None)
        if cancel is not None:
            cancel()
            return
        sock = self._sockets.pop(conn_id, None)
        if sock is None:
            return
        self._ids.pop(id(sock), None)
        self.kernel.log(self.name, f"{'reset' if reset else 'close'} c{conn_id}")
        sock.reset() if reset else sock.close()

    def _register(self, conn_id: int, sock: VirtualSocket) -> None:
        self._sockets[conn_id] = sock
        self._ids[id(sock)] = conn_id

    def _timer_fired(self, now_ns: int) -> None:
        self.proxy.on_timer(now_ns)
        self._apply()
