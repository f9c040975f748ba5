"""Retry budgets: retries as a bounded fraction of requests, shared by every route of a service.

Theory of operation
-------------------
Per-request retry limits alone let an outage multiply load: with a limit of 3, every failing request
becomes four. A budget bounds retries across all the requests to one service, the way Finagle's
``RetryBudget`` and Linkerd's ServiceProfile ``retryBudget`` do:

- every original request **deposits** ``retry_ratio`` of a retry (0.2 by default: one retry per five
  requests);
- every retry **withdraws** one whole retry, and is refused when fewer than one is available;
- on top of the deposits sits a fixed **reserve** of ``min_retries_per_s x ttl`` retries (10/s x 10 s = 100
  by default), so a quiet service can still retry its few failures;
- deposits and withdrawals count for ``ttl`` (10 s by default) and then expire, both of them, so the
  budget follows the recent request rate rather than all of history.

So over any ttl window, retries <= retry_ratio x requests + min_retries_per_s x ttl.

Windowing: the ttl is cut into ``SLOTS_PER_TTL`` (10) slots of ttl/10; an event made at time t counts while
the current slot is one of the ten starting with t's slot, that is for between 0.9 and 1.0 ttl. This
keeps memory at ten integers per service whatever the request rate (an exact sliding window would keep
every event), at the cost of expiring events up to one slot early. Times that go backwards are taken as
the latest time seen. A deposit can expire a slot before the retry it paid for, leaving the balance
below zero for up to a slot: retries are then refused until the withdrawal expires as well.

Arithmetic is in integer thousandths of a retry (``MILLI``), so the ratio has a precision of 0.001 and
the balance never drifts with floating point.

Linkerd's defaults are the defaults here: ratio 0.2, 10 retries/s, ttl 10 s. ``RetryBudgets`` keeps one
budget per service, at most ``max_services`` of them; the least recently used is forgotten first, and a
forgotten service starts again from its reserve.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

S = 1_000_000_000
MILLI = 1000  # one retry, in the budget's integer unit
SLOTS_PER_TTL = 10
TTL_NS_MIN = 1 * S
TTL_NS_MAX = 60 * S
RETRY_RATIO_MAX = 1000.0  # retries per request; Linkerd accepts up to 1000
MIN_RETRIES_PER_S_MAX = 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudgetConfig:
    """A service's budget: ``retry_ratio`` retries per request, plus ``min_retries_per_s``, over ``ttl_ns``."""

    retry_ratio: float = 0.2
    min_retries_per_s: int = 10
    ttl_ns: int = 10 * S

    def __post_init__(self) -> None:
        assert 0.0 <= self.retry_ratio <= RETRY_RATIO_MAX, self.retry_ratio
        assert 0 <= self.min_retries_per_s <= MIN_RETRIES_PER_S_MAX, self.min_retries_per_s
        assert TTL_NS_MIN <= self.ttl_ns <= TTL_NS_MAX, self.ttl_ns

    @property
    def deposit_milli(self) -> int:
        """What one request adds, in thousandths of a retry."""
        return round(self.retry_ratio * MILLI)

    @property
    def reserve_milli(self) -> int:
        """The standing allowance, ``min_retries_per_s x ttl``, in thousandths of a retry."""
        return self.min_retries_per_s * self.ttl_ns * MILLI // S

    @property
    def slot_ns(self) -> int:
        return self.ttl_ns // SLOTS_PER_TTL


DEFAULT_RETRY_BUDGET = RetryBudgetConfig()


class RetryBudget:
    """One service's budget; see the module docstring. ``now_ns`` is the driver's monotonic clock."""

    def __init__(self, config: RetryBudgetConfig = DEFAULT_RETRY_BUDGET) -> None:
        self.config = config
        self._slots = [0] * SLOTS_PER_TTL  # net thousandths per slot: deposits minus withdrawals
        self._current_slot: int | None = None
        self.deposits = 0
        self.withdrawals = 0
        self.refusals = 0

    def deposit(self, now_ns: int) -> None:
        """An original request (not a retry) was sent to the service."""
        self._advance(now_ns)
        self._slots[self._index()] += self.config.deposit_milli
        self.deposits += 1

    def try_withdraw(self, now_ns: int) -> bool:
        """Spend one retry if the budget holds one; False (and nothing spent) otherwise."""
        self._advance(now_ns)
        if self._balance() < MILLI:
            self.refusals += 1
            return False
        self._slots[self._index()] -= MILLI
        self.withdrawals += 1
        assert self._balance() >= 0
        return True

    def balance_milli(self, now_ns: int) -> int:
        """Thousandths of a retry available at ``now_ns`` (reserve included)."""
        self._advance(now_ns)
        return self._balance()

    def _balance(self) -> int:
        return self.config.reserve_milli + sum(self._slots)

    def _index(self) -> int:
        assert self._current_slot is not None
        return self._current_slot % SLOTS_PER_TTL

    def _advance(self, now_ns: int) -> None:
        slot = now_ns // self.config.slot_ns
        if self._current_slot is None:
            self._current_slot = slot
            return
        if slot <= self._current_slot:
            return  # the same slot, or a time earlier than one already seen: counted in the current slot
        # Each slot passed over starts empty: what it held is older than the window now.
        for passed in range(self._current_slot + 1, min(slot, self._current_slot + SLOTS_PER_TTL) + 1):
            self._slots[passed % SLOTS_PER_TTL] = 0
        self._current_slot = slot


class RetryBudgets:
    """One ``RetryBudget`` per service name, bounded to ``max_services`` (least recently used forgotten)."""

    def __init__(self, *, max_services: int = 1024) -> None:
        assert max_services >= 1, max_services
        self.max_services = max_services
        self._budgets: OrderedDict[str, RetryBudget] = OrderedDict()

    def for_service(self, service: str, config: RetryBudgetConfig = DEFAULT_RETRY_BUDGET) -> RetryBudget:
        """The budget of ``service``; a changed ``config`` starts a fresh budget with the new settings."""
        budget = self._budgets.get(service)
        if budget is None or budget.config != config:
            budget = self._budgets[service] = RetryBudget(config)
        self._budgets.move_to_end(service)
        while len(self._budgets) > self.max_services:
            self._budgets.popitem(last=False)
        return budget

    def __len__(self) -> int:
        return len(self._budgets)
