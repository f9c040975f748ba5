"""Endpoint choice for one backend: power of two choices over peak-EWMA cost, and the endpoint table.

Theory of operation
-------------------
One ``Balancer`` serves one backend (one service's endpoint set) and owns its endpoint table. The proxy
drives it with four inputs, each carrying ``now_ns``:

- ``update_endpoints({address: weight}, now_ns)``: discovery changed the set. New endpoints join at the end
  of the table (its order is the only order any choice depends on, so the same inputs and RNG give the same
  choices). A removed endpoint with requests in flight stays as DRAINING until the last one finishes and
  receives nothing new; one without is forgotten at once. Re-adding a draining endpoint revives it as it was.
- ``acquire(now_ns) -> Handle | None`` (or ``pick`` then ``started``): choose an endpoint and count the
  request as pending on it. ``None`` means no endpoint is ready: the failfast queue (failfast.py) holds the
  request until one is.
- ``finished(handle, outcome, now_ns)``: the request ended. Its pending count drops, its round-trip time
  feeds the endpoint's peak-EWMA estimate (ewma.py) and its outcome feeds the circuit breaker (breaker.py).
- ``set_available(address, available, now_ns)``: the proxy learnt the endpoint cannot take requests now
  (PENDING, for instance while its connection is refused) or can again.

An endpoint is READY when it is in the table, available and its breaker is CLOSED. Only READY endpoints
compete; a PROBING endpoint (ejected, backoff elapsed, probe not yet sent) takes the very next request ahead
of all of them, so a probe is never starved by cheaper endpoints (the first PROBING one in table order).

Strategies (``BalancerConfig.strategy``, chosen by name):

- ``p2c-ewma`` (default, HTTP): draw two distinct READY endpoints uniformly with the injected RNG and take
  the cheaper, the first drawn on a tie. Cost = ``max(rtt, 1 ns) x (pending + 1) / weight``, where ``rtt``
  is the estimate read at ``now_ns``; the 1 ns floor keeps pending counts deciding once estimates of
  long-idle endpoints have decayed to nothing.
- ``p2c-pending`` (opaque TCP): the same draw on ``(pending + 1) / weight``. For opaque TCP the proxy holds
  the handle for the life of the connection, so pending is the open connection count.
- ``least-loaded``: a full scan for the lowest ``(pending + 1) / weight``, ties broken uniformly with the
  RNG (a fixed tie-break would send every request of an idle backend to its first endpoint). O(n) a pick.
- ``round-robin``: smooth weighted round robin (each pick adds every READY endpoint's weight to its credit,
  takes the endpoint with the most credit, first in table order on a tie, and charges it the total weight);
  new endpoints start with a random credit so proxies started together do not move in lockstep. O(n).

Weights (integers from 1, Linkerd's destination API sends 10,000 by default) divide the cost. Under load the
P2C strategies settle where ``(pending + 1) / weight`` (times RTT) is level, so traffic splits in proportion to
weight; an idle backend (one request at a time) sends everything to the endpoint with the lowest
``rtt / weight``, which is what P2C-EWMA does with RTTs alone. Round robin splits in exact proportion.

Limits: at most ``max_endpoints`` (10,000) endpoints per backend; the rest of an update is ignored and
counted (``endpoints_over_limit``). The READY list is rebuilt only when the table, an availability or a
breaker state changed, so a P2C pick is O(1) otherwise. Handles in flight are bounded by the proxy's own
connection and stream limits. Time must not go backwards between calls (``BalancerUsageError``).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from tether.core.address import Address
from tether.core.traffic.breaker import (
    BreakerConfig,
    BreakerState,
    BreakerStats,
    BreakerTransition,
    CircuitBreaker,
    Outcome,
)
from tether.core.traffic.ewma import DEFAULT_DECAY_NS, DEFAULT_RTT_NS, PeakEwma

RTT_FLOOR_NS = 1.0


class BalancerUsageError(Exception):
    """The caller broke the balancer's contract (a handle finished twice, time going backwards...)."""


