"""The proxy's configuration: one immutable, validated value with every limit spelled out.

Defaults follow Linkerd's proxy where it documents one, and otherwise name the reason next to the value.
``ConfigError`` always names the field and says what would be accepted, so a command line or file that
is wrong can be fixed from the message alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from tether.core.traffic.breaker import BreakerConfig, SuccessRateConfig

MS = 1_000_000
S = 1_000_000_000
HOUR = 3600 * S
PROTOCOLS = ("http1", "detect", "opaque")
# Endpoint choice (core/traffic/balancer.py). Linkerd balances HTTP with P2C over peak-EWMA; the other two
# stay available for comparison (`tether sim --balancer`).
BALANCERS = ("p2c-ewma", "round-robin", "least-loaded")
# Fields that are fractions from 0 to 1 (every other number is a whole number).
RATIO_FIELDS = ("breaker_backoff_jitter_ratio", "breaker_success_rate_min")
BREAKER_BUCKETS_MAX = 100


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and the fix."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        super().__init__(f"{field}: {problem}; {fix}")
        self.field = field
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """Limits and timeouts of one proxy. All durations are integer nanoseconds."""

    # h11 refuses a request or response head larger than this (431 / 502). 16 KiB is h11's own default
    # and about where Node (16 KiB) sits; nginx's large_client_header_buffers allows 4 x 8 KiB.
    max_header_bytes: int = 16 * 1024
    # HTTP/1.1 answers pipelined requests in order, so a connection has at most one request in flight;
    # while it is in flight the proxy stops reading that connection and later requests wait in the
    # kernel's socket buffer. The field exists so the limit is visible; HTTP/2 (issue 3) raises it.
    max_requests_in_flight_per_connection: int = 1
    # A downstream connection with no request in flight is closed after this long.
    idle_timeout_ns: int = 60 * S
    # Linkerd's outbound connect timeout is 1 s; a connect that takes longer answers 504.
    connect_timeout_ns: int = 1 * S
    # From the last byte of the request written upstream to the response head. 0 disables it.
    response_timeout_ns: int = 10 * S
    # Upstream connections per endpoint, busy or idle; a request that finds the pool full waits.
    pool_max_connections_per_endpoint: int = 256
    # Idle upstream connections kept per endpoint, and for how long.
    pool_max_idle_per_endpoint: int = 16
    pool_idle_timeout_ns: int = 10 * S
    # Requests waiting for a pooled connection per endpoint; past this they get 503. Linkerd's
    # default dispatch queue capacity is 100.
    pool_max_waiters_per_endpoint: int = 100
    # Bytes written to a connection that its peer has not yet taken; past this the proxy stops reading
    # the connection feeding it. Also bounds request bytes held while an upstream connection opens.
    max_buffered_bytes: int = 64 * 1024
    # After a shutdown request, connections with a request in flight get this long to finish.
    drain_timeout_ns: int = 10 * S
    # What client connections carry: "http1" (HTTP/1.1, or HTTP/2 when a client opens with the HTTP/2
    # preface; anything else is a malformed request, 400), "detect" (Linkerd's protocol detection: HTTP/2,
    # HTTP/1.1, else an opaque TCP tunnel) or "opaque" (every connection is a TCP tunnel, as Linkerd's
    # opaque ports).
    protocol: str = "http1"
    # With "detect": a client that sends nothing this long (a server-speaks-first protocol) is tunnelled.
    # Linkerd's default is 10 s; set the port to "opaque" to skip the wait.
    detect_timeout_ns: int = 10 * S
    # Destination ports whose connections are tunnelled without detection: server-speaks-first protocols
    # (SMTP 25 and 587, MySQL 3306) by default, as the issue and Linkerd's skip list have it. Applies to
    # connections whose destination is known: redirected ones (original destination) and inbound `to`.
    opaque_ports: tuple[int, ...] = (25, 587, 3306)
    # HTTP/2, both sides. Streams a client may open at once on one connection (RFC 9113 recommends at
    # least 100; more get REFUSED_STREAM). Windows: what a peer may send before the proxy has passed its
    # bytes on, per stream and per connection; they bound what one connection can make the proxy hold.
    # 64 KiB per stream is HTTP/2's default, 1 MiB per connection is Linkerd's.
    h2_max_concurrent_streams: int = 100
    h2_stream_window: int = 65_535
    h2_connection_window: int = 1024 * 1024
    # SETTINGS, PING, RST_STREAM and empty DATA frames a peer may send per second before it is treated as
    # a flood (rapid reset, settings flood) and sent GOAWAY ENHANCE_YOUR_CALM.
    h2_max_control_frames_per_second: int = 1000
    # A PING on every HTTP/2 connection this often; no answer within the timeout closes the connection
    # (a peer that vanished without a FIN). Linkerd's proxy pings every 10 s.
    h2_keepalive_interval_ns: int = 10 * S
    h2_keepalive_timeout_ns: int = 3 * S
    # How requests choose among a service's endpoints; see BALANCERS. Opaque TCP connections balance on
    # their open connection count (P2C over pending) when this is "p2c-ewma".
    balancer: str = "p2c-ewma"
    # Circuit breaking (core/traffic/breaker.py), outbound only: an inbound proxy never ejects its one
    # workload. Two detectors, each off at 0. Consecutive failures (Linkerd's failure accrual, on by
    # default): an endpoint that fails this many requests in a row is ejected.
    breaker_consecutive_failures: int = 7
    # An ejection lasts backoff_min, doubling with each ejection in a row up to backoff_max, plus a jitter
    # of up to jitter_ratio of that; then one request probes the endpoint. Linkerd's 1 s, 60 s and 0.5.
    breaker_backoff_min_ns: int = 1 * S
    breaker_backoff_max_ns: int = 60 * S
    breaker_backoff_jitter_ratio: float = 0.5
    # Success rate (Envoy's failure-percentage outlier detection; off by default, as Linkerd's stable proxy
    # has none): at a failure, an endpoint whose successes over verdicts in the last window (split into
    # buckets that expire one at a time) fall below success_rate_min, with at least requests_min verdicts,
    # is ejected, unless that ejects more than max_ejected_percent of the endpoints (one is always allowed)
    # or leaves fewer than ready_endpoints_min un-ejected. Envoy's 10 s window and 50 %; at most 100
    # buckets, the counters each endpoint keeps.
    breaker_success_rate_min: float = 0.0
    breaker_success_rate_requests_min: int = 20
    breaker_success_rate_window_ns: int = 10 * S
    breaker_success_rate_buckets: int = 10
    breaker_success_rate_max_ejected_percent: int = 50
    breaker_success_rate_ready_endpoints_min: int = 1
    # While no endpoint of a service is ready, its requests wait in a queue of this many (Linkerd's 100);
    # one that waits failfast_timeout (Linkerd's 3 s) puts the service in failfast: every waiting and new
    # request gets 503 with l5d-proxy-error until an endpoint is ready again.
    failfast_queue_capacity: int = 100
    failfast_timeout_ns: int = 3 * S

    def __post_init__(self) -> None:
        for port in self.opaque_ports:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
                raise ConfigError("opaque_ports", f"{port!r} is not a port", "list numbers from 1 to 65535")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                "protocol", f"{self.protocol!r} is not a protocol mode", f"use one of {', '.join(PROTOCOLS)}"
            )
        if self.balancer not in BALANCERS:
            raise ConfigError("balancer", f"{self.balancer!r} is not a balancer", f"use one of {', '.join(BALANCERS)}")
        for field in fields(self):
            if field.name in ("protocol", "opaque_ports", "balancer"):
                continue
            value = getattr(self, field.name)
            if field.name in RATIO_FIELDS:
                _check_ratio(field.name, value)
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(field.name, f"{value!r} is not an integer", "give a whole number")
            if value < 0:
                raise ConfigError(field.name, f"{value} is negative", "give 0 or more")
        _at_least(self, "max_header_bytes", 1024, "1024 (a head smaller than 1 KiB rejects real clients)")
        _at_least(self, "max_requests_in_flight_per_connection", 1, "1")
        _at_most(self, "max_requests_in_flight_per_connection", 1, "1 (HTTP/1.1 answers in order)")
        _at_least(self, "connect_timeout_ns", 1 * MS, "1 ms")
        _at_least(self, "idle_timeout_ns", 1 * MS, "1 ms")
        _at_least(self, "pool_max_connections_per_endpoint", 1, "1")
        _at_least(self, "max_buffered_bytes", 1024, "1024")
        _at_least(self, "h2_max_concurrent_streams", 1, "1")
        _at_least(self, "h2_stream_window", 65_535, "65535 (HTTP/2's initial window)")
        _at_most(self, "h2_stream_window", 2**31 - 1, "2147483647 (HTTP/2's largest window)")
        _at_least(self, "h2_connection_window", 65_535, "65535 (HTTP/2's initial window)")
        _at_most(self, "h2_connection_window", 2**31 - 1, "2147483647 (HTTP/2's largest window)")
        _at_least(self, "h2_max_control_frames_per_second", 10, "10")
        _at_least(self, "h2_keepalive_interval_ns", 100 * MS, "100 ms")
        _at_least(self, "h2_keepalive_timeout_ns", 1 * MS, "1 ms")
        _at_least(self, "failfast_timeout_ns", 1 * MS, "1 ms")
        self._check_breaker()

    def _check_breaker(self) -> None:
        _at_most(self, "breaker_consecutive_failures", 1000, "1000")
        _at_least(self, "breaker_backoff_min_ns", 1 * MS, "1 ms")
        _at_most(self, "breaker_backoff_max_ns", HOUR, "1 hour (3600000 ms)")
        if self.breaker_backoff_max_ns < self.breaker_backoff_min_ns:
            raise ConfigError(
                "breaker_backoff_max_ns",
                f"{self.breaker_backoff_max_ns / MS:g} ms is shorter than the minimum backoff "
                f"({self.breaker_backoff_min_ns / MS:g} ms)",
                "make it at least breaker_backoff_min",
            )
        _at_least(self, "breaker_success_rate_requests_min", 1, "1")
        _at_most(self, "breaker_success_rate_requests_min", 1_000_000, "1000000")
        _at_least(self, "breaker_success_rate_buckets", 1, "1")
        _at_most(self, "breaker_success_rate_buckets", BREAKER_BUCKETS_MAX, f"{BREAKER_BUCKETS_MAX}")
        buckets = self.breaker_success_rate_buckets
        _at_least(self, "breaker_success_rate_window_ns", buckets * MS, f"{buckets} ms (1 ms per bucket)")
        _at_most(self, "breaker_success_rate_window_ns", HOUR, "1 hour (3600000 ms)")
        _at_most(self, "breaker_success_rate_max_ejected_percent", 100, "100")
        _at_most(self, "breaker_success_rate_ready_endpoints_min", 10_000, "10000 (a backend's most endpoints)")

    def breaker_config(self) -> BreakerConfig | None:
        """The circuit breaker these fields describe for an outbound backend; None when both detectors are
        off (0 consecutive failures and a success rate minimum of 0)."""
        success_rate = None
        if self.breaker_success_rate_min > 0:
            success_rate = SuccessRateConfig(
                success_rate_min=float(self.breaker_success_rate_min),
                requests_min=self.breaker_success_rate_requests_min,
                # Whole nanoseconds per bucket: the window may come out a few nanoseconds short of what was asked.
                bucket_ns=self.breaker_success_rate_window_ns // self.breaker_success_rate_buckets,
                buckets=self.breaker_success_rate_buckets,
                max_ejected_percent=self.breaker_success_rate_max_ejected_percent,
                ready_endpoints_min=self.breaker_success_rate_ready_endpoints_min,
            )
        if not self.breaker_consecutive_failures and success_rate is None:
            return None
        return BreakerConfig(
            consecutive_failures_max=self.breaker_consecutive_failures,
            backoff_min_ns=self.breaker_backoff_min_ns,
            backoff_max_ns=self.breaker_backoff_max_ns,
            jitter_ratio=float(self.breaker_backoff_jitter_ratio),
            success_rate=success_rate,
        )


def _check_ratio(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, f"{value!r} is not a number", "give a number from 0 to 1, such as 0.5")
    if not (math.isfinite(value) and 0 <= value <= 1):  # YAML's .nan would pass every comparison
        raise ConfigError(name, f"{value} is out of range", "give a number from 0 to 1, such as 0.5")


def _at_least(config: ProxyConfig, name: str, minimum: int, shown: str) -> None:
    if getattr(config, name) < minimum:
        raise ConfigError(name, f"{getattr(config, name)} is too small", f"use at least {shown}")


def _at_most(config: ProxyConfig, name: str, maximum: int, shown: str) -> None:
    if getattr(config, name) > maximum:
        raise ConfigError(name, f"{getattr(config, name)} is too large", f"use at most {shown}")
