"""A virtual TCP network: hosts, listeners, byte streams with latency, loss, partitions and crashes.

Theory of operation
-------------------
A connection is a pair of ``VirtualSocket``s. Bytes written to one arrive at the other as a reliable,
ordered stream, as TCP promises; faults change *when* they arrive, or end the connection:

- latency: each transmission takes ``latency_min + Exp(latency_tail_mean)`` on its link;
- loss: each attempt is lost with probability ``loss`` and retransmitted after an RTO (200 ms, doubling),
  so loss shows up as delay, the way an application sees it;
- partitions (both ways or one way): segments wait in the sender's queue and are retried with backoff;
  if a segment waits longer than ``user_timeout`` (15 s), the connection is reset on both sides;
- crash: a crashed host's sockets vanish without a word (power loss): peers learn of it only through
  their own timeouts, or through an RST when they send to the restarted host;
- a write to a socket the other side already closed is answered with an RST.

Segments of one socket are delivered in order: a segment never arrives before the one written before it
(``arrival = max(previous arrival, now + delay)``). Writes may be split into segments of at most ``mss``
bytes, so receivers see arbitrary splits. Every random draw comes from the network's own RNG.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from tether.core.address import Address
from tether.sim.kernel import Kernel

MS = 1_000_000
RTO_NS = 200 * MS
RTO_MAX_NS = 3_200 * MS
USER_TIMEOUT_NS = 15_000 * MS
SYN_RETRY_DELAYS_NS = (1_000 * MS, 2_000 * MS, 4_000 * MS)


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSpec:
    latency_min_ns: int = 200_000
    latency_tail_mean_ns: int = 100_000
    loss: float = 0.0

    def __post_init__(self) -> None:
        assert self.latency_min_ns >= 0 and self.latency_tail_mean_ns >= 0
        assert 0.0 <= self.loss < 1.0, self.loss


class SocketHandler(Protocol):
    def on_data(self, sock: VirtualSocket, data: bytes) -> None: ...
    def on_eof(self, sock: VirtualSocket) -> None: ...
    def on_reset(self, sock: VirtualSocket) -> None: ...


@dataclass(slots=True)
class Host:
    name: str
    alive: bool = True
    epoch: int = 0  # incremented by each crash; sockets of an older epoch are gone
    listeners: dict[int, Callable[[VirtualSocket], SocketHandler]] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class VirtualSocket:
    network: Network
    host: str
    epoch: int
    label: str
    handler: SocketHandler | None = None
    peer: VirtualSocket | None = None
    reading: bool = True
    closed: bool = False  # closed (or reset) by its owner: no more writes, and data arriving is answered RST
    write_closed: bool = False  # we sent FIN; with a half-close we still read
    dead: bool = False  # reset or crashed: nothing more in or out
    backlog: deque[tuple[str, bytes]] = field(default_factory=deque)  # arrived while not reading
    held: deque[tuple[str, bytes]] = field(default_factory=deque)  # waiting out a partition
    held_since_ns: int | None = None
    retry_delay_ns: int = RTO_NS
    last_arrival_ns: int = 0

    def send(self, data: bytes) -> None:
        if not self.dead and not self.closed and not self.write_closed and data:
            self.network.transmit(self, "data", data)

    def shutdown_write(self) -> None:
        """Half-close: send FIN after what was written, and keep receiving."""
        if not self.dead and not self.closed and not self.write_closed:
            self.write_closed = True
            self.network.transmit(self, "fin", b"")

    def close(self) -> None:
        if not self.dead and not self.closed:
            self.closed = True
            if not self.write_closed:
                self.write_closed = True
                self.network.transmit(self, "fin", b"")

    def reset(self) -> None:
        if not self.dead:
            self.closed = self.dead = True
            self.network.transmit(self, "rst", b"")

    def attach(self, handler: SocketHandler) -> None:
        """Give a connected socket its handler; bytes that beat it here (the server spoke first) follow."""
        self.handler = handler
        if self.backlog:
            self.network.kernel.after(0, self._deliver_backlog)

    def set_reading(self, enabled: bool) -> None:
        self.reading = enabled
        if enabled and self.backlog:
            # Deliver what waited as a new event, never from inside the caller's own call: a machine
            # that resumes reading must not be re-entered while it is still handing out effects.
            self.network.kernel.after(0, self._deliver_backlog)

    def _deliver_backlog(self) -> None:
        while self.reading and self.handler is not None and self.backlog and not self.dead:
            kind, payload = self.backlog.popleft()
            self.network.hand_to_app(self, kind, payload)


class Network:
    """Hosts by name, their listeners, and the links between them."""

    def __init__(
        self, kernel: Kernel, rng: random.Random, *, default_link: LinkSpec | None = None, mss: int = 64 * 1024
    ) -> None:
        assert mss > 0
        self.kernel = kernel
        self.rng = rng
        self.default_link = default_link or LinkSpec()
        self.mss = mss
        self.hosts: dict[str, Host] = {}
        self._links: dict[tuple[str, str], LinkSpec] = {}
        self._blocked: dict[tuple[str, str], int] = {}  # (from, to) -> number of active partitions
        self._sockets: dict[str, list[VirtualSocket]] = {}
        self._socket_count = 0

    # ---------------------------------------------------------------- topology and faults

    def add_host(self, name: str) -> Host:
        assert name not in self.hosts, name
        host = self.hosts[name] = Host(name)
        self._sockets[name] = []
        return host

    def set_link(self, a: str, b: str, spec: LinkSpec) -> None:
        self._links[(a, b)] = spec
        self._links[(b, a)] = spec

    def link(self, a: str, b: str) -> LinkSpec:
        return self._links.get((a, b), self.default_link)

    def listen(self, host: str, port: int, accept: Callable[[VirtualSocket], SocketHandler]) -> None:
        self.hosts[host].listeners[port] = accept

    def partition(self, a: str, b: str, *, one_way: bool = False) -> None:
        """Block a -> b (and b -> a unless ``one_way``). Partitions nest: heal each one you start."""
        for pair in [(a, b)] if one_way else [(a, b), (b, a)]:
            self._blocked[pair] = self._blocked.get(pair, 0) + 1
        self.kernel.log("network", f"partition {a} {'->' if one_way else '<->'} {b}")

    def heal(self, a: str, b: str, *, one_way: bool = False) -> None:
        for pair in [(a, b)] if one_way else [(a, b), (b, a)]:
            count = self._blocked.get(pair, 0) - 1
            if count <= 0:
                self._blocked.pop(pair, None)
            else:
                self._blocked[pair] = count
        self.kernel.log("network", f"heal {a} {'->' if one_way else '<->'} {b}")

    def lossy(self) -> bool:
        return self.default_link.loss > 0 or any(spec.loss > 0 for spec in self._links.values())

    def clear_loss(self) -> None:
        """Make every link lossless, keeping its latency."""
        self.default_link = replace(self.default_link, loss=0.0)
        self._links = {pair: replace(spec, loss=0.0) for pair, spec in self._links.items()}
        self.kernel.log("network", "loss cleared on every link")

    def blocked(self, a: str, b: str) -> bool:
        return (a, b) in self._blocked

    def crash(self, name: str) -> None:
        host = self.hosts[name]
        host.alive = False
        host.epoch += 1
        host.listeners.clear()
        for sock in self._sockets[name]:
            sock.dead = sock.closed = True
        self._sockets[name] = []
        self.kernel.log(name, "crashed")

    def restart(self, name: str) -> None:
        self.hosts[name].alive = True
        self.kernel.log(name, "restarted")

    # ---------------------------------------------------------------- connections

    def connect(
        self, src: str, dst: Address, on_result: Callable[[VirtualSocket | None, str], None]
    ) -> Callable[[], None]:
        """Open a connection from host ``src``; ``on_result(sock, "")`` or ``(None, reason)`` follows.

        Returns a function that abandons the attempt (a connect timeout on the caller's side).
        """
        attempt = {"cancelled": False}

        def cancel() -> None:
            attempt["cancelled"] = True

        self._send_syn(src, dst, on_result, attempt, retry=0)
        return cancel

    def _send_syn(
        self,
        src: str,
        dst: Address,
        on_result: Callable[[VirtualSocket | None, str], None],
        attempt: dict[str, bool],
        retry: int,
    ) -> None:
        target = self.hosts.get(dst.host)
        lost = (
            target is None
            or not target.alive
            or self.blocked(src, dst.host)
            or self.blocked(dst.host, src)
            or self.rng.random() < self.link(src, dst.host).loss
        )
        if lost:
            if retry >= len(SYN_RETRY_DELAYS_NS):
                self.kernel.after(0, lambda: None if attempt["cancelled"] else on_result(None, "connection timed out"))
                return
            self.kernel.after(
                SYN_RETRY_DELAYS_NS[retry],
                lambda: None if attempt["cancelled"] else self._send_syn(src, dst, on_result, attempt, retry + 1),
            )
            return
        assert target is not None
        there = self._delay(src, dst.host)
        back = self._delay(dst.host, src)

        def arrive() -> None:
            accept = target.listeners.get(dst.port) if target.alive else None
            if accept is None:
                # RST for a closed port; a dead host answers nothing, so the caller's timeout decides.
                if target.alive:
                    self.kernel.after(
                        back, lambda: None if attempt["cancelled"] else on_result(None, "connection refused")
                    )
                return
            if attempt["cancelled"]:
                return
            client = self._new_socket(src, f"{src}->{dst}")
            server = self._new_socket(dst.host, f"{dst}<-{src}")
            client.peer, server.peer = server, client
            # Before accept(): a server that speaks first writes from inside it, and its first segment must
            # set the ordering floor for what follows on this socket.
            client.last_arrival_ns = server.last_arrival_ns = self.kernel.now_ns
            server.handler = accept(server)

            def established() -> None:
                if attempt["cancelled"] or client.dead:
                    client.reset() if not client.dead else None
                    return
                on_result(client, "")

            self.kernel.after(back, established)

        self.kernel.after(there, arrive)

    def _new_socket(self, host: str, label: str) -> VirtualSocket:
        self._socket_count += 1
        sock = VirtualSocket(self, host, self.hosts[host].epoch, f"{label}#{self._socket_count}")
        self._sockets[host].append(sock)
        return sock

    # ---------------------------------------------------------------- segments

    def transmit(self, sock: VirtualSocket, kind: str, payload: bytes) -> None:
        if kind == "data" and len(payload) > self.mss:
            for start in range(0, len(payload), self.mss):
                self._enqueue(sock, kind, payload[start : start + self.mss])
        else:
            self._enqueue(sock, kind, payload)

    def _enqueue(self, sock: VirtualSocket, kind: str, payload: bytes) -> None:
        blocked = self._blocked and sock.peer is not None and (sock.host, sock.peer.host) in self._blocked
        if sock.held or blocked:
            sock.held.append((kind, payload))
            if sock.held_since_ns is None:
                sock.held_since_ns = self.kernel.now_ns
                sock.retry_delay_ns = RTO_NS
                self.kernel.after(RTO_NS, lambda: self._retry_held(sock))
            return
        self._put_on_wire(sock, kind, payload)

    def _retry_held(self, sock: VirtualSocket) -> None:
        if (
            not sock.held
            or sock.peer is None
            or not self.hosts[sock.host].alive
            or sock.epoch != self.hosts[sock.host].epoch
        ):
            sock.held.clear()
            sock.held_since_ns = None
            return
        if self.blocked(sock.host, sock.peer.host):
            assert sock.held_since_ns is not None
            if self.kernel.now_ns - sock.held_since_ns >= USER_TIMEOUT_NS:
                self.kernel.log(sock.host, f"{sock.label} gave up after the user timeout")
                sock.held.clear()
                self._abort_both(sock)
                return
            sock.retry_delay_ns = min(sock.retry_delay_ns * 2, RTO_MAX_NS)
            self.kernel.after(sock.retry_delay_ns, lambda: self._retry_held(sock))
            return
        sock.held_since_ns = None
        while sock.held:
            kind, payload = sock.held.popleft()
            self._put_on_wire(sock, kind, payload)

    def _put_on_wire(self, sock: VirtualSocket, kind: str, payload: bytes) -> None:
        peer = sock.peer
        if peer is None:
            return
        arrival = self.kernel.now_ns + self._delay(sock.host, peer.host)
        if kind != "rst":
            arrival = max(arrival, sock.last_arrival_ns)  # TCP delivers in order
            sock.last_arrival_ns = arrival
        self.kernel.at(arrival, lambda: self._arrive(sock, peer, kind, payload))

    def _delay(self, a: str, b: str) -> int:
        spec = self.link(a, b)
        delay = spec.latency_min_ns
        if spec.latency_tail_mean_ns:
            delay += int(self.rng.expovariate(1.0 / spec.latency_tail_mean_ns))
        rto = RTO_NS
        while spec.loss and self.rng.random() < spec.loss and rto <= RTO_MAX_NS * 8:
            delay += rto  # lost, then retransmitted after the RTO
            rto *= 2
        return delay

    def _arrive(self, sender: VirtualSocket, receiver: VirtualSocket, kind: str, payload: bytes) -> None:
        host = self.hosts[receiver.host]
        if not host.alive:
            return  # a powered-off host answers nothing
        if receiver.epoch != host.epoch:
            if kind != "rst":
                self._reset_sender(sender)  # the restarted host does not know this connection
            return
        if receiver.dead:
            return
        if kind == "rst":
            receiver.dead = receiver.closed = True
            receiver.backlog.clear()
            self.hand_to_app(receiver, "rst", b"")
            return
        if receiver.closed and kind == "data":
            self._reset_sender(sender)  # Linux answers data for a closed socket with RST
            return
        if receiver.reading and receiver.handler is not None:
            self.hand_to_app(receiver, kind, payload)
        else:
            receiver.backlog.append((kind, payload))  # paused, or the connect result has not reached its owner

    def hand_to_app(self, sock: VirtualSocket, kind: str, payload: bytes) -> None:
        handler = sock.handler
        if handler is None:
            return
        if kind == "data":
            handler.on_data(sock, payload)
        elif kind == "fin":
            handler.on_eof(sock)
        else:
            handler.on_reset(sock)

    def _reset_sender(self, sender: VirtualSocket) -> None:
        if sender.dead:
            return
        back = self._delay(sender.peer.host if sender.peer else sender.host, sender.host)

        def deliver() -> None:
            if not sender.dead and self.hosts[sender.host].alive and sender.epoch == self.hosts[sender.host].epoch:
                sender.dead = sender.closed = True
                self.hand_to_app(sender, "rst", b"")

        self.kernel.after(back, deliver)

    def _abort_both(self, sock: VirtualSocket) -> None:
        for side in (sock, sock.peer):
            if side is not None and not side.dead:
                side.dead = side.closed = True
                self.hand_to_app(side, "rst", b"")
