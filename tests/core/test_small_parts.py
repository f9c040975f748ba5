"""Addresses, configuration errors, deadlines, the exchange table and the latency histogram."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.core.address import Address, AddressError, parse_authority
from tether.core.config import ConfigError, ProxyConfig
from tether.core.proxy.exchange import TRANSITIONS, Exchange, ExchangeState, ExchangeStateError, Step
from tether.core.proxy.stats import LatencyHistogram
from tether.core.timers import Deadlines


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:80", Address("127.0.0.1", 80)), ("[::1]:8080", Address("::1", 8080)), ("web:1", Address("web", 1))],
)
def test_address_parse_accepts_host_port(text: str, expected: Address) -> None:
    assert Address.parse(text) == expected
    assert Address.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "host", "host:0", "host:99999", ":80", "::1:80", "[::1", "h:x"])
def test_address_parse_rejects_with_example(text: str) -> None:
    with pytest.raises(AddressError, match="HOST:PORT|port|IPv6|']'"):
        Address.parse(text)


def test_parse_authority_never_raises() -> None:
    assert parse_authority("Web.NS:8080") == ("web.ns", 8080)
    assert parse_authority("[::1") == ("", None)


def test_config_error_names_field_and_fix() -> None:
    with pytest.raises(ConfigError) as caught:
        ProxyConfig(connect_timeout_ns=5)
    assert caught.value.field == "connect_timeout_ns" and "at least" in str(caught.value)
    with pytest.raises(ConfigError, match="max_header_bytes: 'big' is not an integer"):
        ProxyConfig(max_header_bytes="big")  # type: ignore[arg-type]


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 10**6)), max_size=50), st.integers(0, 10**6))
def test_deadlines_pop_exactly_the_expired_latest_setting(ops: list[tuple[int, int]], now: int) -> None:
    deadlines = Deadlines()
    model: dict[int, int] = {}
    for key, when in ops:
        if when % 7 == 0:
            deadlines.cancel(key)
            model.pop(key, None)
        else:
            deadlines.set(key, when)
            model[key] = when
    expected_next = min(model.values()) if model else None
    assert deadlines.next_ns() == expected_next
    due = deadlines.pop_expired(now)
    assert sorted(due) == sorted(key for key, when in model.items() if when <= now)
    assert len(deadlines) == sum(1 for when in model.values() if when > now)


@given(st.sampled_from(list(ExchangeState)), st.sampled_from(list(Step)))
def test_exchange_table_allows_listed_pairs_and_refuses_the_rest(state: ExchangeState, step: Step) -> None:
    import h11

    exchange = Exchange(1, 1, h11.Request(method="GET", target="/", headers=[("host", "x")]), "svc", 0)
    exchange.state = state
    if (state, step) in TRANSITIONS:
        assert exchange.advance(step) is TRANSITIONS[(state, step)]
    else:
        with pytest.raises(ExchangeStateError):
            exchange.advance(step)


@given(st.lists(st.floats(0, 60_000, allow_nan=False), min_size=1, max_size=200))
def test_histogram_quantile_lies_within_observed_bucket_bounds(values: list[float]) -> None:
    histogram = LatencyHistogram()
    for value in values:
        histogram.record(value)
    assert histogram.count == len(values)
    p50 = histogram.quantile_ms(0.5)
    assert p50 is not None and 0 <= p50 <= 50_000
    assert histogram.quantile_ms(0.0) <= p50 <= histogram.quantile_ms(1.0)  # type: ignore[operator]


def test_static_resolver_routes_then_falls_back() -> None:
    from tether.core.discovery import StaticResolver

    web = [Address("10.0.0.5", 8080)]
    routed = StaticResolver(by_host={"Web": web}, dial_authority=True)
    assert routed.resolve("web:80").endpoints == tuple(web)  # type: ignore[union-attr]
    assert routed.resolve("api.example:9000").endpoints == (Address("api.example", 9000),)  # type: ignore[union-attr]
    assert routed.resolve("api.example").endpoints == (Address("api.example", 80),)  # type: ignore[union-attr]
    assert routed.resolve("") is None
    assert StaticResolver(by_host={"web": web}).resolve("other") is None


def test_address_port_zero_only_for_listening() -> None:
    assert Address.parse("127.0.0.1:0", listening=True) == Address("127.0.0.1", 0)
    with pytest.raises(AddressError):
        Address.parse("127.0.0.1:0")


def test_deadlines_set_and_cancelled_forever_keep_the_heap_small() -> None:
    deadlines = Deadlines()
    deadlines.set(("idle", 0), 10**12)
    for request in range(10_000):  # a response timeout armed and cancelled per request
        deadlines.set(("response", request), request + 10**10)
        deadlines.cancel(("response", request))
    assert len(deadlines) == 1 and len(deadlines._heap) <= 2 * 1 + 64 + 1  # noqa: SLF001
    assert deadlines.next_ns() == 10**12 and deadlines.pop_expired(10**12) == [("idle", 0)]


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("set"), st.integers(0, 6), st.integers(0, 300)),
            st.tuples(st.just("cancel"), st.integers(0, 6), st.just(0)),
            st.tuples(st.just("advance"), st.just(0), st.integers(0, 60)),
        ),
        max_size=80,
    )
)
def test_deadlines_fire_in_deadline_then_arming_order(ops: list[tuple[str, int, int]]) -> None:
    """Against a dict of (deadline, arming order): keys re-armed later, earlier, cancelled and re-armed."""
    deadlines = Deadlines()
    model: dict[int, tuple[int, int]] = {}
    now = 0
    for armed, (op, key, value) in enumerate(ops):
        if op == "set":
            deadlines.set(key, now + value)
            model[key] = (now + value, armed)
        elif op == "cancel":
            deadlines.cancel(key)
            model.pop(key, None)
        else:
            now += value
            due = sorted((when, order, key) for key, (when, order) in model.items() if when <= now)
            assert deadlines.pop_expired(now) == [key for _, _, key in due]
            for _, _, key in due:
                del model[key]
        assert deadlines.next_ns() == (min(when for when, _ in model.values()) if model else None)
        assert len(deadlines) == len(model)


def test_deadlines_pushed_back_by_every_request_stay_one_heap_entry() -> None:
    deadlines = Deadlines()
    for request in range(1000):  # an idle timer re-armed after each request, further out every time
        deadlines.cancel(("idle", 1))
        deadlines.set(("idle", 1), request + 60_000)
    assert len(deadlines._heap) == 1  # noqa: SLF001
    assert deadlines.pop_expired(60_998) == [] and deadlines.next_ns() == 60_999
    assert deadlines.pop_expired(60_999) == [("idle", 1)] and deadlines.next_ns() is None
