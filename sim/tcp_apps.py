"""Virtual applications that speak raw TCP: an echo server and a session client that checks every byte.

They exercise the proxy's opaque tunnels and protocol detection. A session sends a random payload, then
half-closes; the server echoes every byte as it arrives (after a banner, if it speaks first) and
half-closes when the client has. With a server that speaks first the client sends nothing until the
whole banner has arrived, as an SMTP or MySQL client does: a detecting proxy in between sees no bytes
and must tunnel the connection once its detect timeout passes. The client checks that it got exactly
the banner and its own bytes back, then the end of stream: a tunnel that loses, reorders, truncates or
mixes bytes breaks that check.
"""

from __future__ import annotations

from dataclasses import dataclass

from tether.core.address import Address
from tether.sim.apps import OpenLoopClient, RequestRecord
from tether.sim.network import Network, VirtualSocket

MS = 1_000_000
BANNER = b"220 ready\r\n"


class VirtualEchoServer:
    def __init__(self, network: Network, host: str, port: int, *, server_first: bool) -> None:
        self.network = network
        self.server_first = server_first
        network.listen(host, port, self._accept)

    def _accept(self, sock: VirtualSocket) -> _EchoConnection:
        if self.server_first:
            sock.send(BANNER)
        return _EchoConnection()


class _EchoConnection:
    def on_data(self, sock: VirtualSocket, data: bytes) -> None:
        sock.send(data)

    def on_eof(self, sock: VirtualSocket) -> None:
        sock.shutdown_write()
        sock.close()  # both directions have ended

    def on_reset(self, sock: VirtualSocket) -> None:
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpWorkloadSpec:
    target: Address
    rate_per_s: float = 20.0
    start_ns: int = 0
    stop_ns: int = 10_000 * MS
    payload_bytes: tuple[int, int] = (1, 4096)
    server_first: bool = False  # expect the server's banner before the echo
    timeout_ns: int = 60_000 * MS


class TcpSessionClient(OpenLoopClient):
    """Opens one connection per session; records end as for WorkloadClient (error None means every byte
    came back)."""

    spec: TcpWorkloadSpec

    def _issue(self, *, probe: bool = False) -> None:
        payload = self.rng.randbytes(self.rng.randint(*self.spec.payload_bytes))
        record = RequestRecord(
            request_id=f"{self.host}-tcp-{len(self.records) + 1}",
            started_ns=self.kernel.now_ns,
            body=payload,
            response_bytes=len(payload),
            chunked=False,
            probe=probe,
        )
        self.records.append(record)
        self._pending += 1
        session = _Session(self, record)
        self.kernel.after(self.spec.timeout_ns, session.timed_out)
        self.network.connect(self.host, self.spec.target, session.connected)

    def finish(self, record: RequestRecord, *, error: str | None) -> None:
        if record.done:
            self.on_violation(f"session {record.request_id} ended twice")
            return
        record.ended_ns = self.kernel.now_ns
        record.error = error
        self._pending -= 1
        self.kernel.log(self.host, f"{record.request_id} {'ok' if error is None else 'error ' + error}")


class _Session:
    def __init__(self, client: TcpSessionClient, record: RequestRecord) -> None:
        self.client = client
        self.record = record
        self.sock: VirtualSocket | None = None
        self.received = bytearray()
        self.sent = False  # the payload and the half-close went out

    def connected(self, sock: VirtualSocket | None, reason: str) -> None:
        if self.record.done:
            if sock is not None:
                sock.reset()
            return
        if sock is None:
            self.client.finish(self.record, error=f"connect_failed: {reason}")
            return
        self.sock = sock
        sock.attach(self)
        if not self.client.spec.server_first:
            self._send_payload(sock)

    def _send_payload(self, sock: VirtualSocket) -> None:
        self.sent = True
        payload = self.record.body
        half = len(payload) // 2
        sock.send(payload[:half])
        sock.send(payload[half:])
        sock.shutdown_write()

    def on_data(self, sock: VirtualSocket, data: bytes) -> None:
        self.received += data
        if not self.sent and len(self.received) >= len(BANNER):
            self._send_payload(sock)  # the server has spoken: the client's turn

    def on_eof(self, sock: VirtualSocket) -> None:
        if self.record.done:
            return
        expected = (BANNER if self.client.spec.server_first else b"") + self.record.body
        if bytes(self.received) != expected:
            self.client.on_violation(
                f"session {self.record.request_id}: got {len(self.received)} bytes back, expected {len(expected)} "
                f"(first difference at {_first_difference(bytes(self.received), expected)})"
            )
        self.client.finish(self.record, error=None)
        sock.close()

    def on_reset(self, sock: VirtualSocket) -> None:
        if not self.record.done:
            self.client.finish(self.record, error="connection_reset")

    def timed_out(self) -> None:
        if not self.record.done:
            self.client.finish(self.record, error="client_timeout")
            if self.sock is not None:
                self.sock.reset()


def _first_difference(got: bytes, expected: bytes) -> int:
    for index, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            return index
    return min(len(got), len(expected))
