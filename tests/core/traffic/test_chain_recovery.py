"""A chain of services with circuit breaking on, fault then heal: every tier comes back within its backoffs.

Each tier is what one outbound proxy keeps for the next service: a ``Balancer`` with a breaker and the
``FailfastQueue`` in front of it. ``Chain`` drives the tiers the way core/proxy/balancing.py does (submit,
deliver the queue's outputs, ``finished`` then ``poll``, ``on_timer`` at ``next_deadline_ns``), on a
virtual clock with one fixed hop latency. A request dispatched at tier ``i`` becomes a request at tier
``i + 1`` (the service it reached calls the next one), and the bottom tier's endpoints answer from a fault
that fails some share of the requests arriving before the heal. A rejected request (failfast, queue full)
is a failure for the tier above, as B's 5xx is for A's proxy: that is how a fault at the bottom ejects the
healthy endpoints above it.

The bound after the heal, and why it holds: once a tier's last failure is seen, each of its endpoints is
PROBING within one backoff (at most ``backoff_max x (1 + jitter)``) and stays PROBING until a request comes,
so from then on it always admits a request; the tier above sees its last failure at most a failfast timeout
later (a request waiting in this tier's queue). Going up the chain, every request the edge gets after
``heal + tiers x (backoff cap + failfast timeout)`` (plus the hops) succeeds.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.address import Address
from tether.core.traffic.balancer import Balancer, BalancerConfig, EndpointState, Handle
from tether.core.traffic.breaker import BreakerConfig, Outcome
from tether.core.traffic.failfast import FailfastQueue, QueueConfig, QueueOutput, QueueState, Rejected

MS = 1_000_000
S = 1_000_000_000
HOP_NS = MS

Reply = Callable[[bool], None]


@dataclass
class Tier:
    balancer: Balancer
    queue: FailfastQueue
    armed_ns: int | None = None


@dataclass
class Chain:
    """``tiers`` services in a row, two endpoints each; tier 0 is the edge, the last one calls the faulty one."""

    tiers: int
    breaker: BreakerConfig
    queue: QueueConfig = field(default_factory=QueueConfig)
    seed: int = 0
    endpoints: int = 2
    failure_rate: float = 1.0
    heal_ns: int = 0  # the bottom fails requests arriving before this
    now_ns: int = 0
    results: list[tuple[int, bool]] = field(default_factory=list)  # (started, succeeded) of edge requests

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self._fault_rng = random.Random(rng.getrandbits(64))
        self._events: list[tuple[int, int, Callable[[], None]]] = []
        self._sequence = 0
        self._waiting: dict[int, tuple[int, Reply]] = {}
        self._last_id = 0
        self.layers: list[Tier] = []
        for index in range(self.tiers):
            name = f"tier-{index}"
            balancer = Balancer(name, BalancerConfig(breaker=self.breaker), random.Random(rng.getrandbits(64)))
            addresses = {Address(f"10.{index}.0.{n}", 80): 1 for n in range(1, self.endpoints + 1)}
            balancer.update_endpoints(addresses, 0)
            self.layers.append(Tier(balancer, FailfastQueue(name, self.queue, balancer)))

    # ------------------------------------------------------------------ the clock

    def at(self, time_ns: int, action: Callable[[], None]) -> None:
        self._sequence += 1
        heapq.heappush(self._events, (time_ns, self._sequence, action))

    def run_until(self, end_ns: int) -> None:
        while self._events and self._events[0][0] <= end_ns:
            self.now_ns, _sequence, action = heapq.heappop(self._events)
            action()
        self.now_ns = max(self.now_ns, end_ns)

    # ------------------------------------------------------------------ traffic

    def edge_request(self) -> None:
        started_ns = self.now_ns
        self.request(0, lambda succeeded: self.results.append((started_ns, succeeded)))

    def every(self, gap_ns: int, until_ns: int) -> None:
        """Edge requests every ``gap_ns`` from now until ``until_ns``."""
        for time_ns in range(self.now_ns, until_ns, gap_ns):
            self.at(time_ns, self.edge_request)

    def request(self, tier: int, reply: Reply) -> None:
        self._last_id += 1
        self._waiting[self._last_id] = (tier, reply)
        self._deliver(tier, self.layers[tier].queue.submit(self._last_id, self.now_ns))

    def _deliver(self, tier: int, outputs: list[QueueOutput]) -> None:
        for output in outputs:
            _tier, reply = self._waiting.pop(output.request_id)
            if isinstance(output, Rejected):
                self.at(self.now_ns, partial(reply, False))
            else:
                self.at(self.now_ns + HOP_NS, partial(self._arrive, tier, output.handle, reply))
        self._rearm(tier)

    def _arrive(self, tier: int, handle: Handle, reply: Reply) -> None:
        def answer(succeeded: bool) -> None:
            self.at(self.now_ns + HOP_NS, lambda: self._finish(tier, handle, succeeded, reply))

        if tier + 1 < self.tiers:
            self.request(tier + 1, answer)
        else:
            answer(not (self.now_ns < self.heal_ns and self._fault_rng.random() < self.failure_rate))

    def _finish(self, tier: int, handle: Handle, succeeded: bool, reply: Reply) -> None:
        layer = self.layers[tier]
        layer.balancer.finished(handle, Outcome.SUCCESS if succeeded else Outcome.FAILURE, self.now_ns)
        self._deliver(tier, layer.queue.poll(self.now_ns))
        reply(succeeded)

    def _rearm(self, tier: int) -> None:
        layer = self.layers[tier]
        deadline_ns = layer.queue.next_deadline_ns()
        if deadline_ns is not None and deadline_ns != layer.armed_ns:
            layer.armed_ns = deadline_ns
            self.at(deadline_ns, lambda: self._timer(tier, deadline_ns))

    def _timer(self, tier: int, deadline_ns: int) -> None:
        layer = self.layers[tier]
        if layer.armed_ns == deadline_ns:
            layer.armed_ns = None
        self._deliver(tier, layer.queue.on_timer(self.now_ns))

    # ------------------------------------------------------------------ what the tests read

    def states(self, tier: int) -> list[EndpointState | None]:
        balancer = self.layers[tier].balancer
        return [balancer.endpoint_state(address) for address in balancer.endpoints()]

    def recovery_bound_ns(self) -> int:
        cap_ns = int(self.breaker.backoff_max_ns * (1 + self.breaker.jitter_ratio))
        return self.tiers * (cap_ns + self.queue.failfast_timeout_ns + 4 * HOP_NS)


def test_an_edge_probe_failing_on_an_ejected_callee_delays_the_chain_only_until_the_next_backoff() -> None:
    """The smallest input of the cascade: one endpoint per tier, U (the edge) calling L.

    L is ejected by a failure of its own (another caller of L); U's request waits in L's queue until L fails
    fast, so U ejects its healthy endpoint; L's second failure doubles L's backoff, and U's probe, landing
    while L is still ejected, fails and doubles U's. After the heal L turns PROBING and waits, out of
    failfast, for U's next probe, which readmits both: after the heal the edge holds its requests (and
    would fail them fast) only until its own backoff ends.
    """
    breaker = BreakerConfig(consecutive_failures_max=1, backoff_min_ns=5 * S, jitter_ratio=0.0)
    chain = Chain(tiers=2, breaker=breaker, endpoints=1, heal_ns=20 * S)
    upper, lower = chain.layers
    lower_answers: list[bool] = []
    chain.at(0, lambda: chain.request(1, lower_answers.append))  # L's other caller: fails, L ejected 5 s
    chain.at(1 * S, chain.edge_request)  # waits in L's queue, failed fast at 4 s: U ejected 5 s
    chain.at(6 * S, lambda: chain.request(1, lower_answers.append))  # L's probe fails: L ejected 10 s
    chain.at(10 * S, chain.edge_request)  # U's probe waits in L's queue, failed fast at 13 s: U ejected 10 s
    chain.run_until(14 * S)
    assert lower_answers == [False, False] and chain.results == [(1 * S, False), (10 * S, False)]
    assert chain.states(0) == [EndpointState.EJECTED] and chain.states(1) == [EndpointState.EJECTED]
    upper_stats = upper.balancer.stats.breaker
    assert upper_stats is not None and upper_stats.ejections_probe_failed == 1  # U's probe failed, on L's account

    chain.run_until(22 * S)  # healed at 20 s: L has been PROBING since 16 s with no request, out of failfast
    assert chain.states(1) == [EndpointState.PROBING] and lower.queue.state is QueueState.SERVING
    assert chain.states(0) == [EndpointState.EJECTED]
    (address,) = upper.balancer.endpoints()
    upper_until_ns = upper.balancer._breaker.ejected_until_ns(address)  # type: ignore[union-attr]
    assert upper_until_ns is not None and 22 * S < upper_until_ns < 24 * S  # 13 s + 10 s
    chain.at(22 * S, chain.edge_request)  # waits in U's queue: U is still ejected
    chain.run_until(23 * S)
    assert len(upper.queue.waiting()) == 1 and chain.results[-1] == (10 * S, False)
    chain.run_until(upper_until_ns + 10 * HOP_NS)  # at U's backoff end it becomes U's probe, carrying L's
    assert chain.results[-1] == (22 * S, True)
    assert chain.states(0) == [EndpointState.READY] and chain.states(1) == [EndpointState.READY]


def test_a_three_service_chain_with_the_default_breaker_recovers_within_the_sum_of_backoffs() -> None:
    """Defaults throughout (7 in a row, 1-60 s with jitter 0.5, failfast after 3 s, queue 100). The bottom
    fails every request for ten minutes, long enough for every backoff to reach its cap, then heals."""
    chain = Chain(tiers=3, breaker=BreakerConfig(), seed=1, heal_ns=600 * S)
    chain.every(100 * MS, 1200 * S)
    chain.run_until(600 * S)
    edge_stats = chain.layers[0].balancer.stats.breaker
    assert edge_stats is not None and edge_stats.ejections_probe_failed > 0  # the healthy edge endpoints ejected
    assert chain.layers[0].queue.stats.failfast_entered > 0
    chain.run_until(1200 * S)
    bound_ns = chain.heal_ns + chain.recovery_bound_ns()  # 3 x (90 s + 3 s) after the heal
    assert bound_ns < 1200 * S
    late = [succeeded for started_ns, succeeded in chain.results if started_ns >= bound_ns]
    assert late and all(late)
    for tier in range(3):
        assert set(chain.states(tier)) == {EndpointState.READY}, tier


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    tiers=st.integers(2, 4),
    failure_rate=st.sampled_from([0.5, 0.8, 1.0]),
    consecutive=st.sampled_from([1, 3, 7]),
    fault_s=st.integers(1, 30),
    gap_ms=st.sampled_from([10, 37, 100, 450]),
    jitter=st.sampled_from([0.0, 0.5]),
)
def test_any_chain_recovers_within_the_sum_of_backoffs_after_the_bottom_heals(
    seed: int, tiers: int, failure_rate: float, consecutive: int, fault_s: int, gap_ms: int, jitter: float
) -> None:
    # Backoffs of 100 ms to 2 s and a 300 ms failfast timeout: the same machine, scaled down so an example
    # stays small; the bound scales with them.
    breaker = BreakerConfig(
        consecutive_failures_max=consecutive, backoff_min_ns=100 * MS, backoff_max_ns=2 * S, jitter_ratio=jitter
    )
    chain = Chain(
        tiers=tiers,
        breaker=breaker,
        queue=QueueConfig(failfast_timeout_ns=300 * MS),
        seed=seed,
        failure_rate=failure_rate,
        heal_ns=fault_s * S,
    )
    bound_ns = chain.heal_ns + chain.recovery_bound_ns()
    end_ns = bound_ns + 3 * S
    chain.every(gap_ms * MS, end_ns)
    chain.run_until(end_ns + S)
    late = [succeeded for started_ns, succeeded in chain.results if started_ns >= bound_ns]
    assert late and all(late), (bound_ns, [(started, ok) for started, ok in chain.results if not ok][-3:])
    for tier in range(tiers):
        assert EndpointState.EJECTED not in chain.states(tier), tier
        assert chain.layers[tier].queue.state is QueueState.SERVING, tier
