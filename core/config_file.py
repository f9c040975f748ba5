"""Reading configuration files: field paths in errors, and the proxy's limits from a mapping.

Pure: the caller loads the file (YAML) and hands over the parsed mapping and the file's name. Every error
names the file, the field (as a path such as ``clients[0].rate_per_s``) and what to write instead. The
simulator's scenario files and ``tether proxy --config`` share this reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tether.core.address import Address, AddressError
from tether.core.config import MS, RATIO_FIELDS, ConfigError, ProxyConfig

PROXY_CONFIG_MS_FIELDS = {
    "connect_timeout_ms": "connect_timeout_ns",
    "response_timeout_ms": "response_timeout_ns",
    "idle_timeout_ms": "idle_timeout_ns",
    "pool_idle_timeout_ms": "pool_idle_timeout_ns",
    "drain_timeout_ms": "drain_timeout_ns",
    "detect_timeout_ms": "detect_timeout_ns",
    "h2_keepalive_interval_ms": "h2_keepalive_interval_ns",
    "h2_keepalive_timeout_ms": "h2_keepalive_timeout_ns",
    "failfast_timeout_ms": "failfast_timeout_ns",
    "breaker_backoff_min_ms": "breaker_backoff_min_ns",
    "breaker_backoff_max_ms": "breaker_backoff_max_ns",
    "breaker_success_rate_window_ms": "breaker_success_rate_window_ns",
}
PROXY_CONFIG_PLAIN_FIELDS = (
    "max_header_bytes",
    "pool_max_connections_per_endpoint",
    "pool_max_idle_per_endpoint",
    "pool_max_waiters_per_endpoint",
    "max_buffered_bytes",
    "h2_max_concurrent_streams",
    "h2_stream_window",
    "h2_connection_window",
    "h2_max_control_frames_per_second",
    "breaker_consecutive_failures",
    "breaker_success_rate_requests_min",
    "breaker_success_rate_buckets",
    "breaker_success_rate_max_ejected_percent",
    "breaker_success_rate_ready_endpoints_min",
    "failfast_queue_capacity",
)
# Fractions from 0 to 1, kept as written (the plain fields above are whole numbers).
PROXY_CONFIG_RATIO_FIELDS = RATIO_FIELDS


class ConfigFileError(ValueError):
    """A configuration file is wrong: the message names the file, the field and the fix."""

    def __init__(self, source: str, field: str, problem: str, fix: str) -> None:
        super().__init__(f"{source}: {field}: {problem}; {fix}")
        self.source = source
        self.field = field


@dataclass(slots=True)
class FieldReader:
    """Reads one mapping of a configuration file, remembering where it is for error messages."""

    source: str
    path: str
    data: Mapping[str, Any]

    def fail(self, key: str, problem: str, fix: str) -> ConfigFileError:
        return ConfigFileError(self.source, f"{self.path}{key}", problem, fix)

    def known(self, *keys: str) -> None:
        for key in self.data:
            if key not in keys:
                raise self.fail(str(key), "unknown field", f"use one of: {', '.join(keys)}")

    def number(
        self, key: str, default: float | None = None, *, minimum: float = 0.0, maximum: float | None = None
    ) -> float:
        value = self.data.get(key, default)
        if value is None:
            raise self.fail(key, "missing", "give a number")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"{value!r} is not a number", "give a number such as 10 or 0.5")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise self.fail(key, f"{value} is out of range", f"give at least {minimum}{upper}")
        return float(value)

    def text(self, key: str, default: str | None = None) -> str:
        value = self.data.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"{value!r} is not a name", "give a non-empty string")
        return value

    def address(self, value: object, key: str, *, listening: bool = False) -> Address:
        try:
            return Address.parse(str(value), listening=listening)
        except AddressError as error:
            raise self.fail(key, str(error), "write HOST:PORT, for example backend-1:8080") from None

    def child(self, key: str) -> FieldReader:
        value = self.data.get(key, {})
        if not isinstance(value, Mapping):
            raise self.fail(key, "is not a mapping", "write key: value pairs under it")
        return FieldReader(self.source, f"{self.path}{key}.", value)

    def items(self, key: str) -> list[FieldReader]:
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise self.fail(key, "is not a list", "write one '- ' entry per item")
        readers = []
        for index, item in enumerate(value):
            if not isinstance(item, Mapping):
                raise self.fail(f"{key}[{index}]", "is not a mapping", "write key: value pairs")
            readers.append(FieldReader(self.source, f"{self.path}{key}[{index}].", item))
        return readers

    def pair(self, key: str, default: tuple[int, int]) -> tuple[int, int]:
        value = self.data.get(key, list(default))
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) for v in value)
            or value[0] < 0
            or value[0] > value[1]
        ):
            raise self.fail(key, f"{value!r} is not a range", "write [LOW, HIGH] with 0 <= LOW <= HIGH")
        return int(value[0]), int(value[1])

    def latency(self, key: str, default_ms: tuple[float, float]) -> tuple[int, int]:
        node = self.child(key)
        node.known("min", "tail_mean")
        return (int(node.number("min", default_ms[0]) * MS), int(node.number("tail_mean", default_ms[1]) * MS))


def read_proxy_config(options: FieldReader, *, extra_fields: tuple[str, ...] = ()) -> ProxyConfig:
    """A ProxyConfig from a mapping of ``*_ms`` durations, whole-number limits, ratios (0 to 1) and names."""
    options.known(
        *PROXY_CONFIG_MS_FIELDS,
        *PROXY_CONFIG_PLAIN_FIELDS,
        *PROXY_CONFIG_RATIO_FIELDS,
        "protocol",
        "balancer",
        "opaque_ports",
        *extra_fields,
    )
    values: dict[str, Any] = {}
    for key in ("protocol", "balancer"):
        if key in options.data:
            values[key] = options.text(key)
    if "opaque_ports" in options.data:
        ports = options.data["opaque_ports"]
        if not isinstance(ports, list):
            raise options.fail("opaque_ports", f"{ports!r} is not a list", "write [25, 587, 3306]")
        values["opaque_ports"] = tuple(ports)
    for key, field_name in PROXY_CONFIG_MS_FIELDS.items():
        if key in options.data:
            values[field_name] = int(options.number(key) * MS)
    for key in PROXY_CONFIG_PLAIN_FIELDS:
        if key in options.data:
            number = options.number(key)
            if not number.is_integer():
                raise options.fail(key, f"{number:g} is not a whole number", "give a count such as 20")
            values[key] = int(number)
    for key in PROXY_CONFIG_RATIO_FIELDS:
        if key in options.data:
            values[key] = options.number(key, maximum=1.0)
    try:
        return ProxyConfig(**values)
    except ConfigError as error:
        written = {field: key for key, field in PROXY_CONFIG_MS_FIELDS.items()}.get(error.field, error.field)
        raise options.fail(written, error.problem, f"{error.fix} (see docs/configuration.md)") from None
