"""Whole-mesh invariants under faults that Hypothesis draws: the seed, and the fault *rates* too.

Topology, after a meshed call: client -> outbound proxy -> inbound proxy (one per app) -> app.
A failure writes the drawn scenario to .tether-failures/ and prints the command that replays it.
"""

from __future__ import annotations

from typing import Any

from fault_draws import faults, report
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.sim.scenario import scenario_from_mapping

HOSTS = ["client", "out", "in-1", "in-2", "app-1", "app-2", "tcp-proxy", "echo"]
LINKS = [
    ("client", "out"),
    ("out", "in-1"),
    ("out", "in-2"),
    ("in-1", "app-1"),
    ("in-2", "app-2"),
    ("tcp-client", "tcp-proxy"),
    ("tcp-proxy", "echo"),
]


def mesh(draw: st.DrawFn) -> dict[str, Any]:
    duration_s = 8.0
    big = draw(st.booleans())  # large bodies with large segments, or small bodies cut into tiny segments
    return {
        "duration_s": duration_s,
        "network": {
            "latency_ms": {
                "min": draw(st.sampled_from([0.05, 0.5, 2.0])),
                "tail_mean": draw(st.sampled_from([0.0, 0.5, 5.0])),
            },
            "loss": draw(st.sampled_from([0.0, 0.0, 0.01, 0.05])),
            "mss": draw(st.sampled_from([1460, 65536] if big else [7, 536])),
        },
        "servers": [
            {
                "host": "app-1",
                "port": 8080,
                "latency_ms": {"min": 1, "tail_mean": draw(st.sampled_from([1, 20]))},
                "failure_rate": draw(st.sampled_from([0.0, 0.1])),
            },
            {"host": "app-2", "port": 8080, "latency_ms": {"min": 1, "tail_mean": 3}},
        ],
        "proxies": [
            {
                "host": "out",
                "port": 4140,
                "service": "app",
                "to": ["in-1:4143", "in-2:4143"],
                "config": {
                    "connect_timeout_ms": 1000,
                    "response_timeout_ms": draw(st.sampled_from([500, 3000])),
                    "max_buffered_bytes": draw(st.sampled_from([1024, 65536])),
                    "protocol": draw(st.sampled_from(["http1", "detect"])),
                },
            },
            {"host": "in-1", "port": 4143, "to": ["app-1:8080"], "config": {"response_timeout_ms": 5000}},
            {
                "host": "tcp-proxy",
                "port": 4140,
                "to": ["echo:9000"],
                "config": {"protocol": draw(st.sampled_from(["detect", "opaque"])), "detect_timeout_ms": 300},
            },
            {"host": "in-2", "port": 4143, "to": ["app-2:8080"], "config": {"response_timeout_ms": 5000}},
        ],
        "clients": [
            {
                "host": "client",
                "target": "out:4140",
                "authority": "app",
                "rate_per_s": draw(st.sampled_from([20, 80])),
                "connections": draw(st.sampled_from([1, 4, 16])),
                "request_bytes": [0, draw(st.sampled_from([0, 70000] if big else [0, 1500]))],
                "response_bytes": [0, draw(st.sampled_from([20000, 150000] if big else [100, 1500]))],
                "timeout_s": 60,
            },
        ],
        # Opaque TCP beside the HTTP mesh: echo sessions (some servers speak first) through a tunnelling proxy.
        "tcp_servers": [{"host": "echo", "port": 9000, "server_first": (server_first := draw(st.booleans()))}],
        "tcp_clients": [
            {
                "host": "tcp-client",
                "target": "tcp-proxy:4140",
                "rate_per_s": 10,
                "server_first": server_first,
                "payload_bytes": [
                    0 if server_first else 1,
                    draw(st.sampled_from([5000, 100_000] if big else [100, 1500])),
                ],
            },
        ],
        "faults": draw(faults(duration_s=duration_s, crashable=HOSTS[1:], links=LINKS)),
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_mesh_invariants_hold_under_drawn_faults(data: st.DataObject, seed: int) -> None:
    mapping = mesh(data.draw)
    scenario = scenario_from_mapping(mapping, "<hypothesis>")
    result = scenario.build(seed).run(scenario.duration_ns)
    assert not result.violations, report(mapping, seed, result.violations, prefix="mesh")
    assert result.requests > 0
    if seed % 5 == 0:  # replaying a seed gives the same run
        again = scenario.build(seed).run(scenario.duration_ns)
        assert again.trace_hash == result.trace_hash, report(
            mapping, seed, ["trace hash differs on replay"], prefix="mesh"
        )
