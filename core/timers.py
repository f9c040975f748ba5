"""Deadlines for a machine that owns many objects, each with at most one timer per purpose.

The machine never schedules anything: it records deadlines here and exposes the earliest through
``next_deadline_ns()``; the driver calls ``machine.on_timer(now_ns)`` once that time has passed.

The heap holds, for every armed key, one *anchor*: an entry no later than the key's deadline. Re-arming a
key later than its anchor (an idle timer pushed back by every request, the commonest case by far) touches
only the dictionary: the anchor stays, and when it surfaces the key is pushed again at its current
deadline. Re-arming earlier pushes a new anchor. Cancelling forgets the deadline and leaves the anchor to
be skipped when it surfaces (lazy deletion), so set and cancel cost O(1) or O(log n) without searching.
When stale entries outnumber live ones the heap is rebuilt from the live ones, so it never holds more than
about twice what is armed (a 10 s response timeout set and cancelled for every request would otherwise
keep rate x 10 s stale entries).

Keys due at the same time come out in the order they were armed: every entry carries the sequence number
of the ``set`` that armed its key.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable


class Deadlines:
    """A set of (key -> absolute deadline) with the earliest one cheap to find."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Hashable]] = []
        self._current: dict[Hashable, tuple[int, int]] = {}  # key -> (deadline, sequence) as last armed
        self._anchors: dict[Hashable, tuple[int, int]] = {}  # key -> its heap entry no later than _current's
        self._sequence = 0

    def set(self, key: Hashable, deadline_ns: int) -> None:
        """Arm (or re-arm) the timer ``key`` to fire at ``deadline_ns``."""
        self._sequence += 1
        entry = (deadline_ns, self._sequence)
        self._current[key] = entry
        anchor = self._anchors.get(key)
        if anchor is None or anchor[0] > deadline_ns:
            self._anchors[key] = entry
            heapq.heappush(self._heap, (deadline_ns, self._sequence, key))
            if len(self._heap) > 2 * len(self._current) + 64:
                self._compact()

    def cancel(self, key: Hashable) -> None:
        self._current.pop(key, None)

    def next_ns(self) -> int | None:
        self._settle()
        return self._heap[0][0] if self._heap else None

    def pop_expired(self, now_ns: int) -> list[Hashable]:
        """Remove and return the keys due at ``now_ns``, earliest first (ties in arming order)."""
        due: list[Hashable] = []
        while True:
            self._settle()
            if not self._heap or self._heap[0][0] > now_ns:
                return due
            _deadline, _seq, key = heapq.heappop(self._heap)
            del self._current[key]
            del self._anchors[key]
            due.append(key)

    def __len__(self) -> int:
        return len(self._current)

    def _compact(self) -> None:
        self._heap = [(deadline, seq, key) for key, (deadline, seq) in self._current.items()]
        heapq.heapify(self._heap)
        self._anchors = dict(self._current)

    def _settle(self) -> None:
        """Bring the heap's top to a live entry: drop stale ones, and move a surfacing anchor whose key was
        re-armed later to that later deadline."""
        heap = self._heap
        current = self._current
        while heap:
            deadline, seq, key = heap[0]
            armed = current.get(key)
            if armed is not None and armed[0] == deadline and armed[1] == seq:
                return
            heapq.heappop(heap)
            anchor = self._anchors.get(key)
            if anchor is None or anchor[0] != deadline or anchor[1] != seq:
                continue  # replaced by an earlier anchor: that one stands for the key
            if armed is None:
                del self._anchors[key]  # cancelled
            else:
                assert armed[0] >= deadline, (key, armed, deadline)
                self._anchors[key] = armed
                heapq.heappush(heap, (armed[0], armed[1], key))
