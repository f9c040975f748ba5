"""Deadlines for a machine that owns many objects, each with at most one timer per purpose.

The machine never schedules anything: it records deadlines here and exposes the earliest through
``next_deadline_ns()``; the driver calls ``machine.on_timer(now_ns)`` once that time has passed.
Cancelled or replaced deadlines stay in the heap and are skipped when they surface (lazy deletion),
which keeps set and cancel O(log n) without searching. When stale entries outnumber live ones the heap is
rebuilt from the live ones, so it never holds more than about twice what is armed (a 10 s response timeout
set and cancelled for every request would otherwise keep rate x 10 s stale entries).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable


class Deadlines:
    """A set of (key -> absolute deadline) with the earliest one cheap to find."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Hashable]] = []
        self._current: dict[Hashable, tuple[int, int]] = {}
        self._sequence = 0

    def set(self, key: Hashable, deadline_ns: int) -> None:
        """Arm (or re-arm) the timer ``key`` to fire at ``deadline_ns``."""
        self._sequence += 1
        entry = (deadline_ns, self._sequence)
        self._current[key] = entry
        heapq.heappush(self._heap, (deadline_ns, self._sequence, key))
        if len(self._heap) > 2 * len(self._current) + 64:
            self._compact()

    def cancel(self, key: Hashable) -> None:
        self._current.pop(key, None)

    def next_ns(self) -> int | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_expired(self, now_ns: int) -> list[Hashable]:
        """Remove and return the keys due at ``now_ns``, earliest first (ties in arming order)."""
        due: list[Hashable] = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now_ns:
                return due
            _deadline, _seq, key = heapq.heappop(self._heap)
            del self._current[key]
            due.append(key)

    def __len__(self) -> int:
        return len(self._current)

    def _compact(self) -> None:
        self._heap = [(deadline, seq, key) for key, (deadline, seq) in self._current.items()]
        heapq.heapify(self._heap)

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            deadline, seq, key = heap[0]
            if self._current.get(key) == (deadline, seq):
                return
            heapq.heappop(heap)
