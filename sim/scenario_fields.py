"""Scenario fields for traffic experiments: latency models, time windows, chained services, routes.

Read by sim/scenario.py; like every scenario field, an error names the file, the field path and the fix.

- ``servers[].latency``: ``{kind: lognormal, median_ms: 167, sigma: 0.5, min_ms: 0}``,
  ``{kind: fixed, ms: 2000}`` or ``{kind: exponential, min_ms: 1, tail_mean_ms: 2}`` (the older
  ``latency_ms: {min, tail_mean}`` is the exponential one; give one of the two);
- ``servers[].failure_status``: the status a failed request gets (5xx; 500 by default);
- ``servers[].windows``: ``[{from_s, until_s, latency, failure_rate, failure_status}]``, non-overlapping;
  each overrides what it names while virtual time is in [from_s, until_s);
- ``servers[].calls``: ``{target: PROXY:PORT, authority, connections, timeout_s}`` makes the server a chained
  service: every request it does not fail on purpose makes one call to ``authority`` through ``target``
  (its own outbound proxy), and its answer carries the call's status;
- ``proxies[].route_config``: routes (HTTPRoute / ServiceProfile YAML, core/traffic/route_config.py), as a
  path relative to the scenario file, or inline as one document or a list of documents.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from tether.core.config_file import FieldReader
from tether.core.traffic.route_config import RouteConfig, load_route_yaml, read_route_documents
from tether.sim.apps import ServerSpec, WorkloadSpec
from tether.sim.behaviour import Behaviour, Latency, Window

MS = 1_000_000
S = 1_000_000_000
ARRIVALS = ("poisson", "uniform")
LATENCY_KINDS = ("exponential", "lognormal", "fixed")
WINDOWS_MAX = 64  # a server's windows; each request scans them, so a hostile file cannot make that slow
SIGMA_MAX = 4.0  # a log-normal shape past this puts the p99.9 beyond 10^5 times the median: a typo
LATENCY_MS_MAX = 600_000.0  # ten virtual minutes
CALL_RESPONSE_BYTES = (64, 256)


def http_server_spec(server: FieldReader, base: ServerSpec) -> ServerSpec:
    """``base`` (port, latency_ms, failure_rate, already read) with the experiment fields added."""
    if not any(key in server.data for key in ("latency", "failure_status", "windows")):
        return base  # the older shape: draws exactly as before, so old scenarios keep their hashes
    if "latency" in server.data and "latency_ms" in server.data:
        raise server.fail("latency", "is given with latency_ms", "keep one of the two (latency_ms is the exponential)")
    if "latency" in server.data:
        latency = read_latency(server.child("latency"))
    else:
        latency = Latency(min_ns=base.latency_min_ns, tail_mean_ns=base.latency_tail_mean_ns)
    behaviour = Behaviour(
        latency=latency,
        failure_rate=base.failure_rate,
        failure_status=_status(server, "failure_status", 500),
        windows=_windows(server),
    )
    return replace(base, behaviour=behaviour)


def read_latency(node: FieldReader) -> Latency:
    kind = node.text("kind", "exponential")
    if kind not in LATENCY_KINDS:
        raise node.fail("kind", f"{kind!r} is not a latency model", f"use one of {', '.join(LATENCY_KINDS)}")
    if kind == "fixed":
        node.known("kind", "ms")
        return Latency(kind="fixed", min_ns=_ms(node, "ms", None))
    if kind == "lognormal":
        node.known("kind", "median_ms", "sigma", "min_ms")
        median_ns = _ms(node, "median_ms", None)
        if median_ns <= 0:
            raise node.fail("median_ms", "must be more than 0", "give the median latency in ms, such as 167")
        sigma = node.number("sigma", 0.5, maximum=SIGMA_MAX)
        return Latency(kind="lognormal", median_ns=median_ns, sigma=sigma, min_ns=_ms(node, "min_ms", 0))
    node.known("kind", "min_ms", "tail_mean_ms")
    return Latency(min_ns=_ms(node, "min_ms", 1), tail_mean_ns=_ms(node, "tail_mean_ms", 2))


def _ms(node: FieldReader, key: str, default: float | None) -> int:
    return int(node.number(key, default, maximum=LATENCY_MS_MAX) * MS)


def _status(node: FieldReader, key: str, default: int) -> int:
    value = node.data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 500 <= value <= 599:
        raise node.fail(key, f"{value!r} is not a 5xx status", "give a status from 500 to 599, such as 503")
    return value


def _windows(server: FieldReader) -> tuple[Window, ...]:
    entries = server.items("windows")
    if len(entries) > WINDOWS_MAX:
        raise server.fail("windows", f"has {len(entries)} entries", f"give at most {WINDOWS_MAX}")
    windows: list[Window] = []
    for entry in entries:
        entry.known("from_s", "until_s", "latency", "failure_rate", "failure_status")
        from_ns = int(entry.number("from_s") * S)
        until_ns = int(entry.number("until_s") * S)
        if until_ns <= from_ns:
            raise entry.fail("until_s", f"{until_ns / S:g} is not after from_s", "give an until_s later than from_s")
        if not any(key in entry.data for key in ("latency", "failure_rate", "failure_status")):
            raise entry.fail("", "changes nothing", "give latency, failure_rate or failure_status")
        for earlier in windows:
            if from_ns < earlier.until_ns and earlier.from_ns < until_ns:
                raise entry.fail(
                    "from_s",
                    f"this window overlaps the one from {earlier.from_ns / S:g} s to {earlier.until_ns / S:g} s",
                    "make windows follow one another",
                )
        windows.append(
            Window(
                from_ns=from_ns,
                until_ns=until_ns,
                latency=read_latency(entry.child("latency")) if "latency" in entry.data else None,
                failure_rate=entry.number("failure_rate", maximum=1.0) if "failure_rate" in entry.data else None,
                failure_status=_status(entry, "failure_status", 500) if "failure_status" in entry.data else None,
            )
        )
    return tuple(windows)


def read_calls(server: FieldReader) -> WorkloadSpec | None:
    """A chained service's call to the next service, or None for a plain server."""
    if "calls" not in server.data:
        return None
    calls = server.child("calls")
    calls.known("target", "authority", "connections", "timeout_s")
    if "target" not in calls.data:
        raise calls.fail("target", "missing", "give the outbound proxy this service calls through, as HOST:PORT")
    return WorkloadSpec(
        target=calls.address(calls.data.get("target"), "target"),
        authority=calls.text("authority"),
        rate_per_s=1.0,
        start_ns=0,
        stop_ns=0,  # no arrivals of its own: it calls once per request its server handles
        max_connections=int(calls.number("connections", 256, minimum=1, maximum=100_000)),
        request_bytes=(0, 0),
        response_bytes=CALL_RESPONSE_BYTES,
        chunked_ratio=0.0,
        timeout_ns=int(calls.number("timeout_s", 60, minimum=0.001) * S),
    )


def read_route_config(proxy: FieldReader, key: str) -> RouteConfig | None:
    """The proxy's routes: a path (relative to the scenario file), one document, or a list of documents."""
    value = proxy.data.get(key)
    if value is None:
        return None
    where = f"{proxy.source}: {proxy.path}{key}"
    if isinstance(value, str):
        path = Path(proxy.source).parent / value
        try:
            text = path.read_text()
        except OSError as error:
            problem = f"cannot read {value!r} ({error.strerror or error})"
            fix = "give a path relative to the scenario file, or the documents inline"
            raise proxy.fail(key, problem, fix) from None
        return load_route_yaml(text, str(path))
    documents = [value] if isinstance(value, Mapping) else value
    if not isinstance(documents, list) or not documents:
        raise proxy.fail(key, f"{type(value).__name__} is not routes", "give a path, a document, or a list of them")
    return read_route_documents(documents, where)
