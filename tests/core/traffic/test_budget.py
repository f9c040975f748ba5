"""The retry budget against a naive model that keeps every deposit and withdrawal with its timestamp."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tether.core.traffic.budget import (
    MILLI,
    SLOTS_PER_TTL,
    RetryBudget,
    RetryBudgetConfig,
    RetryBudgets,
)

S = 1_000_000_000
MS = 1_000_000


class NaiveBudget:
    """Every event kept with its (clamped) time; the balance recomputed from all of them on each call.

    The window rule is the documented one: an event counts while the current slot (ttl / 10 long) is
    at most 9 slots after the event's slot.
    """

    def __init__(self, config: RetryBudgetConfig) -> None:
        self.config = config
        self.events: list[tuple[int, int]] = []  # (time, thousandths of a retry: + deposit, - withdrawal)
        self.latest_ns: int | None = None

    def _clamp(self, now_ns: int) -> int:
        self.latest_ns = now_ns if self.latest_ns is None else max(self.latest_ns, now_ns)
        return self.latest_ns

    def balance(self, now_ns: int) -> int:
        now_ns = self._clamp(now_ns)
        slot = self.config.ttl_ns // SLOTS_PER_TTL
        live = [amount for time, amount in self.events if now_ns // slot - time // slot < SLOTS_PER_TTL]
        return self.config.reserve_milli + sum(live)

    def deposit(self, now_ns: int) -> None:
        self.events.append((self._clamp(now_ns), round(self.config.retry_ratio * 1000)))

    def try_withdraw(self, now_ns: int) -> bool:
        if self.balance(now_ns) < MILLI:
            return False
        self.events.append((self._clamp(now_ns), -MILLI))
        return True


configs = st.builds(
    RetryBudgetConfig,
    retry_ratio=st.one_of(st.sampled_from([0.0, 0.001, 0.2, 0.5, 1.0, 3.0]), st.floats(0.0, 2.0)),
    min_retries_per_s=st.integers(0, 12),
    ttl_ns=st.sampled_from([1 * S, 3 * S + 7, 10 * S, 60 * S]),
)


class BudgetMachine(RuleBasedStateMachine):
    @initialize(config=configs, start_ns=st.integers(0, 10**12))
    def start(self, config: RetryBudgetConfig, start_ns: int) -> None:
        self.budget = RetryBudget(config)
        self.model = NaiveBudget(config)
        self.now_ns = start_ns

    @rule(delta_ms=st.one_of(st.integers(0, 300), st.integers(0, 70_000)))
    def advance_time(self, delta_ms: int) -> None:
        self.now_ns += delta_ms * MS

    @rule(count=st.integers(1, 30))
    def requests(self, count: int) -> None:
        for _ in range(count):
            self.budget.deposit(self.now_ns)
            self.model.deposit(self.now_ns)

    @rule(count=st.integers(1, 30))
    def retries(self, count: int) -> None:
        for _ in range(count):
            assert self.budget.try_withdraw(self.now_ns) == self.model.try_withdraw(self.now_ns)

    @precondition(lambda self: self.now_ns > 0)
    @rule(behind_ms=st.integers(1, 2_000))
    def a_late_report(self, behind_ms: int) -> None:
        # An input stamped earlier than one already seen counts at the latest time.
        late_ns = max(0, self.now_ns - behind_ms * MS)
        assert self.budget.try_withdraw(late_ns) == self.model.try_withdraw(late_ns)

    @invariant()
    def balance_matches_the_model(self) -> None:
        assert self.budget.balance_milli(self.now_ns) == self.model.balance(self.now_ns)

    @invariant()
    def counters_add_up(self) -> None:
        assert self.budget.deposits == sum(1 for _, amount in self.model.events if amount >= 0)
        assert self.budget.withdrawals == sum(1 for _, amount in self.model.events if amount < 0)


TestBudgetMachine = BudgetMachine.TestCase
TestBudgetMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_budget_defaults_are_linkerds() -> None:
    config = RetryBudgetConfig()
    assert (config.retry_ratio, config.min_retries_per_s, config.ttl_ns) == (0.2, 10, 10 * S)
    assert config.reserve_milli == 100 * MILLI  # 10 retries/s for 10 s


def test_budget_allows_ratio_of_requests_beyond_the_reserve() -> None:
    budget = RetryBudget(RetryBudgetConfig(retry_ratio=0.2, min_retries_per_s=0, ttl_ns=10 * S))
    for _ in range(50):
        budget.deposit(0)
    granted = sum(budget.try_withdraw(0) for _ in range(20))
    assert granted == 10  # 0.2 x 50
    assert budget.refusals == 10


def test_budget_deposits_expire_after_the_ttl() -> None:
    budget = RetryBudget(RetryBudgetConfig(retry_ratio=1.0, min_retries_per_s=0, ttl_ns=10 * S))
    for _ in range(5):
        budget.deposit(0)
    assert budget.balance_milli(9 * S) == 5 * MILLI  # still in the window (slot 9 of 0..9)
    assert budget.balance_milli(10 * S) == 0


def test_budget_balance_goes_negative_when_deposits_expire_before_their_withdrawals() -> None:
    # Found by the state machine: a retry funded by a deposit outlives it by up to one slot. The budget
    # then refuses retries until the withdrawal expires too; it never grants one it does not hold.
    budget = RetryBudget(RetryBudgetConfig(retry_ratio=1.0, min_retries_per_s=0, ttl_ns=1 * S))
    budget.deposit(0)
    assert budget.try_withdraw(137 * MS)
    assert budget.balance_milli(1 * S) == -MILLI
    assert not budget.try_withdraw(1 * S)
    assert budget.balance_milli(1100 * MS) == 0


def test_budget_withdrawals_expire_too() -> None:
    budget = RetryBudget(RetryBudgetConfig(retry_ratio=0.0, min_retries_per_s=1, ttl_ns=1 * S))
    assert budget.try_withdraw(0)
    assert not budget.try_withdraw(0)  # the reserve of 1 retry per 1 s is spent
    assert budget.try_withdraw(1 * S)


def test_budgets_are_per_service_and_bounded() -> None:
    budgets = RetryBudgets(max_services=2)
    web = budgets.for_service("web")
    assert budgets.for_service("web") is web
    budgets.for_service("api")
    budgets.for_service("db")
    assert len(budgets) == 2
    assert budgets.for_service("web") is not web  # forgotten first: the least recently used
    changed = budgets.for_service("api", RetryBudgetConfig(retry_ratio=0.5))
    assert changed.config.retry_ratio == 0.5
