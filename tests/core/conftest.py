from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.effects import Close, Connect, LogError, Send, SetReading, ShutdownWrite
from tether.core.proxy import Proxy

ENDPOINT_A = Address("10.0.0.1", 80)
ENDPOINT_B = Address("10.0.0.2", 80)
S = 1_000_000_000


@dataclass
class Harness:
    """A minimal driver for tests: records what the proxy asks for, acknowledges writes at once."""

    proxy: Proxy
    now_ns: int = 0
    written: dict[int, bytearray] = field(default_factory=dict)
    closed: dict[int, bool] = field(default_factory=dict)  # conn id -> reset?
    connects: list[Connect] = field(default_factory=list)
    reading: dict[int, bool] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    shutdowns: list[int] = field(default_factory=list)
    auto_ack: bool = True

    def pump(self) -> None:
        for effect in self.proxy.effects():
            if isinstance(effect, Send):
                assert effect.conn_id not in self.closed, f"write after close on {effect.conn_id}"
                self.written.setdefault(effect.conn_id, bytearray()).extend(effect.data)
                if self.auto_ack:
                    self.proxy.sent(effect.conn_id, len(effect.data), self.now_ns)
            elif isinstance(effect, Close):
                self.closed[effect.conn_id] = effect.reset
            elif isinstance(effect, Connect):
                self.connects.append(effect)
            elif isinstance(effect, SetReading):
                self.reading[effect.conn_id] = effect.enabled
            elif isinstance(effect, LogError):
                self.errors.append(effect.message)
            elif isinstance(effect, ShutdownWrite):
                self.shutdowns.append(effect.conn_id)

    def accept(self) -> int:
        conn_id = self.proxy.accepted(self.now_ns)
        self.pump()
        return conn_id

    def recv(self, conn_id: int, data: bytes) -> None:
        self.proxy.received(conn_id, data, self.now_ns)
        self.pump()

    def connected(self, conn_id: int) -> None:
        self.proxy.connected(conn_id, self.now_ns)
        self.pump()

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * S)
        deadline = self.proxy.next_deadline_ns()
        if deadline is not None and deadline <= self.now_ns:
            self.proxy.on_timer(self.now_ns)
            self.pump()

    def take(self, conn_id: int) -> bytes:
        data = bytes(self.written.get(conn_id, b""))
        self.written[conn_id] = bytearray()
        return data


@pytest.fixture
def make_harness():
    def make(
        endpoints: list[Address] | None = None,
        *,
        resolver: StaticResolver | None = None,
        direction: str = "outbound",
        **config: int,
    ) -> Harness:
        if resolver is None:
            resolver = StaticResolver(default=[ENDPOINT_A] if endpoints is None else endpoints)
        return Harness(Proxy(ProxyConfig(**config), resolver, random.Random(7), direction=direction))

    return make
