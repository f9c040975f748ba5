"""Upstream connections to one endpoint: idle ones to reuse, a cap on the total, and a bounded queue.

The pool holds ids only; the proxy owns the connections. Idle connections are reused newest first, so
that under light load the oldest ones reach their idle timeout and close (the same choice as hyper's
pool, which linkerd2-proxy uses).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tether.core.address import Address
from tether.core.config import ProxyConfig


@dataclass(slots=True)
class EndpointPool:
    endpoint: Address
    max_connections: int
    max_idle: int
    max_waiters: int
    connection_ids: set[int] = field(default_factory=set)  # every open or opening connection
    idle_ids: list[int] = field(default_factory=list)  # a stack: the last released is reused first
    waiting_exchange_ids: deque[int] = field(default_factory=deque)

    def take_idle(self) -> int | None:
        return self.idle_ids.pop() if self.idle_ids else None

    def has_capacity(self) -> bool:
        return len(self.connection_ids) < self.max_connections

    def can_queue(self) -> bool:
        return len(self.waiting_exchange_ids) < self.max_waiters

    def keep_idle(self, conn_id: int) -> bool:
        """Park ``conn_id`` for reuse; False means the idle list is full and the caller should close it."""
        assert conn_id in self.connection_ids, conn_id
        if len(self.idle_ids) >= self.max_idle:
            return False
        self.idle_ids.append(conn_id)
        return True

    def forget(self, conn_id: int) -> None:
        self.connection_ids.discard(conn_id)
        if conn_id in self.idle_ids:
            self.idle_ids.remove(conn_id)


def pool_for(pools: dict[Address, EndpointPool], endpoint: Address, config: ProxyConfig) -> EndpointPool:
    """The pool of ``endpoint`` in ``pools``, made with the configured limits on first use."""
    pool = pools.get(endpoint)
    if pool is None:
        pool = pools[endpoint] = EndpointPool(
            endpoint,
            max_connections=config.pool_max_connections_per_endpoint,
            max_idle=config.pool_max_idle_per_endpoint,
            max_waiters=config.pool_max_waiters_per_endpoint,
        )
    return pool
