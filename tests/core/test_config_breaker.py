"""The circuit breaker's fields of ProxyConfig: what they build, what they refuse, and how a file names them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.core.config import HOUR, MS, ConfigError, ProxyConfig, S
from tether.core.config_file import ConfigFileError, FieldReader, read_proxy_config
from tether.core.traffic.breaker import BreakerConfig, SuccessRateConfig


def test_proxy_config_breaker_defaults_are_the_breakers_own_with_seven_failures() -> None:
    assert ProxyConfig().breaker_config() == BreakerConfig(consecutive_failures_max=7)


def test_proxy_config_breaker_success_rate_fields_build_the_detector() -> None:
    config = ProxyConfig(
        breaker_backoff_min_ns=2 * S,
        breaker_backoff_max_ns=30 * S,
        breaker_backoff_jitter_ratio=0.25,
        breaker_success_rate_min=0.8,
        breaker_success_rate_requests_min=40,
        breaker_success_rate_window_ns=3 * S,
        breaker_success_rate_buckets=6,
        breaker_success_rate_max_ejected_percent=20,
        breaker_success_rate_ready_endpoints_min=2,
    )
    assert config.breaker_config() == BreakerConfig(
        consecutive_failures_max=7,
        backoff_min_ns=2 * S,
        backoff_max_ns=30 * S,
        jitter_ratio=0.25,
        success_rate=SuccessRateConfig(
            success_rate_min=0.8,
            requests_min=40,
            bucket_ns=S // 2,
            buckets=6,
            max_ejected_percent=20,
            ready_endpoints_min=2,
        ),
    )


def test_proxy_config_breaker_each_detector_turns_off_alone() -> None:
    success_rate_only = ProxyConfig(breaker_consecutive_failures=0, breaker_success_rate_min=0.5).breaker_config()
    assert success_rate_only is not None
    assert success_rate_only.consecutive_failures_max == 0 and success_rate_only.success_rate is not None
    assert ProxyConfig(breaker_consecutive_failures=0).breaker_config() is None


@pytest.mark.parametrize(
    ("field", "value", "fix"),
    [
        ("breaker_consecutive_failures", 1001, "at most 1000"),
        ("breaker_consecutive_failures", -1, "0 or more"),
        ("breaker_backoff_min_ns", 0, "at least 1 ms"),
        ("breaker_backoff_max_ns", 2 * HOUR, "at most 1 hour"),
        ("breaker_backoff_max_ns", 500 * MS, "at least breaker_backoff_min"),
        ("breaker_backoff_jitter_ratio", 1.5, "from 0 to 1"),
        ("breaker_backoff_jitter_ratio", math.nan, "from 0 to 1"),
        ("breaker_backoff_jitter_ratio", "half", "from 0 to 1"),
        ("breaker_success_rate_min", -0.1, "from 0 to 1"),
        ("breaker_success_rate_min", True, "from 0 to 1"),
        ("breaker_success_rate_requests_min", 0, "at least 1"),
        ("breaker_success_rate_requests_min", 2_000_000, "at most 1000000"),
        ("breaker_success_rate_window_ns", 5 * MS, "at least 10 ms (1 ms per bucket)"),
        ("breaker_success_rate_window_ns", HOUR + 1, "at most 1 hour"),
        ("breaker_success_rate_buckets", 0, "at least 1"),
        ("breaker_success_rate_buckets", 101, "at most 100"),
        ("breaker_success_rate_max_ejected_percent", 101, "at most 100"),
        ("breaker_success_rate_ready_endpoints_min", 10_001, "at most 10000"),
        ("breaker_success_rate_ready_endpoints_min", 1.5, "whole number"),
    ],
)
def test_proxy_config_breaker_bad_value_names_field_and_fix(field: str, value: object, fix: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ProxyConfig(**{field: value})  # type: ignore[arg-type]
    assert caught.value.field == field
    assert fix in caught.value.fix


@given(
    consecutive=st.integers(-1, 1001),
    backoff_min_ms=st.integers(0, 4000),
    backoff_max_ms=st.integers(0, 4000),
    jitter=st.floats(-0.5, 1.5) | st.just(math.nan),
    success_rate_min=st.floats(-0.5, 1.5) | st.just(math.nan),
    requests_min=st.integers(-1, 30),
    window_ms=st.integers(0, 300),
    buckets=st.integers(-1, 120),
    max_ejected_percent=st.integers(-1, 120),
    ready_min=st.integers(-1, 5),
)
def test_proxy_config_breaker_every_accepted_config_builds_a_breaker(
    consecutive: int,
    backoff_min_ms: int,
    backoff_max_ms: int,
    jitter: float,
    success_rate_min: float,
    requests_min: int,
    window_ms: int,
    buckets: int,
    max_ejected_percent: int,
    ready_min: int,
) -> None:
    """ProxyConfig refuses, with the field and the fix, whatever the breaker's own checks would refuse."""
    try:
        config = ProxyConfig(
            breaker_consecutive_failures=consecutive,
            breaker_backoff_min_ns=backoff_min_ms * MS,
            breaker_backoff_max_ns=backoff_max_ms * MS,
            breaker_backoff_jitter_ratio=jitter,
            breaker_success_rate_min=success_rate_min,
            breaker_success_rate_requests_min=requests_min,
            breaker_success_rate_window_ns=window_ms * MS,
            breaker_success_rate_buckets=buckets,
            breaker_success_rate_max_ejected_percent=max_ejected_percent,
            breaker_success_rate_ready_endpoints_min=ready_min,
        )
    except ConfigError as error:
        assert error.field.startswith("breaker_") and error.fix
        return
    breaker = config.breaker_config()  # raises ValueError if the breaker refuses what ProxyConfig took
    if breaker is not None and breaker.success_rate is not None:
        window_ns = breaker.success_rate.bucket_ns * breaker.success_rate.buckets
        assert window_ms * MS - buckets < window_ns <= window_ms * MS


