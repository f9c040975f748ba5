"""Runs the proxy's ``IdentityAgent`` (core/identity/agent.py) on anyio: a socket, a timer, a key, a token file.

This module decides nothing. It carries out the agent's effects and reports back:

- ``RequestKey``: an ECDSA P-256 key from cryptography, generated here, held in memory and never written
  anywhere (``TlsContexts.build`` loads it into OpenSSL through an anonymous memfd);
- ``ReadToken``: reads the token file afresh (Kubernetes rotates projected tokens), without surrounding
  whitespace (``tether identity token > FILE`` leaves a newline);
- ``Connect`` / ``Send`` / ``Close``: one TCP connection to the identity service at a time, a reader task
  and a writer task;
- ``CertificateReady``: builds ``TlsContexts`` once and hands the process's proxies a ``CertificateUpdate``
  through ``apply``; ``CertificateExpired``: hands them ``mtls.CertificateExpired``;
- ``LogError``: one warning line.

One timer is kept armed at ``agent.next_deadline_ns()``. The monotonic clock and the wall clock are read
here and nowhere else.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
from cryptography.hazmat.primitives.asymmetric import ec

from tether.core.address import Address
from tether.core.effects import Close, Connect, LogError, Send
from tether.core.identity.agent import IdentityAgent
from tether.core.identity.ca import utc_text
from tether.core.identity.client import CertificateExpired, CertificateReady, ReadToken, RequestKey
from tether.core.proxy import mtls

log = logging.getLogger("tether.identity")

READ_SIZE = 64 * 1024
TOKEN_BYTES_MAX = 64 * 1024  # a Kubernetes token is 1-2 KB; anything this large is not a token file

ControlUpdate = mtls.CertificateUpdate | mtls.CertificateExpired


@dataclass(slots=True)
class _Connection:
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stream: anyio.abc.SocketStream | None = None
    queued: deque[bytes] = field(default_factory=deque)
    wakeup: anyio.Event = field(default_factory=anyio.Event)


class IdentityAgentDriver:
    """Drives one ``IdentityAgent``; ``run`` until cancelled. ``apply`` reaches every proxy of the process."""

    def __init__(
        self,
        agent: IdentityAgent,
        *,
        token_file: Path,
        apply: Callable[[ControlUpdate], None],
        clock_ns: Callable[[], int] = time.monotonic_ns,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.agent = agent
        self._token_file = token_file
        self._apply_update = apply
        self._clock_ns = clock_ns
        self._wall_clock = wall_clock
        self._connections: dict[int, _Connection] = {}
        self._task_group: anyio.abc.TaskGroup | None = None
        self._timer_changed = anyio.Event()
        self._applying = False

    async def run(self) -> None:
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            self._feed(self.agent.start, self._clock_ns(), self._wall_clock())
            await self._run_timer()

    # ---------------------------------------------------------------- effects

    def _feed(self, method: Callable[..., None], *args: object) -> None:
        method(*args)
        self._apply_effects()

    def _apply_effects(self) -> None:
        if self._applying:
            return  # the outer loop picks up what this input produced
        self._applying = True
        try:
            while effects := self.agent.effects():
                for effect in effects:
                    self._apply(effect)
        finally:
            self._applying = False
        self._timer_changed.set()

    def _apply(self, effect: object) -> None:
        agent = self.agent
        if isinstance(effect, Send):
            connection = self._connections.get(effect.conn_id)
            if connection is not None:
                connection.queued.append(effect.data)
                connection.wakeup.set()
        elif isinstance(effect, Connect):
            connection = self._connections[effect.conn_id] = _Connection()
            assert self._task_group is not None
            self._task_group.start_soon(self._run_connection, effect.conn_id, effect.address, connection)
        elif isinstance(effect, Close):
            closing = self._connections.pop(effect.conn_id, None)
            if closing is not None:
                closing.scope.cancel()
        elif isinstance(effect, RequestKey):
            agent.key_issued(ec.generate_private_key(ec.SECP256R1()), self._clock_ns())
        elif isinstance(effect, ReadToken):
            self._read_token(effect.attempt)
        elif isinstance(effect, CertificateReady):
            self._certificate_ready(effect)
        elif isinstance(effect, CertificateExpired):
            until = utc_text(effect.valid_until_s)
            log.error("identity: the certificate of %s expired at %s with no renewal", effect.identity, until)
            self._apply_update(mtls.certificate_expired(effect))
        elif isinstance(effect, LogError):
            log.warning("%s", effect.message)

    def _read_token(self, attempt: int) -> None:
        now_ns = self._clock_ns()
        try:
            with self._token_file.open("rb") as handle:
                token = handle.read(TOKEN_BYTES_MAX + 1).strip()
        except OSError as error:
            reason = f"{self._token_file}: {error.strerror or error}"
            self.agent.token_unreadable(attempt, reason, now_ns)
            return
        if not token or len(token) > TOKEN_BYTES_MAX:
            self.agent.token_unreadable(attempt, f"{self._token_file} is empty or not a token", now_ns)
            return
        self.agent.token_read(attempt, token, now_ns)

    def _certificate_ready(self, ready: CertificateReady) -> None:
        log.info("identity: certified as %s until %s", ready.identity, utc_text(ready.valid_until_s))
        self._apply_update(mtls.certificate_update(ready, self._wall_clock()))

    # ---------------------------------------------------------------- the connection

    async def _run_connection(self, conn_id: int, address: Address, connection: _Connection) -> None:
        with connection.scope:
            try:
                stream = await anyio.connect_tcp(address.host, address.port)
            except OSError as error:
                self._connections.pop(conn_id, None)
                self._feed(self.agent.connect_failed, conn_id, error.strerror or str(error), self._clock_ns())
                return
            connection.stream = stream
            async with stream, anyio.create_task_group() as task_group:
                task_group.start_soon(self._write_loop, conn_id, connection)
                self._feed(self.agent.connected, conn_id, self._clock_ns())
                await self._read_loop(conn_id, stream)
                task_group.cancel_scope.cancel()
        if self._connections.get(conn_id) is connection:
            self._connections.pop(conn_id)

    async def _read_loop(self, conn_id: int, stream: anyio.abc.SocketStream) -> None:
        while True:
            try:
                data = await stream.receive(READ_SIZE)
            except anyio.EndOfStream:
                self._feed(self.agent.received, conn_id, b"", self._clock_ns(), self._wall_clock())
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self._feed(self.agent.closed, conn_id, self._clock_ns())
                return
            self._feed(self.agent.received, conn_id, data, self._clock_ns(), self._wall_clock())

    async def _write_loop(self, conn_id: int, connection: _Connection) -> None:
        assert connection.stream is not None
        while True:
            await connection.wakeup.wait()
            connection.wakeup = anyio.Event()
            while connection.queued:
                try:
                    await connection.stream.send(connection.queued.popleft())
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return  # the reader sees the same failure and reports it

    # ---------------------------------------------------------------- the timer

    async def _run_timer(self) -> None:
        while True:
            deadline = self.agent.next_deadline_ns()
            self._timer_changed = anyio.Event()
            delay = math.inf if deadline is None else max(0.0, (deadline - self._clock_ns()) / 1e9)
            with anyio.move_on_after(delay):
                await self._timer_changed.wait()
            now_ns = self._clock_ns()
            deadline = self.agent.next_deadline_ns()
            if deadline is not None and deadline <= now_ns:
                self._feed(self.agent.on_timer, now_ns, self._wall_clock())