class Strategy(enum.Enum):
    P2C_EWMA = "p2c-ewma"
    P2C_PENDING = "p2c-pending"
    LEAST_LOADED = "least-loaded"
    ROUND_ROBIN = "round-robin"

    @classmethod
    def from_name(cls, name: str) -> Strategy:
        try:
            return cls(name)
        except ValueError:
            names = ", ".join(strategy.value for strategy in cls)
            raise ValueError(f"unknown balancer strategy {name!r}; expected one of {names}") from None

    def __repr__(self) -> str:
        return f"Strategy.{self.name}"


class EndpointState(enum.Enum):
    """What the admin adapter reports per endpoint. Linkerd's balancer gauge has only "ready" and
    "pending"; its "pending" is our PENDING + PROBING + EJECTED."""

    READY = "ready"
    PENDING = "pending"
    PROBING = "probing"
    EJECTED = "ejected"
    DRAINING = "draining"

    def __repr__(self) -> str:
        return f"EndpointState.{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class BalancerConfig:
    """One backend's balancing; ``breaker=None`` (the default, as in Linkerd) turns circuit breaking off."""

    strategy: Strategy = Strategy.P2C_EWMA
    default_rtt_ns: int = DEFAULT_RTT_NS
    decay_ns: int = DEFAULT_DECAY_NS
    max_endpoints: int = 10_000
    breaker: BreakerConfig | None = None

    def __post_init__(self) -> None:
        if self.default_rtt_ns < 0 or self.decay_ns <= 0:
            raise ValueError("default_rtt_ns must be at least 0 and decay_ns positive")
        if self.max_endpoints < 1:
            raise ValueError("max_endpoints must be at least 1")


class Handle(NamedTuple):
    """One request (for opaque TCP, one connection) in flight to ``endpoint``.

    ``started``/``acquire`` hand it out; the proxy gives it back to ``finished`` exactly once. ``probe`` says
    whether it is the probe of an ejected endpoint: its outcome alone decides whether that endpoint returns.
    A named tuple rather than a frozen dataclass: the proxy makes one per request, and a tuple is built
    several times faster (immutable all the same).
    """

    endpoint: Address
    handle_id: int
    started_ns: int
    probe: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointCounts:
    """How many endpoints of one backend are in each state (a gauge per state)."""

    ready: int = 0
    pending: int = 0
    probing: int = 0
    ejected: int = 0
    draining: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class BalancerStats:
    """One backend's balancer, as the admin adapter renders it."""

    backend: str
    endpoints: EndpointCounts
    in_flight: int
    endpoints_over_limit: int
    breaker: BreakerStats | None


class _Endpoint:
    """The mutable per-endpoint record; only ``Balancer`` touches it."""

    __slots__ = ("address", "available", "draining", "ewma", "pending", "round_robin_credit", "weight")

    def __init__(self, address: Address, weight: int, ewma: PeakEwma, round_robin_credit: int) -> None:
        self.address = address
        self.weight = weight
        self.ewma = ewma
        self.pending = 0
        self.available = True
        self.draining = False
        self.round_robin_credit = round_robin_credit


