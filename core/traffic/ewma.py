"""Peak-EWMA round-trip-time estimate of one endpoint, as the P2C balancer reads it.

Theory of operation
-------------------
The estimate is a pair (value, stamp): the latest estimate in nanoseconds and the time it was last
updated. Two rules change it, and one rule reads it:

- **Peak**: a sample above the stored value replaces it at once. One slow response makes the endpoint look
  slow immediately, which is what keeps P2C away from an endpoint that just started to struggle.
- **Average**: a sample at or below it moves the value towards the sample with weight ``1 - w``, where
  ``w = exp(-elapsed / decay)`` and ``elapsed`` is the time since the previous update. The past therefore
  fades with time, not with the number of samples: whatever the request rate, a value is mostly forgotten
  after a few ``decay`` periods (10 s by default).
- **Read**: the value is read as ``value * exp(-(now - stamp) / decay)``, decaying towards zero while no
  sample arrives. An endpoint that P2C stopped choosing (because it looked slow) therefore becomes
  attractive again after a while and is re-measured by real traffic, instead of being starved forever.
  Reading never changes the state, so how often the balancer looks at an endpoint cannot change its choices;
  tower and Finagle decay on every read instead, which makes the estimate depend on the read rate.

A new endpoint starts at ``default_rtt`` (30 ms, Linkerd's default), stamped when it was added.

Limits: values are floats in nanoseconds; ``math.exp`` of a large negative number is 0.0, so a long-idle
endpoint reads as 0 (its cost is then decided by its pending count and weight alone).
"""

from __future__ import annotations

import math

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000

DEFAULT_RTT_NS = 30 * NS_PER_MS
DEFAULT_DECAY_NS = 10 * NS_PER_S


class PeakEwma:
    """The round-trip-time estimate of one endpoint; see the module docstring."""

    __slots__ = ("_decay_ns", "_stamp_ns", "_value_ns")

    def __init__(self, *, initial_ns: float, decay_ns: int, now_ns: int) -> None:
        assert initial_ns >= 0, initial_ns
        assert decay_ns > 0, decay_ns
        self._value_ns = float(initial_ns)
        self._decay_ns = decay_ns
        self._stamp_ns = now_ns

    def read_ns(self, now_ns: int) -> float:
        """The estimate as seen at ``now_ns``: the stored value, decayed towards 0 since the last sample."""
        idle_ns = max(0, now_ns - self._stamp_ns)
        return self._value_ns * math.exp(-idle_ns / self._decay_ns)

    def observe(self, rtt_ns: int, now_ns: int) -> None:
        """Fold in one round-trip time measured by a request that finished at ``now_ns``."""
        assert rtt_ns >= 0, rtt_ns
        if rtt_ns > self._value_ns:
            self._value_ns = float(rtt_ns)
        else:
            elapsed_ns = max(0, now_ns - self._stamp_ns)
            weight = math.exp(-elapsed_ns / self._decay_ns)
            self._value_ns = self._value_ns * weight + rtt_ns * (1.0 - weight)
        self._stamp_ns = max(self._stamp_ns, now_ns)

    @property
    def value_ns(self) -> float:
        """The stored value (what ``read_ns`` returns at the time of the last sample)."""
        return self._value_ns

    def __repr__(self) -> str:
        return f"PeakEwma(value_ns={self._value_ns!r}, stamp_ns={self._stamp_ns})"
