"""Stateful test of the traffic wiring: clients send requests while endpoints fail, refuse, go silent, slow
down, heal, and leave or join discovery, under each balancer, with and without retrying routes.

Safety after every step: no client gets two answers; the proxy never retries without the budget's say
(each retry withdraws one, and with the profile's budget, retries <= 0.5 x routed requests: ratio 0.5 and
no reserve). Liveness at the end: once the world has run dry every request has exactly one answer (a
response, or its connection reset), nothing is in flight in any balancer, no mirror ticket or exchange is
left, and no route timer is armed.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from traffic_world import MS, Behaviour, S, World

from tether.core.address import Address
from tether.core.config import BALANCERS, ProxyConfig
from tether.core.traffic.route_config import load_route_yaml

ENDPOINTS = [Address("10.9.0.1", 80), Address("10.9.0.2", 80), Address("10.9.0.3", 80)]
CANARY = Address("10.9.0.4", 80)

PROFILE = """
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata: {name: web.default.svc.cluster.local}
spec:
  routes: [{name: all, condition: {pathRegex: "/.*"}, isRetryable: true, timeout: 1500ms}]
  retryBudget: {retryRatio: 0.5, minRetriesPerSecond: 0, ttl: 10s}
"""
SPLIT = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
  annotations: {retry.linkerd.io/http: 5xx, retry.linkerd.io/limit: "3", timeout.linkerd.io/response: 700ms}
spec:
  parentRefs: [{name: web}]
  rules:
    - backendRefs: [{name: web, weight: 3}, {name: canary, weight: 1}]
      filters: [{type: RequestMirror, requestMirror: {backendRef: {name: canary}, percent: 50}}]
"""
BEHAVIOURS = {
    "ok": Behaviour(),
    "failing": Behaviour(status=503),
    "flaky": Behaviour(failures_left=2),
    "refusing": Behaviour(refuse=True),
    "silent": Behaviour(silent=True),
    "slow": Behaviour(latency_ns=400 * MS),
}


class TrafficWiring(RuleBasedStateMachine):
    world: World
    routes_kind: str

    @initialize(
        seed=st.integers(0, 2**16),
        balancer=st.sampled_from(BALANCERS),
        routes_kind=st.sampled_from(["none", "profile", "split"]),
    )
    def start(self, seed: int, balancer: str, routes_kind: str) -> None:
        config = ProxyConfig(balancer=balancer, failfast_timeout_ns=500 * MS, response_timeout_ns=2 * S)
        text = {"none": None, "profile": PROFILE, "split": SPLIT}[routes_kind]
        routes = load_route_yaml(text, "routes.yaml") if text is not None else None
        self.world = World({"web": list(ENDPOINTS), "canary": [CANARY]}, config=config, routes=routes, seed=seed)
        self.routes_kind = routes_kind

    @rule(count=st.integers(1, 4), body_bytes=st.sampled_from([0, 300, 70_000]))
    def send(self, count: int, body_bytes: int) -> None:
        body = b"x" * body_bytes  # 70,000: past the 64 KiB replay buffer and the mirror limit
        for _ in range(count):
            self.world.send("web", method="POST" if body else "GET", body=body)

    @rule(endpoint=st.sampled_from([*ENDPOINTS, CANARY]), behaviour=st.sampled_from(sorted(BEHAVIOURS)))
    def change(self, endpoint: Address, behaviour: str) -> None:
        template = BEHAVIOURS[behaviour]
        self.world.behaviour[endpoint] = Behaviour(**vars(template))

    @rule(present=st.lists(st.sampled_from(ENDPOINTS), unique=True, max_size=3))
    def rediscover(self, present: list[Address]) -> None:
        self.world.resolver.set("web", present)

    @rule(delta_ms=st.integers(1, 1500))
    def advance(self, delta_ms: int) -> None:
        self.world.run(until_ns=self.world.now_ns + delta_ms * MS)

    @invariant()
    def answered_at_most_once(self) -> None:
        assert self.world.answered_twice == []

    @invariant()
    def retries_within_the_budget(self) -> None:
        proxy = self.world.proxy
        retries = sum(counts.requests for counts in proxy.telemetry.traffic.retries.values())
        budgets = list(proxy._budgets._budgets.values())
        assert retries == sum(budget.withdrawals for budget in budgets)
        if self.routes_kind == "profile":
            routed = sum(counters.requests for _key, counters in proxy._route_stats.items())
            assert retries <= 0.5 * routed, (retries, routed)

    def teardown(self) -> None:
        world = getattr(self, "world", None)
        if world is None:
            return
        world.run()  # until nothing is left: every timeout fires, every endpoint answers or is given up on
        assert world.answered_twice == []
        lost = [answer for answer in world.answers if answer.status is None and not answer.reset]
        assert lost == [], lost
        proxy = world.proxy
        assert all(balancer.in_flight == 0 for balancer in proxy.telemetry.traffic.balancers.values())
        assert all(backend.queue.waiting() == [] for backend in proxy._backends.values())
        assert proxy._exchanges == {} and proxy._mirror_tickets == {} and proxy._mirror_gate.in_flight == 0
        assert proxy.next_deadline_ns() is None


TrafficWiring.TestCase.settings = settings(
    max_examples=25, stateful_step_count=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_traffic_wiring = TrafficWiring.TestCase