class Balancer:
    """The endpoint table and choice of one backend; see the module docstring."""

    def __init__(self, name: str, config: BalancerConfig, rng: random.Random) -> None:
        self.name = name
        self.config = config
        self._rng = rng
        # The breaker's jitter draws come from a child RNG, so they never shift the balancer's own draws.
        breaker_rng = random.Random(rng.getrandbits(64))
        self._breaker = CircuitBreaker(config.breaker, breaker_rng) if config.breaker is not None else None
        self._endpoints: dict[Address, _Endpoint] = {}
        self._open_handles: set[int] = set()
        self._last_handle_id = 0
        self._now_ns: int | None = None
        self._endpoints_over_limit = 0
        # Cache of (READY endpoints, PROBING endpoints that admit a probe), keyed by what can change them.
        self._version = 0
        self._cache_key: tuple[int, int] | None = None
        self._ready: list[_Endpoint] = []
        self._probes: list[_Endpoint] = []

    # ------------------------------------------------------------------ driver inputs

    def update_endpoints(self, weights: Mapping[Address, int], now_ns: int) -> None:
        """Discovery's new endpoint set for this backend, each with its weight (an integer from 1)."""
        self._advance(now_ns)
        items = list(weights.items())
        self._endpoints_over_limit = max(0, len(items) - self.config.max_endpoints)
        wanted = dict(items[: self.config.max_endpoints])
        for address, weight in wanted.items():
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
                raise BalancerUsageError(f"weight of {address} must be an integer from 1, not {weight!r}")
        for address, entry in list(self._endpoints.items()):
            if address not in wanted and not entry.draining:
                if entry.pending:
                    entry.draining = True
                else:
                    self._forget(address)
        total_weight = sum(wanted.values())
        for address, weight in wanted.items():
            entry = self._endpoints.get(address)
            if entry is None:
                self._endpoints[address] = self._new_endpoint(address, weight, total_weight, now_ns)
            else:
                entry.weight = weight
                entry.draining = False
        self._version += 1

    def set_available(self, endpoint: Address, available: bool, now_ns: int) -> None:
        """The proxy learnt whether ``endpoint`` can take requests (PENDING while not). Unknown: ignored."""
        self._advance(now_ns)
        entry = self._endpoints.get(endpoint)
        if entry is not None and entry.available != available:
            entry.available = available
            self._version += 1

    def pick(self, now_ns: int) -> Address | None:
        """Choose an endpoint for a new request without starting it; None if no endpoint is ready."""
        self._advance(now_ns)
        entry, _probe = self._pick_entry(now_ns)
        return None if entry is None else entry.address

    def started(self, endpoint: Address, now_ns: int) -> Handle:
        """A request goes to ``endpoint`` (usually what ``pick`` chose): count it as pending."""
        self._advance(now_ns)
        entry = self._endpoints.get(endpoint)
        if entry is None or entry.draining:
            raise BalancerUsageError(f"started() on {endpoint}, which is not in the endpoint set")
        return self._start(entry, now_ns, may_probe=True)

    def acquire(self, now_ns: int) -> Handle | None:
        """``pick`` and ``started`` in one step; None if no endpoint is ready.

        The proxy calls this once per request: the common case (a READY endpoint) is written out here rather
        than through ``_pick_entry`` and ``_start``, which it matches.
        """
        self._advance(now_ns)
        breaker = self._breaker
        cache_key = self._cache_key
        if (
            cache_key is None
            or cache_key[0] != self._version
            or cache_key[1] != (breaker.version if breaker is not None else 0)
        ):
            self._eligible()
        ready, probes = self._ready, self._probes
        if probes:
            return self._start(probes[0], now_ns, may_probe=True)
        if not ready:
            return None
        entry = ready[0] if len(ready) == 1 else self._choose(ready, now_ns)
        entry.pending += 1
        self._last_handle_id += 1
        self._open_handles.add(self._last_handle_id)
        return Handle(entry.address, self._last_handle_id, now_ns, False)

    def _pick_entry(self, now_ns: int) -> tuple[_Endpoint | None, bool]:
        """The endpoint to choose, and whether it is a probe (a PROBING endpoint goes first)."""
        ready, probes = self._eligible()
        if probes:
            return probes[0], True
        if not ready:
            return None, False
        return self._choose(ready, now_ns), False

    def _start(self, entry: _Endpoint, now_ns: int, *, may_probe: bool) -> Handle:
        # A READY endpoint's breaker is CLOSED, where ``dispatched`` is always False: skip the lookup.
        probe = self._breaker.dispatched(entry.address) if may_probe and self._breaker is not None else False
        entry.pending += 1
        self._last_handle_id += 1
        self._open_handles.add(self._last_handle_id)
        return Handle(entry.address, self._last_handle_id, now_ns, probe)

    def finished(self, handle: Handle, outcome: Outcome, now_ns: int, *, rtt_ns: int | None = None) -> None:
        """The request of ``handle`` ended with ``outcome``.

        ``rtt_ns``: the round-trip time to feed the estimate when it is not ``now - started`` (a gRPC
        response is finished at its end, where its status is, but timed to its head, as HTTP is).
        """
        self._advance(now_ns)
        if handle.handle_id not in self._open_handles:
            raise BalancerUsageError(f"finished() twice, or with a handle of another balancer: {handle!r}")
        self._open_handles.remove(handle.handle_id)
        entry = self._endpoints[handle.endpoint]  # an endpoint with a request in flight is never forgotten
        assert entry.pending > 0, entry.address
        entry.pending -= 1
        rtt_ns = max(0, now_ns - handle.started_ns if rtt_ns is None else rtt_ns)
        # A cancelled request only says the answer took at least rtt_ns: it counts only when it raises the
        # estimate (the peak rule), never to make an endpoint look faster than it is.
        if outcome is not Outcome.CANCELLED or rtt_ns > entry.ewma.value_ns:
            entry.ewma.observe(rtt_ns, now_ns)
        if self._breaker is not None:
            self._breaker.record(handle.endpoint, outcome, now_ns, probe=handle.probe)
        if entry.draining and entry.pending == 0:
            self._forget(handle.endpoint)
            self._version += 1

    def on_timer(self, now_ns: int) -> None:
        """Run the breaker's backoff timers (every other input does as well, before anything else)."""
        self._advance(now_ns)

    # ------------------------------------------------------------------ queries

    def next_deadline_ns(self) -> int | None:
        """When an ejected endpoint's backoff ends; None if no endpoint is ejected."""
        return self._breaker.next_deadline_ns() if self._breaker is not None else None

    def has_ready_endpoint(self, now_ns: int) -> bool:
        """Whether ``acquire`` would return a handle now."""
        self._advance(now_ns)
        ready, probes = self._eligible()
        return bool(ready or probes)

    def endpoint_state(self, endpoint: Address) -> EndpointState | None:
        """The endpoint's state as of the latest input; None if it is not in the table."""
        entry = self._endpoints.get(endpoint)
        if entry is None:
            return None
        if entry.draining:
            return EndpointState.DRAINING
        breaker_state = self._breaker.state(endpoint) if self._breaker is not None else BreakerState.CLOSED
        if breaker_state is BreakerState.EJECTED:
            return EndpointState.EJECTED
        if not entry.available:
            return EndpointState.PENDING
        if breaker_state is BreakerState.PROBING:
            return EndpointState.PROBING
        return EndpointState.READY

    def endpoints(self) -> list[Address]:
        """Every endpoint in the table, draining ones included, in table order."""
        return list(self._endpoints)

    def pending(self, endpoint: Address) -> int:
        entry = self._endpoints.get(endpoint)
        return 0 if entry is None else entry.pending

    def weight(self, endpoint: Address) -> int | None:
        entry = self._endpoints.get(endpoint)
        return None if entry is None else entry.weight

    def rtt_estimate_ns(self, endpoint: Address, now_ns: int) -> float | None:
        entry = self._endpoints.get(endpoint)
        return None if entry is None else entry.ewma.read_ns(now_ns)

    @property
    def in_flight(self) -> int:
        return len(self._open_handles)

    def counts(self) -> EndpointCounts:
        tally = dict.fromkeys(EndpointState, 0)
        for address in self._endpoints:
            state = self.endpoint_state(address)
            assert state is not None
            tally[state] += 1
        return EndpointCounts(**{state.value: count for state, count in tally.items()})

    @property
    def stats(self) -> BalancerStats:
        return BalancerStats(
            backend=self.name,
            endpoints=self.counts(),
            in_flight=self.in_flight,
            endpoints_over_limit=self._endpoints_over_limit,
            breaker=self._breaker.stats if self._breaker is not None else None,
        )

    def take_transitions(self) -> list[BreakerTransition]:
        """Breaker state changes since the last call, for the operator's log."""
        return self._breaker.take_transitions() if self._breaker is not None else []

    # ------------------------------------------------------------------ internals

    def _advance(self, now_ns: int) -> None:
        if self._now_ns is not None and now_ns < self._now_ns:
            raise BalancerUsageError(f"time went backwards: {now_ns} after {self._now_ns}")
        self._now_ns = now_ns
        breaker = self._breaker
        if breaker is not None and breaker.has_deadlines:
            deadline_ns = breaker.next_deadline_ns()
            if deadline_ns is not None and deadline_ns <= now_ns:
                breaker.on_timer(now_ns)

    def _new_endpoint(self, address: Address, weight: int, total_weight: int, now_ns: int) -> _Endpoint:
        ewma = PeakEwma(initial_ns=self.config.default_rtt_ns, decay_ns=self.config.decay_ns, now_ns=now_ns)
        # Only round robin draws here, so the P2C strategies' draws depend on picks alone.
        credit = self._rng.randrange(total_weight) if self.config.strategy is Strategy.ROUND_ROBIN else 0
        if self._breaker is not None:
            self._breaker.add(address)
        return _Endpoint(address, weight, ewma, credit)

    def _forget(self, address: Address) -> None:
        assert self._endpoints[address].pending == 0, address
        del self._endpoints[address]
        if self._breaker is not None:
            self._breaker.remove(address)

    def _eligible(self) -> tuple[list[_Endpoint], list[_Endpoint]]:
        breaker = self._breaker
        breaker_version = breaker.version if breaker is not None else 0
        # Compared field by field: building a key tuple on every pick costs more than the comparison.
        if self._cache_key is None or self._cache_key[0] != self._version or self._cache_key[1] != breaker_version:
            self._cache_key = (self._version, breaker_version)
            live = [entry for entry in self._endpoints.values() if entry.available and not entry.draining]
            if breaker is None:
                self._ready, self._probes = live, []
            else:
                self._ready = [entry for entry in live if breaker.state(entry.address) is BreakerState.CLOSED]
                self._probes = [
                    entry
                    for entry in live
                    if breaker.state(entry.address) is BreakerState.PROBING and breaker.admits(entry.address)
                ]
        return self._ready, self._probes

    def _choose(self, ready: list[_Endpoint], now_ns: int) -> _Endpoint:
        strategy = self.config.strategy
        if strategy is Strategy.ROUND_ROBIN:
            return _smooth_round_robin(ready)
        if strategy is Strategy.LEAST_LOADED:
            return self._least_loaded(ready)
        if len(ready) == 1:
            return ready[0]
        first_index = self._rng.randrange(len(ready))
        second_index = self._rng.randrange(len(ready) - 1)
        if second_index >= first_index:
            second_index += 1
        first, second = ready[first_index], ready[second_index]
        return second if self._cost(second, now_ns) < self._cost(first, now_ns) else first

    def _cost(self, entry: _Endpoint, now_ns: int) -> float:
        load = (entry.pending + 1) / entry.weight
        if self.config.strategy is Strategy.P2C_EWMA:
            return max(entry.ewma.read_ns(now_ns), RTT_FLOOR_NS) * load
        return load

    def _least_loaded(self, ready: list[_Endpoint]) -> _Endpoint:
        best = ready[0]
        ties = 1
        for entry in ready[1:]:
            # (pending + 1) / weight compared by cross-multiplying, exactly, in integers
            left = (entry.pending + 1) * best.weight
            right = (best.pending + 1) * entry.weight
            if left < right:
                best, ties = entry, 1
            elif left == right:
                ties += 1
                if self._rng.randrange(ties) == 0:  # reservoir sampling: each tied endpoint 1 / ties
                    best = entry
        return best


def _smooth_round_robin(ready: list[_Endpoint]) -> _Endpoint:
    total_weight = 0
    best = ready[0]
    for entry in ready:
        entry.round_robin_credit += entry.weight
        total_weight += entry.weight
        if entry.round_robin_credit > best.round_robin_credit:
            best = entry
    best.round_robin_credit -= total_weight
    return best