def _read(limits: dict[str, object]) -> ProxyConfig:
    return read_proxy_config(FieldReader("proxy.yaml", "limits.", limits))


def test_config_file_breaker_keys_in_milliseconds_and_ratios() -> None:
    config = _read(
        {
            "breaker_consecutive_failures": 5,
            "breaker_backoff_min_ms": 250,
            "breaker_backoff_max_ms": 4000,
            "breaker_backoff_jitter_ratio": 0.1,
            "breaker_success_rate_min": 0.75,
            "breaker_success_rate_requests_min": 10,
            "breaker_success_rate_window_ms": 2000,
            "breaker_success_rate_buckets": 4,
            "breaker_success_rate_max_ejected_percent": 30,
            "breaker_success_rate_ready_endpoints_min": 0,
        }
    )
    assert (config.breaker_backoff_min_ns, config.breaker_backoff_max_ns) == (250 * MS, 4000 * MS)
    assert (config.breaker_backoff_jitter_ratio, config.breaker_success_rate_min) == (0.1, 0.75)
    assert config.breaker_success_rate_window_ns == 2 * S and config.breaker_success_rate_buckets == 4
    assert (config.breaker_success_rate_max_ejected_percent, config.breaker_success_rate_ready_endpoints_min) == (30, 0)


@pytest.mark.parametrize(
    ("limits", "field", "fix"),
    [
        ({"breaker_success_rate_min": 1.2}, "limits.breaker_success_rate_min", "at most 1.0"),
        ({"breaker_backoff_jitter_ratio": "lots"}, "limits.breaker_backoff_jitter_ratio", "give a number"),
        ({"breaker_success_rate_buckets": 2.5}, "limits.breaker_success_rate_buckets", "whole number"),
        ({"breaker_success_rate_window_ms": 0.5}, "limits.breaker_success_rate_window_ms", "1 ms per bucket"),
        (
            {"breaker_backoff_min_ms": 3000, "breaker_backoff_max_ms": 2000},
            "limits.breaker_backoff_max_ms",
            "at least breaker_backoff_min",
        ),
        ({"breaker_sucess_rate_min": 0.5}, "limits.breaker_sucess_rate_min", "breaker_success_rate_min"),
    ],
)
def test_config_file_breaker_bad_key_names_file_field_and_fix(limits: dict[str, object], field: str, fix: str) -> None:
    with pytest.raises(ConfigFileError) as caught:
        _read(limits)
    message = str(caught.value)
    assert message.startswith(f"proxy.yaml: {field}: ") and fix in message
