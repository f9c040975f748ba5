"""The simulator's heart: a virtual clock, an ordered event queue, seeds, and the trace.

Events are ordered by ``(time_ns, sequence)``; the sequence number breaks ties in scheduling order, so
two runs that schedule the same things in the same order replay identically. Time jumps straight to the
next event (trio's MockClock "autojump"); nothing waits on a real clock.

Every run has one seed. Subsystems draw from their own ``random.Random`` derived from it by name
(``rng_for("network")``, ``rng_for("host", "web-1", 0)``), so adding a host does not shift the random
stream of the network, as TigerBeetle's swarm options do.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field


def derive_seed(seed: int, *names: object) -> int:
    text = ":".join([str(seed), *(str(name) for name in names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


@dataclass(slots=True)
class Trace:
    """One line per event; the hash covers every line, the kept lines are optional (memory)."""

    keep_lines: bool = False
    lines: list[str] = field(default_factory=list)
    count: int = 0
    _hasher: hashlib._Hash = field(default_factory=hashlib.sha256)

    def add(self, now_ns: int, who: str, what: str) -> None:
        line = f"{now_ns / 1e6:.3f} {who} {what}"
        self._hasher.update(line.encode())
        self._hasher.update(b"\n")
        self.count += 1
        if self.keep_lines:
            self.lines.append(line)

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


class Kernel:
    """The virtual clock and its queue of callbacks."""

    def __init__(self, seed: int, *, keep_trace: bool = False) -> None:
        self.seed = seed
        self.now_ns = 0
        self.trace = Trace(keep_lines=keep_trace)
        self._queue: list[tuple[int, int, Callable[[], None]]] = []
        self._sequence = 0
        self.events_run = 0

    def rng_for(self, *names: object) -> random.Random:
        return random.Random(derive_seed(self.seed, *names))

    def at(self, time_ns: int, action: Callable[[], None]) -> None:
        assert time_ns >= self.now_ns, (time_ns, self.now_ns)
        self._sequence += 1
        heapq.heappush(self._queue, (time_ns, self._sequence, action))

    def after(self, delay_ns: int, action: Callable[[], None]) -> None:
        # ``at`` without its check (now + a non-negative delay is never in the past): the hottest call here.
        self._sequence += 1
        heapq.heappush(self._queue, (self.now_ns + (delay_ns if delay_ns > 0 else 0), self._sequence, action))

    def log(self, who: str, what: str) -> None:
        self.trace.add(self.now_ns, who, what)

    def run_until(self, end_ns: int, *, stop: Callable[[], bool] | None = None) -> None:
        """Run events up to and including ``end_ns``; the clock ends at ``end_ns``."""
        queue = self._queue
        pop = heapq.heappop
        while queue and queue[0][0] <= end_ns:
            time_ns, _sequence, action = pop(queue)
            self.now_ns = time_ns
            self.events_run += 1
            action()
            if stop is not None and stop():
                return
        self.now_ns = max(self.now_ns, end_ns)


class MachineTimer:
    """One kernel event armed at a machine's ``next_deadline_ns()``, as the adapters' drivers keep a loop timer.

    ``arm`` after every input: it schedules only when the deadline moved earlier (a later one finds the armed
    event early, and ``fire`` arms again). ``reset`` forgets the armed event (after a crash the new machine
    starts clean); an event that fires after a reset, or while the host is down, does nothing.
    """

    def __init__(
        self,
        kernel: Kernel,
        next_deadline_ns: Callable[[], int | None],
        fire: Callable[[int], None],
        alive: Callable[[], bool],
    ) -> None:
        self._kernel = kernel
        self._next_deadline_ns = next_deadline_ns
        self._fire = fire
        self._alive = alive
        self._generation = 0
        self._armed_ns: int | None = None

    def arm(self) -> None:
        deadline = self._next_deadline_ns()
        if deadline is None or (self._armed_ns is not None and self._armed_ns <= deadline):
            return
        self._armed_ns = deadline
        self._generation += 1
        generation = self._generation
        self._kernel.at(max(deadline, self._kernel.now_ns), lambda: self._fired(generation))

    def reset(self) -> None:
        self._generation += 1
        self._armed_ns = None

    def _fired(self, generation: int) -> None:
        if generation != self._generation or not self._alive():
            return
        self._armed_ns = None
        self._fire(self._kernel.now_ns)
