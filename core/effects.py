"""Effects: what a core machine asks its driver to do, as plain frozen data.

A driver (the anyio adapter or the simulator) drains ``machine.effects()`` after every input and carries
each effect out in order. Effects name connections by the integer ids the machine hands out; the driver
keeps the table from id to socket (or virtual link). No effect carries a callback.
"""

from __future__ import annotations

from dataclasses import dataclass

from tether.core.address import Address


@dataclass(frozen=True, slots=True, kw_only=True)
class Send:
    """Write ``data`` to connection ``conn_id``. The driver reports completion with ``sent()``."""

    conn_id: int
    data: bytes

    def __repr__(self) -> str:
        return f"Send(conn_id={self.conn_id}, data=<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class Connect:
    """Open a TCP connection to ``address`` and call it ``conn_id``.

    The driver answers with ``connected(conn_id)`` or ``connect_failed(conn_id, reason)``. The machine
    owns the connect timeout: the driver must not add one of its own.
    """

    conn_id: int
    address: Address


@dataclass(frozen=True, slots=True, kw_only=True)
class Close:
    """Close ``conn_id`` after flushing what was sent on it; with ``reset`` discard and abort instead.

    After emitting Close the machine has forgotten the connection; later inputs for it are ignored.
    """

    conn_id: int
    reset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownWrite:
    """Send FIN on ``conn_id`` after flushing what was sent, and keep reading (a TCP half-close).

    Opaque tunnels use it to carry one side's end of stream to the other without ending the reverse
    direction.
    """

    conn_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SetReading:
    """Start (``enabled``) or stop reading from ``conn_id``; this is how the core applies backpressure.

    A new connection is read from until the machine says otherwise.
    """

    conn_id: int
    enabled: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class LogError:
    """One line for the operator's log: a request or connection failed, and why."""

    conn_id: int | None
    message: str


Effect = Send | Connect | Close | ShutdownWrite | SetReading | LogError
